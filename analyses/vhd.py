"""``vhd``: vision-aware head divergence of a vision-language model's language heads, and the VHR intervention.

After He et al. (ACL 2025), "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence".
Per prompt, the model first decodes greedily with the image; then two teacher-forced forward passes read every
head's output z (the input of its output projection, through ``Gates(read="all")``): one with the image, one
with the image tokens removed from the same ``input_ids`` (same text prompt, same generated prefix). At the
query position t that predicts generated token k (the prompt's last token for k = 0, then each generated token
but the last):

- VHD_k[l, h] = || z[l, h, t](with image) - z[l, h, t](without image) ||_2;
- the map ``vhd`` is VHD averaged over generated positions and prompts (``average="prompts"``: the mean over
  prompts of each prompt's mean over positions; ``"tokens"``: the mean over every (prompt, position) pair);
  ``vhd_first_step`` is VHD_0 averaged over prompts (what VHR selects on);
- T-VHD of generated token k = the mean of VHD_k over its ``top_k`` largest heads (per token; table ``t_vhd``).

VHR (Vision-aware Head Reinforcement, training-free): at the first generation step (k = 0), layer by layer,
heads whose VHD_0 is an outlier within the layer (ours: above Q3 + ``outlier_iqr`` x IQR of the layer's heads;
the paper says only that abnormal VHD scores are filtered out) are left alone; of the others, the heads above
the median of the kept heads' VHD_0 have their output z scaled by ``alpha`` (2). With ``layerwise`` (default)
layer l's VHD_0 is measured with layers < l already reinforced (our reading of the paper's layer-wise
enhancement); otherwise every layer selects from the clean run. The heads are then fixed for the whole
generation. :func:`reinforce` returns the :class:`~headscope.capture.gates.Gates`; :func:`generate` decodes with
them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from headscope import progress
from headscope.capture.engine import Scope
from headscope.capture.gates import Gates
from headscope.capture.reducers import LastRow
from headscope.errors import HeadscopeError
from headscope.probes import images
from headscope.probes.images import extended, generate, patch_grid
from headscope.registry import Context, Parameters, register
from headscope.results import AnalysisResult, HeadMap

Average = Literal["prompts", "tokens"]
STACK = "self"
DESCRIPTIONS = {
    "vhd": "vision-aware head divergence: ||z(with image) - z(without)||_2 at the generation position, mean over "
           "generated positions and prompts",
    "vhd_first_step": "vision-aware head divergence at the first generation step, mean over prompts",
    "vhr_selected": "share of prompts in which VHR reinforced the head",
    "image_attention": "attention mass from the generation position to the image tokens, mean over generated "
                       "positions and prompts",
}
ERROR_NO_IMAGE_TOKEN = ("{model} has no image token in its config (image_token_id / image_token_index): vhd needs a "
                        "vision-language model that marks image positions with a placeholder token")


@dataclass(frozen=True)
class Params(Parameters):
    """The parameters of ``vhd`` (``--set vhd.NAME=VALUE`` overrides them).

    Attributes:
        prompts: shipped shapes pictures measured (one prompt each); a user's ``--input``/``--text`` is one.
        max_new_tokens: tokens decoded greedily per prompt (the positions VHD is averaged over).
        top_k: heads averaged into each token's T-VHD (capped at layers x heads).
        average: ``"prompts"`` (mean over prompts of per-prompt means) or ``"tokens"`` (pooled positions).
        alpha: VHR's scale on the selected heads (the paper: 2; 4 broke generation, < 1 raised hallucination).
        outlier_iqr: VHR leaves out heads above Q3 + outlier_iqr x IQR of their layer (ours).
        layerwise: VHR measures each layer with the layers before it already reinforced.
        vhr: also decode with VHR and report both generations.
        grid_heads: heads (the top VHD ones) whose image attention is drawn on the patch grid, first prompt.
        seed: the first shipped picture's seed.
    """

    analysis = "vhd"
    prompts: int = 3
    max_new_tokens: int = 16
    top_k: int = 10
    average: Average = "prompts"
    alpha: float = 2.0
    outlier_iqr: float = 1.5
    layerwise: bool = True
    vhr: bool = True
    grid_heads: int = 4
    seed: int = 0

    def check(self) -> None:
        if self.prompts < 1 or self.max_new_tokens < 1 or self.top_k < 1 or self.outlier_iqr < 0:
            raise HeadscopeError("vhd needs prompts >= 1, max_new_tokens >= 1, top_k >= 1 and outlier_iqr >= 0")


@dataclass
class Reinforcement:
    """What VHR chose: the gates, the selected heads (layers, heads) bool, and the first-step VHD each layer was
    selected on (layers, heads)."""

    gates: Gates
    selected: np.ndarray
    first_step: np.ndarray


# --- head outputs and divergence -------------------------------------------------------------------------------


def head_outputs(model: torch.nn.Module, scope: Scope, inputs: dict[str, torch.Tensor], stack: str = STACK,
                 scale: torch.Tensor | None = None) -> torch.Tensor:
    """(layers, tokens, heads, head_dim) float32 output z of every head of ``stack`` at every token of one plain
    forward pass (batch 1), read before ``scale`` (layers, heads), when given, multiplies it."""
    reader = Gates(stack=stack, read="all", scale=scale)
    with torch.no_grad(), scope.capture(gates=[reader]):
        model(**inputs, use_cache=False)
    return torch.stack([reader.z_[layer][-1][0].float() for layer in sorted(reader.z_)])


def divergence(model: torch.nn.Module, scope: Scope, pair: images.ImagePair, prefix: torch.Tensor | None = None,
               stack: str = STACK, scale: torch.Tensor | None = None) -> np.ndarray:
    """(steps, layers, heads) VHD_k[l, h] for k = 0 ... len(prefix): the L2 distance between z with and without
    the image at the position that predicts generated token k, the generated ``prefix`` teacher-forced in both."""
    prefix = torch.zeros(0, dtype=torch.long) if prefix is None else prefix
    outputs = []
    for inputs in (pair.with_image, pair.without_image):
        z = head_outputs(model, scope, extended(inputs, prefix), stack, scale)
        first = inputs["input_ids"].shape[1] - 1
        outputs.append(z[:, first:first + len(prefix) + 1])
    return torch.linalg.vector_norm(outputs[0] - outputs[1], dim=-1).permute(1, 0, 2).double().cpu().numpy()


def t_vhd(per_step: np.ndarray, top_k: int) -> np.ndarray:
    """(steps,) T-VHD: per generated token, the mean of its ``top_k`` largest head VHDs (per_step (steps, L, H))."""
    flat = np.sort(per_step.reshape(len(per_step), -1), axis=1)[:, ::-1]
    return flat[:, :min(top_k, flat.shape[1])].mean(axis=1)


class ImageAttention:
    """Attention from each generation position to the image tokens, per head of ``stack``, read from the last
    query row of every call of a captured ``generate`` (the prompt's last token, then each decode step).

    ``mass()`` (layers, heads): mean over steps of the row's sum over image keys; ``rows()`` (layers, heads,
    image tokens): the mean row over image keys, to reshape onto the image's patch grid.
    """

    def __init__(self, image_mask: torch.Tensor, stack: str = STACK) -> None:
        self.image_mask = image_mask.cpu()
        self.stack = stack
        self.sums: dict[int, torch.Tensor] = {}
        self.steps: dict[int, int] = {}
        self.reducer = LastRow(callback=self._add, stacks=[stack])

    def _add(self, site, call: int, row: torch.Tensor) -> None:
        image = row[0, :, :len(self.image_mask)][:, self.image_mask.to(row.device)].double().cpu()
        self.sums[site.layer] = self.sums.get(site.layer, 0) + image
        self.steps[site.layer] = self.steps.get(site.layer, 0) + 1

    def rows(self) -> np.ndarray:
        return torch.stack([self.sums[layer] / self.steps[layer] for layer in sorted(self.sums)]).numpy()

    def mass(self) -> np.ndarray:
        return self.rows().sum(axis=-1)


# --- generation and VHR --------------------------------------------------------------------------------------


def select_heads(values: np.ndarray, outlier_iqr: float = 1.5) -> np.ndarray:
    """(heads,) bool: VHR's choice within one layer from its heads' VHD ``values`` (heads,).

    Outliers are the heads above Q3 + ``outlier_iqr`` x (Q3 - Q1) (quartiles by linear interpolation); of the
    others, the heads strictly above their median are chosen.
    """
    q1, q3 = np.percentile(values, [25, 75])
    kept = values <= q3 + outlier_iqr * (q3 - q1)
    return kept & (values > np.median(values[kept]))


def reinforcement(model: torch.nn.Module, scope: Scope, pair: images.ImagePair, alpha: float = 2.0,
                  outlier_iqr: float = 1.5, layerwise: bool = True, stack: str = STACK) -> Reinforcement:
    """VHR's heads for ``pair`` (see the module docstring), chosen at the first generation step."""
    shape = scope.stacks[stack]
    scale = torch.ones(shape.layers, shape.heads)
    selected = np.zeros((shape.layers, shape.heads), dtype=bool)
    first_step = divergence(model, scope, pair, stack=stack)[0]
    for layer in range(shape.layers):
        if layerwise and layer > 0:
            first_step[layer] = divergence(model, scope, pair, stack=stack, scale=scale)[0, layer]
        selected[layer] = select_heads(first_step[layer], outlier_iqr)
        scale[layer, torch.from_numpy(selected[layer])] = alpha
    return Reinforcement(Gates(stack=stack, scale=scale), selected, first_step)


def reinforce(model: torch.nn.Module, scope: Scope, pair: images.ImagePair, alpha: float = 2.0,
              outlier_iqr: float = 1.5, layerwise: bool = True, stack: str = STACK) -> Gates:
    """The VHR gates for ``pair``: ``Gates(scale=...)`` with ``alpha`` on the chosen heads and 1 elsewhere."""
    return reinforcement(model, scope, pair, alpha, outlier_iqr, layerwise, stack).gates


# --- the analysis --------------------------------------------------------------------------------------------


def _figures(result: AnalysisResult) -> dict[str, go.Figure]:
    return figures(result)


@register("vhd", kinds=("vision-language",), params=Params, main_metric="vhd",
          description="vision-aware head divergence (He et al. 2025) per language head, T-VHD per generated token, "
                      "and generations with and without VHR", figures=_figures,
          cost="about 1 min on synthetic-llava-smollm2 (2 CPU cores)")
def run(context: Context) -> AnalysisResult:
    started = time.perf_counter()
    params = Params.read(context.params, context.seed)
    loaded, scope = context.loaded, context.scope
    model = loaded.model
    image_token = scope.adapter.image_token_id
    if image_token is None:
        raise HeadscopeError(ERROR_NO_IMAGE_TOKEN.format(model=loaded.info.architecture))
    if STACK not in scope.stacks:
        raise HeadscopeError(f"vhd needs a '{STACK}' attention stack; this model has {list(scope.stacks)}")
    user = context.text is not None or context.input_path is not None
    probes = ([images.user(context.input_path, context.text, params.seed)] if user
              else images.shipped(params.prompts, params.seed))
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)

    per_prompt, first_steps, selected, token_rows, generation_rows, viewed = [], [], [], [], [], []
    timing = {"generate": 0.0, "vhd": 0.0, "vhr": 0.0}
    for index, probe in progress.steps(list(enumerate(probes)), "vhd: prompts"):
        pair = images.pair(loaded, probe, image_token)
        clock = time.perf_counter()
        view = ImageAttention(pair.image_mask)
        generated = generate(model, scope, pair.with_image, params.max_new_tokens, reducers=(view.reducer,))
        viewed.append((view, patch_grid(model, pair.with_image, int(pair.image_mask.sum()))))
        timing["generate"] += time.perf_counter() - clock
        clock = time.perf_counter()
        steps = divergence(model, scope, pair, generated[:-1])
        timing["vhd"] += time.perf_counter() - clock
        per_prompt.append(steps)
        first_steps.append(steps[0])
        token_rows += _token_rows(index, generated, steps, params.top_k, tokenizer)
        row = {"prompt": index, "image": probe.description, "source": probe.source, "text": probe.prompt,
               "image_tokens": int(pair.image_mask.sum()), "output": tokenizer.decode(generated)}
        if params.vhr:
            clock = time.perf_counter()
            chosen = reinforcement(model, scope, pair, params.alpha, params.outlier_iqr, params.layerwise)
            reinforced = generate(model, scope, pair.with_image, params.max_new_tokens, chosen.gates)
            timing["vhr"] += time.perf_counter() - clock
            selected.append(chosen.selected)
            row.update(output_vhr=tokenizer.decode(reinforced), heads_reinforced=int(chosen.selected.sum()),
                       changed=bool(len(reinforced) != len(generated) or (reinforced != generated).any()))
        generation_rows.append(row)

    result = AnalysisResult(name="vhd", params={**params.__dict__, "stack": STACK, "image_token_id": image_token})
    result.add_map("vhd", HeadMap(_average(per_prompt, params.average), STACK, DESCRIPTIONS["vhd"]))
    result.add_map("vhd_first_step", HeadMap(np.mean(first_steps, axis=0), STACK, DESCRIPTIONS["vhd_first_step"]))
    result.add_map("image_attention", HeadMap(np.mean([view.mass() for view, _ in viewed], axis=0), STACK,
                                              DESCRIPTIONS["image_attention"]))
    if selected:
        result.add_map("vhr_selected", HeadMap(np.mean(selected, axis=0), STACK, DESCRIPTIONS["vhr_selected"]))
    result.tables["t_vhd"] = pd.DataFrame(token_rows)
    result.tables["generations"] = pd.DataFrame(generation_rows)
    result.tables["image_attention_grid"] = _grid_rows(result, *viewed[0], params.grid_heads)
    result.summary = _summary(result, probes, timing, params)
    if loaded.info.source.get("synthetic"):  # e.g. synthetic-llava-smollm2: its vision side is untrained
        result.summary["synthetic_model"] = loaded.info.source["synthetic"]
    result.seconds = time.perf_counter() - started
    return result


def _average(per_prompt: list[np.ndarray], average: Average) -> np.ndarray:
    """(layers, heads) mean VHD: of per-prompt means (``"prompts"``), or over every position (``"tokens"``)."""
    if average == "prompts":
        return np.mean([steps.mean(axis=0) for steps in per_prompt], axis=0)
    return np.concatenate(per_prompt).mean(axis=0)


def _grid_rows(result: AnalysisResult, view: ImageAttention, grid: tuple[int, int], count: int) -> pd.DataFrame:
    """The first prompt's image attention of the top ``count`` VHD heads, one row per image token on its grid."""
    rows = view.rows()
    out = []
    for layer, head, _ in result.top_heads("vhd", k=count, stack=STACK):
        for index, value in enumerate(rows[layer, head]):
            out.append({"layer": layer, "head": head, "row": index // grid[1], "column": index % grid[1],
                        "attention": float(value)})
    return pd.DataFrame(out, columns=["layer", "head", "row", "column", "attention"])


def _token_rows(index: int, generated: torch.Tensor, steps: np.ndarray, top_k: int, tokenizer) -> list[dict]:
    scores = t_vhd(steps, top_k)
    heads = steps.shape[2]
    rows = []
    for step, (token, score) in enumerate(zip(generated.tolist(), scores, strict=True)):
        top = int(np.argmax(steps[step]))
        rows.append({"prompt": index, "step": step, "token_id": token, "token": tokenizer.decode([token]),
                     "t_vhd": float(score), "top_head": f"{top // heads}.{top % heads}",
                     "top_vhd": float(steps[step].max())})
    return rows


def _summary(result: AnalysisResult, probes: list[images.ImageProbe], timing: dict[str, float],
             params: Params) -> dict[str, Any]:
    values = result.map("vhd", STACK).values
    tokens = result.tables["t_vhd"]
    summary: dict[str, Any] = {
        "input": sorted({probe.source for probe in probes}),
        "prompts": len(probes),
        "generated_tokens": len(tokens),
        "top_vhd": [f"{layer}.{head}={value:.4g}" for layer, head, value in result.top_heads("vhd", k=10, stack=STACK)],
        "top_vhd_per_layer": [f"{layer}.{int(np.argmax(row))}={row.max():.4g}" for layer, row in enumerate(values)],
        "mean_t_vhd": float(tokens["t_vhd"].mean()),
        "seconds_generate": round(timing["generate"], 3),
        "seconds_vhd": round(timing["vhd"], 3),
        "vhd_cost_vs_generation": round(timing["vhd"] / max(timing["generate"], 1e-9), 3),
    }
    if params.vhr:
        generations = result.tables["generations"]
        summary.update(vhr_heads_reinforced_mean=float(generations["heads_reinforced"].mean()),
                       vhr_changed_outputs=int(generations["changed"].sum()), seconds_vhr=round(timing["vhr"], 3))
    return summary


# --- figures -------------------------------------------------------------------------------------------------


def figures(result: AnalysisResult) -> dict[str, go.Figure]:
    """T-VHD per generated token, one line per prompt; hover shows the token."""
    table = result.tables["t_vhd"]
    figure = go.Figure()
    for prompt, group in table.groupby("prompt", sort=True):
        hover = [f"{step}: {_escape(token)}<br>top head {head}" for step, token, head
                 in zip(group["step"], group["token"], group["top_head"], strict=True)]
        figure.add_trace(go.Scatter(x=group["step"], y=group["t_vhd"], mode="lines+markers", name=f"prompt {prompt}",
                                    hovertext=hover, hovertemplate="%{hovertext}<br>T-VHD %{y:.4f}<extra></extra>"))
    figure.update_layout(title=f"vhd: T-VHD per generated token (mean over the top {result.params.get('top_k')} "
                               "heads of each token)", xaxis_title="generated token", yaxis_title="T-VHD",
                         template="simple_white", width=720, height=420)
    out = {"t_vhd": figure}
    grid = result.tables.get("image_attention_grid")
    if grid is not None and len(grid):
        out["image_attention_grid"] = _grid_figure(grid)
    return out


def _grid_figure(grid: pd.DataFrame) -> go.Figure:
    """Per top VHD head, its attention to each image token laid out on the image's patch grid (first prompt)."""
    from plotly.subplots import make_subplots

    heads = list(dict.fromkeys(zip(grid["layer"], grid["head"], strict=True)))
    figure = make_subplots(rows=1, cols=len(heads), subplot_titles=[f"head {layer}.{head}" for layer, head in heads])
    for column, (layer, head) in enumerate(heads, start=1):
        cells = grid[(grid["layer"] == layer) & (grid["head"] == head)]
        values = np.full((cells["row"].max() + 1, cells["column"].max() + 1), np.nan)
        values[cells["row"], cells["column"]] = cells["attention"]
        figure.add_trace(go.Heatmap(z=values, coloraxis="coloraxis",
                                    hovertemplate="row %{y}, column %{x}<br>attention %{z:.4f}<extra></extra>"),
                         row=1, col=column)
        figure.update_yaxes(autorange="reversed", row=1, col=column)
    figure.update_layout(title="vhd: attention from the generation position to image tokens on the patch grid "
                               "(top VHD heads, first prompt, mean over generated tokens)",
                         coloraxis={"colorscale": "Viridis"}, template="simple_white",
                         width=max(480, 240 * len(heads)), height=360)
    return figure


def _escape(token: str) -> str:
    """A token's text for plotly's HTML-like hover labels: markup escaped, line breaks and tabs shown."""
    text = token.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return '"' + text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r") + '"'
