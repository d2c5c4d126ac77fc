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

Gu et al.'s protocol (``protocol="gu"``) compares their three input distributions
(:mod:`headscope.probes.sink_inputs`), 64 tokens per sequence, one prefill each, in batches: natural text
(paragraphs of the shipped texts, or the user's text; the maps and tables above read it), random tokens and one
repeated token (maps ``sink_score_random`` and ``sink_score_repeated``). Table ``gu_sink_rates`` holds the sink
rate of each, figure ``gu-rates`` draws them.
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

from headscope import distributed, plotting, progress
from headscope.analyses import sinks_vlm
from headscope.analyses.sink_reducers import FilteredEntropy, KeyReceived, ResidualMass, SinkMass, SinkScores
from headscope.capture.reducers import Entropy, KeyMass, Reducer
from headscope.errors import HeadscopeError
from headscope.probes import audio as probe_audio
from headscope.probes import decoding, sink_inputs
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
    "sink_score_random": "Gu et al.'s alpha on random tokens: mean attention on the first token over the queries "
                         "that can see it",
    "sink_score_repeated": "Gu et al.'s alpha on one repeated token: mean attention on the first token over the "
                           "queries that can see it",
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
        protocol: ``"prose"`` (the probe in one pass) or ``"gu"`` (Gu et al.'s protocol: 64-token inputs, one
            prefill each, of the kinds ``gu_inputs`` names).
        gu_inputs: ``protocol="gu"``: the input kinds to measure, of ``natural`` (paragraphs of the shipped texts, or
            the user's text cut to 64 tokens), ``random`` (uniformly random ordinary tokens) and ``repeated`` (one
            token repeated); a list or comma-separated. The maps and tables other than ``gu_sink_rates`` and
            ``sink_score_<kind>`` read the natural text, so they are left out without it.
        gu_sequences: ``protocol="gu"``: sequences of each kind (Gu et al.: 100); natural text has at most as many as
            the shipped texts have paragraphs of 64 tokens (the summary says how many).
        gu_prefix: ``protocol="gu"``: random and repeated sequences begin with what the tokenizer puts before a
            text (``<bos>``), as the model reads any text; false: the token ids alone, as Gu et al.'s Proposition on
            identical tokens assumes (the same for a tokenizer that adds nothing, such as SmolLM2's).
        batch_size: ``protocol="gu"``: sequences read in one forward pass.
        seed: ``protocol="gu"``: draws the natural paragraphs, the random tokens and the repeated ones (default: the
            run's ``--seed``).
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
        **dict.fromkeys(("gu_inputs", "gu_sequences", "gu_prefix", "batch_size", "seed"), ("text",)),
        **dict.fromkeys(("visual_tau", "visual_min_layer", "centric_ratio", "centric_mass"), ("vision-language",))}
    sink_positions: tuple[int, ...] | Literal["detected"] = (0,)
    eps: float = 0.3
    protocol: Protocol = "prose"
    gu_inputs: tuple[str, ...] = sink_inputs.KINDS
    gu_sequences: int = 100
    gu_prefix: bool = True
    batch_size: int = 25
    seed: int = 0
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
        wrong = [kind for kind in params.gu_inputs if kind not in sink_inputs.KINDS]
        if wrong or not params.gu_inputs or len(set(params.gu_inputs)) < len(params.gu_inputs):
            raise HeadscopeError(f"sinks.gu_inputs must name some of {', '.join(sink_inputs.KINDS)}, each once; got "
                                 f"{', '.join(params.gu_inputs) or '(none)'}")
        if params.gu_sequences < 1 or params.batch_size < 1:
            raise HeadscopeError(f"sinks.gu_sequences and sinks.batch_size must be at least 1, got "
                                 f"{params.gu_sequences} and {params.batch_size}")
        if not 0 < params.eps < 1 or not 0 < params.token_threshold < 1:
            raise HeadscopeError("eps and token_threshold must lie between 0 and 1")
        if not (params.visual_tau > 0 and params.visual_min_layer >= 0 and 0 <= params.centric_ratio <= 1
                and 0 <= params.centric_mass <= 1 and params.max_new_tokens >= 0 and params.silence_db >= 0):
            raise HeadscopeError("sinks needs visual_tau > 0, visual_min_layer >= 0, centric_ratio and centric_mass "
                                 "between 0 and 1, and max_new_tokens and silence_db >= 0")


@dataclass
class _Pass:
    """One input and what the capture made of it.

    Inputs of the same shape are read in one forward pass (Gu et al.'s protocol): the per-head ``reducers`` of
    such a batch are then held by its first input, and the others hold none.
    """

    inputs: dict[str, torch.Tensor]
    generate: bool
    reducers: dict[str, Reducer] = field(default_factory=dict)
    received: KeyReceived = field(default_factory=KeyReceived)
    alpha: dict[str, np.ndarray] = field(default_factory=dict)  # per stack, this input's sink scores
    sink_sets: dict[str, list[int]] = field(default_factory=dict)  # per stack, the detected S of sink_mass
    output: str | None = None  # what an encoder-decoder decoded
    waveform: np.ndarray | None = None  # an audio source's clip
    frames: list[str] | None = None  # an audio source: why each encoder position is non-content ("" if not)
    hidden: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # kept for vision-language models
    massive: list[dict[str, Any]] = field(default_factory=list)  # per layer, its largest and massive activations
    labels: dict[str, list[str]] = field(default_factory=dict)


@register("sinks", kinds=("decoder", "encoder", "encoder-decoder", "vision-language"), params=Params,
          main_metric="sink_score",
          description="attention sinks: sink mass and Gu et al.'s sink rate per head (natural text, random and "
                      "repeated tokens), sink tokens, massive activations, cross-attention on non-content tokens, "
                      "visual sinks and image-centric heads",
          figures=lambda result: figures(result),
          cost="about 3 s on smollm2-135m (protocol gu: 5 s), 2 s on whisper-tiny.en, 7 s on synthetic-llava-smollm2 "
               "(2 CPU cores)")
def run(context: Context) -> AnalysisResult:
    started = time.perf_counter()
    params = Params.read(context.params, context.seed)
    result = AnalysisResult(name="sinks", params={**params.__dict__, "gu_tokens": GU_TOKENS})
    summary: dict[str, Any] = {}
    kinds, skipped = _token_kinds(context, params)
    rows = []
    if params.protocol != "gu" or "natural" in params.gu_inputs or not kinds:
        passes = _probe_part(context, params, result, summary)
        if params.protocol == "gu":
            rows += _natural_rows(passes, params, result)
    for kind in kinds:
        rows += _token_kind(context, params, kind, result, summary)
    if params.protocol == "gu":
        summary.update(_gu_summary(rows, skipped))
        result.tables["gu_sink_rates"] = pd.DataFrame(rows, columns=list(GU_COLUMNS))
    if "sink_score" not in result.metrics() and kinds:  # no natural text: top_heads() ranks the first kind's score
        summary["main_metric"] = f"sink_score_{kinds[0]}"
    result.summary = summary
    result.seconds = time.perf_counter() - started
    return result


def _probe_part(context: Context, params: Params, result: AnalysisResult, summary: dict[str, Any]) -> list[_Pass]:
    """Measure the probe (under Gu et al.'s protocol, its natural text): every map but ``sink_score_<kind>``, every
    table but ``gu_sink_rates``, and their summary entries. Returns the inputs measured."""
    passes, source = _passes(context, params)
    tokenizer = _tokenizer(context)
    mine = distributed.split(passes)  # under torchrun, each process measures its share of the inputs
    batches = _batches(mine, params.batch_size)
    for batch in progress.steps(batches, "sinks: forward passes") if len(batches) > 1 else batches:
        _measure(context, params, batch, tokenizer)
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
    summary.update({"input": source, "passes": len(passes),
                    "tokens": [len(next(iter(p.labels.values()))) for p in passes]})
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
    result.tables["massive_activations"] = _massive(passes)
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
    return passes


# --- inputs -------------------------------------------------------------------------------------------------


def _tokenizer(context: Context):
    processor = context.loaded.processor
    return getattr(processor, "tokenizer", processor)


def _gu_tokens(context: Context) -> int:
    """T of Gu et al.'s protocol: 64, or the model's context where shorter."""
    limit = context.loaded.info.max_tokens
    return min(GU_TOKENS, limit) if limit else GU_TOKENS


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
        tokens = _gu_tokens(context)
        if context.text is not None or context.input_path is not None:
            chosen = [{name: tensor[:, :tokens] for name, tensor in probe.inputs.items()}]
            length = chosen[0]["input_ids"].shape[1]
            source = f"{probe.source}, Gu et al. protocol: its first {length} tokens, one prefill"
        else:
            natural = sink_inputs.natural(_tokenizer(context), params.gu_sequences, tokens, params.seed)
            chosen = [{"input_ids": ids[None], "attention_mask": torch.ones_like(ids[None])}
                      for ids in natural.input_ids]
            source = f"Gu et al. protocol, natural text: {natural.source}"
        return [_Pass(inputs, probe.generate) for inputs in chosen], source
    if params.protocol == "gu":
        source = f"{probe.source} (Gu et al.'s protocol needs text; the audio is measured as it is)"
        return [_Pass(probe.inputs, probe.generate, waveform=probe.waveform)], source
    return [_Pass(probe.inputs, probe.generate, waveform=probe.waveform)], probe.source


def _batches(passes: list[_Pass], size: int) -> list[list[_Pass]]:
    """Consecutive inputs of the same shapes that one forward pass reads, ``size`` at most to a batch; an input
    that is decoded stays alone."""
    batches: list[list[_Pass]] = []
    for one in passes:
        shapes = {name: tensor.shape for name, tensor in one.inputs.items()}
        last = batches[-1] if batches else None
        if (last is not None and not one.generate and not last[0].generate and len(last) < size
                and shapes == {name: tensor.shape for name, tensor in last[0].inputs.items()}):
            last.append(one)
        else:
            batches.append([one])
    return batches


# --- capture ------------------------------------------------------------------------------------------------


def _measure(context: Context, params: Params, batch: list[_Pass], tokenizer) -> None:
    """Capture a batch of inputs in one forward pass (or one input, decoded): per-head reducers (held by the first
    input), each input's sink scores and received attention, then each layer's largest activations."""
    model, stacks = context.loaded.model, context.scope.stacks
    first = batch[0]
    positions = (0,) if params.sink_positions == DETECTED else params.sink_positions
    first.reducers = {"sink_mass": SinkMass(positions=positions),
                      "sink_score": SinkMass(positions=(0,), exclude_own=False),
                      "residual_mass": ResidualMass()}
    scores, received = SinkScores(), KeyReceived()
    inputs = {name: torch.cat([one.inputs[name] for one in batch]).to(model.device) for name in first.inputs}
    source_ids = inputs["input_ids"][0].tolist() if "input_ids" in inputs else None
    reasons = None
    if "cross" in stacks and source_ids is not None:
        reasons = noncontent(tokenizer, source_ids)
    elif "cross" in stacks and first.waveform is not None:  # Whisper: 10 ms mel frames, then a stride-2 convolution
        positions = inputs["input_features"].shape[-1] // 2
        first.frames = reasons = probe_audio.frame_reasons(first.waveform, probe_audio.SAMPLE_RATE, positions,
                                                           silence_db=params.silence_db)
    if reasons is not None:
        exclude = torch.tensor([bool(r) for r in reasons], device=model.device)[None]
        first.reducers["noncontent_mass"] = KeyMass(key_mask=exclude, exclude_own=False, stacks=("cross",))
        first.reducers["entropy"] = Entropy(stacks=("cross",))
        first.reducers["filtered_entropy"] = FilteredEntropy(exclude, stacks=("cross",))
    with torch.no_grad(), context.scope.capture(*first.reducers.values(), scores, received):
        if first.generate:
            # the start tokens and the output, as the decoder read and produced them (Whisper's generate leaves
            # its start tokens and the end of text out of what it returns)
            sequences = decoding.own_output(model, inputs, params.max_new_tokens).sequence
        else:
            outputs = model(**inputs, output_hidden_states=True, **_few_logits(model))
    alpha = scores.result()
    for index, one in enumerate(batch):
        one.alpha = {stack: values[index] for stack, values in alpha.items()}
        one.received = received.example(index) if len(batch) > 1 else received
    if first.generate:  # hidden states of the decoded sequence, outside the capture
        with torch.no_grad():
            outputs = model(**inputs, decoder_input_ids=sequences, output_hidden_states=True)
        first.hidden = {"encoder": outputs.encoder_hidden_states, "decoder": outputs.decoder_hidden_states}
        target = _texts(tokenizer, sequences[0].tolist())
        first.output = tokenizer.decode(sequences[0], skip_special_tokens=True).strip()
        source = _texts(tokenizer, source_ids) if source_ids is not None else _frames(outputs.encoder_hidden_states)
        first.labels = {"encoder": source, "cross": source, "decoder": target}
    else:
        stack = next(iter(stacks))
        for index, one in enumerate(batch):
            one.hidden = {stack: tuple(state[index: index + 1] for state in outputs.hidden_states)}
            one.labels = {stack: _texts(tokenizer, inputs["input_ids"][index].tolist())}
    for one in batch:
        one.massive = _massive_rows(one, params)
        if context.loaded.info.kind != "vision-language":  # the visual sinks read them; nothing else does
            one.hidden = {}


def _token_kinds(context: Context, params: Params) -> tuple[list[str], list[str]]:
    """Gu et al.'s token inputs to measure (random, repeated: those ``gu_inputs`` names, for a model that reads
    text in one forward pass) and those left out."""
    if params.protocol != "gu":
        return [], []
    wanted = [kind for kind in params.gu_inputs if kind != "natural"]
    if context.loaded.info.kind in ("decoder", "encoder") and "input_ids" in context.probe().inputs:
        return wanted, []
    return [], wanted


def _token_kind(context: Context, params: Params, kind: str, result: AnalysisResult,
                summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Gu et al.'s sink score on ``gu_sequences`` sequences of ``kind`` (random or repeated tokens), batched: the
    map ``sink_score_<kind>`` and the rows of ``gu_sink_rates``."""
    model = context.loaded.model
    vocab = getattr(model.config.get_text_config(), "vocab_size", None)
    inputs = sink_inputs.build(kind, _tokenizer(context), params.gu_sequences, _gu_tokens(context), params.seed,
                               vocab, params.gu_prefix)
    starts = range(0, inputs.sequences, params.batch_size)
    mine = distributed.split(list(starts))
    measured = []
    for start in progress.steps(mine, f"sinks: {kind} tokens") if len(mine) > 1 else mine:
        ids = inputs.input_ids[start: start + params.batch_size].to(model.device)
        scores = SinkScores()
        with torch.no_grad(), context.scope.capture(scores):
            model(input_ids=ids, attention_mask=torch.ones_like(ids), **_few_logits(model))
        measured.append(scores)
    measured = distributed.gathered(measured)
    summary.setdefault("gu_inputs", {})[kind] = inputs.source
    rows = []
    for stack in measured[0].sums:
        alphas = [alpha for scores in measured for alpha in scores.result()[stack]]
        result.add_map(f"sink_score_{kind}", HeadMap(values=_pooled(measured, stack), stack=stack,
                                                     description=DESCRIPTIONS[f"sink_score_{kind}"], unit="share"))
        rows.append(_gu_row(stack, kind, alphas, inputs.tokens, params.eps))
    return rows


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


def _sink_rate(alphas: list[np.ndarray], eps: float) -> float:
    """Gu et al.'s sink rate: 100 x the mean over inputs of the share of heads with alpha > eps (each input's
    (layers, heads) alpha; NaN where no head)."""
    return 100 * float(np.mean([np.nanmean(np.where(np.isnan(alpha), np.nan, alpha > eps)) for alpha in alphas]))


def _sink_rates(passes: list[_Pass], params: Params, result: AnalysisResult, stacks) -> dict[str, Any]:
    summary: dict[str, Any] = {"eps": params.eps}
    for stack in stacks:
        if ("sink_score", stack) not in result.maps:
            continue
        summary[f"sink_rate_{stack}"] = round(_sink_rate([one.alpha[stack] for one in passes], params.eps), 2)
        top = result.top_heads("sink_score", k=params.top_k, stack=stack)
        summary[f"top_sink_heads_{stack}"] = [f"{layer}.{head}={value:.3f}" for layer, head, value in top]
    return summary


GU_COLUMNS = {"stack": "attention stack", "input": "input kind: natural, random or repeated",
              "sequences": "sequences measured", "tokens": "tokens per sequence (the longest, for user text)",
              "sink_rate": "Gu et al.'s sink rate, % (heads with alpha > eps, mean over sequences)",
              "mean_alpha": "mean of alpha over sequences, layers and heads"}


def _gu_row(stack: str, kind: str, alphas: list[np.ndarray], tokens: int, eps: float) -> dict[str, Any]:
    """A row of ``gu_sink_rates`` from each sequence's (layers, heads) alpha."""
    return {"stack": stack, "input": kind, "sequences": len(alphas), "tokens": tokens,
            "sink_rate": round(_sink_rate(alphas, eps), 2), "mean_alpha": float(np.nanmean(np.stack(alphas)))}


def _natural_rows(passes: list[_Pass], params: Params, result: AnalysisResult) -> list[dict[str, Any]]:
    """The natural-text rows of ``gu_sink_rates``: the probe's passes, per stack with a sink score."""
    tokens = max(len(next(iter(one.labels.values()))) for one in passes)
    return [_gu_row(stack, "natural", [one.alpha[stack] for one in passes], tokens, params.eps)
            for metric, stack in result.maps if metric == "sink_score"]


def _gu_summary(rows: list[dict[str, Any]], skipped: list[str]) -> dict[str, Any]:
    """Per stack, the sink rate of each input kind; and the kinds this model cannot read."""
    summary: dict[str, Any] = {}
    for row in rows:
        summary.setdefault(f"gu_sink_rates_{row['stack']}", {})[row["input"]] = row["sink_rate"]
    if skipped:
        summary["gu_inputs_left_out"] = (f"{', '.join(skipped)}: Gu et al.'s token inputs need a model that reads "
                                         "text in one forward pass (a decoder or an encoder)")
    return summary


def _pooled(measured: list[SinkScores], stack: str) -> np.ndarray:
    """(layers, heads) sink score over every sequence of the batches ``measured``: sums over counts, NaN where none."""
    sums = sum(scores.sums[stack].sum(dim=0).double().cpu() for scores in measured)
    counts = sum(scores.counts[stack].sum(dim=0).double().cpu() for scores in measured)
    return torch.where(counts > 0, sums / counts.clamp_min(1e-300), torch.nan).numpy()


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


def _massive_rows(one: _Pass, params: Params) -> list[dict[str, Any]]:
    """Per layer's residual output of one input: its largest activation, and every massive one (Sun et al. 2024)."""
    rows = []
    mask = one.inputs.get("attention_mask")
    for stack, states in one.hidden.items():
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
                rows.append({"stack": stack, "layer": layer, "position": position, "dimension": dimension,
                             "value": float(x[position, dimension]), "ratio": float(ratio[position, dimension]),
                             "median": median, "massive": bool(massive[position, dimension])})
    return rows


def _massive(passes: list[_Pass]) -> pd.DataFrame:
    """The massive-activation rows of every input, with its index and each position's token."""
    rows = [{"input": index, **row, "token": _label(one.labels.get(row["stack"], []), row["position"])}
            for index, one in enumerate(passes) for row in one.massive]
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
    rates = result.tables.get("gu_sink_rates")
    if rates is not None and len(rates):
        out["gu-rates"] = _gu_figure(rates, result.params)
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


def _gu_figure(rates: pd.DataFrame, params: Mapping[str, Any]) -> go.Figure:
    """Gu et al.'s sink rate of each input kind, one bar each, a colour per stack."""
    figure = go.Figure()
    for number, (stack, group) in enumerate(rates.groupby("stack", sort=False)):
        hover = [f"{kind}: {n} sequences of {tokens} tokens, mean alpha {alpha:.3f}" for kind, n, tokens, alpha
                 in zip(group["input"], group["sequences"], group["tokens"], group["mean_alpha"], strict=True)]
        figure.add_bar(x=group["input"], y=group["sink_rate"], name=stack,
                       text=[f"{value:.1f}%" for value in group["sink_rate"]], textposition="outside",
                       hovertext=hover, hovertemplate="%{hovertext}<extra></extra>",
                       marker_color=plotting.CATEGORICAL[number % len(plotting.CATEGORICAL)])
    figure.update_layout(title=f"sinks: Gu et al.'s sink rate per input (heads with alpha > {params.get('eps')}, "
                               f"T = {int(rates['tokens'].max())})", xaxis_title="input",
                         yaxis_title="sink rate (% of heads)", yaxis_range=[0, 105], template="simple_white",
                         showlegend=rates["stack"].nunique() > 1)
    return figure


def _escape(token: str) -> str:
    """A token's text for plotly's HTML-like hover labels: markup escaped, line breaks and tabs shown."""
    text = token.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return '"' + text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r") + '"'
