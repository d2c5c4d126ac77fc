"""headscope: inspect the attention heads of Hugging Face transformers models.

    import headscope
    result = headscope.run("sinks", "smollm2-135m")   # one analysis, one result
    result.plot("sink_score")                         # a layer x head heatmap (result.plot(): every figure)
    result.top_heads()                                # the most notable heads of the main metric

    patterns = headscope.patterns_of("smollm2-135m", "The cat sat on the mat.", heads=[(3, 2)])
    patterns.plot(3, 2)                               # one head's token x token pattern

Underneath, :class:`Scope` captures per-head statistics from an unmodified model through reducers:

    model, tokenizer, info = headscope.load("smollm2-135m")
    mass = headscope.KeyMass()
    with headscope.Scope(model).capture(mass):
        model(**tokenizer("The lighthouse stood on the headland.", return_tensors="pt"))
    mass.result()["self"]  # (layers, heads) mean attention on the first token
"""

from headscope._version import __version__
from headscope.api import Patterns, patterns_of, run
from headscope.capture.engine import Scope
from headscope.capture.gates import Gates
from headscope.capture.reducers import (
    ArgmaxKey,
    Entropy,
    FullMaps,
    KernelCall,
    KeyMass,
    LastRow,
    MeanDistance,
    OffsetMass,
    Recorder,
    Reducer,
)
from headscope.errors import HeadscopeError
from headscope.models.load import Loaded, ModelInfo, load
from headscope.registry import Parameters, list_analyses, register
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
    "KernelCall",
    "KeyMass",
    "LastRow",
    "Loaded",
    "MeanDistance",
    "ModelInfo",
    "OffsetMass",
    "Parameters",
    "Patterns",
    "Recorder",
    "Reducer",
    "Results",
    "RunOptions",
    "Scope",
    "__version__",
    "analyze",
    "list_analyses",
    "load",
    "patterns_of",
    "register",
    "run",
]
