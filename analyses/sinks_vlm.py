"""The vision-language part of ``sinks``: attention on image tokens, visual sink tokens and image-centric heads.

After Kang et al. (ICLR 2025), "See What You Are Told: Visual Attention Sink in Large Multimodal Models".
Notation: h_l (tokens, hidden) is the hidden state entering language layer l (``hidden_states[l]`` of
transformers, l < L: the state whose attention layer l computes), phi(x) = x / sqrt(mean_d x[d]^2 + 1e-6) its
weight-free RMS normalisation, J = {l : ``visual_min_layer`` <= l < L} the judged layers (the paper: l >= 2).

- sink dimensions D = {d : |phi(h_l[0])[d]| > tau for some l in J}, h_l[0] the first token of the prompt with its
  image tokens removed (text only); tau = ``visual_tau`` (20);
- visual sink tokens V_l of layer l in J: the image tokens v with max_{d in D} |phi(h_l[v])[d]| > tau;
- per language head, over the queries Q after the last image token (they see the whole image: the prompt's tail,
  then the generated tokens, read back in one pass):
  ``image_mass``[l, h] = mean_{t in Q} sum_{s image} A[l, h, t, s];
  ``visual_sink_mass``[l, h] = mean_{t in Q} sum_{s in V_l} A[l, h, t, s] (layers in J; 0 where V_l is empty);
  ``visual_sink_share`` = visual_sink_mass / image_mass;
  ``image_centric``[l, h] = share of t in Q where sum_{V_l} A <= ``centric_ratio`` x sum_{image} A and
  sum_{image} A >= ``centric_mass`` (the paper's rule, per query as in its code; layers with a visual sink only);
- a head is image-centric when its layer has a visual sink, visual_sink_share <= ``centric_ratio`` (0.5) and
  image_mass >= ``centric_mass`` (0.2): table ``image_centric_heads``, counted in the summary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from headscope.capture.reducers import Chunk, KernelCall, Reducer
from headscope.errors import HeadscopeError
from headscope.probes import images
from headscope.registry import Context
from headscope.results import AnalysisResult, HeadMap

STACK = "self"
RMS_EPS = 1e-6  # the authors' weight-free RMS norm
DESCRIPTIONS = {
    "image_mass": "mean attention mass on image tokens from the queries after the image",
    "visual_sink_mass": "mean attention mass on the layer's visual sink tokens from the queries after the image",
    "visual_sink_share": "attention on visual sink tokens / attention on all image tokens (Kang et al. 2025)",
    "image_centric": "share of queries after the image where the head is image-centric: sink share <= ratio "
                     "and image mass >= mass",
}
SINK_COLUMNS = ["layer", "position", "image_index", "row", "column", "token", "dimension", "value", "hidden"]
CENTRIC_COLUMNS = ["layer", "head", "image_mass", "visual_sink_mass", "visual_sink_share", "image_centric"]
ERROR_NO_IMAGE_TOKEN = ("{model} has no image token in its config (image_token_id / image_token_index): the "
                        "image part of sinks needs a model that marks image positions with a placeholder token")


@dataclass
class Measured:
    """What the image part found: maps, tables and summary entries, and the token labels with image patches."""

    maps: dict[str, HeadMap] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)


# --- inputs ---------------------------------------------------------------------------------------------------


def decoded(model: torch.nn.Module, scope, inputs: dict[str, torch.Tensor],
            max_new_tokens: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The greedy continuation (new tokens,) of ``inputs`` (batch 1) and the inputs that read it back in one pass:
    the prompt and every generated token but the last (the queries generation computed attention for).
    :func:`~headscope.probes.images.generate` never produces the image placeholder, which read back would ask for
    image features."""
    if max_new_tokens < 1:
        return inputs, torch.zeros(0, dtype=torch.long)
    new = images.generate(model, scope, inputs, max_new_tokens)
    return images.extended(inputs, new[:-1]), new


# --- visual sinks ---------------------------------------------------------------------------------------------


def rms_normalised(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = x / sqrt(mean over the last axis of x^2 + 1e-6): RMS normalisation without the norm's weight."""
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + RMS_EPS)


def sink_dimensions(first: Sequence[torch.Tensor], tau: float, layers: Sequence[int]) -> dict[int, float]:
    """{dimension: largest |phi| over ``layers``} of the dimensions where the first token's state (``first[l]``
    (hidden,) for each layer l) is massive: |phi(first[l])[d]| > ``tau`` in some layer of ``layers``."""
    found: dict[int, float] = {}
    for layer in layers:
        values = rms_normalised(first[layer]).abs()
        for dimension in (values > tau).nonzero()[:, 0].tolist():
            found[dimension] = max(found.get(dimension, 0.0), float(values[dimension]))
    return dict(sorted(found.items()))


def visual_sinks(hidden: Sequence[torch.Tensor], image_mask: torch.Tensor, dimensions: Sequence[int], tau: float,
                 layers: Sequence[int]) -> dict[int, list[tuple[int, int, float, float]]]:
    """Per layer of ``layers``, the visual sink tokens: image positions (``image_mask`` (tokens,)) whose state
    ``hidden[l]`` (tokens, hidden) has |phi| > ``tau`` in some dimension of ``dimensions``; each as (position,
    dimension of the largest |phi|, that phi, the raw hidden value)."""
    found: dict[int, list[tuple[int, int, float, float]]] = {layer: [] for layer in layers}
    if not len(dimensions):
        return found
    columns = torch.tensor(list(dimensions))
    for layer in layers:
        state = hidden[layer].double().cpu()
        phi = rms_normalised(state)[:, columns]
        largest, which = phi.abs().max(dim=-1)
        for position in ((largest > tau) & image_mask.cpu()).nonzero()[:, 0].tolist():
            dimension = int(columns[which[position]])
            found[layer].append((position, dimension, float(phi[position, which[position]]),
                                 float(state[position, dimension])))
    return found


def image_centric(image_mass: np.ndarray, sink_mass: np.ndarray, ratio: float = 0.5, mass: float = 0.2,
                  has_sinks: np.ndarray | None = None) -> np.ndarray:
    """Kang et al.'s image-centric rule on per-head numbers (any matching shapes): attention on visual sink tokens
    / attention on all image tokens <= ``ratio`` and attention on image tokens >= ``mass``. ``has_sinks``
    (broadcastable bool) marks where visual sinks exist: the rule needs some (as in the authors' code). NaN never
    meets the rule."""
    image_mass, sink_mass = np.asarray(image_mass, dtype=float), np.asarray(sink_mass, dtype=float)
    with np.errstate(invalid="ignore"):
        meets = (sink_mass <= ratio * image_mass) & (image_mass >= mass) & (image_mass > 0)
    return meets if has_sinks is None else meets & np.asarray(has_sinks, dtype=bool)


# --- reducers -------------------------------------------------------------------------------------------------


class LayerKeyMass(Reducer):
    """Mean attention on a per-layer key set from chosen queries: mean over t in Q of sum_{s in S_l} A[l, h, t, s].

    ``key_masks`` {layer: (keys,) bool} gives S_l (a layer left out is not measured: NaN); ``query_mask``
    (queries,) bool gives Q on the call's query axis. Batch 1, one call over the whole sequence.
    """

    name = "layer_key_mass"
    kernel = True

    def __init__(self, key_masks: dict[int, torch.Tensor], query_mask: torch.Tensor, stacks=(STACK,)) -> None:
        super().__init__(stacks)
        self.key_masks = key_masks
        self.query_mask = query_mask

    def _rows(self, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The chunk's (heads, counted queries, keys) probabilities, and its query rows; None when none count."""
        if chunk.probs.shape[0] != 1:
            raise ValueError("image attention is measured one input at a time (batch 1)")
        rows = self.query_mask.to(chunk.probs.device)[chunk.query_index] & chunk.query_valid[0]
        return (chunk.probs[0][:, rows], rows) if bool(rows.any()) else None

    @staticmethod
    def _on(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(heads, queries) mass of ``probs`` (heads, queries, K) on the (keys,) bool set (cut to K)."""
        return probs[..., keys.to(probs.device)[: probs.shape[-1]]].sum(dim=-1)

    def update(self, chunk: Chunk) -> None:
        keys = self.key_masks.get(chunk.site.layer)
        found = self._rows(chunk) if keys is not None else None
        if found is not None:
            probs, rows = found
            self.add(chunk.site, self._on(probs, keys).sum(dim=-1), float(rows.sum()))

    def _kernel_rows(self, call: KernelCall) -> torch.Tensor | None:
        """The call's counted query rows (queries,) bool, as :meth:`_rows`; None when none count."""
        if call.lse.shape[0] != 1:
            raise ValueError("image attention is measured one input at a time (batch 1)")
        rows = self.query_mask.to(call.lse.device)[call.query_index] & call.query_valid[0]
        return rows if bool(rows.any()) else None

    @staticmethod
    def _kernel_on(call: KernelCall, keys: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(heads, counted queries) mass on the (keys,) bool set, from the kernel's row log-sum-exp."""
        in_set = keys.to(call.lse.device)[None, : call.keys]
        return call.mass_on(in_set)[0][0][:, rows]

    def update_kernel(self, call: KernelCall) -> None:
        keys = self.key_masks.get(call.site.layer)
        rows = self._kernel_rows(call) if keys is not None else None
        if rows is not None:
            self.add(call.site, self._kernel_on(call, keys, rows).sum(dim=-1), float(rows.sum()))


class CentricShare(LayerKeyMass):
    """Share of the queries Q at which a head meets the image-centric rule (per query, as the authors' code
    decides it): sum_{s in V_l} A <= ``ratio`` x sum_{s image} A and sum_{s image} A >= ``mass``.

    ``key_masks`` {layer: (keys,) bool} gives V_l (layers with a visual sink only); ``image_mask`` the image tokens.
    """

    name = "centric_share"

    def __init__(self, key_masks: dict[int, torch.Tensor], image_mask: torch.Tensor, query_mask: torch.Tensor,
                 ratio: float, mass: float) -> None:
        super().__init__(key_masks, query_mask)
        self.image_mask, self.ratio, self.mass = image_mask, ratio, mass

    def update(self, chunk: Chunk) -> None:
        keys = self.key_masks.get(chunk.site.layer)
        found = self._rows(chunk) if keys is not None else None
        if found is not None:
            probs, rows = found
            self._add_meets(chunk.site, self._on(probs, self.image_mask), self._on(probs, keys), rows)

    def update_kernel(self, call: KernelCall) -> None:
        keys = self.key_masks.get(call.site.layer)
        rows = self._kernel_rows(call) if keys is not None else None
        if rows is not None:
            self._add_meets(call.site, self._kernel_on(call, self.image_mask, rows), self._kernel_on(call, keys, rows),
                            rows)

    def _add_meets(self, site, image: torch.Tensor, sink: torch.Tensor, rows: torch.Tensor) -> None:
        meets = (sink <= self.ratio * image) & (image >= self.mass) & (image > 0)
        self.add(site, meets.double().sum(dim=-1), float(rows.sum()))


# --- the measurement ------------------------------------------------------------------------------------------


def measure(context: Context, params, inputs: dict[str, torch.Tensor], hidden: Sequence[torch.Tensor],
            labels: list[str]) -> Measured:
    """The image part of ``sinks`` for one input (batch 1) already read with ``hidden`` (the language model's
    hidden states, L + 1 of them) and token ``labels``; ``params`` carries visual_tau, visual_min_layer,
    centric_ratio and centric_mass."""
    model, scope = context.loaded.model, context.scope
    image_token = scope.adapter.image_token_id
    if image_token is None:
        raise HeadscopeError(ERROR_NO_IMAGE_TOKEN.format(model=context.loaded.info.architecture))
    image_mask = scope.adapter.image_positions(inputs["input_ids"])[0].cpu()
    if not bool(image_mask.any()):
        raise HeadscopeError("the input holds no image token: the image part of sinks needs an image")
    out = Measured()
    positions = image_mask.nonzero()[:, 0]
    grid = images.patch_grid(model, inputs, len(positions))
    known = grid[0] > 1 or len(positions) == 1
    patch = {int(p): (i, *divmod(i, grid[1])) if known else (i, None, None) for i, p in enumerate(positions)}
    out.labels = [_patch_label(labels[p], *patch[p]) if p in patch else labels[p] for p in range(len(labels))]

    hidden = [state[0] for state in hidden]
    layers = list(range(params.visual_min_layer, scope.stacks[STACK].layers))
    text_only, _ = images.without_image(inputs, image_token)
    with torch.no_grad():
        first = model(**text_only, output_hidden_states=True, use_cache=False).hidden_states
    dimensions = sink_dimensions([state[0, 0] for state in first], params.visual_tau, layers)
    found = visual_sinks(hidden, image_mask, list(dimensions), params.visual_tau, layers)
    rows = [{"layer": layer, "position": position, "image_index": patch[position][0], "row": patch[position][1],
             "column": patch[position][2], "token": out.labels[position], "dimension": dimension, "value": value,
             "hidden": raw} for layer, sinks in found.items() for position, dimension, value, raw in sinks]
    out.tables["visual_sinks"] = pd.DataFrame(rows, columns=SINK_COLUMNS)

    tokens = len(image_mask)
    queries = torch.arange(tokens) > int(positions[-1])
    sink_masks = {layer: torch.isin(torch.arange(tokens), torch.tensor([p for p, *_ in sinks], dtype=torch.long))
                  for layer, sinks in found.items()}
    image = LayerKeyMass({layer: image_mask for layer in range(scope.stacks[STACK].layers)}, queries)
    sink = LayerKeyMass(sink_masks, queries)
    centric = CentricShare({layer: mask for layer, mask in sink_masks.items() if bool(mask.any())}, image_mask,
                           queries, params.centric_ratio, params.centric_mass)
    with torch.no_grad(), scope.capture(image, sink, centric):
        model(**{name: tensor.to(model.device) for name, tensor in inputs.items()}, use_cache=False)
    maps = {"image_mass": image, "visual_sink_mass": sink, "image_centric": centric}
    values = {metric: reducer.result().get(STACK) for metric, reducer in maps.items()}
    if values["image_mass"] is None:
        raise HeadscopeError("no query follows the image: put the prompt's text after the image to measure "
                             "attention on image tokens")
    if values["visual_sink_mass"] is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            values["visual_sink_share"] = values["visual_sink_mass"] / values["image_mass"]
    for metric, value in values.items():
        if value is not None and not np.isnan(value).all():
            out.maps[metric] = HeadMap(values=value, stack=STACK, description=DESCRIPTIONS[metric], unit="share")
    out.tables["image_centric_heads"] = _centric_table(values, found, params)
    out.summary = {"image_tokens": len(positions), "image_grid": f"{grid[0]} x {grid[1]}" if known else "unknown",
                   "image_queries": int(queries.sum()),
                   **_summary(out, params, dimensions, layers, found, hidden[0].shape[-1])}
    return out


def _patch_label(text: str, index: int, row: int | None, column: int | None) -> str:
    where = f" (row {row}, column {column})" if row is not None else ""
    return f"{text} #{index}{where}"


def _centric_table(values: dict[str, np.ndarray | None], found: dict[int, list], params) -> pd.DataFrame:
    """The heads that meet the image-centric rule on their means, with their numbers and per-query share."""
    if values["visual_sink_mass"] is None:
        return pd.DataFrame(columns=CENTRIC_COLUMNS)
    image, sink = values["image_mass"], values["visual_sink_mass"]
    has_sinks = np.array([bool(found.get(layer)) for layer in range(len(image))])[:, None]
    meets = image_centric(image, sink, params.centric_ratio, params.centric_mass, has_sinks)
    share = values.get("image_centric")
    rows = [{"layer": layer, "head": head, "image_mass": image[layer, head], "visual_sink_mass": sink[layer, head],
             "visual_sink_share": sink[layer, head] / image[layer, head],
             "image_centric": np.nan if share is None else share[layer, head]}
            for layer, head in zip(*np.nonzero(meets), strict=True)]
    return pd.DataFrame(rows, columns=CENTRIC_COLUMNS)


def _summary(out: Measured, params, dimensions: dict[int, float], layers: list[int], found: dict[int, list],
             width: int) -> dict[str, Any]:
    image = out.maps["image_mass"].values
    heads = image.shape[1]
    top = np.argsort(-np.nan_to_num(image, nan=-np.inf).ravel(), kind="stable")[:params.top_k]
    summary: dict[str, Any] = {
        "image_mass_mean": round(float(np.nanmean(image)), 4),
        "top_image_heads": [f"{i // heads}.{i % heads}={image.flat[i]:.3f}" for i in top],
    }
    if not layers:
        summary["visual_sinks"] = (f"not looked for: the language model has {image.shape[0]} layers, none at or "
                                   f"above visual_min_layer ({params.visual_min_layer})")
        return summary
    summary["visual_sink_layers"] = f"{layers[0]}-{layers[-1]}"
    summary["sink_dimensions"] = [f"{dimension} (|phi| {value:.1f})" for dimension, value in dimensions.items()]
    if math.sqrt(width) <= params.visual_tau:
        summary["visual_tau_reachable"] = (f"no: a weight-free RMS-normalised state of width {width} cannot exceed "
                                           f"sqrt({width}) = {math.sqrt(width):.2f} <= tau = {params.visual_tau:g}")
    table = out.tables["visual_sinks"]
    counts = table.groupby(["position", "token"]).size().sort_values(ascending=False)
    summary["visual_sink_tokens"] = int(table["position"].nunique())
    summary["top_visual_sinks"] = [f"{position} {token!r}: {n} layer(s)" for (position, token), n
                                   in counts.head(5).items()]
    centric = out.tables["image_centric_heads"]
    summary["image_centric_heads"] = len(centric)
    summary["image_centric_layers"] = sum(1 for sinks in found.values() if sinks)
    summary["top_image_centric_heads"] = [f"{row.layer}.{row.head}: image {row.image_mass:.3f}, sink share "
                                          f"{row.visual_sink_share:.3f}" for row in
                                          centric.sort_values("image_mass", ascending=False).head(5).itertuples()]
    return summary


# --- figures --------------------------------------------------------------------------------------------------


def figures(result: AnalysisResult) -> dict[str, go.Figure]:
    """The visual sink tokens on the image's patch grid: in how many judged layers each image token is one."""
    table = result.tables.get("visual_sinks")
    grid = result.summary.get("image_grid", "unknown")
    if table is None or not len(table) or grid == "unknown":
        return {}
    rows, columns = (int(n) for n in grid.split(" x "))
    counts = np.zeros((rows, columns))
    for (row, column), n in table.groupby(["row", "column"]).size().items():
        counts[int(row), int(column)] = n
    figure = go.Figure(go.Heatmap(z=counts, colorscale="Reds", colorbar_title="layers",
                                  hovertemplate="row %{y}, column %{x}<br>a visual sink in %{z} layer(s)"
                                                "<extra></extra>"))
    figure.update_yaxes(autorange="reversed", title="patch row")
    layers, tau = result.summary.get("visual_sink_layers"), result.params.get("visual_tau")
    figure.update_layout(title=f"sinks: visual sink tokens on the patch grid (layers {layers}, tau {tau})",
                         xaxis_title="patch column",
                         template="simple_white", width=520, height=480)
    return {"visual-sinks": figure}
