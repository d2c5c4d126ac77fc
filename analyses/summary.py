"""``summary``: where each head's attention goes, in one pass: mass on the first token and entropy.

For every attention stack of the model, per head:
- ``first_token_mass`` = mean over queries t > 0 of A[l, h, t, 0] (the first real token; the query at
  position 0 itself is left out);
- ``entropy`` = mean over queries of -sum_s A[l, h, t, s] log A[l, h, t, s], in nats.

Text models read the probe in one forward pass; encoder-decoders decode it greedily, capturing the
encoder, the decoder's self-attention and its cross-attention.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from headscope.capture.reducers import Entropy, KeyMass
from headscope.errors import HeadscopeError
from headscope.probes import decoding
from headscope.registry import Context, Parameters, register
from headscope.results import AnalysisResult, HeadMap

MAX_NEW_TOKENS = 64
DESCRIPTIONS = {
    "first_token_mass": "mean attention on the first token (queries after it)",
    "entropy": "mean attention entropy in nats",
}


@dataclass(frozen=True)
class Params(Parameters):
    """The parameters of ``summary``.

    Attributes:
        max_new_tokens: tokens an encoder-decoder decodes.
    """

    analysis = "summary"
    applies: ClassVar[Mapping[str, tuple[str, ...]]] = {"max_new_tokens": ("encoder-decoder",)}
    max_new_tokens: int = MAX_NEW_TOKENS

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise HeadscopeError(f"summary.max_new_tokens must be at least 1, got {self.max_new_tokens}")


# Not part of a default run: sinks' sink_mass is first_token_mass, and patterns has entropy; run it by name for the
# two maps in one cheap pass (and for encoder-decoders' decoder and cross-attention entropy).
@register("summary", kinds=("decoder", "encoder", "encoder-decoder"), params=Params, main_metric="first_token_mass",
          description="per-head attention mass on the first token and entropy, in one pass", default=False,
          cost="about 3 s on smollm2-135m, 1 s on whisper-tiny.en (2 CPU cores)")
def run(context: Context) -> AnalysisResult:
    started = time.perf_counter()
    params = Params.read(context.params)
    probe = context.probe()
    model = context.loaded.model
    mass, entropy = KeyMass(positions=(0,)), Entropy()
    inputs = {name: tensor.to(model.device) for name, tensor in probe.inputs.items()}
    summary: dict = {"input": probe.source, "tokens": len(probe.tokens)}
    with torch.no_grad(), context.scope.capture(mass, entropy):
        if probe.generate:
            generated = model.generate(**inputs, max_new_tokens=params.max_new_tokens, do_sample=False,
                                       **decoding.cache_for_generate(model))
            processor = context.loaded.processor
            summary["output"] = processor.batch_decode(generated, skip_special_tokens=True)[0].strip()
            summary["tokens"] = int(generated.shape[1])
        else:
            model(**inputs)
    result = AnalysisResult(name="summary", params={"positions": [0], "max_new_tokens": params.max_new_tokens})
    for metric, reducer in (("first_token_mass", mass), ("entropy", entropy)):
        for stack, values in reducer.result().items():
            result.add_map(metric, HeadMap(values=values, stack=stack, description=DESCRIPTIONS[metric],
                                           unit="nats" if metric == "entropy" else "share"))
    for stack in context.scope.stacks:
        top = result.top_heads("first_token_mass", k=3, stack=stack)
        summary[f"top_first_token_mass_{stack}"] = [f"{layer}.{head}={value:.3f}" for layer, head, value in top]
    result.summary = summary
    result.seconds = time.perf_counter() - started
    return result
