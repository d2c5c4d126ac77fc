"""``saliency``: does cross-attention point where the input matters? Cross-attention against saliency, per head.

After Papi et al. (2025), "Cross-Attention is Half Explanation in Speech-to-Text Models". For an
encoder-decoder model and an input (speech for Whisper, text for T5/BART/Marian-like models), the model's own
greedy output y is teacher-forced, and for each output token i (the decoder query t_i that predicts it):

- cross-attention CA[l, h, i, p] over the real encoder positions p, and its aggregates: per layer (mean over
  heads), last layer, all layers (mean over layers and heads), and Whisper's ``alignment_heads`` (mean over
  the listed heads) when the generation config names them;
- saliency S_m[i, p] of log p(y_i) with respect to the input, with captum: ``saliency`` (|gradient|),
  ``integrated_gradients`` (|IG| from a baseline, ``ig_steps`` steps), ``feature_ablation`` (|log-prob
  change| when a time x frequency patch, or a source token, is set to the baseline), and
  ``encoder_saliency`` (|gradient| with respect to the encoder's output states, the paper's second level).
  Audio: |attribution| (mel, frames) is pooled over frequency and over the encoder's stride (frames per
  encoder position; Whisper: 2), ``max`` by default, and cropped to the real audio's positions. Vectors per
  position (text embeddings, encoder states): sum over the vector's dimension of |attribution|.
- agreement per token: Pearson r (the paper's measure), Spearman rho and Kendall tau (``scipy.stats``)
  between CA[., i, :] and S_m[i, :], averaged over the tokens where both vary; per head (maps
  ``<measure>_<method>``, stack ``cross``) and per aggregate (table ``aggregates``). For a text source the
  aggregates are also scored on content positions only (the ``sinks`` analysis's non-content set removed).
- deletion curves: per explained token (``deletion_tokens`` of them, evenly spaced), the top fraction f of
  positions by each explanation (an attention aggregate, each saliency method, a random order) is set to the
  baseline, and the drop of log p(y_i) is measured; the area under each curve summarises it.

Decoding: greedy ``generate`` through ``headscope.probes.decoding`` (the start tokens, Whisper's
``<|startoftranscript|><|notimestamps|>``, which ``generate`` leaves out of its output, are restored from what
the decoder read; T5 with unequal encoder and decoder depths decodes with a growing cache).
"""

from __future__ import annotations

import contextlib
import html
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from scipy import stats
from transformers.modeling_outputs import BaseModelOutput

from headscope import progress
from headscope.capture.engine import Scope
from headscope.capture.reducers import FullMaps
from headscope.errors import HeadscopeError
from headscope.probes import audio, decoding
from headscope.probes import inputs as probe_inputs
from headscope.probes.text import noncontent
from headscope.registry import Context, Parameters, register
from headscope.results import AnalysisResult, HeadMap

Method = Literal["saliency", "integrated_gradients", "feature_ablation", "encoder_saliency"]
METHODS: tuple[str, ...] = get_args(Method)
INPUT_METHODS = ("saliency", "integrated_gradients", "feature_ablation")  # attribute the input itself
MEASURES = ("pearson", "spearman", "kendall")
STACK = "cross"
ALIGNMENT = "alignment_heads"
RANDOM = "random"
ERROR_METHOD = "unknown saliency method(s) {unknown}: choose from {known}"
DESCRIPTION = "{measure} between the head's cross-attention and {method} per output token, mean over tokens"
METHOD_TEXT = {
    "saliency": "|gradient| of log p(token) w.r.t. the input",
    "integrated_gradients": "|integrated gradients| of log p(token) w.r.t. the input",
    "feature_ablation": "|log p(token) change| when an input patch is set to the baseline",
    "encoder_saliency": "|gradient| of log p(token) w.r.t. the encoder output states",
}


@dataclass(frozen=True)
class Params(Parameters):
    """The parameters of ``saliency`` (``--set saliency.NAME=VALUE`` overrides them).

    Attributes:
        methods: saliency methods to compare with cross-attention (``METHODS``); a list or a comma-separated
            string.
        ig_steps: integration steps of integrated gradients (Gauss-Legendre, captum's default rule).
        baseline: ``floor`` (audio: the log-mel floor, the feature value of silence, which Whisper's padding
            holds; text: the pad token's embedding) or ``zero``; used by integrated gradients, feature
            ablation and the deletion curves.
        pooling: ``max`` or ``mean`` over the frequency axis and the encoder's stride (audio).
        patch_frames, patch_bands: feature ablation patches on audio, in input frames (10 ms each) and in
            frequency bands (the mel bins split evenly); text ablates one source token at a time.
        max_new_tokens: tokens decoded.
        tokens: explain at most this many output tokens, evenly spaced (0: every one); the cost of the
            gradient methods grows with it.
        source_tokens: the shipped prose is cut to this many tokens for text models unless ``--max-tokens``
            says otherwise (user text is cut only by ``--max-tokens``).
        deletion_fractions: fractions of the real positions deleted along each deletion curve (none: no deletion
            curves).
        deletion_tokens: output tokens measured by the deletion curves, evenly spaced (0: every one).
        deletion_attention: the attention aggregate whose order the deletion curve follows (``all_layers``,
            ``last_layer``, ``layer_<l>``, ``alignment_heads``).
        token: the explained token drawn in the overlay figure (index among the explained tokens; default
            the middle one).
        batch_size: rows per forward/backward pass of the attribution and deletion passes.
        memory_gib: memory the captured cross-attention maps may take, in GiB (the unit of every analysis's budget).
        top_k: heads listed in the summary.
        seed: seed of the random deletion order.
    """

    analysis = "saliency"
    methods: tuple[str, ...] = ("saliency", "encoder_saliency")
    ig_steps: int = 32
    baseline: Literal["floor", "zero"] = "floor"
    pooling: Literal["max", "mean"] = "max"
    patch_frames: int = 20
    patch_bands: int = 4
    max_new_tokens: int = 64
    tokens: int = 0
    source_tokens: int = 64
    deletion_fractions: tuple[float, ...] = (0.02, 0.05, 0.1, 0.25)
    deletion_tokens: int = 4
    deletion_attention: str = "all_layers"
    token: int | None = None
    batch_size: int = 4
    memory_gib: float = 0.25
    top_k: int = 5
    seed: int = 0

    def check(self) -> None:
        wrong = [m for m in self.methods if m not in METHODS]
        if wrong or not self.methods:
            raise HeadscopeError(ERROR_METHOD.format(unknown=", ".join(wrong) or "(none given)",
                                                     known=", ".join(METHODS)))
        if self.baseline not in ("floor", "zero") or self.pooling not in ("max", "mean"):
            raise HeadscopeError("saliency needs baseline 'floor' or 'zero' and pooling 'max' or 'mean'")
        positive = (self.ig_steps, self.patch_frames, self.patch_bands, self.max_new_tokens, self.source_tokens,
                    self.batch_size)
        if min(positive) < 1 or self.memory_gib <= 0 or self.deletion_tokens < 0 or self.tokens < 0:
            raise HeadscopeError("saliency needs ig_steps, patch_frames, patch_bands, max_new_tokens, source_tokens, "
                                 "batch_size >= 1, memory_gib > 0, and tokens and deletion_tokens >= 0")
        if not all(0 < f <= 1 for f in self.deletion_fractions):
            raise HeadscopeError("saliency deletion_fractions must lie in (0, 1]")


# --- what is explained -------------------------------------------------------------------------------------------


@dataclass
class Source:
    """The input side: the tensor the saliency methods attribute to, and how the encoder reads it.

    Attributes:
        kind: ``audio`` (x = log-mel features (1, mel, frames)) or ``text`` (x = the source embeddings as the
            encoder's embedding layer outputs them, (1, tokens, dim)).
        x: the explained input.
        inputs: the model's own inputs for the encoder (``input_features``, or ``input_ids`` and
            ``attention_mask``).
        positions: real encoder positions (audio: the real frames / stride, rounded up; text: tokens).
        stride: input frames per encoder position (audio), 1 for text.
        baseline: broadcastable to x: what a deleted or ablated part of x becomes.
        labels: one per real encoder position.
        noncontent: (positions,) bool, the non-content source tokens (text), or None.
        description: where the input comes from.
        frames: the real input frames (audio; Whisper's padding to 30 s follows them), 0 for text.
    """

    kind: Literal["audio", "text"]
    x: torch.Tensor
    inputs: dict[str, torch.Tensor]
    positions: int
    stride: int
    baseline: torch.Tensor
    labels: list[str]
    noncontent: np.ndarray | None = None
    description: str = ""
    frames: int = 0


@dataclass
class Target:
    """The teacher-forced output: ``sequence`` (1, T) is what the decoder reads plus the last token; the
    decoder query at position ``queries[i]`` predicts ``sequence[queries[i] + 1]``, the i-th explained token."""

    sequence: torch.Tensor
    queries: np.ndarray
    labels: list[str]
    text: str
    decoding: str


@dataclass
class Explanation:
    """Cross-attention and saliency for each explained token, on the real encoder positions.

    ``attention`` (layers, heads, tokens, positions); ``saliency[method]`` (tokens, positions); ``log_probs``
    (tokens,) of the explained tokens; ``seconds`` per method; ``ig_delta`` the mean |completeness error| of
    integrated gradients relative to |log p(x) - log p(baseline)|.
    """

    attention: np.ndarray
    saliency: dict[str, np.ndarray]
    log_probs: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)
    ig_delta: float | None = None


def audio_source(loaded, input_path: str | None, baseline: str) -> Source:
    """The shipped speech clip (or the user's WAV, resampled to 16 kHz) as Whisper's log-mel features, with the
    number of real frames read from the feature extractor's attention mask."""
    model, processor, _ = loaded
    waveform, rate, description = audio.speech_input(input_path)
    features = processor.feature_extractor(waveform, sampling_rate=rate, return_tensors="pt",
                                           return_attention_mask=True)
    x = features["input_features"].to(model.device, model.dtype)
    frames = int(features["attention_mask"].sum())
    stride = x.shape[-1] // model.config.max_source_positions
    positions = math.ceil(frames / stride)
    floor = x.min() if baseline == "floor" else torch.zeros((), dtype=x.dtype, device=x.device)
    labels = [f"{p * stride * 0.01:.2f} s" for p in range(positions)]
    if len(waveform) > 30 * rate:
        description += " (cut to Whisper's 30 s window)"
    return Source("audio", x, {"input_features": x}, positions, stride, floor.reshape(1, 1, 1), labels,
                  description=description, frames=frames)


def text_source(loaded, text: str | None, input_path: str | None, max_tokens: int | None, baseline: str) -> Source:
    """The user's text (or the shipped prose) cut to ``max_tokens``, as the encoder's input embeddings."""
    model, processor, _ = loaded
    probe = probe_inputs.build(loaded, text, input_path, max_tokens)
    ids = probe.inputs["input_ids"].to(model.device)
    mask = probe.inputs.get("attention_mask", torch.ones_like(ids)).to(model.device)
    tokenizer = getattr(processor, "tokenizer", processor)
    embed = model.get_encoder().get_input_embeddings()
    with torch.no_grad():
        x = embed(ids).detach()
        pad = getattr(model.config, "pad_token_id", None)
        floor = embed(torch.tensor([[pad]], device=ids.device)) if baseline == "floor" and pad is not None \
            else torch.zeros_like(x[:, :1])
    real = ids[0][mask[0].bool()].tolist()
    reasons = noncontent(tokenizer, real)
    return Source("text", x, {"input_ids": ids, "attention_mask": mask}, len(real), 1, floor.detach(),
                  [tokenizer.decode([i]) for i in real], np.array([bool(r) for r in reasons]),
                  description=probe.source)


def decode(model, source: Source, max_new_tokens: int, tokenizer=None, tokens: int = 0) -> Target:
    """The model's own greedy output, whole (the start tokens its decoder read included) for teacher forcing.

    The explained tokens are the decoded ones that are not special tokens (end of text, language or task tags),
    at most ``tokens`` of them evenly spaced when ``tokens`` > 0.
    """
    decoded = decoding.own_output(model, source.inputs, max_new_tokens)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    special |= set(eos)
    sequence = decoded.sequence
    ids = sequence[0].tolist()
    queries = np.array([t for t in range(decoded.start - 1, len(ids) - 1) if ids[t + 1] not in special], dtype=int)
    if not len(queries):
        raise HeadscopeError("the model decoded no content token from this input: nothing to explain")
    if 0 < tokens < len(queries):
        queries = queries[np.unique(np.linspace(0, len(queries) - 1, tokens).round().astype(int))]
    labels = [tokenizer.decode([ids[t + 1]]) if tokenizer is not None else str(ids[t + 1]) for t in queries]
    text = tokenizer.decode([ids[t + 1] for t in queries]).strip() if tokenizer is not None else " ".join(labels)
    return Target(sequence.to(source.x.device), queries, labels, text,
                  f"greedy, {decoded.start} start token(s) restored")


# --- forward functions ---------------------------------------------------------------------------------------


class Scorer:
    """log p of each explained token as a function of the input x or of the encoder states.

    ``encode(x)`` (rows, ...) -> encoder states (rows, positions, dim); ``log_probs(states)`` -> (rows, tokens).
    For text, x replaces the output of the encoder's embedding layer (a forward hook active only while the
    encoder runs), so any scaling the encoder applies after it (Marian) still applies.
    """

    def __init__(self, model, source: Source, target: Target) -> None:
        self.model, self.source, self.target = model, source, target
        self.queries = torch.as_tensor(target.queries, device=source.x.device)
        self.tokens = target.sequence[0, self.queries + 1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        encoder = self.model.get_encoder()
        if self.source.kind == "audio":
            return encoder(input_features=x).last_hidden_state
        rows = x.shape[0]
        ids = self.source.inputs["input_ids"].expand(rows, -1)
        mask = self.source.inputs["attention_mask"].expand(rows, -1)
        handle = encoder.get_input_embeddings().register_forward_hook(lambda module, args, output: x)
        try:
            return encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        finally:
            handle.remove()

    def log_probs(self, states: torch.Tensor) -> torch.Tensor:
        rows = states.shape[0]
        mask = self.source.inputs.get("attention_mask")
        logits = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=states),
                            attention_mask=None if mask is None else mask.expand(rows, -1),
                            decoder_input_ids=self.target.sequence[:, :-1].expand(rows, -1), use_cache=False).logits
        chosen = logits[:, self.queries].float().log_softmax(-1)
        return chosen.gather(-1, self.tokens[None, :, None].expand(rows, -1, 1))[..., 0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_probs(self.encode(x))


@contextlib.contextmanager
def _no_weight_gradients(model) -> Iterator[None]:
    """Gradients flow to the input only: weight gradients are not computed (about a third of a backward)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for parameter, _ in saved:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in saved:
            parameter.requires_grad_(flag)


# --- pooling and agreement -----------------------------------------------------------------------------------


def pool_audio(attribution: torch.Tensor, stride: int, positions: int, pooling: str = "max") -> np.ndarray:
    """(tokens, mel, frames) |attribution| pooled to (tokens, positions): ``pooling`` (max or mean) over the
    frequency axis, then over each encoder position's ``stride`` frames; positions past ``positions`` (padding)
    are cropped."""
    values = attribution.detach().abs().float()
    reduce = (lambda t, dim: t.amax(dim)) if pooling == "max" else (lambda t, dim: t.mean(dim))
    per_frame = reduce(values, 1)  # (tokens, frames)
    frames = per_frame.shape[-1] - per_frame.shape[-1] % stride
    pooled = reduce(per_frame[:, :frames].reshape(per_frame.shape[0], -1, stride), -1)
    return pooled[:, :positions].cpu().double().numpy()


def pool_vectors(attribution: torch.Tensor, positions: int) -> np.ndarray:
    """(tokens, positions, dim) attribution -> (tokens, positions): sum over dim of |attribution|, cropped."""
    return attribution.detach().abs().float().sum(-1)[:, :positions].cpu().double().numpy()


def agreement(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Pearson r, Spearman rho and Kendall tau-b of two vectors (``scipy.stats``); NaN when either is constant."""
    return dict(zip(MEASURES, token_agreement(np.asarray(x)[None], np.asarray(y)[None])[0], strict=True))


def token_agreement(attention: np.ndarray, saliency: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """(tokens, 3) Pearson, Spearman, Kendall per token (row) between (tokens, positions) attention and saliency,
    on the positions ``keep`` marks (all by default); NaN for a token where either row is constant.

    ``scipy.stats``: Pearson from ``pearsonr`` along the rows, Spearman as scipy defines it (Pearson of the
    ``rankdata`` ranks, ties averaged), Kendall's tau-b from ``kendalltau`` row by row.
    """
    x, y = np.asarray(attention, dtype=float), np.asarray(saliency, dtype=float)
    if keep is not None:
        x, y = x[:, keep], y[:, keep]
    out = np.full((x.shape[0], len(MEASURES)), np.nan)
    varies = (np.ptp(x, axis=1) > 0) & (np.ptp(y, axis=1) > 0)
    if not varies.any():
        return out
    x, y = x[varies], y[varies]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out[varies, 0] = stats.pearsonr(x, y, axis=1).statistic
        out[varies, 1] = stats.pearsonr(stats.rankdata(x, axis=1), stats.rankdata(y, axis=1), axis=1).statistic
        out[varies, 2] = [stats.kendalltau(a, b).statistic for a, b in zip(x, y, strict=True)]
    return out


def mean_over_tokens(values: np.ndarray) -> np.ndarray:
    """Mean over tokens (axis 0) of the defined values; NaN where none is."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=0)


def aggregates(attention: np.ndarray, alignment_heads: list[tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
    """Attention aggregates (tokens, positions) from (layers, heads, tokens, positions): ``layer_<l>`` (mean over
    the layer's heads), ``last_layer``, ``all_layers`` (mean over layers and heads) and ``alignment_heads``
    (mean over the listed (layer, head) pairs) when given."""
    out = {f"layer_{layer}": attention[layer].mean(0) for layer in range(attention.shape[0])}
    out["last_layer"] = attention[-1].mean(0)
    out["all_layers"] = attention.mean((0, 1))
    if alignment_heads:
        out[ALIGNMENT] = np.mean([attention[layer, head] for layer, head in alignment_heads], axis=0)
    return out


# --- capture and attribution --------------------------------------------------------------------------------------


def cross_attention(model, scope: Scope, source: Source, target: Target,
                    budget_bytes: int = 256 * 2**20) -> np.ndarray:
    """(layers, heads, tokens, positions) cross-attention of the explained tokens' queries over the real encoder
    positions, captured in one teacher-forced forward pass (``FullMaps`` of every cross-attention head)."""
    if STACK not in scope.stacks:
        raise HeadscopeError(f"saliency needs a cross-attention stack; this model has {list(scope.stacks)}")
    stack = scope.stacks[STACK]
    maps = FullMaps([(STACK, layer, head) for layer in range(stack.layers) for head in range(stack.heads)],
                    budget_bytes=budget_bytes)
    with torch.no_grad(), scope.capture(maps):
        model(**source.inputs, decoder_input_ids=target.sequence[:, :-1], use_cache=False)
    found = maps.result()
    out = np.full((stack.layers, stack.heads, len(target.queries), source.positions), np.nan)
    first = _first_position(source)
    for (_, _, layer, head), values in found.items():
        rows = torch.as_tensor(target.queries)
        out[layer, head] = values[0, rows, first:first + source.positions].double().numpy()
    return out


def _first_position(source: Source) -> int:
    """Index of the first real encoder position (text with left padding starts later)."""
    mask = source.inputs.get("attention_mask")
    return int(mask[0].int().argmax()) if mask is not None else 0


def explain(model, scope: Scope, source: Source, target: Target, params: Params) -> Explanation:
    """Cross-attention and each saliency method's attribution for every explained token."""
    scorer = Scorer(model, source, target)
    started = time.perf_counter()
    attention = cross_attention(model, scope, source, target, int(params.memory_gib * 2**30))
    seconds = {"cross_attention": time.perf_counter() - started}
    with torch.no_grad():
        log_probs = scorer(source.x).double().cpu().numpy()[0]
    saliency, delta = {}, None
    with _no_weight_gradients(model):
        for method in progress.steps(params.methods, "saliency: attribution methods"):
            started = time.perf_counter()
            raw, found = _attribute(method, scorer, source, params)
            saliency[method] = _pool(raw, source, params, method)
            delta = found if method == "integrated_gradients" else delta
            seconds[method] = time.perf_counter() - started
    return Explanation(attention, saliency, log_probs, seconds, delta)


def _attribute(method: str, scorer: Scorer, source: Source, params: Params) -> tuple[torch.Tensor, float | None]:
    """Raw captum attribution (tokens, *x.shape[1:]) of each explained token's log-probability."""
    from captum.attr import FeatureAblation, IntegratedGradients, Saliency

    tokens = len(scorer.target.queries)
    if method == "feature_ablation":
        mask = _feature_mask(source, params)
        with torch.no_grad():
            found = FeatureAblation(scorer).attribute(source.x, baselines=source.baseline.expand_as(source.x),
                                                      feature_mask=mask, perturbations_per_eval=1)
        return found, None
    if method == "encoder_saliency":
        with torch.no_grad():
            states = scorer.encode(source.x)
        return _rows(lambda rows, targets: Saliency(scorer.log_probs).attribute(rows, target=targets, abs=True),
                     states, tokens, params.batch_size), None
    if method == "saliency":
        return _rows(lambda rows, targets: Saliency(scorer).attribute(rows, target=targets, abs=True),
                     source.x, tokens, params.batch_size), None
    deltas: list[torch.Tensor] = []
    baseline = source.baseline.expand_as(source.x)

    def integrated(rows: torch.Tensor, targets: list[int]) -> torch.Tensor:
        found, delta = IntegratedGradients(scorer).attribute(
            rows, baselines=baseline.expand_as(rows), target=targets, n_steps=params.ig_steps,
            internal_batch_size=params.batch_size, return_convergence_delta=True)
        deltas.append(delta.detach().abs().cpu())
        return found

    found = _rows(integrated, source.x, tokens, params.batch_size)
    with torch.no_grad():
        span = (scorer(source.x) - scorer(baseline)).abs()[0].cpu()
    relative = torch.cat(deltas).double() / span.double().clamp_min(1e-12)
    return found, float(relative.mean())


def _rows(attribute: Callable[[torch.Tensor, list[int]], torch.Tensor], x: torch.Tensor, tokens: int,
          batch_size: int) -> torch.Tensor:
    """One row of x per explained token (row i's target is token i), ``batch_size`` rows per call."""
    out = []
    for start in range(0, tokens, batch_size):
        targets = list(range(start, min(start + batch_size, tokens)))
        rows = x.detach().repeat(len(targets), *[1] * (x.ndim - 1)).requires_grad_()
        out.append(attribute(rows, targets).detach())
    return torch.cat(out)


def _feature_mask(source: Source, params: Params) -> torch.Tensor:
    """Feature groups of x: audio time x frequency patches over the real frames (padding is one more group);
    text one group per source token."""
    x = source.x
    if source.kind == "text":
        return torch.arange(x.shape[1], device=x.device)[None, :, None].expand_as(x)
    mel, frames = x.shape[1], x.shape[2]
    band = torch.arange(mel, device=x.device) * params.patch_bands // mel  # (mel,)
    patch = torch.arange(frames, device=x.device) // params.patch_frames  # (frames,)
    mask = patch[None, :] * params.patch_bands + band[:, None]
    padding = int(mask[:, : source.frames].max()) + 1 if source.frames else 0
    mask[:, source.frames:] = padding
    return mask[None]


def _pool(raw: torch.Tensor, source: Source, params: Params, method: str) -> np.ndarray:
    if method == "encoder_saliency" or source.kind == "text":
        return pool_vectors(raw[:, _first_position(source):], source.positions)
    return pool_audio(raw, source.stride, source.positions, params.pooling)


# --- deletion ---------------------------------------------------------------------------------------------------


def deletion_curves(scorer: Scorer, source: Source, explanations: dict[str, np.ndarray], clean: np.ndarray,
                    params: Params) -> pd.DataFrame:
    """Drop of log p(token) when the top fraction of the real positions by each explanation is set to the
    baseline (audio: all frequencies of the position's frames; text: the token's embedding).

    ``explanations`` maps a name to (tokens, positions); a ``random`` order (seeded) is added. Columns:
    explanation, fraction, positions_deleted, mean_drop, std_drop, tokens.
    """
    count = len(clean)
    wanted = count if params.deletion_tokens == 0 else min(params.deletion_tokens, count)
    chosen = np.unique(np.linspace(0, count - 1, wanted).round().astype(int))
    generator = np.random.default_rng(params.seed)
    orders = {name: np.argsort(-values, axis=1, kind="stable") for name, values in explanations.items()}
    orders[RANDOM] = np.stack([generator.permutation(source.positions) for _ in range(count)])
    jobs = [(name, fraction, token) for name in orders for fraction in params.deletion_fractions for token in chosen]
    first = _first_position(source)
    found = np.empty(len(jobs))
    with torch.no_grad():
        for start in range(0, len(jobs), params.batch_size * 2):
            batch = jobs[start:start + params.batch_size * 2]
            rows = source.x.repeat(len(batch), *[1] * (source.x.ndim - 1))
            for row, (name, fraction, token) in enumerate(batch):
                deleted = orders[name][token, : max(1, round(fraction * source.positions))]
                _delete(rows, row, deleted + first, source)
            log_probs = scorer(rows).double().cpu().numpy()
            found[start:start + len(batch)] = [log_probs[row, token] for row, (_, _, token) in enumerate(batch)]
    frame = pd.DataFrame(jobs, columns=["explanation", "fraction", "token"])
    frame["drop"] = clean[frame["token"].to_numpy()] - found
    table = frame.groupby(["explanation", "fraction"], sort=False)["drop"].agg(["mean", "std", "count"]).reset_index()
    table.columns = ["explanation", "fraction", "mean_drop", "std_drop", "tokens"]
    table.insert(2, "positions_deleted", [max(1, round(f * source.positions)) for f in table["fraction"]])
    return table


def _delete(rows: torch.Tensor, row: int, positions: np.ndarray, source: Source) -> None:
    index = torch.as_tensor(positions, device=rows.device)
    if source.kind == "text":
        rows[row, index] = source.baseline[0, 0].to(rows.dtype)
        return
    frames = (index[:, None] * source.stride + torch.arange(source.stride, device=rows.device)[None, :]).flatten()
    rows[row, :, frames] = source.baseline.reshape(()).to(rows.dtype)


def deletion_auc(table: pd.DataFrame) -> dict[str, float]:
    """Per explanation, the area under mean drop against fraction (the trapezoid rule from fraction 0, drop 0),
    divided by the largest fraction: the mean drop over the curve."""
    out = {}
    for name, group in table.groupby("explanation", sort=False):
        x = np.concatenate([[0.0], group["fraction"].to_numpy()])
        y = np.concatenate([[0.0], group["mean_drop"].to_numpy()])
        out[name] = float(np.trapezoid(y, x) / x[-1])
    return out


# --- the analysis --------------------------------------------------------------------------------------------------


def _figures(result: AnalysisResult) -> dict[str, go.Figure]:
    return figures(result)


@register("saliency", kinds=("encoder-decoder",), params=Params,
          description="cross-attention vs saliency agreement per head and aggregate (Papi et al. 2025): captum "
                      "saliency, integrated gradients, feature ablation; deletion curves",
          # one backward pass per output token and method: run it by name
          figures=_figures, default=False, cost="about 50 s on whisper-tiny.en (2 CPU cores)")
def run(context: Context) -> AnalysisResult:
    started = time.perf_counter()
    params = Params.read(context.params, context.seed)
    loaded = context.loaded
    model, processor = loaded.model, loaded.processor
    tokenizer = getattr(processor, "tokenizer", processor)
    if STACK not in context.scope.stacks:
        raise HeadscopeError(f"saliency needs a cross-attention stack; this model has {list(context.scope.stacks)}")
    if hasattr(processor, "feature_extractor"):
        if context.text is not None:
            raise HeadscopeError("this model reads speech: give a .wav file with --input, not --text")
        source = audio_source(loaded, context.input_path, params.baseline)
    else:
        shipped = context.text is None and context.input_path is None
        max_tokens = params.source_tokens if shipped and context.max_tokens is None else context.max_tokens
        source = text_source(loaded, context.text, context.input_path, max_tokens, params.baseline)
    started_decoding = time.perf_counter()
    target = decode(model, source, params.max_new_tokens, tokenizer, params.tokens)
    decoding_seconds = time.perf_counter() - started_decoding
    heads = alignment_heads(model)
    explanation = explain(model, context.scope, source, target, params)
    explanation.seconds["decoding"] = decoding_seconds
    result = assemble(explanation, source, target, params, heads)
    if params.deletion_fractions:
        started_deletion = time.perf_counter()
        result.tables["deletion"] = _deletion(model, source, target, explanation, params, heads)
        explanation.seconds["deletion"] = time.perf_counter() - started_deletion
        result.summary["deletion_auc"] = {k: round(v, 4) for k, v in deletion_auc(result.tables["deletion"]).items()}
    else:
        result.summary["deletion_auc"] = "not run: saliency.deletion_fractions is empty"
    result.summary["seconds"] = {k: round(v, 2) for k, v in explanation.seconds.items()}
    result.seconds = time.perf_counter() - started
    return result


def alignment_heads(model) -> list[tuple[int, int]] | None:
    """Whisper's alignment heads, (layer, head) pairs, from the generation config; None when it names none."""
    heads = getattr(model.generation_config, "alignment_heads", None)
    return [(int(layer), int(head)) for layer, head in heads] if heads else None


def _deletion(model, source: Source, target: Target, explanation: Explanation, params: Params,
              heads: list[tuple[int, int]] | None) -> pd.DataFrame:
    attention = aggregates(explanation.attention, heads)
    if params.deletion_attention not in attention:
        raise HeadscopeError(f"saliency deletion_attention '{params.deletion_attention}' is not an aggregate of "
                             f"this model: choose from {', '.join(attention)}")
    explanations = {f"attention:{params.deletion_attention}": attention[params.deletion_attention],
                    **explanation.saliency}
    return deletion_curves(Scorer(model, source, target), source, explanations, explanation.log_probs, params)


def assemble(explanation: Explanation, source: Source, target: Target, params: Params,
             heads: list[tuple[int, int]] | None = None) -> AnalysisResult:
    """Maps, tables and summary of one explanation."""
    result = AnalysisResult(name="saliency", params={**params.__dict__, "stack": STACK})
    attention = explanation.attention
    layers, n_heads = attention.shape[:2]
    per_head: dict[str, np.ndarray] = {}
    for method, saliency in explanation.saliency.items():
        values = np.array([[mean_over_tokens(token_agreement(attention[layer, head], saliency))
                            for head in range(n_heads)] for layer in range(layers)])  # (layers, heads, measures)
        per_head[method] = values
        for index, measure in enumerate(MEASURES):
            result.add_map(f"{measure}_{method}", HeadMap(values[..., index], STACK, DESCRIPTION.format(
                measure=measure.capitalize(), method=METHOD_TEXT[method])))
    rows, token_rows = [], []
    keeps = [("raw", None)]
    if source.noncontent is not None and source.noncontent.any() and not source.noncontent.all():
        keeps.append(("content_only", ~source.noncontent))
    for method, saliency in explanation.saliency.items():
        for name, aggregate in aggregates(attention, heads).items():
            for kept, keep in keeps:
                per_token = token_agreement(aggregate, saliency, keep)
                mean = mean_over_tokens(per_token)
                rows.append({"method": method, "aggregate": name, "attention": kept,
                             **dict(zip(MEASURES, mean, strict=True)),
                             "pearson_std": float(np.nanstd(per_token[:, 0])) if np.isfinite(per_token[:, 0]).any()
                             else math.nan, "tokens": int(np.isfinite(per_token[:, 0]).sum())})
                if kept == "raw":
                    token_rows += [{"token_index": i, "token": target.labels[i], "method": method, "aggregate": name,
                                    **dict(zip(MEASURES, per_token[i], strict=True))} for i in range(len(per_token))]
        values = per_head[method][..., 0]
        best = np.unravel_index(np.nanargmax(values), values.shape) if np.isfinite(values).any() else None
        rows.append({"method": method, "aggregate": "per_head_median", "attention": "raw",
                     **{m: float(np.nanmedian(per_head[method][..., i])) for i, m in enumerate(MEASURES)},
                     "pearson_std": math.nan, "tokens": len(target.queries)})
        if best is not None:
            rows.append({"method": method, "aggregate": f"best_head_{best[0]}.{best[1]}", "attention": "raw",
                         **{m: float(per_head[method][best][i]) for i, m in enumerate(MEASURES)},
                         "pearson_std": math.nan, "tokens": len(target.queries)})
    result.tables["aggregates"] = pd.DataFrame(rows)
    result.tables["tokens"] = pd.DataFrame(token_rows)
    result.tables["token_maps"] = _token_maps(explanation, source, target, params, heads)
    result.tables["positions"] = pd.DataFrame({
        "position": range(source.positions), "label": source.labels,
        "non_content": source.noncontent if source.noncontent is not None else False})
    result.summary = _summary(result, explanation, source, target, params)
    return result


def _token_maps(explanation: Explanation, source: Source, target: Target, params: Params,
                heads: list[tuple[int, int]] | None) -> pd.DataFrame:
    """Wide table for the overlay figure: per explanation and token, its values over the real positions."""
    attention = aggregates(explanation.attention, heads)
    name = params.deletion_attention if params.deletion_attention in attention else "all_layers"
    chosen = {f"attention:{name}": attention[name], **explanation.saliency}
    frames = []
    for explanation_name, values in chosen.items():
        frame = pd.DataFrame(values, columns=[str(p) for p in range(values.shape[1])])
        frame.insert(0, "token", target.labels)
        frame.insert(0, "token_index", range(len(values)))
        frame.insert(0, "explanation", explanation_name)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _summary(result: AnalysisResult, explanation: Explanation, source: Source, target: Target,
             params: Params) -> dict[str, Any]:
    table = result.tables["aggregates"]
    summary: dict[str, Any] = {"input": source.description, "output": target.text, "decoding": target.decoding,
                               "tokens_explained": len(target.queries), "encoder_positions": source.positions,
                               "token": _chosen_token(params, len(target.queries)),
                               "main_metric": f"pearson_{next(iter(explanation.saliency))}"}
    for method in explanation.saliency:
        rows = table[(table["method"] == method) & (table["attention"] == "raw")]
        summary[f"pearson_{method}"] = {row.aggregate: round(float(row.pearson), 4) for row in rows.itertuples()}
        top = result.top_heads(f"pearson_{method}", k=params.top_k, stack=STACK)
        summary[f"top_heads_{method}"] = [f"{layer}.{head}={value:.3f}" for layer, head, value in top]
    if explanation.ig_delta is not None:
        summary["integrated_gradients_relative_delta"] = round(explanation.ig_delta, 4)
    summary["mean_log_prob"] = round(float(explanation.log_probs.mean()), 4)
    return summary


def _chosen_token(params: Params, count: int) -> int:
    if params.token is None:
        return count // 2
    if not -count <= params.token < count:
        raise HeadscopeError(f"saliency token {params.token} is out of range: {count} tokens were explained")
    return params.token % count


# --- figures -------------------------------------------------------------------------------------------------------


def figures(result: AnalysisResult) -> dict[str, go.Figure]:
    """The aggregate bar chart, the token x position maps with the chosen token's overlay, the deletion curves."""
    out: dict[str, go.Figure] = {}
    table = result.tables.get("aggregates")
    if table is not None and len(table):
        raw = table[table["attention"] == "raw"]
        bars = go.Figure()
        for method, group in raw.groupby("method", sort=False):
            bars.add_bar(x=[html.escape(a) for a in group["aggregate"]], y=group["pearson"], name=method,
                         error_y={"type": "data", "array": group["pearson_std"].fillna(0), "visible": True})
        bars.update_layout(title="saliency: Pearson r of cross-attention aggregates with saliency (mean over tokens)",
                           xaxis_title="attention aggregate", yaxis_title="Pearson r", barmode="group",
                           template="simple_white", yaxis_range=[-1, 1])
        out["aggregates"] = bars
    maps = result.tables.get("token_maps")
    if maps is not None and len(maps):
        out["overlay"] = _overlay(result, maps)
    deletion = result.tables.get("deletion")
    if deletion is not None and len(deletion):
        curves = go.Figure()
        for name, group in deletion.groupby("explanation", sort=False):
            curves.add_scatter(x=[0.0, *group["fraction"]], y=[0.0, *group["mean_drop"]], mode="lines+markers",
                               name=html.escape(name))
        curves.update_layout(title="saliency: deletion curves (positions removed in each explanation's order)",
                             xaxis_title="fraction of encoder positions deleted",
                             yaxis_title="mean drop of log p(token)", xaxis_tickformat=".0%", template="simple_white")
        out["deletion"] = curves
    return out


def _overlay(result: AnalysisResult, maps: pd.DataFrame) -> go.Figure:
    """Side by side: token x position heatmaps (each row scaled to its maximum) of the attention aggregate and of
    each saliency method, and below, the chosen token's rows overlaid."""
    names = list(dict.fromkeys(maps["explanation"]))
    positions_table = result.tables.get("positions")
    labels = [] if positions_table is None else [str(label) for label in positions_table["label"]]
    token = int(result.summary.get("token", 0))
    figure = make_subplots(rows=2, cols=len(names), subplot_titles=[html.escape(n) for n in names],
                           row_heights=[0.65, 0.35], vertical_spacing=0.12, horizontal_spacing=0.03,
                           shared_xaxes=True, shared_yaxes=True)
    value_columns = [c for c in maps.columns if c not in ("explanation", "token_index", "token")]
    positions = np.arange(len(value_columns))
    hover = [html.escape(labels[p]) if p < len(labels) else str(p) for p in positions]
    for column, name in enumerate(names, start=1):
        group = maps[maps["explanation"] == name]
        values = group[value_columns].to_numpy(dtype=float)
        scaled = values / np.where(values.max(1, keepdims=True) > 0, values.max(1, keepdims=True), 1.0)
        tokens = [f"{i} {html.escape(str(t))}" for i, t in zip(group["token_index"], group["token"], strict=True)]
        figure.add_heatmap(z=scaled, x=positions, y=tokens, colorscale="Viridis", showscale=column == 1,
                           customdata=np.tile(hover, (len(tokens), 1)), row=1, col=column,
                           hovertemplate="%{y} at %{customdata}<br>scaled %{z:.3f}<extra></extra>")
        figure.add_scatter(x=positions, y=scaled[token], mode="lines", name=html.escape(name), row=2, col=column,
                           customdata=hover, hovertemplate="%{customdata}: %{y:.3f}<extra></extra>")
    chosen = maps.loc[maps["token_index"] == token, "token"].iloc[0]
    figure.update_xaxes(title_text="encoder position", row=2)
    figure.update_layout(title=f"saliency: cross-attention vs saliency per output token (rows scaled to their "
                               f"maximum); below, token {token} {html.escape(repr(chosen))}", showlegend=False,
                         template="simple_white", height=760, width=max(900, 360 * len(names)))
    return figure
