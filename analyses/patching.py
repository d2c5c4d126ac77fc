"""``patching``: activation patching of head outputs z between a clean and a corrupted prompt, and its
gradient approximation (attribution patching).

A pair is a clean prompt, on which ``answer`` is right, and a corrupted prompt of the same token length, on which
``wrong`` is right (probes: :mod:`headscope.probes.ioi`). With M a metric of the last position's logits:

- ``logit_diff``: M = logit(answer) - logit(wrong);
- ``probability``: M = softmax(logits)[answer];
- ``kl``: M = KL(p_clean || p) = sum_v p_clean(v) (log p_clean(v) - log p(v)), 0 on the clean run.

*Denoising* (the default) runs the corrupted prompt with z[l, h] (every position, or one position t) taken from
the clean run; *noising* runs the clean prompt with z taken from the corrupted run. Per head (or head and
position), over the N pairs, with M_clean, M_corrupted and M_patched means over the pairs:

- ``patch_effect`` = (M_patched - M_corrupted) / (M_clean - M_corrupted), the normalised patching effect:
  0 where the patch does nothing to the corrupted run, 1 where it restores the clean metric (denoising); under
  noising 1 where the clean run is unchanged, falling as the head matters;
- ``patch_metric`` = M_patched itself.

The L x H single-head patches run batched: one forward pass carries ``batch_size`` of them as rows of the batch,
each row with its own patch-mask row (:class:`~headscope.capture.gates.Gates` ``patch_mask``), the source z of
batch 1 serving every row.

*Attribution patching* (Nanda 2023; Syed, Rager, Conmy 2023, "Attribution Patching Outperforms Automated Circuit
Discovery") replaces each patch by its first-order Taylor term around the base run (the corrupted run when
denoising): M_patched - M_base ~ sum_t (z_source[l, h, t] - z_base[l, h, t]) . dM/dz[l, h, t], every head and
position from one forward and one backward pass of the base run (and the forward pass of the source run that the
patches read anyway). ``attribution_effect`` normalises M_base plus that term like ``patch_effect``; the summary
gives its Pearson correlation with ``patch_effect`` per layer (over that layer's heads) and over all heads. A
metric with a minimum at the base run (KL under noising) has zero gradient there: attribution patching gives 0.

*Direct logit attribution* (``dla``, on the clean prompt; Elhage et al. 2021, "A Mathematical Framework for
Transformer Circuits"): with d = W_U[answer] - W_U[wrong] and the final norm N(x) = s (P x) / sigma(x) + b taken at
*frozen scale* (sigma, the RMS or standard deviation of the final residual x, held at its value on the run; P
centres for a LayerNorm), head (l, h) contributes d . s (P W_O[l, h] z[l, h]) / sigma at the last token. The heads,
the output projections' biases, the rest of the residual stream (embeddings, MLPs) and d . b (plus the
unembedding's bias difference) sum to logit(answer) - logit(wrong) exactly. Models that normalise each attention
output before the residual stream (Gemma 2 and 3, OLMo 2) or soft-cap their logits are refused (``dla_skipped``).
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from headscope import plotting, progress
from headscope.capture.engine import Scope
from headscope.capture.gates import Gates
from headscope.errors import HeadscopeError
from headscope.models.cache import cache_keyword, cache_kwargs, output_cache
from headscope.probes import ioi
from headscope.probes import text as probe_text
from headscope.registry import Context, Parameters, register
from headscope.results import AnalysisResult, HeadMap

Metric = Literal["logit_diff", "probability", "kl"]
Direction = Literal["denoising", "noising"]
STACK = "self"
METRICS = {
    "logit_diff": "logit(answer) - logit(wrong) at the last token",
    "probability": "softmax probability of the answer at the last token",
    "kl": "KL(p_clean || p) at the last token, nats",
}
DLA_DESCRIPTION = ("direct logit attribution on the clean prompt's last token: the head's output through its slice of "
                   "the output projection and the final norm at frozen scale, on W_U[answer] - W_U[wrong]")
EFFECT = "(M_patched - M_corrupted) / (M_clean - M_corrupted), {}, z of the head taken from the {} run"


@dataclass(frozen=True)
class Params(Parameters):
    """The parameters of ``patching`` (``--set patching.NAME=VALUE`` overrides them).

    Attributes:
        clean, corrupt: one prompt pair of the same token length; when left out, the probe set ``probe``.
        answers: the clean prompt's answer and the corrupted prompt's (the wrong one), one token each with their
            leading space: ``(" Mary", " John")``, or on the command line ``" Mary"," John"`` (comma-separated,
            spaces kept) or a JSON list. ``kl`` needs none; ``probability`` reads the first.
        probe: the probe set when no pair is given: ioi (names, places, objects) or capitals.
        prompts: pairs drawn from the probe set.
        metric: logit_diff, probability (of the answer) or kl (to the clean run), at the last token.
        direction: denoising (the corrupted run with z from the clean run) or noising (the reverse).
        batch_size: patched rows per forward pass.
        top_k: heads of largest patch effect that are also patched one position at a time.
        heads: patch these heads one position at a time instead (``layer.head``, ``--set patching.heads=9.1,10.7``).
        groups: groups of heads patched together, each ``layer.head`` joined by ``+``
            (``--set patching.groups=9.6+9.9,10.0+10.7``); every layer's heads together are patched always.
        layer_positions: also patch every layer's heads together one position at a time.
        attribution: also compute attribution patching (one backward pass per pair).
        dla: also compute direct logit attribution on the clean prompts (needs both answers).
        seed: the probe set's seed (default: the run's ``--seed``).
    """

    analysis = "patching"

    clean: str = ""
    corrupt: str = ""
    answers: str | tuple[str, ...] = ""
    probe: Literal["ioi", "capitals"] = "ioi"
    prompts: int = 8
    metric: Metric = "logit_diff"
    direction: Direction = "denoising"
    batch_size: int = 16
    top_k: int = 3
    heads: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    layer_positions: bool = True
    attribution: bool = True
    dla: bool = True
    seed: int = 0

    def check(self) -> None:
        if self.batch_size < 1 or self.prompts < 1 or self.top_k < 0:
            raise HeadscopeError("patching needs batch_size >= 1, prompts >= 1 and top_k >= 0")
        if bool(self.clean) != bool(self.corrupt):
            raise HeadscopeError("patching needs both patching.clean and patching.corrupt (or neither, for the "
                                 "probe set)")
        answers = self.answer_list
        if len(answers) > 2:
            raise HeadscopeError(f"patching.answers takes the clean answer and the wrong one; got {len(answers)}")
        if self.clean and self.metric != "kl" and len(answers) < (2 if self.metric == "logit_diff" else 1):
            raise HeadscopeError(f"patching.metric={self.metric} needs patching.answers: the clean prompt's answer "
                                 "and the corrupted prompt's, e.g. --set patching.answers=\" Mary\",\" John\"")
        malformed = [name for name in self.heads if not re.fullmatch(r"\d+\.\d+", name.strip())]
        if malformed:
            raise HeadscopeError(f"patching.heads takes layer.head pairs such as 9.1; got {', '.join(malformed)}")
        malformed = [group for group in self.groups if not re.fullmatch(r"\d+\.\d+(\+\d+\.\d+)*", group.strip())]
        if malformed:
            raise HeadscopeError("patching.groups takes groups of layer.head joined by +, such as 9.6+9.9; got "
                                 f"{', '.join(malformed)}")

    @property
    def answer_list(self) -> list[str]:
        """``answers`` as a list, leading spaces kept."""
        if isinstance(self.answers, tuple):
            return list(self.answers)
        if self.answers.strip().startswith("["):
            return [str(item) for item in json.loads(self.answers)]
        return [item for item in self.answers.split(",") if item.strip()]


def _figures(result: AnalysisResult) -> dict[str, go.Figure]:
    return figures(result)


@register("patching", kinds=("decoder",), params=Params, main_metric="patch_effect",
          description="activation patching of head outputs between clean and corrupted prompts, attribution patching",
          figures=_figures, default=False,
          cost="49 s on smollm2-135m with its 8 IOI pairs")
def run(context: Context) -> AnalysisResult:
    started = time.perf_counter()
    params = Params.read(context.params, context.seed)
    if context.text is not None or context.input_path is not None:
        raise HeadscopeError("patching reads its prompts from patching.clean and patching.corrupt (or its probe set, "
                             "patching.probe), not from --text or --input")
    model, processor, info = context.loaded
    tokenizer = getattr(processor, "tokenizer", processor)
    scope = context.scope
    shape = scope.stacks[STACK]
    chosen = _heads(params.heads, shape, "patching.heads")
    groups = [_heads(group.split("+"), shape, "patching.groups") for group in params.groups]
    if params.clean:
        answers = [*params.answer_list, "", ""]
        found = [ioi.Pair(params.clean, params.corrupt, answers[0], answers[1], "user")]
    else:
        found = ioi.pairs(params.probe, tokenizer, params.prompts, params.seed)
    prepared = [prepare(model, scope, tokenizer, pair, params.metric, info.max_tokens) for pair in found]

    heads = patch_heads(model, scope, prepared, params.metric, params.direction, params.batch_size)
    result = AnalysisResult(name="patching", params={**params.__dict__, "answers": params.answer_list,
                                                      "pairs": len(prepared)})
    description = EFFECT.format(METRICS[params.metric], "clean" if params.direction == "denoising" else "corrupted")
    result.add_map("patch_effect", HeadMap(heads.effect, STACK, description, signed=True, unit="share restored"))
    result.add_map("patch_metric", HeadMap(heads.patched, STACK, f"mean M_patched, M = {METRICS[params.metric]}",
                                           signed=True, unit=params.metric))
    summary: dict[str, Any] = {
        "pairs": len(prepared), "probe": found[0].family, "metric": METRICS[params.metric],
        "direction": params.direction, "clean_metric": heads.clean, "corrupted_metric": heads.corrupted,
        "top_patch_effect": [f"{layer}.{head}={value:.4g}" for layer, head, value in
                             result.top_heads("patch_effect", k=5)],
    }
    if params.attribution:
        attributed = attribution_patching(model, scope, prepared, params.metric, params.direction)
        effect = heads.normalise(attributed.sum(-1) + heads.base)
        result.add_map("attribution_effect", HeadMap(effect, STACK, "first-order (attribution patching) estimate of "
                                                     "patch_effect", signed=True, unit="share restored"))
        summary["attribution_pearson_per_layer"] = [_pearson(effect[layer], heads.effect[layer])
                                                    for layer in range(shape.layers)]
        summary["attribution_pearson"] = _pearson(effect.ravel(), heads.effect.ravel())
        summary["top_attribution_effect"] = [f"{layer}.{head}={value:.4g}" for layer, head, value in
                                             result.top_heads("attribution_effect", k=5)]
    direct: list[Attribution] = []
    if params.dla and all(p.answer is not None and p.wrong is not None for p in prepared):
        try:
            direct = [direct_logit_attribution(model, scope, p.clean, p.answer, p.wrong) for p in prepared]
        except HeadscopeError as error:  # an architecture it does not fit: the patching results stand
            summary["dla_skipped"] = str(error)
    if direct:
        result.add_map("dla", HeadMap(np.mean([d.heads for d in direct], axis=0), STACK,
                                      DLA_DESCRIPTION, signed=True, unit="logits"))
        summary["dla"] = {"heads": float(np.mean([d.heads.sum() for d in direct])),
                          "output_biases": float(np.mean([d.biases for d in direct])),
                          "rest": float(np.mean([d.rest for d in direct])),
                          "constant": float(np.mean([d.constant for d in direct])),
                          "total": float(np.mean([d.total for d in direct])),
                          "logit_diff": float(np.mean([d.logit_diff for d in direct]))}
        summary["top_dla"] = [f"{layer}.{head}={value:.4g}" for layer, head, value in result.top_heads("dla", k=5)]
    named = chosen or [(layer, head) for layer, head, _ in result.top_heads("patch_effect", k=params.top_k)]
    same = [p for p in prepared if p.pair.template == prepared[0].pair.template and p.length == prepared[0].length]
    clean = float(np.mean([p.clean_metric for p in same]))
    corrupted = float(np.mean([p.corrupted_metric for p in same]))
    reference = HeadPatches(heads.patched, clean, corrupted, corrupted if params.direction == "denoising" else clean)
    per_position = None
    if params.attribution and (named or params.layer_positions):
        per_position = attribution_patching(model, scope, same, params.metric, params.direction)
    if named:
        result.tables["positions"] = patch_positions(model, scope, same, named, reference, params.metric,
                                                     params.direction, params.batch_size, attributed=per_position)
    if params.layer_positions:
        result.tables["layer_positions"] = patch_positions(model, scope, same, (), reference, params.metric,
                                                           params.direction, params.batch_size, layers=True,
                                                           attributed=per_position)
    if named or params.layer_positions:
        summary["position_pairs"] = len(same)
    result.tables["groups"] = patch_groups(model, scope, prepared, groups, heads, params.direction, params.batch_size)
    summary["top_layers"] = [f"{row.group}={row.patch_effect:.4g}" for row in
                             result.tables["groups"].head(shape.layers).nlargest(3, "patch_effect").itertuples()]
    result.tables["pairs"] = pd.DataFrame([{"clean": p.pair.clean, "corrupt": p.pair.corrupt, "answer": p.pair.answer,
                                            "wrong": p.pair.wrong, "clean_metric": p.clean_metric,
                                            "corrupted_metric": p.corrupted_metric,
                                            "shared_prefix": shared_prefix(model, scope, p)} for p in prepared])
    result.summary = summary
    result.seconds = time.perf_counter() - started
    return result


def _heads(names, shape, what: str) -> list[tuple[int, int]]:
    """``layer.head`` names as (layer, head) pairs; one clear error for a head past the model's."""
    heads = [tuple(int(part) for part in name.strip().split(".")) for name in names]
    past = [f"{layer}.{head}" for layer, head in heads if layer >= shape.layers or head >= shape.heads]
    if past:
        raise HeadscopeError(f"{what}: {', '.join(past)} is past the model's {shape.layers} layers x "
                             f"{shape.heads} heads")
    return heads


# --- the runs ----------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A pair, tokenised, with its clean and corrupted runs: last-token logits (vocab,) and, per layer, z
    (1, tokens, heads, head_dim); ``value(logits)`` is the pair's metric of (rows, vocab) logits."""

    pair: ioi.Pair
    clean: dict[str, torch.Tensor]
    corrupt: dict[str, torch.Tensor]
    tokens: list[str]
    corrupt_tokens: list[str]
    value: Callable[[torch.Tensor], torch.Tensor]
    clean_logits: torch.Tensor
    corrupted_logits: torch.Tensor
    clean_z: dict[int, torch.Tensor]
    corrupted_z: dict[int, torch.Tensor]
    answer: int | None = None
    wrong: int | None = None

    @property
    def length(self) -> int:
        return self.clean["input_ids"].shape[1]

    @property
    def clean_metric(self) -> float:
        return float(self.value(self.clean_logits[None])[0])

    @property
    def corrupted_metric(self) -> float:
        return float(self.value(self.corrupted_logits[None])[0])

    def base(self, direction: Direction) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
        """The run patched into and the z patched in: (corrupted inputs, clean z) when denoising."""
        return (self.corrupt, self.clean_z) if direction == "denoising" else (self.clean, self.corrupted_z)


def prepare(model: torch.nn.Module, scope: Scope, tokenizer, pair: ioi.Pair, metric: Metric,
            context: int | None = None) -> Prepared:
    """Tokenise ``pair`` and run both prompts, reading z; one clear error for prompts of different token lengths
    or an answer that is not one token."""
    clean = {k: v.to(model.device) for k, v in probe_text.encode(tokenizer, pair.clean, context).items()}
    corrupt = {k: v.to(model.device) for k, v in probe_text.encode(tokenizer, pair.corrupt, context).items()}
    answer = probe_text.one_token(tokenizer, pair.answer, "patching: the answer") if pair.answer else None
    wrong = probe_text.one_token(tokenizer, pair.wrong, "patching: the wrong answer") if pair.wrong else None
    return prepare_inputs(model, scope, clean, corrupt, answer, wrong, metric, pair,
                          probe_text.readable(tokenizer, clean["input_ids"][0].tolist()),
                          probe_text.readable(tokenizer, corrupt["input_ids"][0].tolist()))


def prepare_inputs(model: torch.nn.Module, scope: Scope, clean: dict[str, torch.Tensor],
                   corrupt: dict[str, torch.Tensor], answer: int | None, wrong: int | None,
                   metric: Metric = "logit_diff", pair: ioi.Pair | None = None, tokens: list[str] | None = None,
                   corrupt_tokens: list[str] | None = None) -> Prepared:
    """A pair given as token ids (inputs of batch 1, same shape) and answer token ids, run both ways."""
    if clean["input_ids"].shape != corrupt["input_ids"].shape or clean["input_ids"].shape[0] != 1:
        if pair is not None:
            shown = (f"{pair.clean!r} is {clean['input_ids'].shape[1]} tokens and the corrupted {pair.corrupt!r} "
                     f"{corrupt['input_ids'].shape[1]}")
        else:
            shown = f"is {tuple(clean['input_ids'].shape)} and the corrupted {tuple(corrupt['input_ids'].shape)}"
        raise HeadscopeError(f"the clean prompt {shown}: patching matches positions one to one, so both need the "
                             "same token length (and batch 1)")
    clean_logits, clean_z = read_run(model, scope, clean)
    corrupted_logits, corrupted_z = read_run(model, scope, corrupt)
    tokens = tokens or [str(int(i)) for i in clean["input_ids"][0]]
    corrupt_tokens = corrupt_tokens or [str(int(i)) for i in corrupt["input_ids"][0]]
    pair = pair or ioi.Pair(" ".join(tokens), " ".join(corrupt_tokens), str(answer), str(wrong), "user")
    return Prepared(pair, clean, corrupt, tokens, corrupt_tokens, metric_function(metric, answer, wrong, clean_logits),
                    clean_logits, corrupted_logits, clean_z, corrupted_z, answer, wrong)


def read_run(model: torch.nn.Module, scope: Scope, inputs: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The last token's logits (vocab,) float32 of one run (batch 1), and its z per layer (1, tokens, heads, d)."""
    reader = Gates(stack=STACK, read="all")
    with torch.no_grad(), scope.capture(gates=[reader]):
        logits = _wide(_call(model, inputs).logits[0, -1])
    return logits, reader.z()


def metric_function(metric: Metric, answer: int | None, wrong: int | None,
                    clean_logits: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """M of (rows, vocab) last-token logits, (rows,) float32 (float64 for float64 logits); see the module's
    docstring."""
    if metric == "logit_diff":
        if answer is None or wrong is None:
            raise HeadscopeError("patching.metric=logit_diff needs two answers (patching.answers)")
        return lambda logits: _wide(logits[:, answer]) - _wide(logits[:, wrong])
    if metric == "probability":
        if answer is None:
            raise HeadscopeError("patching.metric=probability needs an answer (patching.answers)")
        return lambda logits: torch.softmax(_wide(logits), -1)[:, answer]
    reference = torch.log_softmax(_wide(clean_logits), -1)

    def kl(logits: torch.Tensor) -> torch.Tensor:
        own = torch.log_softmax(_wide(logits), -1)
        return (reference.exp() * (reference - own.to(reference.device))).sum(-1)

    return kl


def patched_logits(model: torch.nn.Module, scope: Scope, inputs: dict[str, torch.Tensor],
                   source: dict[int, torch.Tensor], masks: torch.Tensor, batch_size: int = 16,
                   what: str = "patching: head patches", prefix: int = 0) -> torch.Tensor:
    """(rows, vocab) last-token logits of ``inputs`` (batch 1) repeated once per row of ``masks``, row i with z
    taken from ``source`` where ``masks[i]`` is set: masks (rows, layers, heads) or (rows, layers, heads, tokens).
    ``batch_size`` rows per forward pass.

    ``prefix`` leading tokens (see :func:`shared_prefix`) run once into a key/value cache that every pass extends:
    the passes compute only the tokens after it, and a patch there is left out (it would put z in its own place)."""
    if not 0 <= prefix < inputs["input_ids"].shape[1]:
        raise HeadscopeError(f"patching: a shared prefix of {prefix} tokens leaves no token of "
                             f"{inputs['input_ids'].shape[1]} to run")
    cache = None
    if prefix:
        with torch.no_grad():
            cache = output_cache(_call(model, {name: tensor[:, :prefix] for name, tensor in inputs.items()},
                                       use_cache=True))
        source = {layer: z[:, prefix:] for layer, z in source.items()}
        masks = masks[..., prefix:] if masks.ndim == 4 else masks
        inputs = {name: tensor if name == "attention_mask" else tensor[:, prefix:] for name, tensor in inputs.items()}
    out = []
    for start in progress.steps(range(0, len(masks), batch_size), what):
        chunk = masks[start:start + batch_size]
        rows = {name: tensor.expand(len(chunk), *tensor.shape[1:]) for name, tensor in inputs.items()}
        with torch.no_grad(), scope.capture(gates=[Gates(stack=STACK, patch=source, patch_mask=chunk)]):
            if cache is None:
                logits = _call(model, rows).logits
            else:
                past = copy.deepcopy(cache)
                past.batch_repeat_interleave(len(chunk))
                logits = _call(model, rows, **cache_kwargs(model, past), use_cache=True).logits
            out.append(_wide(logits[:, -1]).cpu())
    return torch.cat(out)


def shared_prefix(model: torch.nn.Module, scope: Scope, pair: Prepared) -> int:
    """The leading tokens on which the pair's prompts agree. A causal model computes the same z there in both runs,
    so patching them changes nothing, and :func:`patched_logits` can run them once; 0 for a model whose attention
    is not causal or that takes no key/value cache."""
    sites = [site for site in scope.adapter.sites if site.stack == STACK]
    if not all(getattr(site.module, "is_causal", False) for site in sites):
        return 0
    if cache_keyword(model) not in inspect.signature(model.forward).parameters:
        return 0
    differ = (pair.clean["input_ids"][0] != pair.corrupt["input_ids"][0]).nonzero()
    return min(int(differ[0]) if len(differ) else pair.length, pair.length - 1)


def _wide(values: torch.Tensor) -> torch.Tensor:
    """``values`` in float32, or float64 where they are float64 already."""
    return values if values.dtype == torch.float64 else values.float()


def _call(model, inputs: dict[str, torch.Tensor], **options):
    """``model(**inputs)`` without a cache, and with the logits of the last token only where the model can."""
    return model(**inputs, **options, **_last_only(model), **({} if options else _no_cache(model)))


def _last_only(model) -> dict[str, int]:
    """``logits_to_keep=1`` where ``model.forward`` takes it: the metrics read the last token, and the unembedding
    of the others is a fifth of a small model's pass."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _no_cache(model) -> dict[str, bool]:
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


# --- patching every head ---------------------------------------------------------------------------------------


@dataclass
class HeadPatches:
    """Means over the pairs: M per single-head patch (layers, heads), clean, corrupted and base (unpatched) M."""

    patched: np.ndarray
    clean: float
    corrupted: float
    base: float

    def normalise(self, values: np.ndarray | float) -> np.ndarray:
        """(values - M_corrupted) / (M_clean - M_corrupted)."""
        return (np.asarray(values, dtype=float) - self.corrupted) / (self.clean - self.corrupted)

    @property
    def effect(self) -> np.ndarray:
        return self.normalise(self.patched)


def single_head_masks(layers: int, heads: int) -> torch.Tensor:
    """(layers * heads, layers, heads) bool: row i patches head i alone (i = layer * heads + head)."""
    return torch.eye(layers * heads, dtype=torch.bool).view(layers * heads, layers, heads)


def mean_patched(model: torch.nn.Module, scope: Scope, prepared: Sequence[Prepared], masks: torch.Tensor,
                 direction: Direction = "denoising", batch_size: int = 16, what: str = "patching: head patches",
                 reuse_prefix: bool = True) -> np.ndarray:
    """(rows,) M of each row of ``masks`` (see :func:`patched_logits`), the mean over the pairs; with
    ``reuse_prefix`` each pair's shared prefix runs once."""
    values = []
    for pair in prepared:
        inputs, source = pair.base(direction)
        prefix = shared_prefix(model, scope, pair) if reuse_prefix else 0
        logits = patched_logits(model, scope, inputs, source, masks, batch_size, what, prefix)
        values.append(pair.value(logits).double().numpy())
    return np.mean(values, axis=0)


def patch_heads(model: torch.nn.Module, scope: Scope, prepared: Sequence[Prepared], metric: Metric = "logit_diff",
                direction: Direction = "denoising", batch_size: int = 16, reuse_prefix: bool = True) -> HeadPatches:
    """Every single-head patch (all positions) of every pair, batched; the means over the pairs."""
    clean = float(np.mean([p.clean_metric for p in prepared]))
    corrupted = float(np.mean([p.corrupted_metric for p in prepared]))
    if not np.isfinite(clean - corrupted) or clean == corrupted:
        raise HeadscopeError(f"the clean and corrupted prompts give the same {metric} ({clean:.6g}): there is no "
                             "effect to normalise by; corrupt the prompt where it changes the answer")
    shape = scope.stacks[STACK]
    masks = single_head_masks(shape.layers, shape.heads)
    patched = mean_patched(model, scope, prepared, masks, direction, batch_size, reuse_prefix=reuse_prefix)
    return HeadPatches(patched.reshape(shape.layers, shape.heads), clean, corrupted,
                       corrupted if direction == "denoising" else clean)


def patch_groups(model: torch.nn.Module, scope: Scope, prepared: Sequence[Prepared],
                 groups: Sequence[Sequence[tuple[int, int]]], reference: HeadPatches,
                 direction: Direction = "denoising", batch_size: int = 16, reuse_prefix: bool = True
                 ) -> pd.DataFrame:
    """Each group of heads patched together at every position; every layer's heads together first (the
    group ``layer 3``), then ``groups``. Columns: group, heads, patch_metric, patch_effect."""
    shape = scope.stacks[STACK]
    named = [(f"layer {layer}", [(layer, head) for head in range(shape.heads)]) for layer in range(shape.layers)]
    named += [("+".join(f"{layer}.{head}" for layer, head in group), list(group)) for group in groups]
    masks = torch.zeros(len(named), shape.layers, shape.heads, dtype=torch.bool)
    for row, (_, heads) in enumerate(named):
        for layer, head in heads:
            masks[row, layer, head] = True
    mean = mean_patched(model, scope, prepared, masks, direction, batch_size, "patching: group patches", reuse_prefix)
    return pd.DataFrame([{"group": name, "heads": len(heads), "patch_metric": mean[row],
                          "patch_effect": float(reference.normalise(mean[row]))}
                         for row, (name, heads) in enumerate(named)])


def patch_positions(model: torch.nn.Module, scope: Scope, prepared: Sequence[Prepared],
                    heads: Sequence[tuple[int, int]], reference: HeadPatches, metric: Metric = "logit_diff",
                    direction: Direction = "denoising", batch_size: int = 16, reuse_prefix: bool = True,
                    layers: bool = False, attributed: np.ndarray | None = None) -> pd.DataFrame:
    """Each of ``heads`` patched at one position at a time, over pairs of one token length (one template); with
    ``layers``, every layer's heads together at one position at a time instead (``head`` is -1).

    Columns: layer, head, position, token (clean, and corrupted after an arrow where it differs), patch_metric
    (mean over the pairs) and patch_effect (normalised with the clean and corrupted means of ``reference``, which
    should be those of the same pairs). With ``attributed``, attribution patching's (layers, heads, tokens) terms
    for the same pairs (:func:`attribution_patching`) give column attribution_effect, normalised alike. With
    ``reuse_prefix``, positions before the first corrupted token are not run: their patch puts a z in its own
    place, and their rows hold the unpatched M."""
    shape = scope.stacks[STACK]
    tokens = prepared[0].length
    units = [(layer, -1) for layer in range(shape.layers)] if layers else list(heads)
    masks = torch.zeros(len(units) * tokens, shape.layers, shape.heads, tokens, dtype=torch.bool)
    for i, (layer, head) in enumerate(units):
        for position in range(tokens):
            masks[i * tokens + position, layer, slice(None) if head < 0 else head, position] = True
    what = "patching: layer x position patches" if layers else "patching: head x position patches"
    mean = mean_patched(model, scope, prepared, masks, direction, batch_size, what, reuse_prefix)
    first = prepared[0]
    labels = [clean if clean == bad else f"{clean}→{bad}" for clean, bad in zip(first.tokens, first.corrupt_tokens,
                                                                                 strict=True)]
    table = pd.DataFrame([{"layer": layer, "head": head, "position": position, "token": labels[position],
                           "patch_metric": mean[i * tokens + position],
                           "patch_effect": float(reference.normalise(mean[i * tokens + position]))}
                          for i, (layer, head) in enumerate(units) for position in range(tokens)])
    if attributed is not None:
        terms = np.stack([attributed[layer].sum(0) if head < 0 else attributed[layer, head] for layer, head in units])
        table["attribution_effect"] = reference.normalise(reference.base + terms.ravel())
    return table


# --- attribution patching --------------------------------------------------------------------------------------


def attribution_patching(model: torch.nn.Module, scope: Scope, prepared: Sequence[Prepared],
                         metric: Metric = "logit_diff", direction: Direction = "denoising") -> np.ndarray:
    """(layers, heads, tokens) mean over the pairs of (z_source - z_base) . dM/dz at the base run, per head and
    position: the first-order estimate of M_patched - M_base for a patch of that head at that position (sum over
    tokens: the whole head). Pairs must share one token length."""
    shape = scope.stacks[STACK]
    lengths = {p.length for p in prepared}
    if len(lengths) > 1:  # pairs of several templates: the per-head sums still average
        out = [attribution_patching(model, scope, [p], metric, direction).sum(-1) for p in prepared]
        return np.mean(out, axis=0)[..., None]
    found = []
    for pair in prepared:
        inputs, source = pair.base(direction)
        base_z = pair.corrupted_z if direction == "denoising" else pair.clean_z
        grads = _z_gradients(model, scope, inputs, pair.value)
        terms = np.zeros((shape.layers, shape.heads, pair.length))
        for layer, grad in grads.items():
            delta = (source[layer] - base_z[layer]).to(grad)
            terms[layer] = (delta * grad).double().sum(-1)[0].T.cpu().numpy()  # (tokens, heads) -> (heads, tokens)
        found.append(terms)
    return np.mean(found, axis=0)


def _z_gradients(model: torch.nn.Module, scope: Scope, inputs: dict[str, torch.Tensor],
                 value: Callable[[torch.Tensor], torch.Tensor]) -> dict[int, torch.Tensor]:
    """dM/dz per layer, (1, tokens, heads, head_dim), from one forward and one backward pass of ``inputs``."""
    shape = scope.stacks[STACK]
    gate = Gates(stack=STACK, scale=torch.ones(shape.layers, shape.heads, requires_grad=True))
    grads: dict[int, torch.Tensor] = {}
    handles = []

    def keep(site):
        def hook(module, args):
            x = args[0]
            x.register_hook(lambda grad: grads.__setitem__(site.layer, grad.detach().view(*x.shape[:2], site.heads,
                                                                                           -1)))
        return hook

    try:
        with torch.enable_grad(), scope.capture(gates=[gate]):
            for site in scope.adapter.sites:  # after the gate's hooks: they see the gated z, which needs a gradient
                if site.stack == STACK:
                    handles.append(site.out_proj.register_forward_pre_hook(keep(site)))
            value(_call(model, inputs).logits[:, -1]).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    return grads


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson's r of two arrays; None where either is constant."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


# --- direct logit attribution --------------------------------------------------------------------------------


FINAL_NORMS = ("model.norm", "transformer.ln_f", "model.language_model.norm", "gpt_neox.final_layer_norm",
               "model.final_layernorm", "model.decoder.final_layer_norm")
"""Where decoders keep the norm between the last layer and the unembedding, one path per architecture family."""
NORMED_AFTER_ATTENTION = ("gemma2", "gemma3", "gemma3_text", "olmo2", "olmo3")
"""Model types that normalise the attention block's output before adding it to the residual stream: a head's write
there is not linear in z, so direct logit attribution does not apply."""


@dataclass
class Attribution:
    """Direct logit attribution of one run's last token on d = W_U[answer] - W_U[wrong], frozen final-norm scale.

    ``heads`` (layers, heads): d . N'(W_O[l, h] z[l, h]); ``biases``: d . N'(sum of the output projections'
    biases); ``rest``: d . N'(everything else in the residual stream: embeddings, MLPs); ``constant``: d . b_norm
    plus the unembedding's bias difference; their sum is the logit difference. N'(v) = s (P v) / sigma, with the
    final norm's scale s and its sigma (RMS, or standard deviation) held at their values on the run; P centres v
    for a LayerNorm and is the identity for an RMSNorm.
    """

    heads: np.ndarray
    biases: float
    rest: float
    constant: float
    logit_diff: float

    @property
    def total(self) -> float:
        return float(self.heads.sum() + self.biases + self.rest + self.constant)


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder's final norm (see :data:`FINAL_NORMS`); one clear error where none is found."""
    for path in FINAL_NORMS:
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise HeadscopeError(f"direct logit attribution found no final norm in {type(model).__name__} (looked for "
                         f"{', '.join(FINAL_NORMS)})")


def frozen_norm(norm: torch.nn.Module, x: torch.Tensor, out: torch.Tensor
            ) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """The final norm at frozen scale as (linear map N', constant b) with N'(x) + b = N(x) for this x (hidden,),
    checked against the norm's own output ``out``."""
    x64, out64 = x.double(), out.double()
    weight = getattr(norm, "weight", None)
    bias = getattr(norm, "bias", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0))
    centre = isinstance(norm, torch.nn.LayerNorm)
    centred = x64 - x64.mean() if centre else x64
    sigma = torch.sqrt(centred.pow(2).mean() + eps)
    constant = bias.detach().double() if bias is not None else torch.zeros_like(x64)
    ones = torch.ones_like(x64)
    scales = [ones] if weight is None else [weight.detach().double(), 1.0 + weight.detach().double()]
    for scale in scales:  # Gemma's RMSNorm scales by 1 + weight
        def linear(v: torch.Tensor, scale: torch.Tensor = scale) -> torch.Tensor:
            v = v.double()
            return scale * (v - v.mean(-1, keepdim=True) if centre else v) / sigma
        if torch.allclose(linear(x64) + constant, out64, rtol=1e-4, atol=1e-4 * float(out64.abs().max())):
            return linear, constant
    raise HeadscopeError(f"direct logit attribution does not know the final norm {type(norm).__name__}: it is not "
                         "a LayerNorm or an RMSNorm whose output is scale * x / sigma (+ bias)")


def direct_logit_attribution(model: torch.nn.Module, scope: Scope, inputs: dict[str, torch.Tensor], answer: int,
                             wrong: int) -> Attribution:
    """Direct logit attribution of the last token of ``inputs`` (batch 1); see :class:`Attribution`."""
    config = model.config.get_text_config()
    if config.model_type in NORMED_AFTER_ATTENTION:
        raise HeadscopeError(f"direct logit attribution does not apply to {config.model_type}: it normalises each "
                             "attention output before the residual stream, so a head's write is not linear in z")
    if getattr(config, "final_logit_softcapping", None):
        raise HeadscopeError("direct logit attribution needs logits linear in the final residual stream; this model "
                             "soft-caps its logits")
    norm, unembedding = final_norm(model), model.get_output_embeddings()
    seen: dict[str, torch.Tensor] = {}

    def keep(module, args, output):
        seen["x"], seen["out"] = args[0][0, -1].detach(), output[0, -1].detach()

    handle = norm.register_forward_hook(keep)
    reader = Gates(stack=STACK, read="all")
    try:
        with torch.no_grad(), scope.capture(gates=[reader]):
            logits = _call(model, inputs).logits[0, -1].double()
    finally:
        handle.remove()
    linear, constant = frozen_norm(norm, seen["x"], seen["out"])
    direction = (unembedding.weight[answer] - unembedding.weight[wrong]).detach().double()
    offset = 0.0
    if getattr(unembedding, "bias", None) is not None:
        offset = float(unembedding.bias[answer] - unembedding.bias[wrong])
    shape = scope.stacks[STACK]
    heads = np.zeros((shape.layers, shape.heads))
    writes = torch.zeros_like(seen["x"], dtype=torch.float64)
    biases = torch.zeros_like(writes)
    z = reader.z()
    with torch.no_grad():
        for site in scope.adapter.sites:
            if site.stack != STACK:
                continue
            last = z[site.layer][0, -1]  # (heads, head_dim)
            alone = torch.zeros(site.heads + 1, site.heads, last.shape[-1], dtype=last.dtype, device=last.device)
            for head in range(site.heads):
                alone[head, head] = last[head]
            out = site.out_proj(alone.view(1, site.heads + 1, -1))[0].double()  # last row: no head, the bias alone
            own = out[:-1] - out[-1]
            heads[site.layer, :site.heads] = (linear(own) @ direction).cpu().numpy()
            writes += own.sum(0)
            biases += out[-1]
    rest = seen["x"].double() - writes - biases
    return Attribution(heads, float(linear(biases) @ direction), float(linear(rest) @ direction),
                       float(constant @ direction) + offset, float(logits[answer] - logits[wrong]))


# --- figures ---------------------------------------------------------------------------------------------------


def figures(result: AnalysisResult) -> dict[str, go.Figure]:
    """``positions``: the patch effect of the chosen heads, one position at a time, and ``layer_positions``: of
    every layer's heads together (signed scales centred at 0); ``attribution``: attribution patching against
    patching, one point per head."""
    out: dict[str, go.Figure] = {}
    for name, unit in (("positions", "head"), ("layer_positions", "layer")):
        table = result.tables.get(name)
        if table is not None and len(table):
            out[name] = _position_figure(table, unit, result.params["direction"])
    if ("attribution_effect", STACK) in result.maps:
        patched = result.map("patch_effect").values
        attributed = result.map("attribution_effect").values
        layers, heads = patched.shape
        names = [f"{layer}.{head}" for layer in range(layers) for head in range(heads)]
        figure = go.Figure(go.Scatter(x=patched.ravel(), y=attributed.ravel(), mode="markers", text=names,
                                      marker={"color": np.repeat(np.arange(layers), heads), "colorscale": "Viridis",
                                              "colorbar": {"title": {"text": "layer"}}},
                                      hovertemplate="head %{text}<br>patching %{x:.4g}<br>attribution %{y:.4g}"
                                                    "<extra></extra>"))
        low = float(np.nanmin([patched.min(), attributed.min()]))
        high = float(np.nanmax([patched.max(), attributed.max()]))
        figure.add_trace(go.Scatter(x=[low, high], y=[low, high], mode="lines", line={"dash": "dot"},
                                    name="y = x", showlegend=False))
        figure.update_layout(title=plotting.wrap_title("patching: attribution patching against activation patching"),
                             xaxis_title="patch effect", yaxis_title="attribution effect", template="simple_white",
                             width=560, height=480)
        out["attribution"] = figure
    return out


def _position_figure(table: pd.DataFrame, unit: str, direction: str) -> go.Figure:
    """The patch effect of each head (or layer) at each position: a heatmap on a signed scale centred at 0."""
    keys = zip(table["layer"], table["head"], strict=True)
    names = list(dict.fromkeys(str(layer) if head < 0 else f"{layer}.{head}" for layer, head in keys))
    tokens = int(table["position"].max()) + 1
    values = table["patch_effect"].to_numpy().reshape(len(names), tokens)
    labels = [plotting.escape_label(f"{p}:{t}") for p, t in enumerate(table["token"].iloc[:tokens])]
    limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    figure = go.Figure(go.Heatmap(z=values, x=labels, y=names, colorscale=plotting.DIVERGING, zmid=0.0,
                                  zmin=-limit, zmax=limit, colorbar={"title": {"text": "share restored"}},
                                  hovertemplate=f"{unit} %{{y}}<br>token %{{x}}<br>effect %{{z:.4g}}<extra></extra>"))
    what = "each layer's heads together" if unit == "layer" else "per head"
    figure.update_layout(title=plotting.wrap_title(f"patching: effect per position, {what} ({direction})"),
                         xaxis_title="position: token", yaxis_title=unit, yaxis_autorange="reversed",
                         template="simple_white", width=max(480, 160 + 40 * tokens),
                         height=max(300, 160 + (14 if unit == "layer" else 30) * len(names)))
    return figure
