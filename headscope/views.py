"""Attention patterns of the top heads for the report's linked views: click a head, see its pattern.

After the analyses, a forward pass keeps the full query x key attention map of the top ``TOP_PER_MAP`` heads of
every map (``FullMaps``, at most ``MAX_HEADS`` heads), on the probe each map was measured on:
- the patterns analysis's induction, previous- and duplicate-token maps: its first repeated random-token
  sequence ([BOS] + r + r, the same tokens the scores came from; r cut to ``REPEATED_LENGTH``), so an induction
  head is seen inducting;
- every other map of a text model: the first ``VIEW_TOKENS`` tokens of the run's text (the shipped prose by
  default);
- a speech model (Whisper): the decoder's self-attention over its transcript, and its cross-attention over the
  clip's encoder frames, with the frames' time on the key axis (20 ms a frame). The encoder's own frames x frames
  maps are too large for a report and get no view.
Token labels are readable text (each token as the tokenizer decodes it alone: no ``Ġ`` or ``▁``). Stacks whose
keys are not tokens or frames (a vision tower's patches) get no view. The maps live in the report only, rounded
to 3 decimals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from headscope.capture.engine import Scope
from headscope.capture.reducers import FullMaps
from headscope.models.load import Loaded
from headscope.probes import decoding
from headscope.probes import repeated as repeated_probe
from headscope.probes import text as probe_text
from headscope.results import Results

VIEW_TOKENS = 48
TOP_PER_MAP = 3
MAX_HEADS = 48
DECODED_TOKENS = 16
SPEECH_TOKENS = 48
REPEATED_LENGTH = 64
"""The repeated view's r is at most this long (the analysis's r, cut): its maps grow with the square of it."""
FRAME_SECONDS = 0.02  # Whisper's encoder: one position per 20 ms of audio
REPEATED_METRICS = ("induction", "previous_token", "duplicate_token")
"""The maps of the ``patterns`` analysis measured on its repeated random-token probe."""


@dataclass
class Views:
    """Per view stack, the query and key labels (and, for audio, the key axis's title); per ``"stack:layer.head"``,
    its (queries, keys) map. A view stack or map key of another probe than the run's text starts with the probe's
    name and ``/`` (``"repeated/self"``, ``"repeated/self:3.1"``); ``routes`` says which maps
    (``"analysis/metric"``) use which probe, ``notes`` what each probe is."""

    labels: dict[str, dict[str, Any]] = field(default_factory=dict)
    maps: dict[str, list[list[float]]] = field(default_factory=dict)
    note: str = ""
    notes: dict[str, str] = field(default_factory=dict)
    routes: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"labels": self.labels, "maps": self.maps, "note": self.note, "notes": self.notes,
                "routes": self.routes}


def key(stack: str, layer: int, head: int) -> str:
    return f"{stack}:{layer}.{head}"


def top_heads(results: Results, stacks: set[str], only: set[str] | None = None,
              leave_out: set[str] = frozenset()) -> list[tuple[str, int, int]]:
    """The top ``TOP_PER_MAP`` heads of every map (``"analysis/metric"`` in ``only`` when given, not in
    ``leave_out``) of the finished analyses on ``stacks``, at most ``MAX_HEADS``."""
    chosen: dict[tuple[str, int, int], None] = {}
    for name, result in results.items():
        if result.status != "ok":
            continue
        for (metric, stack), head_map in result.maps.items():
            route = f"{name}/{metric}"
            if stack not in stacks or head_map.notable == "label" or route in leave_out or (
                    only is not None and route not in only):
                continue
            for layer, head, _ in head_map.top(TOP_PER_MAP):
                chosen[(stack, int(layer), int(head))] = None
    return list(chosen)[:MAX_HEADS]


def attention_views(loaded: Loaded, scope: Scope, results: Results, text: str | None = None,
                    probe: Any = None) -> Views:
    """The patterns of the top heads on the probes their maps came from (see the module's docstring); an empty
    :class:`Views` with a note where the model's input is neither text nor speech. ``probe`` is the run's input
    (:func:`headscope.probes.inputs.build`); a speech model needs it."""
    _, processor, info = loaded
    tokenizer = getattr(processor, "tokenizer", processor)
    if info.kind == "encoder-decoder" and hasattr(processor, "feature_extractor"):
        if probe is None or getattr(probe, "waveform", None) is None:
            return Views(note="no pattern views: the speech input was not given")
        return _speech_views(loaded, scope, results, probe)
    if info.kind not in ("decoder", "encoder", "encoder-decoder") or not callable(tokenizer):
        return Views(note=f"no pattern views for a {info.kind} model whose input is not text")
    views = Views()
    routes = {f"patterns/{metric}": "repeated" for metric in REPEATED_METRICS}
    if info.kind in ("decoder", "encoder") and "patterns" in results and results["patterns"].status == "ok":
        try:
            _repeated_views(loaded, scope, results, set(routes), views)
            views.routes.update(routes)
        except Exception as error:  # the prose views are still worth having
            views.notes["repeated"] = f"no repeated-token views: {type(error).__name__}: {error}".splitlines()[0]
    _text_views(loaded, scope, results, text, set(views.routes), views)
    return views


def _text_views(loaded: Loaded, scope: Scope, results: Results, text: str | None, leave_out: set[str],
                views: Views) -> None:
    model, processor, info = loaded
    tokenizer = getattr(processor, "tokenizer", processor)
    inputs = probe_text.encode(tokenizer, probe_text.prose() if text is None else text, info.max_tokens,
                               VIEW_TOKENS)
    inputs = {name: tensor.to(model.device) for name, tensor in inputs.items()}
    source = probe_text.readable(tokenizer, inputs["input_ids"][0].tolist())
    if info.kind == "encoder-decoder":
        decoded = decoding.own_output(model, inputs, DECODED_TOKENS)
        inputs["decoder_input_ids"] = decoded.sequence
        target = probe_text.readable(tokenizer, decoded.sequence[0].tolist())
        labels = {"encoder": (source, source), "decoder": (target, target), "cross": (target, source)}
    else:
        labels = {stack: (source, source) for stack in scope.stacks if not stack.startswith("vision")}
    heads = top_heads(results, set(labels), leave_out=leave_out)
    views.note = (f"patterns of {len(heads)} top heads on the first {inputs['input_ids'].shape[1]} tokens of the "
                  f"{'text' if text is not None else 'prose probe'}")
    if heads:
        _record(scope, model, inputs, heads, labels, "", views)


def _repeated_views(loaded: Loaded, scope: Scope, results: Results, routes: set[str], views: Views) -> None:
    """The repeated-token heads on the patterns analysis's own first sequence ([BOS] + r + r)."""
    model, processor, info = loaded
    tokenizer = getattr(processor, "tokenizer", processor)
    params = results["patterns"].params
    stack = params.get("stack", "self")
    vocab = getattr(model.config.get_text_config(), "vocab_size", None)
    length = min(int(params.get("length", repeated_probe.DEFAULT_LENGTH)), REPEATED_LENGTH)
    probe = repeated_probe.build(tokenizer, length, 1, int(params.get("seed", 0)), info.max_tokens, vocab)
    heads = top_heads(results, {stack}, only=routes)
    tokens = probe_text.readable(tokenizer, probe.input_ids[0].tolist())
    views.notes["repeated"] = (f"on the first repeated random-token sequence of patterns ([BOS] + r + r, "
                               f"{probe.tokens} tokens), where these scores were measured"
                               + ("" if probe.length == int(params.get("length", probe.length)) else
                                  f"; r cut to its first {probe.length} tokens"))
    if heads:
        inputs = {"input_ids": probe.input_ids.to(model.device),
                  "attention_mask": probe.attention_mask.to(model.device)}
        _record(scope, model, inputs, heads, {stack: (tokens, tokens)}, "repeated", views)


def _speech_views(loaded: Loaded, scope: Scope, results: Results, probe: Any) -> Views:
    """Whisper: the decoder's self-attention over its transcript and its cross-attention over the clip's frames."""
    model, processor, _ = loaded
    tokenizer = getattr(processor, "tokenizer", processor)
    inputs = {name: tensor.to(model.device) for name, tensor in probe.inputs.items()}
    decoded = decoding.own_output(model, inputs, SPEECH_TOKENS)
    inputs["decoder_input_ids"] = decoded.sequence
    target = probe_text.readable(tokenizer, decoded.sequence[0].tolist())
    window = getattr(model.config, "max_source_positions", 1500)  # Whisper hears at most 30 s
    frames = min(window, max(1, math.ceil(len(probe.waveform) / 16000 / FRAME_SECONDS)))
    times = [f"{index * FRAME_SECONDS:.2f} s" for index in range(frames)]
    labels = {"decoder": (target, target), "cross": (target, times)}
    heads = top_heads(results, set(labels))
    views = Views(note=f"patterns of {len(heads)} top heads: the decoder over its {len(target)} tokens, and its "
                       f"cross-attention over the clip's {frames} encoder frames ({FRAME_SECONDS * 1000:.0f} ms each)")
    if heads:
        _record(scope, model, inputs, heads, labels, "", views, crop_keys=frames)
        views.labels["cross"]["key_title"] = "audio time (encoder frame)"
    return views


def _record(scope: Scope, model: Any, inputs: dict[str, torch.Tensor], heads: list[tuple[str, int, int]],
            labels: dict[str, tuple[list[str], list[str]]], probe: str, views: Views,
            crop_keys: int | None = None) -> None:
    """One forward pass of ``inputs`` keeping the full maps of ``heads`` into ``views`` (keys cut to ``crop_keys``
    for cross-attention over audio frames), under the probe's prefix."""
    prefix = f"{probe}/" if probe else ""
    reducer = FullMaps(heads, budget_bytes=64 * 2**20)
    with torch.no_grad(), scope.capture(reducer):
        model(**inputs)
    for (_, stack, layer, head), probs in reducer.result().items():
        rows = probs[0]
        if crop_keys is not None and stack == "cross":
            rows = rows[:, :crop_keys]
        views.maps[prefix + key(stack, layer, head)] = rows.round(decimals=3).tolist()
    for stack, (queries, keys) in labels.items():
        views.labels[prefix + stack] = {"queries": list(queries), "keys": list(keys)}
