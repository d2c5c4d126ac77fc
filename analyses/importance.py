"""``importance``: how much each head matters to the model's own loss on the probe.

L is the model's next-token loss on the probe: the mean cross-entropy over the real tokens that have a next
real token (decoders; the shipped prose cut to ``probe_tokens``, 128, by default, or the user's text). Per
head (l, h), with z[l, h] its output (tokens, head_dim) before the output projection and a gate xi[l, h] = 1
multiplying it, T the number of real tokens:

- ``gradient_per_token`` = 1/T sum_t |z_t[l, h] . dL/dz_t[l, h]| (Michel, Levy, Neubig 2019, "Are Sixteen
  Heads Really Better than One?", the authors' per-token estimator);
- ``gradient_per_batch`` = 1/T |dL/dxi[l, h]| = 1/T |sum_t z_t[l, h] . dL/dz_t[l, h]| (transformers' old
  ``run_bertology.py``: the gate's gradient over the batch);
- ``*_normalised``: each layer divided by its L2 norm + 1e-20, then (``min_max=True``) min-max over all heads;
- ``ablation_zero`` = L(z[l, h] <- 0) - L;
- ``ablation_mean`` = L(z[l, h] <- mean of z[l, h] over the probe's real tokens) - L.

Both gradient estimators come from one forward and one backward pass: the gate's gradient gives the
per-batch one, and a gradient hook on the output projection's input gives z_t . dL/dz_t per token (only a
(batch, tokens, heads) product per layer is kept). The L x H single-head ablations run batched: the probe
is repeated ``batch_size`` times and each row carries its own per-example gate row, so the number of forward
passes is L x H / ``batch_size``. Every layer is recomputed (no prefix reuse yet).

Pruning curve: heads are masked (z <- 0) in ascending order of ``gradient_per_token_normalised``, ``step`` of
all heads at a time, and the loss is measured at each step; the same for ``random_orders`` random orders
(mean). At 0% the loss is the clean loss, at 100% the loss with every head zeroed. The steps are batched
rows too. Summary: Spearman correlation of the gradient maps with ``ablation_zero``, and the fraction of
heads prunable before the loss rises by ``tolerance`` (5%).

Decoders only: a bare encoder's output-preservation loss (MSE against the un-gated run) has its minimum at
the clean run, so its gradient with respect to every gate is exactly zero there.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from scipy.stats import spearmanr

from headscope.capture.engine import Scope
from headscope.capture.gates import Gates
from headscope.errors import HeadscopeError
from headscope.probes import inputs as probe_inputs
from headscope.registry import Context, register
from headscope.results import AnalysisResult, HeadMap

Ablation = Literal["zero", "mean"]
STACK = "self"
EPS = 1e-20
LOSS = "next-token cross-entropy, mean over the probe's real tokens that have a real next token"
DESCRIPTIONS = {
    "gradient_per_token": "1/T sum_t |z_t . dL/dz_t| (Michel et al. 2019, per-token estimator)",
    "gradient_per_batch": "1/T |dL/dgate| = 1/T |sum_t z_t . dL/dz_t| (run_bertology, per-batch estimator)",
    "ablation_zero": "loss with the head's output zeroed minus the clean loss",
    "ablation_mean": "loss with the head's output replaced by its mean over the probe's tokens minus the clean loss",
}
NORMALISED = "{}, each layer divided by its L2 norm + 1e-20{}"


@dataclass(frozen=True)
class Params:
    """The parameters of ``importance`` (``--set importance.NAME=VALUE`` overrides them).

    ``batch_size``: ablation rows per forward pass; ``step``: the fraction of all heads masked per pruning
    step; ``random_orders``: random pruning orders averaged; ``tolerance``: the relative loss rise that ends
    the prunable fraction; ``min_max``: min-max the layer-normalised maps over all heads; ``probe_tokens``:
    the shipped prose is cut to this many tokens (L x H ablations cost L x H forward passes over it) unless
    ``--max-tokens`` says otherwise; user text is never cut.
    """

    batch_size: int = 16
    probe_tokens: int = 128
    step: float = 0.1
    random_orders: int = 3
    tolerance: float = 0.05
    min_max: bool = False
    seed: int = 0

    @classmethod
    def read(cls, given: dict[str, Any], seed: int = 0) -> Params:
        known = [f.name for f in fields(cls)]
        unknown = set(given) - set(known)
        if unknown:
            raise HeadscopeError(f"importance has no parameter {sorted(unknown)}: it takes {', '.join(known)}")
        values: dict[str, Any] = {"seed": seed}
        for name, value in given.items():
            default = getattr(cls, name)
            if isinstance(default, bool) and isinstance(value, str):
                value = value.lower() in ("1", "true", "yes")
            values[name] = type(default)(value)
        params = cls(**values)
        valid = (params.batch_size >= 1, params.probe_tokens >= 2, 0 < params.step <= 1, params.random_orders >= 0,
                 params.tolerance >= 0)
        if not all(valid):
            raise HeadscopeError("importance needs batch_size >= 1, probe_tokens >= 2, 0 < step <= 1, "
                                 "random_orders >= 0 and tolerance >= 0")
        return params


def _figures(result: AnalysisResult) -> dict[str, go.Figure]:
    return figures(result)


@register("importance", kinds=("decoder",),
          description="head importance: gradient proxies (Michel et al.), zero and mean ablations, pruning curve",
          figures=_figures, default=False)  # hundreds of forward passes: run it by name
def run(context: Context) -> AnalysisResult:
    started = time.perf_counter()
    params = Params.read(context.params, context.seed)
    shipped = context.text is None and context.input_path is None
    max_tokens = params.probe_tokens if shipped and context.max_tokens is None else context.max_tokens
    probe = probe_inputs.build(context.loaded, context.text, context.input_path, max_tokens)
    model, scope = context.loaded.model, context.scope
    inputs = {name: tensor.to(model.device) for name, tensor in probe.inputs.items()}
    if inputs["input_ids"].shape[1] < 2:
        raise HeadscopeError("importance needs a probe of at least 2 tokens (a next-token loss)")

    clean = float(losses(model, scope, inputs)[0])
    gradients = gradient_importance(model, scope, inputs)
    ablations = {kind: ablation_importance(model, scope, inputs, kind, params.batch_size) - clean
                 for kind in ("zero", "mean")}

    result = AnalysisResult(name="importance", params={**params.__dict__, "loss": LOSS, "stack": STACK,
                                                       "prefix_reuse": False})
    for estimator, values in gradients.items():
        metric = f"gradient_{estimator}"
        result.add_map(metric, HeadMap(values, STACK, DESCRIPTIONS[metric]))
        result.add_map(f"{metric}_normalised", HeadMap(
            normalise(values, params.min_max), STACK,
            NORMALISED.format(DESCRIPTIONS[metric], ", then min-max over all heads" if params.min_max else "")))
    for kind, values in ablations.items():
        metric = f"ablation_{kind}"
        result.add_map(metric, HeadMap(values, STACK, DESCRIPTIONS[metric], signed=True))

    order = np.argsort(result.map("gradient_per_token_normalised").values.ravel(), kind="stable")
    curve = pruning_curve(model, scope, inputs, order, params)
    result.tables["pruning"] = curve
    result.summary = _summary(result, curve, clean, probe, params)
    result.seconds = time.perf_counter() - started
    return result


# --- the loss ------------------------------------------------------------------------------------------------


def next_token_losses(logits: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(batch,) mean cross-entropy of logits (batch, tokens, vocab) at predicting each real next token."""
    targets = input_ids[:, 1:]
    scored = torch.ones_like(targets, dtype=torch.bool)
    if attention_mask is not None:
        scored = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
    return (per_token * scored).sum(1) / scored.sum(1).clamp_min(1)


def losses(model: torch.nn.Module, scope: Scope, inputs: dict[str, torch.Tensor], gates: Sequence[Gates] = (),
           rows: int = 1) -> torch.Tensor:
    """(rows,) loss of each row of the probe repeated ``rows`` times, under ``gates``; no gradient."""
    repeated = {name: tensor.expand(rows, *tensor.shape[1:]) for name, tensor in inputs.items()}
    with torch.no_grad(), scope.capture(gates=gates):
        logits = model(**repeated, use_cache=False).logits
    return next_token_losses(logits, repeated["input_ids"], repeated.get("attention_mask")).cpu()


def _shape(scope: Scope) -> tuple[int, int]:
    if STACK not in scope.stacks:
        raise HeadscopeError(f"importance needs a '{STACK}' attention stack; this model has {list(scope.stacks)}")
    stack = scope.stacks[STACK]
    return stack.layers, stack.heads


# --- gradients -----------------------------------------------------------------------------------------------


def gradient_importance(model: torch.nn.Module, scope: Scope,
                        inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """``per_token`` and ``per_batch`` (layers, heads) gradient importance from one forward and backward pass.

    The per-batch estimator is the gate's own gradient; the per-token one sums |z_t . dL/dz_t| over the
    real tokens, z_t . dL/dz_t read by a gradient hook on the output projection's input (batch, tokens,
    heads * head_dim). Both are divided by the number of real tokens T.
    """
    layers, heads = _shape(scope)
    gate = torch.ones(layers, heads, requires_grad=True)
    mask = inputs.get("attention_mask")
    real = torch.ones(inputs["input_ids"].shape, dtype=torch.bool) if mask is None else mask.bool().cpu()
    per_token = torch.zeros(layers, heads, dtype=torch.float64)
    with torch.enable_grad(), scope.capture(gates=[Gates(stack=STACK, scale=gate)]), \
            _token_products(scope, real, per_token):
        logits = model(**inputs, use_cache=False).logits
        next_token_losses(logits, inputs["input_ids"], mask).sum().backward()
    tokens = int(real.sum())
    model.zero_grad(set_to_none=True)
    return {"per_token": per_token.numpy() / tokens, "per_batch": gate.grad.abs().double().numpy() / tokens}


@contextlib.contextmanager
def _token_products(scope: Scope, real: torch.Tensor, into: torch.Tensor) -> Iterator[None]:
    """Add sum over real tokens of |z_t . dL/dz_t| per (layer, head) into ``into`` during backward."""
    handles = []

    def pre_hook(site, module, args):
        x = args[0]
        if x.requires_grad:
            def on_grad(grad: torch.Tensor) -> None:
                product = (x.detach() * grad).view(*x.shape[:2], site.heads, -1).double().sum(-1)
                into[site.layer, :site.heads] += (product.abs() * real[..., None].to(product.device)).sum((0, 1)).cpu()
            x.register_hook(on_grad)

    try:
        for site in scope.adapter.sites:
            if site.stack == STACK:
                handles.append(site.out_proj.register_forward_pre_hook(
                    lambda module, args, site=site: pre_hook(site, module, args)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def normalise(values: np.ndarray, min_max: bool = False) -> np.ndarray:
    """Each layer (row) divided by its L2 norm + 1e-20; then, with ``min_max``, scaled to [0, 1] over all heads."""
    out = values / (np.linalg.norm(values, axis=1, keepdims=True) + EPS)
    if min_max:
        out = (out - out.min()) / (out.max() - out.min() + EPS)
    return out


# --- ablations -----------------------------------------------------------------------------------------------


def head_means(model: torch.nn.Module, scope: Scope, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(layers, heads, head_dim) mean of each head's output z over the probe's real tokens."""
    reader = Gates(stack=STACK, read="mean")
    losses(model, scope, inputs, [reader])
    return reader.mean()


def ablation_importance(model: torch.nn.Module, scope: Scope, inputs: dict[str, torch.Tensor], kind: Ablation,
                        batch_size: int = 16) -> np.ndarray:
    """(layers, heads) loss with each head ablated alone (``kind`` "zero" or "mean"), not minus the clean loss.

    One forward pass carries up to ``batch_size`` single-head ablations, one per row of the repeated probe,
    each row with its own gate row (batch, layers, heads).
    """
    layers, heads = _shape(scope)
    means = head_means(model, scope, inputs) if kind == "mean" else None
    out = np.empty(layers * heads)
    for start in range(0, layers * heads, batch_size):
        chosen = torch.arange(start, min(start + batch_size, layers * heads))
        rows = torch.zeros(len(chosen), layers * heads, dtype=torch.bool)
        rows[torch.arange(len(chosen)), chosen] = True
        rows = rows.view(-1, layers, heads)
        gate = (Gates(stack=STACK, scale=(~rows).float()) if kind == "zero"
                else Gates(stack=STACK, replace=means, replace_mask=rows))
        out[chosen.numpy()] = losses(model, scope, inputs, [gate], len(chosen)).double().numpy()
    return out.reshape(layers, heads)


# --- pruning -------------------------------------------------------------------------------------------------


def pruning_curve(model: torch.nn.Module, scope: Scope, inputs: dict[str, torch.Tensor], order: np.ndarray,
                  params: Params) -> pd.DataFrame:
    """Loss after masking (z <- 0) the first k heads of ``order`` (flat layer * heads + head indices), k at
    every ``step`` of all heads (0% and 100% included), and the mean loss over ``random_orders`` random orders.

    Columns: fraction, heads_masked, loss (in ``order``), loss_random (mean), loss_random_std.
    """
    layers, heads = _shape(scope)
    total = layers * heads
    fractions = np.unique(np.append(np.arange(0, 1, params.step), 1.0).round(6))
    counts = np.unique(np.round(fractions * total).astype(int))
    generator = np.random.default_rng(params.seed)
    orders = [order] + [generator.permutation(total) for _ in range(params.random_orders)]
    scales = torch.ones(len(orders) * len(counts), total)
    for i, (ordering, count) in enumerate((o, c) for o in orders for c in counts):
        scales[i, torch.as_tensor(ordering[:count], dtype=torch.long)] = 0.0
    scales = scales.view(-1, layers, heads)
    found = torch.cat([losses(model, scope, inputs, [Gates(stack=STACK, scale=chunk)], len(chunk))
                       for chunk in scales.split(params.batch_size)]).double().numpy().reshape(len(orders), -1)
    random = found[1:] if params.random_orders else np.full_like(found[:1], np.nan)
    return pd.DataFrame({"fraction": counts / total, "heads_masked": counts, "loss": found[0],
                         "loss_random": random.mean(0), "loss_random_std": random.std(0)})


def prunable_fraction(curve: pd.DataFrame, clean: float, tolerance: float = 0.05) -> float:
    """The largest fraction of heads masked, in the curve's order, before the loss first exceeds
    (1 + ``tolerance``) x the clean loss."""
    over = np.flatnonzero(curve["loss"].to_numpy() > clean * (1 + tolerance))
    last = len(curve) - 1 if len(over) == 0 else over[0] - 1
    return float(curve["fraction"].iloc[last]) if last >= 0 else 0.0


def _summary(result: AnalysisResult, curve: pd.DataFrame, clean: float, probe, params: Params) -> dict[str, Any]:
    zero = result.map("ablation_zero").values.ravel()
    summary: dict[str, Any] = {"input": probe.source, "tokens": len(probe.tokens), "loss": LOSS,
                               "clean_loss": clean, "all_heads_zeroed_loss": float(curve["loss"].iloc[-1])}
    for metric in ("gradient_per_token", "gradient_per_batch", "ablation_mean"):
        rho = spearmanr(result.map(metric).values.ravel(), zero).statistic
        summary[f"spearman_{metric}_vs_ablation_zero"] = float(rho)
    summary["prunable_fraction"] = prunable_fraction(curve, clean, params.tolerance)
    for metric in ("gradient_per_token", "ablation_zero", "ablation_mean"):
        summary[f"top_{metric}"] = [f"{layer}.{head}={value:.4g}" for layer, head, value
                                    in result.top_heads(metric, k=5, stack=STACK)]
    return summary


# --- export and figures ----------------------------------------------------------------------------------------


def export_npy(result: AnalysisResult, path: str | Path, metric: str = "gradient_per_token_normalised") -> Path:
    """Save ``metric``'s (layers, heads) matrix as ``.npy`` (float32), as ``run_bertology.py`` saved
    ``head_importance.npy``; returns the path."""
    path = Path(path)
    np.save(path, result.map(metric, STACK).values.astype(np.float32))
    return path


def figures(result: AnalysisResult) -> dict[str, go.Figure]:
    """The ``pruning`` curve: loss against the fraction of heads masked, gradient order and random order."""
    curve = result.tables["pruning"]
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=curve["fraction"], y=curve["loss"], mode="lines+markers",
                                name="ascending gradient importance"))
    if curve["loss_random"].notna().any():
        figure.add_trace(go.Scatter(x=curve["fraction"], y=curve["loss_random"], mode="lines+markers",
                                    name=f"random order (mean of {result.params.get('random_orders')})",
                                    error_y={"type": "data", "array": curve["loss_random_std"], "visible": True}))
    clean = result.summary.get("clean_loss")
    if clean is not None:
        figure.add_hline(y=clean, line_dash="dot", annotation_text="clean loss")
    figure.update_layout(title="importance: pruning curve", xaxis_title="fraction of heads masked",
                         yaxis_title="next-token loss", xaxis_tickformat=".0%", template="simple_white",
                         width=720, height=480)
    return {"pruning": figure}
