"""``importance``: how much each head matters to the model's own loss (or a task metric) on the probe.

The objective (see :func:`objective`), one value per forward pass:

- decoders: the next-token loss, mean cross-entropy over the real tokens that have a real next token (the
  shipped prose cut to ``probe_tokens``, 128, by default, or the user's text); or, with ``answer`` and
  ``wrong`` given, the task metric logit(answer) - logit(wrong) at the last token (higher is better);
- encoder-decoders: the decoder loss on the model's own greedy output (or on ``target``), teacher-forced;
- bare encoders: an output-preservation loss, sum_t ||h_t - h0_t||^2 / sum_t ||h0_t||^2 over the real tokens
  of the final hidden state h against the un-gated run's h0. Its minimum is the clean run, so its gradient
  with respect to every gate is zero there: encoders get the ablation maps and no gradient maps.

Per head (l, h) of every attention stack but the vision tower, with z[l, h] its output (tokens, head_dim) before
the output projection, a gate xi[l, h] = 1 multiplying it, T the stack's number of real tokens:

- ``gradient_per_token`` = 1/T sum_t |z_t . dL/dz_t| (Michel, Levy, Neubig 2019, the authors' estimator);
- ``gradient_per_batch`` = 1/T |dL/dxi| = 1/T |sum_t z_t . dL/dz_t| (transformers' old ``run_bertology.py``);
- ``*_normalised``: each layer divided by its L2 norm + 1e-20, then (``min_max=True``) min-max over all heads;
- ``ablation_zero``, ``ablation_mean``, ``ablation_uniform``: L with z[l, h] <- 0, <- its mean over the probe's
  real tokens, or with the head attending uniformly over its visible keys, minus the clean L.

Both gradient estimators come from one forward and one backward pass. The single-head ablations run batched:
one forward pass carries ``batch_size`` of them as rows of the batch, each row with its own gate row, and with
``prefix_reuse`` the layers before a pass's first ablated layer run once at batch 1 (the clean run) before the
hidden states are widened to the batch. Pruning curve: heads masked (z <- 0) in ascending gradient importance
(ablation importance for encoders), ``step`` of all heads at a time, optionally re-estimating the importance
of the remaining heads after each step and keeping ``min_heads_per_layer``; compared with random orders.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from scipy.stats import spearmanr

from headscope import distributed, progress
from headscope.capture.adapters import Site
from headscope.capture.engine import Scope
from headscope.capture.gates import Gates
from headscope.errors import HeadscopeError, MemoryBudgetError
from headscope.probes import decoding
from headscope.probes import inputs as probe_inputs
from headscope.probes import text as probe_text
from headscope.registry import Context, Parameters, register
from headscope.results import AnalysisResult, HeadMap

Ablation = Literal["zero", "mean", "uniform"]
ABLATIONS: tuple[Ablation, ...] = ("zero", "mean", "uniform")
EPS = 1e-20
DESCRIPTIONS = {
    "gradient_per_token": "1/T sum_t |z_t . dL/dz_t| (Michel et al. 2019, per-token estimator)",
    "gradient_per_batch": "1/T |dL/dgate| = 1/T |sum_t z_t . dL/dz_t| (run_bertology, per-batch estimator)",
    "ablation_zero": "{} with the head's output zeroed minus the clean {}",
    "ablation_mean": "{} with the head's output replaced by its mean over the probe's tokens minus the clean {}",
    "ablation_uniform": "{} with the head attending uniformly over its visible keys minus the clean {}",
}
NORMALISED = "{}, each layer divided by its L2 norm + 1e-20{}"


@dataclass(frozen=True)
class Params(Parameters):
    """The parameters of ``importance`` (``--set importance.NAME=VALUE`` overrides them).

    Attributes:
        batch_size: ablation rows per forward pass.
        probe_tokens: the shipped prose is cut to this many tokens unless ``--max-tokens`` says otherwise (user
            text is never cut).
        ablations: comma-separated kinds among zero, mean, uniform.
        prefix_reuse: run the layers before a pass's first ablated layer once at batch 1.
        step: the fraction of all heads masked per pruning step.
        random_orders: random pruning orders averaged.
        reestimate: recompute the gradient importance of the remaining heads after each pruning step
            (``run_bertology``'s loop).
        min_heads_per_layer: heads each layer keeps while pruning.
        tolerance: the relative worsening that ends the prunable fraction.
        min_max: min-max the layer-normalised maps over all heads.
        answer, wrong: one token each: the task metric logit(answer) - logit(wrong) at the last token replaces
            the loss (decoders).
        target: the text an encoder-decoder is scored on instead of its own output.
        max_new_tokens: length of that own output.
        memory_gib: the most a batched pass's logits may take, in GiB (refused up front beyond it).
        seed: the random pruning orders' seed (default: the run's ``--seed``).
        layers: ablate only the heads of these layers (default: every layer); the other heads' ablation values
            are left out (NaN). The gradient proxies and the pruning curve still cover every head.
        heads: ablate only these heads, each ``layer.head`` (``--set importance.heads=3.1,5.0``); not together
            with ``layers``.
    """

    analysis = "importance"

    batch_size: int = 16
    probe_tokens: int = 128
    ablations: str = "zero,mean,uniform"
    prefix_reuse: bool = True
    step: float = 0.1
    random_orders: int = 3
    reestimate: bool = False
    min_heads_per_layer: int = 0
    tolerance: float = 0.05
    min_max: bool = False
    answer: str = ""
    wrong: str = ""
    target: str = ""
    max_new_tokens: int = 48
    memory_gib: float = 4.0
    seed: int = 0
    layers: tuple[int, ...] = ()
    heads: tuple[str, ...] = ()

    def check(self) -> None:
        params = self
        valid = (params.batch_size >= 1, params.probe_tokens >= 2, 0 < params.step <= 1, params.random_orders >= 0,
                 params.tolerance >= 0, params.min_heads_per_layer >= 0, params.max_new_tokens >= 1,
                 params.memory_gib > 0)
        if not all(valid):
            raise HeadscopeError("importance needs batch_size >= 1, probe_tokens >= 2, 0 < step <= 1, random_orders "
                                 ">= 0, tolerance >= 0, min_heads_per_layer >= 0, max_new_tokens >= 1 and "
                                 "memory_gib > 0")
        unknown_kinds = set(params.kinds) - set(ABLATIONS)
        if unknown_kinds or not params.kinds:
            raise HeadscopeError(f"importance.ablations takes a comma-separated list of {', '.join(ABLATIONS)}; "
                                 f"got {params.ablations!r}")
        if params.layers and params.heads:
            raise HeadscopeError("importance takes layers or heads, not both: name the heads of those layers in "
                                 "importance.heads instead")
        malformed = [name for name in params.heads if not re.fullmatch(r"\d+\.\d+", name.strip())]
        if malformed or any(layer < 0 for layer in params.layers):
            raise HeadscopeError(f"importance.heads takes layer.head pairs such as 3.1 and importance.layers "
                                 f"layer numbers from 0; got {', '.join(malformed) or params.layers}")
        if bool(params.answer) != bool(params.wrong):
            raise HeadscopeError("the task metric needs both importance.answer and importance.wrong")

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(kind.strip() for kind in self.ablations.split(",") if kind.strip())

    def selected(self, scope: Scope, stacks: Sequence[str]) -> list[tuple[Site, int]] | None:
        """The (site, head) pairs ``layers`` or ``heads`` name, in running order (None: every head); a layer or
        head past the model's is refused."""
        if not self.layers and not self.heads:
            return None
        named = {tuple(int(part) for part in name.split(".")) for name in self.heads}
        for stack in stacks:
            shape = scope.stacks[stack]
            past = [f"{layer}" for layer in self.layers if layer >= shape.layers]
            past += [f"{layer}.{head}" for layer, head in named if layer >= shape.layers or head >= shape.heads]
            if past:
                raise HeadscopeError(f"importance: {', '.join(past)} is past the {stack} stack's {shape.layers} "
                                     f"layers x {shape.heads} heads")
        return [(site, head) for site, head in heads(scope, stacks)
                if site.layer in self.layers or (site.layer, head) in named]


def _figures(result: AnalysisResult) -> dict[str, go.Figure]:
    return figures(result)


def _exports(result: AnalysisResult, folder: Path) -> list[Path]:
    """``head_importance[-STACK].npy`` per stack (``run_bertology``'s file), from the normalised per-token
    gradient where there is one, else from the first ablation."""
    metric = next(m for m in ("gradient_per_token_normalised", *(f"ablation_{k}" for k in ABLATIONS))
                  if m in result.metrics())
    stacks = result.params.get("stacks", ["self"])
    return [export_npy(result, folder / ("head_importance.npy" if len(stacks) == 1
                                                else f"head_importance-{s.replace(':', '_')}.npy"),
                       metric, s) for s in stacks]


@register("importance", kinds=("decoder", "encoder", "encoder-decoder"), params=Params,
          description="head importance: gradient proxies (Michel et al.), zero/mean/uniform ablations, pruning curve",
          # hundreds of forward passes: run it by name
          figures=_figures, default=False, exports=_exports,
          cost="about 3 min on smollm2-135m, 1 min 10 s on whisper-tiny.en (2 CPU cores)")
def run(context: Context) -> AnalysisResult:
    started = time.perf_counter()
    params = Params.read(context.params, context.seed)
    shipped = context.text is None and context.input_path is None
    max_tokens = params.probe_tokens if shipped and context.max_tokens is None else context.max_tokens
    probe = probe_inputs.build(context.loaded, context.text, context.input_path, max_tokens)
    model, scope = context.loaded.model, context.scope
    goal = objective(context.loaded, scope, probe, params)
    stacks = scored_stacks(scope)
    check_memory(model, goal, params)
    chosen = params.selected(scope, stacks)
    if chosen is not None and not goal.gradient:
        raise HeadscopeError(f"importance.layers and importance.heads need a gradient to rank every head for the "
                             f"pruning curve, and {goal.description} has none: leave them out")

    clean = float(evaluate(model, scope, goal)[0])
    result = AnalysisResult(name="importance", params={**params.__dict__, "objective": goal.description,
                                                       "stacks": list(stacks)})
    if goal.gradient:  # one example, one backward: rank 0 computes it under torchrun and hands it round
        for stack, estimators in distributed.on_main(lambda: gradient_importance(model, scope, goal, stacks)).items():
            for estimator, values in estimators.items():
                metric = f"gradient_{estimator}"
                result.add_map(metric, HeadMap(values, stack, DESCRIPTIONS[metric]))
                result.add_map(f"{metric}_normalised", HeadMap(
                    normalise(values, params.min_max), stack,
                    NORMALISED.format(DESCRIPTIONS[metric], ", then min-max over all heads" if params.min_max else "")))
    for kind in params.kinds:
        found = ablation_importance(model, scope, goal, kind, stacks, params.batch_size, params.prefix_reuse,
                                    chosen)
        for stack, values in found.items():
            description = DESCRIPTIONS[f"ablation_{kind}"].format(goal.name, goal.name)
            result.add_map(f"ablation_{kind}", HeadMap(values - clean, stack, description, signed=True))

    ranking = "gradient_per_token_normalised" if goal.gradient else f"ablation_{params.kinds[0]}"
    ranks = np.concatenate([result.map(ranking, stack).values.ravel() for stack in stacks])
    if not goal.loss or not goal.gradient:  # a metric's fall, or an ablation's change, ranks by its size
        ranks = np.abs(ranks)
    curve = pruning_curve(model, scope, goal, np.argsort(ranks, kind="stable"), params, stacks)
    result.tables["pruning"] = curve
    result.summary = {**_summary(result, curve, clean, goal, probe, params, stacks), "main_metric": ranking}
    result.seconds = time.perf_counter() - started
    return result


# --- the objective -------------------------------------------------------------------------------------------


@dataclass
class Objective:
    """What the heads' importance is measured on.

    ``inputs`` (batch 1) go into every forward pass; ``value(outputs, rows)`` returns one float per row of the
    repeated probe. ``loss``: lower is better (a metric otherwise); ``gradient``: False where the gradient is
    zero by construction; ``real`` marks the real tokens of the stacks that read the probe's text.
    """

    name: str
    description: str
    inputs: dict[str, torch.Tensor]
    value: Callable[[Any, int], torch.Tensor]
    loss: bool = True
    gradient: bool = True
    real: torch.Tensor | None = None


def objective(loaded, scope: Scope, probe, params: Params) -> Objective:
    """The objective for the loaded model's kind and the parameters (see the module's docstring)."""
    model, processor, info = loaded
    tokenizer = getattr(processor, "tokenizer", processor)
    inputs = {name: tensor.to(model.device) for name, tensor in probe.inputs.items()}
    if params.answer and info.kind != "decoder":
        raise HeadscopeError(f"the task metric (importance.answer, importance.wrong) needs a decoder; this model is "
                             f"an {info.kind}")
    if params.target and info.kind != "encoder-decoder":
        raise HeadscopeError("importance.target is the output an encoder-decoder is scored on; this model is "
                             f"a {info.kind}")
    if info.kind == "encoder-decoder":
        return seq2seq_loss(model, tokenizer, inputs, params.target, params.max_new_tokens)
    if info.kind == "encoder":
        return preservation_loss(model, scope, inputs)
    if inputs["input_ids"].shape[1] < 2:
        raise HeadscopeError("importance needs a probe of at least 2 tokens (a next-token loss)")
    if params.answer:
        return logit_difference(inputs, probe_text.one_token(tokenizer, params.answer, "importance.answer ="),
                                probe_text.one_token(tokenizer, params.wrong, "importance.wrong ="))
    return next_token_loss(inputs)


def next_token_losses(logits: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(batch,) mean cross-entropy of logits (batch, tokens, vocab) at predicting each real next token."""
    targets = input_ids[:, 1:].expand(logits.shape[0], -1)
    scored = torch.ones_like(targets, dtype=torch.bool)
    if attention_mask is not None:
        scored = (attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()).expand_as(targets)
    return _mean_cross_entropy(logits[:, :-1], targets, scored)


def _mean_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    # Row by row: each row's (tokens, vocab) logits are contiguous, so the log-softmax runs along memory. Over the
    # transposed batch, cross_entropy copied and normalised across strides: 30% of a 16-row ablation pass.
    per_token = torch.stack([torch.nn.functional.cross_entropy(row.float(), target, reduction="none")
                             for row, target in zip(logits, targets, strict=True)])
    return (per_token * scored).sum(1) / scored.sum(1).clamp_min(1)


def next_token_loss(inputs: dict[str, torch.Tensor]) -> Objective:
    mask = inputs.get("attention_mask")
    return Objective(
        "loss", "next-token cross-entropy, mean over the probe's real tokens that have a real next token", inputs,
        lambda outputs, rows: next_token_losses(outputs.logits, inputs["input_ids"], mask),
        real=None if mask is None else mask.bool())


def logit_difference(inputs: dict[str, torch.Tensor], answer: int, wrong: int) -> Objective:
    """logit(answer) - logit(wrong) at the probe's last real token (higher is better)."""
    mask = inputs.get("attention_mask")
    last = int(mask[0].nonzero().max()) if mask is not None else inputs["input_ids"].shape[1] - 1

    def value(outputs, rows: int) -> torch.Tensor:
        logits = outputs.logits[:, last].float()
        return logits[:, answer] - logits[:, wrong]

    return Objective("metric", f"task metric logit({answer}) - logit({wrong}) at the last token (token ids)",
                     inputs, value, loss=False, real=None if mask is None else mask.bool())


def seq2seq_loss(model, tokenizer, inputs: dict[str, torch.Tensor], target: str, max_new_tokens: int) -> Objective:
    """Decoder cross-entropy over the output tokens of the model's own greedy output (or ``target``)."""
    decoded = (decoding.given_target(model, tokenizer, inputs, target) if target
               else decoding.own_output(model, inputs, max_new_tokens))
    if decoded.sequence.shape[1] <= decoded.start:
        raise HeadscopeError("the model produced no output tokens to score: give importance.target")
    targets, scored = decoded.targets, decoded.scored()
    source = "the given target" if target else "the model's own greedy output"
    mask = inputs.get("attention_mask")
    return Objective(
        "loss", f"decoder cross-entropy over {source} ({int(scored.sum())} tokens), teacher-forced",
        {**inputs, "decoder_input_ids": decoded.decoder_input_ids},
        lambda outputs, rows: _mean_cross_entropy(outputs.logits, targets.expand(rows, -1), scored.expand(rows, -1)),
        real=None if mask is None else mask.bool())


def preservation_loss(model, scope: Scope, inputs: dict[str, torch.Tensor]) -> Objective:
    """sum_t ||h_t - h0_t||^2 / sum_t ||h0_t||^2 over real tokens, h the final hidden state, h0 the clean one."""
    with torch.no_grad():
        clean = _call(model, inputs).last_hidden_state.float()
    mask = inputs.get("attention_mask")
    real = torch.ones(clean.shape[:2], device=clean.device) if mask is None else mask.to(clean)
    scale = (clean.pow(2).sum(-1) * real).sum()

    def value(outputs, rows: int) -> torch.Tensor:
        change = (outputs.last_hidden_state.float() - clean).pow(2).sum(-1)
        return (change * real).sum(1) / scale

    return Objective("loss", "output preservation: sum_t ||h_t - h0_t||^2 / sum_t ||h0_t||^2 over the real tokens "
                     "of the final hidden state (h0: the un-gated run); its gradient is zero at the clean run",
                     inputs, value, gradient=False, real=None if mask is None else mask.bool())


def scored_stacks(scope: Scope) -> tuple[str, ...]:
    """The stacks whose heads are scored: every stack but the vision tower."""
    stacks = tuple(name for name in scope.stacks if not name.startswith("vision"))
    if not stacks:
        raise HeadscopeError(f"importance found no language attention stack in this model ({list(scope.stacks)})")
    return stacks


# --- forward passes ------------------------------------------------------------------------------------------


def check_memory(model: torch.nn.Module, goal: Objective, params: Params) -> None:
    """Refuse, before any pass, a batch whose logits (3 float32 copies: the logits, their float copy and the
    cross-entropy's log-probabilities) would take more than ``params.memory_gib``."""
    tokens = goal.inputs.get("decoder_input_ids", goal.inputs.get("input_ids"))
    vocab = getattr(model.config.get_text_config(), "vocab_size", None)
    if tokens is None or not vocab or not hasattr(model, "get_output_embeddings") or \
            model.get_output_embeddings() is None:
        return
    needed = params.batch_size * tokens.shape[1] * vocab * 4 * 3
    if needed > params.memory_gib * 2**30:
        raise MemoryBudgetError(
            f"importance with batch_size {params.batch_size} on {tokens.shape[1]} tokens needs about "
            f"{needed / 2**30:.2g} GiB of logits per pass ({vocab} tokens in the vocabulary), over the budget of "
            f"{params.memory_gib:g} GiB: lower --set importance.batch_size or --max-tokens, or raise "
            "--set importance.memory_gib")


def evaluate(model: torch.nn.Module, scope: Scope, goal: Objective, gates: Sequence[Gates] = (), rows: int = 1,
             prefix: Site | None = None) -> torch.Tensor:
    """(rows,) objective of each row of the probe repeated ``rows`` times, under ``gates``; no gradient.

    With ``prefix`` (a site), the layers before ``prefix``'s layer run once at batch 1 and the hidden states
    are widened to ``rows`` at its layer's input: the gates must not differ between rows before it.
    """
    with torch.no_grad():
        return _forward(model, scope, goal, gates, rows, prefix).cpu()


def losses(model: torch.nn.Module, scope: Scope, inputs: dict[str, torch.Tensor], gates: Sequence[Gates] = (),
           rows: int = 1) -> torch.Tensor:
    """(rows,) next-token loss of a decoder on ``inputs`` repeated ``rows`` times, under ``gates``."""
    return evaluate(model, scope, next_token_loss(inputs), gates, rows)


def _forward(model, scope: Scope, goal: Objective, gates: Sequence[Gates], rows: int,
             prefix: Site | None) -> torch.Tensor:
    widened = prefix is not None and rows > 1
    inputs = {name: tensor.expand(rows, *tensor.shape[1:])
              if not widened or (prefix.stack == "encoder" and name.startswith("decoder_")) else tensor
              for name, tensor in goal.inputs.items()}
    with scope.capture(gates=gates), (_widened_at(model, prefix, rows) if widened else contextlib.nullcontext()):
        outputs = _call(model, inputs)
    return goal.value(outputs, rows)


def _call(model, inputs: dict[str, torch.Tensor]):
    if "use_cache" in inspect.signature(model.forward).parameters:
        return model(**inputs, use_cache=False)
    return model(**inputs)


def layer_path(site: Site) -> str:
    """The path of the layer (block) holding ``site``: ``model.layers.3.self_attn`` -> ``model.layers.3``."""
    match = re.search(r"(^|\.)\d+(?=\.|$)", site.path)
    if match is None:
        raise HeadscopeError(f"cannot find the layer of the attention module at '{site.path}'")
    return site.path[:match.end()]


@contextlib.contextmanager
def _widened_at(model: torch.nn.Module, site: Site, rows: int) -> Iterator[None]:
    """Widen batch-1 hidden states (every 3-d floating tensor argument of batch 1) to ``rows`` at the input of
    ``site``'s layer and of the later layers of its stack (a decoder's layers each take the encoder's output);
    masks and position embeddings keep batch 1 and broadcast."""

    def widen(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim == 3 and value.shape[0] == 1:
            return value.expand(rows, *value.shape[1:]).contiguous()
        return value

    def hook(module, args, kwargs):
        return tuple(widen(a) for a in args), {name: widen(value) for name, value in kwargs.items()}

    container, _, first = layer_path(site).rpartition(".")
    layers = [layer for name, layer in model.get_submodule(container).named_children()
              if name.isdigit() and int(name) >= int(first)]
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# --- gradients -----------------------------------------------------------------------------------------------


def gradient_importance(model: torch.nn.Module, scope: Scope, goal: Objective, stacks: Sequence[str] = ("self",),
                        scale: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per stack, ``per_token`` and ``per_batch`` (layers, heads) gradient importance from one forward and
    backward pass, under gates ``scale`` (ones by default; pruning re-estimation passes its mask).

    The per-batch estimator is the gate's own gradient; the per-token one sums |z_t . dL/dz_t| over the real
    tokens, z_t . dL/dz_t read by a gradient hook on the output projection's input. Both are divided by the
    stack's number of real tokens T. A metric (higher is better) is differentiated as it is.
    """
    gates = {}
    for stack in stacks:
        shape = (scope.stacks[stack].layers, scope.stacks[stack].heads)
        start = torch.ones(shape) if scale is None else scale[stack].detach().float().clone()
        gates[stack] = Gates(stack=stack, scale=start.requires_grad_(True))
    per_token = {stack: torch.zeros(gate.scale.shape, dtype=torch.float64) for stack, gate in gates.items()}
    tokens: dict[str, float] = {}
    with torch.enable_grad(), _token_products(scope, goal, per_token, tokens):
        _forward(model, scope, goal, list(gates.values()), 1, None).sum().backward()
    model.zero_grad(set_to_none=True)
    return {stack: {"per_token": per_token[stack].numpy() / tokens[stack],
                    "per_batch": gates[stack].scale.grad.abs().double().numpy() / tokens[stack]}
            for stack in stacks}


@contextlib.contextmanager
def _token_products(scope: Scope, goal: Objective, into: dict[str, torch.Tensor],
                    tokens: dict[str, float]) -> Iterator[None]:
    """Add sum over real tokens of |z_t . dL/dz_t| per (layer, head) into ``into[stack]`` during backward, and
    each stack's number of real tokens into ``tokens``."""
    handles = []

    def pre_hook(site: Site, x: torch.Tensor) -> None:
        real = _real_tokens(goal, site, x)
        tokens[site.stack] = float(real.sum())
        if x.requires_grad:
            def on_grad(grad: torch.Tensor) -> None:
                product = (x.detach() * grad).view(*x.shape[:2], site.heads, -1).double().sum(-1)
                into[site.stack][site.layer, :site.heads] += (product.abs() * real[..., None]).sum((0, 1)).cpu()
            x.register_hook(on_grad)

    try:
        for site in scope.adapter.sites:
            if site.stack in into:
                handles.append(site.out_proj.register_forward_pre_hook(
                    lambda module, args, site=site: pre_hook(site, args[0])))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _real_tokens(goal: Objective, site: Site, x: torch.Tensor) -> torch.Tensor:
    """(batch, tokens) float: 1 at the real tokens of z; the probe's mask where this stack reads the probe."""
    reads_probe = site.stack not in ("decoder", "cross")
    if reads_probe and goal.real is not None and goal.real.shape == x.shape[:2]:
        return goal.real.to(device=x.device, dtype=torch.float64)
    return torch.ones(x.shape[:2], device=x.device, dtype=torch.float64)


def normalise(values: np.ndarray, min_max: bool = False) -> np.ndarray:
    """Each layer (row) divided by its L2 norm + 1e-20; then, with ``min_max``, scaled to [0, 1] over all heads."""
    out = values / (np.linalg.norm(values, axis=1, keepdims=True) + EPS)
    if min_max:
        out = (out - out.min()) / (out.max() - out.min() + EPS)
    return out


# --- ablations -----------------------------------------------------------------------------------------------


def heads(scope: Scope, stacks: Sequence[str]) -> list[tuple[Site, int]]:
    """Every (site, head) of ``stacks``, in the order the model defines (and runs) its attention modules."""
    position = {path: i for i, (path, _) in enumerate(scope.model.named_modules())}
    sites = sorted((site for site in scope.adapter.sites if site.stack in stacks), key=lambda s: position[s.path])
    return [(site, head) for site in sites for head in range(site.heads)]


def head_means(model: torch.nn.Module, scope: Scope, goal: Objective | dict[str, torch.Tensor],
               stacks: Sequence[str] = ("self",)) -> dict[str, torch.Tensor] | torch.Tensor:
    """Per stack, (layers, heads, head_dim) mean of each head's output z over the probe's real tokens.

    Given plain decoder ``inputs`` instead of an objective, returns the ``self`` stack's means alone."""
    plain = isinstance(goal, dict)
    readers = {stack: Gates(stack=stack, read="mean") for stack in stacks}
    evaluate(model, scope, next_token_loss(goal) if plain else goal, list(readers.values()))
    means = {stack: reader.mean() for stack, reader in readers.items()}
    return means["self"] if plain else means


def _row_gates(kind: Ablation, rows: dict[str, torch.Tensor], means: dict[str, torch.Tensor] | None) -> list[Gates]:
    """Gates applying the (batch, layers, heads) bool ``rows`` of each stack as ``kind`` ablations."""
    if kind == "zero":
        return [Gates(stack=stack, scale=(~mask).float()) for stack, mask in rows.items()]
    if kind == "mean":
        return [Gates(stack=stack, replace=means[stack], replace_mask=mask) for stack, mask in rows.items()]
    return [Gates(stack=stack, uniform=mask) for stack, mask in rows.items()]


def ablation_importance(model: torch.nn.Module, scope: Scope, goal: Objective | dict[str, torch.Tensor],
                        kind: Ablation, stacks: Sequence[str] = ("self",), batch_size: int = 16,
                        prefix_reuse: bool = True, chosen: Sequence[tuple[Site, int]] | None = None
                        ) -> dict[str, np.ndarray] | np.ndarray:
    """Per stack, the (layers, heads) objective with each head ablated alone (not minus the clean value).

    One forward pass carries up to ``batch_size`` single-head ablations (heads in the model's running order),
    one per row of the repeated probe, each row with its own gate row (batch, layers, heads). With
    ``prefix_reuse``, the layers before the pass's first ablated layer run once at batch 1. ``chosen`` (site,
    head) pairs limit the ablations to those heads (NaN elsewhere). Given plain decoder ``inputs`` instead of an
    objective, returns the ``self`` stack's array alone.
    """
    plain = isinstance(goal, dict)
    goal = next_token_loss(goal) if plain else goal
    means = head_means(model, scope, goal, stacks) if kind == "mean" else None
    every = heads(scope, stacks) if chosen is None else list(chosen)
    out = {stack: np.full((scope.stacks[stack].layers, scope.stacks[stack].heads), np.nan) for stack in stacks}
    found = []
    share = distributed.split(range(0, len(every), batch_size))  # under torchrun, a share of the passes each
    for start in progress.steps(share, f"importance: {kind} ablation passes"):
        chosen = every[start:start + batch_size]
        rows = {}
        for i, (site, head) in enumerate(chosen):
            stack = scope.stacks[site.stack]
            mask = rows.setdefault(site.stack, torch.zeros(len(chosen), stack.layers, stack.heads, dtype=torch.bool))
            mask[i, site.layer, head] = True
        values = evaluate(model, scope, goal, _row_gates(kind, rows, means), len(chosen),
                          chosen[0][0] if prefix_reuse else None).double().numpy()
        found.append([(site.stack, site.layer, head, value) for value, (site, head) in zip(values, chosen,
                                                                                             strict=True)])
    for stack, layer, head, value in (row for rows in distributed.gathered(found) for row in rows):
        out[stack][layer, head] = value
    return out["self"] if plain else out


# --- pruning -------------------------------------------------------------------------------------------------


def pruning_curve(model: torch.nn.Module, scope: Scope, goal: Objective | dict[str, torch.Tensor],
                  order: np.ndarray, params: Params, stacks: Sequence[str] = ("self",)) -> pd.DataFrame:
    """The objective after masking (z <- 0) the first k heads of ``order`` (indices into :func:`heads`), k at
    every ``step`` of all heads (0% and the most that can be masked included), and the mean over
    ``random_orders`` random orders. With ``min_heads_per_layer`` a head that would leave its layer with fewer
    is skipped; with ``reestimate`` the gradient order is recomputed under the mask after each step.

    Columns: fraction, heads_masked, value (in ``order``), value_random (mean), value_random_std.
    """
    goal = next_token_loss(goal) if isinstance(goal, dict) else goal
    every = heads(scope, stacks)
    total = len(every)
    floor = _floor(every, params.min_heads_per_layer)
    most = len(floor(np.arange(total)))
    counts = np.unique(np.append(np.round(np.arange(0, 1, params.step) * total), most).astype(int).clip(0, most))
    generator = np.random.default_rng(params.seed)
    orders = [floor(order)] + [floor(generator.permutation(total)) for _ in range(params.random_orders)]
    masks = [_masks(scope, stacks, every, ordering[:count]) for ordering in orders for count in counts]
    if params.reestimate and goal.gradient:  # sequential: rank 0 alone under torchrun, every process gets its masks
        masks[:len(counts)] = distributed.on_main(
            lambda: _reestimated(model, scope, goal, stacks, every, counts, floor, params.min_max))
    chunks = [masks[i:i + params.batch_size] for i in range(0, len(masks), params.batch_size)]
    found = np.concatenate(distributed.gathered([
        evaluate(model, scope, goal, _row_gates("zero", {s: torch.stack([m[s] for m in chunk]) for s in stacks}, None),
                 len(chunk)).double().numpy()
        for chunk in progress.steps(distributed.split(chunks), "importance: pruning curve passes")  # a share each
    ])).reshape(len(orders), -1)
    random = found[1:] if params.random_orders else np.full_like(found[:1], np.nan)
    return pd.DataFrame({"fraction": counts / total, "heads_masked": counts, "value": found[0],
                         "value_random": random.mean(0), "value_random_std": random.std(0)})


def _floor(every: list[tuple[Site, int]], keep: int) -> Callable[[np.ndarray], np.ndarray]:
    """A filter of orderings that skips heads whose masking would leave their layer fewer than ``keep`` heads."""
    layer_of = [(site.stack, site.layer) for site, _ in every]
    sizes = {key: layer_of.count(key) for key in set(layer_of)}

    def allowed(ordering: np.ndarray) -> np.ndarray:
        masked = dict.fromkeys(sizes, 0)
        kept = []
        for index in ordering:
            key = layer_of[index]
            if sizes[key] - masked[key] > keep:
                masked[key] += 1
                kept.append(index)
        return np.asarray(kept, dtype=int)

    return allowed


def _masks(scope: Scope, stacks: Sequence[str], every: list[tuple[Site, int]],
           masked: Sequence[int]) -> dict[str, torch.Tensor]:
    """Per stack, a (layers, heads) bool table, True at the heads ``masked`` (indices into ``every``)."""
    tables = {s: torch.zeros(scope.stacks[s].layers, scope.stacks[s].heads, dtype=torch.bool) for s in stacks}
    for index in masked:
        site, head = every[index]
        tables[site.stack][site.layer, head] = True
    return tables


def _reestimated(model, scope: Scope, goal: Objective, stacks: Sequence[str], every: list[tuple[Site, int]],
                 counts: np.ndarray, floor: Callable[[np.ndarray], np.ndarray], min_max: bool) -> list[dict]:
    """The masks of a pruning run that recomputes the gradient importance of the remaining heads under the
    current mask before each step, and masks the least important of them (``run_bertology``'s loop)."""
    masked: list[int] = []
    out = []
    for count in counts:
        if count > len(masked):
            mask = _masks(scope, stacks, every, masked)
            found = gradient_importance(model, scope, goal, stacks, {s: (~mask[s]).float() for s in stacks})
            score = np.concatenate([normalise(found[s]["per_token"], min_max).ravel() for s in stacks])
            score = score if goal.loss else np.abs(score)
            score[masked] = -np.inf  # already masked: first in the order, so the floor counts them
            masked = list(floor(np.argsort(score, kind="stable"))[:count])
        out.append(_masks(scope, stacks, every, masked))
    return out


def prunable_fraction(curve: pd.DataFrame, clean: float, tolerance: float = 0.05, loss: bool = True) -> float:
    """The largest fraction of heads masked, in the curve's order, before the objective first worsens by more
    than ``tolerance`` x |clean| (or by ``tolerance`` when clean is 0, as for the output-preservation loss)."""
    values = curve["value"].to_numpy()
    margin = tolerance * abs(clean) if clean != 0 else tolerance
    over = np.flatnonzero(values > clean + margin if loss else values < clean - margin)
    last = len(curve) - 1 if len(over) == 0 else over[0] - 1
    return float(curve["fraction"].iloc[last]) if last >= 0 else 0.0


def _summary(result: AnalysisResult, curve: pd.DataFrame, clean: float, goal: Objective, probe, params: Params,
             stacks: Sequence[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {"input": probe.source, "tokens": len(probe.tokens), "objective": goal.description,
                               f"clean_{goal.name}": clean,
                               f"most_heads_masked_{goal.name}": float(curve["value"].iloc[-1])}

    def flat(metric: str) -> np.ndarray:
        return np.concatenate([result.map(metric, stack).values.ravel() for stack in stacks])

    reference = f"ablation_{params.kinds[0]}"
    compared = [m for m in ("gradient_per_token", "gradient_per_batch") if goal.gradient]
    compared += [f"ablation_{kind}" for kind in params.kinds[1:]]
    for metric in compared:
        ablated = np.isfinite(flat(reference))  # every head, or those importance.layers / heads chose
        rho = spearmanr(flat(metric)[ablated], (np.abs(flat(reference)) if metric.startswith("gradient")
                                                else flat(reference))[ablated])
        summary[f"spearman_{metric}_vs_{reference}"] = float(rho.statistic)
    summary["prunable_fraction"] = prunable_fraction(curve, clean, params.tolerance, goal.loss)
    ranked = (["gradient_per_token"] if goal.gradient else []) + [f"ablation_{kind}" for kind in params.kinds]
    for metric in ranked:
        summary[f"top_{metric}"] = [f"{stack}:{layer}.{head}={value:.4g}" if len(stacks) > 1 else
                                    f"{layer}.{head}={value:.4g}"
                                    for stack in stacks
                                    for layer, head, value in result.top_heads(metric, k=5, stack=stack)]
    return summary


# --- export and figures ----------------------------------------------------------------------------------------


def export_npy(result: AnalysisResult, path: str | Path, metric: str = "gradient_per_token_normalised",
               stack: str = "self") -> Path:
    """Save ``metric``'s (layers, heads) matrix as ``.npy`` (float32), as ``run_bertology.py`` saved
    ``head_importance.npy``; returns the path."""
    path = Path(path)
    np.save(path, result.map(metric, stack).values.astype(np.float32))
    return path


def figures(result: AnalysisResult) -> dict[str, go.Figure]:
    """The ``pruning`` curve: the objective against the fraction of heads masked, importance and random order."""
    curve = result.tables["pruning"]
    figure = go.Figure()
    reestimated = " (re-estimated each step)" if result.params.get("reestimate") else ""
    figure.add_trace(go.Scatter(x=curve["fraction"], y=curve["value"], mode="lines+markers",
                                name=f"ascending importance{reestimated}"))
    if curve["value_random"].notna().any():
        figure.add_trace(go.Scatter(x=curve["fraction"], y=curve["value_random"], mode="lines+markers",
                                    name=f"random order (mean of {result.params.get('random_orders')})",
                                    error_y={"type": "data", "array": curve["value_random_std"], "visible": True}))
    name = "loss" if "clean_loss" in result.summary else "metric"
    clean = result.summary.get(f"clean_{name}")
    if clean is not None:
        figure.add_hline(y=clean, line_dash="dot", annotation_text=f"clean {name}")
    figure.update_layout(title="importance: pruning curve", xaxis_title="fraction of heads masked",
                         yaxis_title=str(result.params.get("objective", name)).split(",")[0].split(":")[0],
                         xaxis_tickformat=".0%", template="simple_white", width=720, height=480)
    return {"pruning": figure}
