"""``sinks``: attention sinks per head, the tokens that take the attention, massive activations, and
cross-attention on non-content source tokens.

For every attention stack of the model, per head (formulas and references: ``docs/analyses/sinks.md``):

- ``sink_mass`` = mean over queries t that can see S, t not in S, of sum_{s in S} A[l, h, t, s]; S is the
  first token by default (``sink_positions``: StreamingLLM keeps the first 4; ``"detected"``: the sink
  tokens found below, measured in a second pass);
- ``sink_score`` = alpha[l, h, 0] of Gu et al. (2024), "When Attention Sink Emerges in Language Models":
  1/T sum_t A[l, h, t, 0] over the queries that can see the first token, t = 0 included. A head with
  alpha > eps (0.3) is a sink head; the sink rate is 100 * mean over inputs, layers and heads of
  1[alpha > eps];
- ``residual_mass`` = mean over queries of 1 - sum_s A[l, h, t, s], kept only when some head withholds
  mass (a learned sink logit such as GPT-OSS's ``s_aux``);
- cross-attention (the NLLB-200 sink study): ``noncontent_mass`` on the non-content source positions N (text
  sources: end of sequence, language tags, punctuation, special and whitespace-only tokens; audio sources:
  the padding after the clip and its silent frames), ``entropy`` of the raw rows and ``filtered_entropy`` of
  the rows renormalised over content positions.

Tables: ``layers`` (per layer: mean sink mass and score, share of heads over eps), ``sink_tokens``
(positions that receive more than ``token_threshold`` of the attention, averaged over heads and the
queries that see them), ``attention_by_position`` (the same, averaged over layers too),
``massive_activations`` (Sun et al. 2024, "Massive Activations in Large Language Models") and
``source_tokens`` (text sources) or ``source_frames`` (audio sources). Text models read the probe in one
forward pass; encoder-decoders decode it greedily. Vision-language models decode a shapes picture's prompt
greedily and read the prompt and continuation back in one pass: the maps above cover the language stack
(``self``) and the vision tower (``vision``), and :mod:`headscope.analyses.sinks_vlm` adds the attention on
image tokens, the visual sink tokens and the image-centric heads of Kang et al. (ICLR 2025).
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from headscope import distributed, plotting
from headscope.analyses import sinks_vlm
from headscope.analyses.sink_reducers import FilteredEntropy, KeyReceived, ResidualMass, SinkMass
from headscope.capture.reducers import Entropy, KeyMass, Reducer
from headscope.errors import HeadscopeError
from headscope.probes import audio as probe_audio
from headscope.probes import decoding
from headscope.probes import text as probe_text
from headscope.probes.text import noncontent
from headscope.registry import Context, Parameters, register
from headscope.results import AnalysisResult, HeadMap

Protocol = Literal["prose", "gu"]
GU_TOKENS = 64  # Gu et al. truncate each prompt to 64 tokens and measure one prefill
RESIDUAL_FLOOR = 1e-4  # residual mass below this on every head is float rounding: no learned sink
MAX_TABLE_ROWS_PER_LAYER = 16  # massive activations listed per layer, largest first
DESCRIPTIONS = {
    "sink_mass": "mean attention mass on the sink set S (queries that can see S, outside it)",
    "sink_score": "Gu et al.'s alpha: mean attention on the first token over the queries that can see it",
    "residual_mass": "mean attention withheld by a learned sink logit: 1 - sum of the row",
    "noncontent_mass": "mean cross-attention mass on non-content source positions",
    "entropy": "mean cross-attention entropy in nats, raw rows",
    "filtered_entropy": "mean cross-attention entropy in nats, rows renormalised over content tokens",
}
NO_SOURCE_TOKENS = ("not applicable: the source is neither tokens nor a waveform headscope read, so no "
                    "non-content positions are known")
# Language tags of multilingual translation models: >>fra<<, __en__, eng_Latn, <|en|>.
DETECTED = "detected"


@dataclass(frozen=True)
class Params(Parameters):
    """The parameters of ``sinks`` (``Context.params`` overrides them).

    Attributes:
        sink_positions: the sink set S of ``sink_mass``: positions from each input's first token, or
            ``"detected"`` for the positions that some layer of the stack finds as sink tokens (the first
            token where none is found).
        eps: sink-head threshold on alpha (Gu et al.: 0.3).
        protocol: ``"prose"`` (the probe in one pass) or ``"gu"`` (inputs cut to 64 tokens: each prose
            paragraph, or the user's text, one prefill each).
        token_threshold: a position is a sink token in a layer when it receives more than this share.
        min_queries: positions seen by fewer queries (the last ones in a causal model) are not judged.
        massive_threshold: |x| above which an activation can be massive (Sun et al.: 100).
        massive_ratio: |x| / median |x| of the layer above which it can be massive (about 1000).
        max_new_tokens: tokens decoded by encoder-decoders and vision-language models (0: the prompt alone).
        silence_db: audio sources: a 20 ms encoder frame of the clip is silence, hence non-content, when its RMS
            lies more than this many dB below the clip's loudest frame (0: padding alone is non-content).
        top_k: sink heads listed per stack in the summary.
        visual_tau: vision-language models: |phi| above which a dimension of the weight-free RMS-normalised state
            is massive (Kang et al.: 20), for the sink dimensions and the visual sink tokens.
        visual_min_layer: the first language layer whose input state is searched for visual sinks (Kang et al.: 2).
        centric_ratio: a head is image-centric when attention on visual sinks / on image tokens is at most this.
        centric_mass: ... and its attention on image tokens is at least this.
    """

    analysis = "sinks"
    applies: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "max_new_tokens": ("encoder-decoder", "vision-language"), "silence_db": ("audio",),
        **dict.fromkeys(("visual_tau", "visual_min_layer", "centric_ratio", "centric_mass"), ("vision-language",))}
    sink_positions: tuple[int, ...] | Literal["detected"] = (0,)
    eps: float = 0.3
    protocol: Protocol = "prose"
    token_threshold: float = 0.1
    min_queries: int = 8
    massive_threshold: float = 100.0
    massive_ratio: float = 1000.0
    max_new_tokens: int = 64
    silence_db: float = 40.0
    top_k: int = 5
    visual_tau: float = 20.0
    visual_min_layer: int = 2
    centric_ratio: float = 0.5
    centric_mass: float = 0.2

    def check(self) -> None:
        params = self
        positions = params.sink_positions
        if positions != DETECTED and (not positions or min(positions) < 0):
            raise HeadscopeError(f"sinks.sink_positions must be non-negative positions or 'detected', got "
                                 f"{positions!r}")
        if not 0 < params.eps < 1 or not 0 < params.token_threshold < 1:
            raise HeadscopeError("eps and token_threshold must lie between 0 and 1")
        if not (params.visual_tau > 0 and params.visual_min_layer >= 0 and 0 <= params.centric_ratio <= 1
                and 0 <= params.centric_mass <= 1 and params.max_new_tokens >= 0 and params.silence_db >= 0):
            raise HeadscopeError("sinks needs visual_tau > 0, visual_min_layer >= 0, centric_ratio and centric_mass "
                                 "between 0 and 1, and max_new_tokens and silence_db >= 0")


@dataclass
class _Pass:
    """One input and what the capture made of it."""

    inputs: dict[str, torch.Tensor]
    generate: bool
    reducers: dict[str, Reducer] = field(default_factory=dict)
    received: KeyReceived = field(default_factory=KeyReceived)
    alpha: dict[str, np.ndarray] = field(default_factory=dict)  # per stack, this input's sink scores
    sink_sets: dict[str, list[int]] = field(default_factory=dict)  # per stack, the detected S of sink_mass
    output: str | None = None  # what an encoder-decoder decoded
    waveform: np.ndarray | None = None  # an audio source's clip
    frames: list[str] | None = None  # an audio source: why each encoder position is non-content ("" if not)
    hidden: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    labels: dict[str, list[str]] = field(default_factory=dict)


@register("sinks", kinds=("decoder", "encoder", "encoder-decoder", "vision-language"), params=Params,
          main_metric="sink_score",
          description="attention sinks: sink mass and Gu et al.'s sink rate per head, sink tokens, massive "
                      "activations, cross-attention on non-content tokens, visual sinks and image-centric heads",
          figures=lambda result: figures(result),
          cost="about 3 s on smollm2-135m, 2 s on whisper-tiny.en, 7 s on synthetic-llava-smollm2 (2 CPU cores)")
def run(context: Context) -> AnalysisResult:
    started = time.perf_counter()
    params = Params.read(context.params)
    passes, source = _passes(context, params)
    tokenizer = _tokenizer(context)
    mine = distributed.split(passes)  # under torchrun, each process measures its share of the inputs
    for one in mine:
        _measure(context, params, one, tokenizer)
    passes = distributed.gathered(mine)
    image = None
    if context.loaded.info.kind == "vision-language":
        one = passes[0]
        image = sinks_vlm.measure(context, params, one.inputs, one.hidden["self"], one.labels["self"])
        one.labels["self"] = image.labels
    found = _sink_tokens(passes, params)
    if params.sink_positions == DETECTED:
        mine = distributed.split(list(enumerate(passes)))
        for index, one in mine:
            _measure_detected(context, params, one, found[found["input"] == index])
        measured = distributed.gathered([(one.sink_sets, one.reducers["sink_mass"]) for _, one in mine])
        for one, (sink_sets, mass) in zip(passes, measured, strict=True):
            one.sink_sets, one.reducers["sink_mass"] = sink_sets, mass
    result = AnalysisResult(name="sinks", params={**params.__dict__, "gu_tokens": GU_TOKENS})
    summary: dict[str, Any] = {"input": source, "passes": len(passes),
                               "tokens": [len(next(iter(p.labels.values()))) for p in passes]}
    if passes[0].output is not None:
        summary["output"] = passes[0].output
    merged = _merged(passes)
    for metric, reducer in merged.items():
        for stack, values in reducer.result().items():
            if metric == "residual_mass" and not np.nanmax(np.abs(values)) > RESIDUAL_FLOOR:
                continue
            result.add_map(metric, HeadMap(values=values, stack=stack, description=DESCRIPTIONS[metric],
                                           unit="nats" if metric.endswith("entropy") else "share"))
    if "residual_mass" not in result.metrics():
        summary["residual_mass"] = f"none: every row sums to 1 within {RESIDUAL_FLOOR:g} (no learned sink)"
    summary.update(_sink_rates(passes, params, result, context.scope.stacks))
    result.tables["layers"] = _layers_table(passes, params, result)
    result.tables["sink_tokens"] = found
    result.tables["attention_by_position"] = _by_position(passes, params, result.tables["sink_tokens"])
    result.tables["massive_activations"] = _massive(passes, params)
    summary.update(_token_summary(result.tables["sink_tokens"], result.tables["massive_activations"]))
    for stack, positions in passes[0].sink_sets.items():
        summary[f"sink_set_{stack}"] = [f"{p} {_label(passes[0].labels.get(stack, []), p)!r}" for p in positions]
    if image is not None:
        for metric, head_map in image.maps.items():
            result.add_map(metric, head_map)
        result.tables.update(image.tables)
        summary.update(image.summary)
    if "cross" in context.scope.stacks:
        summary.update(_cross_summary(result))
        if "input_ids" in passes[0].inputs:
            result.tables["source_tokens"] = _source_table(passes[0], tokenizer)
        elif passes[0].frames is not None:
            result.tables["source_frames"] = _frames_table(passes[0].frames)
            summary["noncontent_set_cross"] = _frames_summary(result.tables["source_frames"])
    result.summary = summary
    result.seconds = time.perf_counter() - started
    return result


# --- inputs -------------------------------------------------------------------------------------------------


def _tokenizer(context: Context):
    processor = context.loaded.processor
    return getattr(processor, "tokenizer", processor)


def _passes(context: Context, params: Params) -> tuple[list[_Pass], str]:
    """The inputs to measure: the probe in one pass, or under Gu et al.'s protocol, 64-token inputs."""
    loaded = context.loaded
    probe = context.probe()
    if loaded.info.kind == "vision-language":
        inputs, new = sinks_vlm.decoded(loaded.model, context.scope, probe.inputs, params.max_new_tokens)
        source = (f"{probe.source}; {len(new)} token(s) decoded greedily, the prompt and all but the last read back "
                  "in one pass")
        if params.protocol == "gu":
            source += " (Gu et al.'s protocol needs text; the image prompt is measured as it is)"
        return [_Pass(inputs, False, output=_tokenizer(context).decode(new, skip_special_tokens=True).strip())], source
    if params.protocol == "gu" and "input_ids" in probe.inputs:
        user = context.text is not None or context.input_path is not None
        if user:
            chosen = [{name: tensor[:, :GU_TOKENS] for name, tensor in probe.inputs.items()}]
        else:
            tokenizer = _tokenizer(context)
            paragraphs = [p for p in probe_text.prose().split("\n\n") if p.strip()]
            chosen = [probe_text.encode(tokenizer, p, loaded.info.max_tokens, GU_TOKENS) for p in paragraphs]
        source = f"{probe.source}, Gu et al. protocol: {len(chosen)} input(s) of at most {GU_TOKENS} tokens"
        return [_Pass(inputs, probe.generate) for inputs in chosen], source
    if params.protocol == "gu":
        source = f"{probe.source} (Gu et al.'s protocol needs text; the audio is measured as it is)"
        return [_Pass(probe.inputs, probe.generate, waveform=probe.waveform)], source
    return [_Pass(probe.inputs, probe.generate, waveform=probe.waveform)], probe.source


# --- capture ------------------------------------------------------------------------------------------------


def _measure(context: Context, params: Params, one: _Pass, tokenizer) -> None:
    """Capture one input: per-head reducers and received attention, then each layer's hidden states."""
    model, stacks = context.loaded.model, context.scope.stacks
    positions = (0,) if params.sink_positions == DETECTED else params.sink_positions
    one.reducers = {"sink_mass": SinkMass(positions=positions),
                    "sink_score": SinkMass(positions=(0,), exclude_own=False),
                    "residual_mass": ResidualMass()}
    inputs = {name: tensor.to(model.device) for name, tensor in one.inputs.items()}
    source_ids = inputs["input_ids"][0].tolist() if "input_ids" in inputs else None
    reasons = None
    if "cross" in stacks and source_ids is not None:
        reasons = noncontent(tokenizer, source_ids)
    elif "cross" in stacks and one.waveform is not None:  # Whisper: 10 ms mel frames, then a stride-2 convolution
        positions = inputs["input_features"].shape[-1] // 2
        one.frames = reasons = probe_audio.frame_reasons(one.waveform, probe_audio.SAMPLE_RATE, positions,
                                                         silence_db=params.silence_db)
    if reasons is not None:
        exclude = torch.tensor([bool(r) for r in reasons], device=model.device)[None]
        one.reducers["noncontent_mass"] = KeyMass(key_mask=exclude, exclude_own=False, stacks=("cross",))
        one.reducers["entropy"] = Entropy(stacks=("cross",))
        one.reducers["filtered_entropy"] = FilteredEntropy(exclude, stacks=("cross",))
    with torch.no_grad(), context.scope.capture(*one.reducers.values(), one.received):
        if one.generate:
            # the start tokens and the output, as the decoder read and produced them (Whisper's generate leaves
            # its start tokens and the end of text out of what it returns)
            sequences = decoding.own_output(model, inputs, params.max_new_tokens).sequence
        else:
            outputs = model(**inputs, output_hidden_states=True, **_few_logits(model))
    one.alpha = one.reducers["sink_score"].result()
    if one.generate:  # hidden states of the decoded sequence, outside the capture
        with torch.no_grad():
            outputs = model(**inputs, decoder_input_ids=sequences, output_hidden_states=True)
        one.hidden = {"encoder": outputs.encoder_hidden_states, "decoder": outputs.decoder_hidden_states}
        target = _texts(tokenizer, sequences[0].tolist())
        one.output = tokenizer.decode(sequences[0], skip_special_tokens=True).strip()
        source = _texts(tokenizer, source_ids) if source_ids is not None else _frames(outputs.encoder_hidden_states)
        one.labels = {"encoder": source, "cross": source, "decoder": target}
    else:
        stack = next(iter(stacks))
        one.hidden = {stack: outputs.hidden_states}
        one.labels = {stack: _texts(tokenizer, source_ids)}


def _measure_detected(context: Context, params: Params, one: _Pass, found: pd.DataFrame) -> None:
    """Sink mass on the detected sink tokens: a second capture, S per stack = the positions any of its layers
    found (the first token where none)."""
    model = context.loaded.model
    reducers = []
    for stack in context.scope.stacks:
        positions = sorted(set(found.loc[found["stack"] == stack, "position"].tolist())) or [0]
        width = max(len(one.labels.get(stack, [])), positions[-1] + 1)
        mask = torch.zeros(1, width, dtype=torch.bool, device=model.device)
        mask[0, positions] = True
        reducers.append(SinkMass(key_mask=mask, stacks=(stack,)))
        one.sink_sets[stack] = positions
    inputs = {name: tensor.to(model.device) for name, tensor in one.inputs.items()}
    with torch.no_grad(), context.scope.capture(*reducers):
        if one.generate:
            model.generate(**inputs, max_new_tokens=params.max_new_tokens, do_sample=False,
                           **decoding.cache_for_generate(model))
        else:
            model(**inputs, **_few_logits(model))
    for reducer in reducers[1:]:
        reducers[0].merge(reducer)
    one.reducers["sink_mass"] = reducers[0]


def _few_logits(model) -> dict[str, int]:
    """Ask a causal LM for the last position's logits only: the analysis needs none, and a large vocabulary
    (Gemma's 262k) would otherwise cost more than the attention."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _texts(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([token_id]) for token_id in ids]


def _frames(encoder_states: tuple[torch.Tensor, ...]) -> list[str]:
    """Labels of audio encoder positions (Whisper: 20 ms each)."""
    return [f"frame {i} ({probe_audio.WHISPER_POSITION_S * i:.2f} s)" for i in range(encoder_states[0].shape[1])]


def _merged(passes: list[_Pass]) -> dict[str, Reducer]:
    """The reducers of all inputs added together (into the first input's)."""
    merged = dict(passes[0].reducers)
    for one in passes[1:]:
        for metric, reducer in one.reducers.items():
            merged[metric].merge(reducer)
    return merged


# --- summaries and tables -------------------------------------------------------------------------------------


def _over_eps(one: _Pass, params: Params) -> dict[str, np.ndarray]:
    """Per stack, (layers, heads) float: 1 where alpha > eps, 0 where not, NaN where no head."""
    out = {}
    for stack, alpha in one.alpha.items():
        out[stack] = np.where(np.isnan(alpha), np.nan, (alpha > params.eps).astype(float))
    return out


def _sink_rates(passes: list[_Pass], params: Params, result: AnalysisResult, stacks) -> dict[str, Any]:
    summary: dict[str, Any] = {"eps": params.eps}
    per_pass = [_over_eps(one, params) for one in passes]
    for stack in stacks:
        if ("sink_score", stack) not in result.maps:
            continue
        summary[f"sink_rate_{stack}"] = round(100 * float(np.mean([np.nanmean(o[stack]) for o in per_pass])), 2)
        top = result.top_heads("sink_score", k=params.top_k, stack=stack)
        summary[f"top_sink_heads_{stack}"] = [f"{layer}.{head}={value:.3f}" for layer, head, value in top]
    return summary


def _layers_table(passes: list[_Pass], params: Params, result: AnalysisResult) -> pd.DataFrame:
    per_pass = [_over_eps(one, params) for one in passes]
    rows = []
    for (metric, stack), head_map in result.maps.items():
        if metric != "sink_mass":
            continue
        score = result.map("sink_score", stack).values
        share = np.mean([o[stack] for o in per_pass], axis=0)
        for layer in range(head_map.values.shape[0]):
            rows.append({"stack": stack, "layer": layer, "sink_mass": np.nanmean(head_map.values[layer]),
                         "sink_score": np.nanmean(score[layer]), "share_over_eps": np.nanmean(share[layer])})
    return pd.DataFrame(rows, columns=["stack", "layer", "sink_mass", "sink_score", "share_over_eps"])


def _sink_tokens(passes: list[_Pass], params: Params) -> pd.DataFrame:
    rows = []
    for index, one in enumerate(passes):
        for (stack, layer), (received, queries) in sorted(one.received.result().items()):
            labels = one.labels.get(stack, [])
            for position in np.flatnonzero((received[0] > params.token_threshold)
                                           & (queries[0] >= params.min_queries)):
                rows.append({"input": index, "stack": stack, "layer": layer, "position": int(position),
                             "token": _label(labels, position), "received": received[0, position],
                             "queries": int(queries[0, position])})
    return pd.DataFrame(rows, columns=["input", "stack", "layer", "position", "token", "received", "queries"])


def _by_position(passes: list[_Pass], params: Params, sinks: pd.DataFrame) -> pd.DataFrame:
    """Attention each position receives, averaged over heads, the queries that see it, and layers."""
    rows = []
    for index, one in enumerate(passes):
        found = one.received.result()
        for stack in dict.fromkeys(stack for stack, _ in found):
            layers = [found[key] for key in sorted(found) if key[0] == stack]
            width = max(received.shape[1] for received, _ in layers)
            values = np.full((len(layers), width), np.nan)
            queries = np.zeros(width)
            for layer, (received, seen) in enumerate(layers):
                judged = seen[0] >= params.min_queries
                values[layer, : received.shape[1]] = np.where(judged, received[0], np.nan)
                queries[: seen.shape[1]] = np.maximum(queries[: seen.shape[1]], seen[0])
            mine = sinks[(sinks["input"] == index) & (sinks["stack"] == stack)]
            detected = set(mine["position"].tolist())
            labels = one.labels.get(stack, [])
            with warnings.catch_warnings():  # a position no layer judged has an empty mean: NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(values, axis=0)
            for position in range(width):
                rows.append({"input": index, "stack": stack, "position": position,
                             "token": _label(labels, position), "received": mean[position],
                             "queries": int(queries[position]), "sink": position in detected})
    return pd.DataFrame(rows, columns=["input", "stack", "position", "token", "received", "queries", "sink"])


def _massive(passes: list[_Pass], params: Params) -> pd.DataFrame:
    """Per layer's residual output: its largest activation, and every massive one (Sun et al. 2024)."""
    rows = []
    for index, one in enumerate(passes):
        mask = one.inputs.get("attention_mask")
        for stack, states in one.hidden.items():
            labels = one.labels.get(stack, [])
            for layer, state in enumerate(states[1:]):
                x = state[0].float().cpu()
                if stack != "decoder" and mask is not None and mask.shape[1] == x.shape[0]:
                    x = x[mask[0].bool()]
                magnitude = x.abs()
                median = float(np.median(magnitude.numpy()))
                ratio = magnitude / max(median, 1e-30)
                massive = (magnitude > params.massive_threshold) & (ratio > params.massive_ratio)
                top = int(magnitude.argmax())
                picked = [top] + [int(i) for i in massive.flatten().nonzero()[:, 0] if int(i) != top]
                picked = sorted(picked, key=lambda i: -float(magnitude.flatten()[i]))[:MAX_TABLE_ROWS_PER_LAYER]
                for flat in picked:
                    position, dimension = divmod(flat, x.shape[1])
                    rows.append({"input": index, "stack": stack, "layer": layer, "position": position,
                                 "token": _label(labels, position), "dimension": dimension,
                                 "value": float(x[position, dimension]), "ratio": float(ratio[position, dimension]),
                                 "median": median, "massive": bool(massive[position, dimension])})
    columns = ["input", "stack", "layer", "position", "token", "dimension", "value", "ratio", "median", "massive"]
    return pd.DataFrame(rows, columns=columns)


def _token_summary(sinks: pd.DataFrame, massive: pd.DataFrame) -> dict[str, Any]:
    """The sink tokens of the first input (by how many layers find them) and the largest activation."""
    summary: dict[str, Any] = {}
    first = sinks[sinks["input"] == 0]
    for stack, group in first.groupby("stack", sort=False):
        counts = group.groupby(["position", "token"]).size().sort_values(ascending=False).head(5)
        summary[f"sink_tokens_{stack}"] = [f"{position} {token!r}: {n} layer(s)" for (position, token), n
                                           in counts.items()]
    summary["massive_activations"] = int(massive["massive"].sum())
    if len(massive):
        top = massive.loc[massive["value"].abs().idxmax()]
        summary["top_activation"] = {key: top[key] for key in ("stack", "layer", "position", "token", "dimension",
                                                                "value", "ratio")}
    return summary


def _cross_summary(result: AnalysisResult) -> dict[str, Any]:
    if ("noncontent_mass", "cross") not in result.maps:
        return {"cross_noncontent": NO_SOURCE_TOKENS}
    raw = result.map("entropy", "cross").values
    filtered = result.map("filtered_entropy", "cross").values
    return {"noncontent_share_cross": round(float(np.nanmean(result.map("noncontent_mass", "cross").values)), 4),
            "cross_entropy_raw": round(float(np.nanmean(raw)), 4),
            "cross_entropy_filtered": round(float(np.nanmean(filtered)), 4)}


def _source_table(one: _Pass, tokenizer) -> pd.DataFrame:
    ids = one.inputs["input_ids"][0].tolist()
    reasons = noncontent(tokenizer, ids)
    return pd.DataFrame({"position": range(len(ids)), "token": _texts(tokenizer, ids),
                         "non_content": [bool(r) for r in reasons], "reason": reasons})


def _frames_table(reasons: list[str]) -> pd.DataFrame:
    """Runs of consecutive audio encoder positions with the same reason ("" for speech), 20 ms each."""
    rows, start, seconds = [], 0, probe_audio.WHISPER_POSITION_S
    for position in range(1, len(reasons) + 1):
        if position == len(reasons) or reasons[position] != reasons[start]:
            rows.append({"first_position": start, "last_position": position - 1, "frames": position - start,
                         "start_s": round(seconds * start, 2), "end_s": round(seconds * position, 2),
                         "non_content": bool(reasons[start]), "reason": reasons[start] or "speech"})
            start = position
    return pd.DataFrame(rows)


def _frames_summary(frames: pd.DataFrame) -> str:
    """The audio non-content set in words: the padding's span and the count of silent frames."""
    parts = []
    padding = frames[frames["reason"] == "padding"]
    if len(padding):
        parts.append(f"padding after {padding['start_s'].min():.2f} s ({int(padding['frames'].sum())} frames)")
    silence = frames[frames["reason"] == "silence"]
    parts.append(f"{int(silence['frames'].sum())} silent frames in {len(silence)} run(s)")
    return "; ".join(parts)


def _label(labels: list[str], position: int) -> str:
    return labels[position] if position < len(labels) else f"position {position}"


# --- figures ----------------------------------------------------------------------------------------------------


def figures(result: AnalysisResult) -> dict[str, go.Figure]:
    """The per-layer sink profile, the visual sinks on the patch grid (vision-language models) and, per stack,
    where attention goes (first input), sink tokens highlighted."""
    out: dict[str, go.Figure] = {}
    layers = result.tables.get("layers")
    if layers is not None and len(layers):
        profile = go.Figure()
        for number, (stack, group) in enumerate(layers.groupby("stack", sort=False)):
            colour = plotting.CATEGORICAL[number % len(plotting.CATEGORICAL)]  # one colour a stack, one dash a measure
            profile.add_scatter(x=group["layer"], y=group["sink_mass"], mode="lines+markers",
                                line={"color": colour, "dash": "solid"}, name=f"{stack}: sink mass")
            profile.add_scatter(x=group["layer"], y=group["share_over_eps"], mode="lines+markers",
                                line={"color": colour, "dash": "dot"}, marker_symbol="diamond-open",
                                name=f"{stack}: share of heads with alpha > {result.params.get('eps')}")
        top = int(layers["layer"].max()) if len(layers) else 0
        profile.update_layout(title="sinks: per-layer profile (mean over heads)", xaxis_title="layer",
                              yaxis_title="share", yaxis_range=[0, 1.02], template="simple_white",
                              xaxis={"tickmode": "linear", "dtick": max(1, (top + 1) // 12),
                                     "range": [-0.5, top + 0.5]})
        out["profile"] = profile
    out.update(sinks_vlm.figures(result))
    table = result.tables.get("attention_by_position")
    if table is None or not len(table):
        return out
    for stack, group in table[table["input"] == 0].groupby("stack", sort=False):
        hover = [f"{position}: {_escape(token)}"
                 for position, token in zip(group["position"], group["token"], strict=True)]
        colours = np.where(group["sink"], "#d62728", "#7f7f7f")
        figure = go.Figure(go.Bar(x=group["position"], y=group["received"], marker_color=colours, hovertext=hover,
                                  hovertemplate="%{hovertext}<br>received %{y:.4f}<extra></extra>"))
        figure.update_layout(title=f"sinks: where attention goes ({stack}; mean over heads, queries and layers; "
                                   "red: sink tokens)", xaxis_title="key position",
                             yaxis_title="attention received (share)", template="simple_white", bargap=0,
                             xaxis_range=[-1, int(group["position"].max()) + 1])  # position 0 clear of the axis
        out[f"where-{stack.replace(':', '_')}"] = figure
    return out


def _escape(token: str) -> str:
    """A token's text for plotly's HTML-like hover labels: markup escaped, line breaks and tabs shown."""
    text = token.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return '"' + text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r") + '"'
