"""headscope: inspect the attention heads of Hugging Face transformers models.

    import headscope
    model, tokenizer, info = headscope.load("smollm2-135m")
    scope = headscope.Scope(model)
    mass, entropy = headscope.KeyMass(), headscope.Entropy()
    with scope.capture(mass, entropy):
        model(**tokenizer("The lighthouse stood on the headland.", return_tensors="pt"))
    mass.result()["self"]  # (layers, heads) mean attention on the first token
"""

from headscope._version import __version__
from headscope.capture.engine import Scope
from headscope.capture.gates import Gates
from headscope.capture.reducers import (
    ArgmaxKey,
    Entropy,
    FullMaps,
    KeyMass,
    LastRow,
    MeanDistance,
    OffsetMass,
    Reducer,
)
from headscope.errors import HeadscopeError
from headscope.models.load import Loaded, ModelInfo, load
from headscope.registry import list_analyses
from headscope.results import AnalysisResult, HeadMap, Results
from headscope.runner import RunOptions, analyze

__all__ = [
    "AnalysisResult",
    "ArgmaxKey",
    "Entropy",
    "FullMaps",
    "Gates",
    "HeadMap",
    "HeadscopeError",
    "KeyMass",
    "LastRow",
    "Loaded",
    "MeanDistance",
    "ModelInfo",
    "OffsetMass",
    "Reducer",
    "Results",
    "RunOptions",
    "Scope",
    "__version__",
    "analyze",
    "list_analyses",
    "load",
]
