"""Attention patterns of the top heads for the report's linked views: click a head, see its pattern.

After the analyses, one forward pass over the start of the run's text probe (``VIEW_TOKENS`` tokens) keeps the
full query x key attention map of the top ``TOP_PER_MAP`` heads of every map (``FullMaps``, at most
``MAX_HEADS`` heads). Stacks whose keys are not tokens (a speech encoder's frames, a vision tower's patches)
get no view. The maps live in the report only, rounded to 3 decimals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from headscope.capture.engine import Scope
from headscope.capture.reducers import FullMaps
from headscope.models.load import Loaded
from headscope.probes import decoding
from headscope.probes import text as probe_text
from headscope.results import Results

VIEW_TOKENS = 48
TOP_PER_MAP = 3
MAX_HEADS = 48
DECODED_TOKENS = 16


@dataclass
class Views:
    """Per stack, the query and key token labels; per ``"stack:layer.head"``, its (queries, keys) map."""

    labels: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    maps: dict[str, list[list[float]]] = field(default_factory=dict)
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"labels": self.labels, "maps": self.maps, "note": self.note}


def key(stack: str, layer: int, head: int) -> str:
    return f"{stack}:{layer}.{head}"


def top_heads(results: Results, stacks: set[str]) -> list[tuple[str, int, int]]:
    """The top ``TOP_PER_MAP`` heads of every map of the finished analyses on ``stacks``, at most ``MAX_HEADS``."""
    chosen: dict[tuple[str, int, int], None] = {}
    for _, result in results.items():
        if result.status != "ok":
            continue
        for (_, stack), head_map in result.maps.items():
            if stack in stacks and head_map.notable != "label":
                for layer, head, _ in head_map.top(TOP_PER_MAP):
                    chosen[(stack, int(layer), int(head))] = None
    return list(chosen)[:MAX_HEADS]


def attention_views(loaded: Loaded, scope: Scope, results: Results, text: str | None = None) -> Views:
    """The patterns of the top heads on the first ``VIEW_TOKENS`` tokens of ``text`` (the shipped prose by
    default); an empty :class:`Views` with a note where the model's input is not text."""
    model, processor, info = loaded
    tokenizer = getattr(processor, "tokenizer", processor)
    if info.kind not in ("decoder", "encoder", "encoder-decoder") or not callable(tokenizer) or hasattr(
            processor, "feature_extractor"):
        return Views(note=f"no pattern views for a {info.kind} model whose input is not text")
    inputs = probe_text.encode(tokenizer, probe_text.prose() if text is None else text, info.max_tokens,
                               VIEW_TOKENS)
    inputs = {name: tensor.to(model.device) for name, tensor in inputs.items()}
    source = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    labels = {}
    if info.kind == "encoder-decoder":
        decoded = decoding.own_output(model, inputs, DECODED_TOKENS)
        inputs["decoder_input_ids"] = decoded.sequence
        target = tokenizer.convert_ids_to_tokens(decoded.sequence[0].tolist())
        labels = {"encoder": (source, source), "decoder": (target, target), "cross": (target, source)}
    else:
        labels = {stack: (source, source) for stack in scope.stacks if not stack.startswith("vision")}
    heads = top_heads(results, set(labels))
    views = Views(note=f"patterns of {len(heads)} top heads on the first {inputs['input_ids'].shape[1]} tokens "
                       "of the probe")
    if not heads:
        return views
    reducer = FullMaps(heads, budget_bytes=64 * 2**20)
    with torch.no_grad(), scope.capture(reducer):
        model(**inputs)
    for (_, stack, layer, head), probs in reducer.result().items():
        views.maps[key(stack, layer, head)] = probs[0].round(decimals=3).tolist()
    views.labels = {stack: {"queries": list(queries), "keys": list(keys)}
                    for stack, (queries, keys) in labels.items()}
    return views
