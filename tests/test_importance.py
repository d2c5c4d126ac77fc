"""The ``importance`` analysis: batched ablations equal one-at-a-time ablations, gate gradients equal autograd's
sum over tokens of z . dL/dz, a planted head is ranked first, the pruning curve ends where it must, and the
command line runs it. The ``slow`` test measures the packaged SmolLM2 and prints its numbers.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import numpy as np
import pytest
import tiny_models as tm
import torch
from cli_runner import run_cli

from headscope.analyses import importance
from headscope.capture.engine import Scope
from headscope.capture.gates import Gates
from headscope.models import zoo
from headscope.results import Results
from headscope.runner import RunOptions, analyze

LAYERS, HEADS, HEAD_DIM = 2, 4, 8
PLANTED = (1, 2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with tm.one_thread():
        yield


def _probe() -> dict[str, torch.Tensor]:
    return tm.get("llama").inputs(1)


def _one_at_a_time(model, scope, inputs, kind: str) -> np.ndarray:
    """Each head ablated in its own forward pass with a shared (layers, heads) gate."""
    means = importance.head_means(model, scope, inputs) if kind == "mean" else None
    out = np.empty((LAYERS, HEADS))
    for layer in range(LAYERS):
        for head in range(HEADS):
            if kind == "zero":
                gate = Gates.zero([(layer, head)], LAYERS, HEADS)
            else:
                mask = torch.zeros(LAYERS, HEADS, dtype=torch.bool)
                mask[layer, head] = True
                gate = Gates(replace=means, replace_mask=mask)
            out[layer, head] = float(importance.losses(model, scope, inputs, [gate])[0])
    return out


@pytest.mark.parametrize("kind", ["zero", "mean"])
@pytest.mark.parametrize("batch_size", [3, 8])
def test_batched_ablation_equals_one_at_a_time_for_every_head(kind, batch_size):
    model = tm.get("llama").model
    scope, inputs = Scope(model), _probe()
    batched = importance.ablation_importance(model, scope, inputs, kind, batch_size)
    alone = _one_at_a_time(model, scope, inputs, kind)
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-5)
    clean = float(importance.losses(model, scope, inputs)[0])
    assert np.abs(alone - clean).max() > 1e-2  # the ablations matter


def test_gate_gradient_equals_autograd_sum_over_tokens_of_z_dot_dloss_dz():
    model = tm.get("llama").model
    scope, inputs = Scope(model), _probe()
    found = importance.gradient_importance(model, scope, inputs)

    z: dict[int, torch.Tensor] = {}

    def keep(layer):
        def hook(_module, args):
            args[0].retain_grad()
            z[layer] = args[0]
        return hook

    handles = [model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(keep(layer))
               for layer in range(LAYERS)]
    try:
        logits = model(**inputs).logits
        importance.next_token_losses(logits, inputs["input_ids"], inputs["attention_mask"]).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    products = torch.stack([(z[layer] * z[layer].grad).view(1, -1, HEADS, HEAD_DIM).sum(-1)[0].detach().double()
                            for layer in range(LAYERS)])  # (layers, tokens, heads)
    model.zero_grad(set_to_none=True)
    tokens = inputs["input_ids"].shape[1]
    per_batch = products.sum(1).abs().numpy() / tokens
    per_token = products.abs().sum(1).numpy() / tokens
    assert per_batch.max() > 1e-3
    np.testing.assert_allclose(found["per_batch"], per_batch, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(found["per_token"], per_token, rtol=1e-4, atol=1e-7)
    assert (found["per_token"] >= found["per_batch"] - 1e-9).all()  # triangle inequality


def _planted() -> torch.nn.Module:
    """The tiny Llama with one head that carries the prediction.

    Every head's slice of its layer's o_proj columns is scaled by 0.01, except head PLANTED, whose slice is
    scaled by 4: the other heads write almost nothing into the residual stream, so removing them (or their
    gradient) barely moves the loss, while the planted head's write dominates what attention adds to the
    last layer's residual stream, which the unembedding reads next.
    """
    model = copy.deepcopy(tm.get("llama").model)
    with torch.no_grad():
        for layer in range(LAYERS):
            weight = model.model.layers[layer].self_attn.o_proj.weight  # (hidden, heads * head_dim)
            for head in range(HEADS):
                factor = 4.0 if (layer, head) == PLANTED else 0.01
                weight[:, head * HEAD_DIM:(head + 1) * HEAD_DIM] *= factor
    return model


def test_a_planted_head_ranks_first_in_both_maps():
    model = _planted()
    scope, inputs = Scope(model), _probe()
    clean = float(importance.losses(model, scope, inputs)[0])
    gradient = importance.gradient_importance(model, scope, inputs)
    zero = importance.ablation_importance(model, scope, inputs, "zero") - clean
    flat_planted = PLANTED[0] * HEADS + PLANTED[1]
    for values in (gradient["per_token"], gradient["per_batch"], np.abs(zero)):
        ranked = np.argsort(-values.ravel())
        assert ranked[0] == flat_planted
        assert values.ravel()[ranked[1]] < 0.2 * values.ravel()[ranked[0]]
    assert zero[PLANTED] > 0.05


def test_pruning_curve_starts_at_the_clean_loss_and_ends_with_every_head_zeroed():
    model = tm.get("llama").model
    scope, inputs = Scope(model), _probe()
    params = importance.Params(batch_size=5, step=0.25, random_orders=2)
    order = np.random.default_rng(1).permutation(LAYERS * HEADS)
    curve = importance.pruning_curve(model, scope, inputs, order, params)

    clean = float(importance.losses(model, scope, inputs)[0])
    zeroed = float(importance.losses(model, scope, inputs, [Gates(scale=torch.zeros(LAYERS, HEADS))])[0])
    assert list(curve["heads_masked"]) == [0, 2, 4, 6, 8]
    for column in ("loss", "loss_random"):
        assert curve[column].iloc[0] == pytest.approx(clean, abs=1e-5)
        assert curve[column].iloc[-1] == pytest.approx(zeroed, abs=1e-5)
    assert abs(zeroed - clean) > 1e-2
    half = Gates.zero([(int(i // HEADS), int(i % HEADS)) for i in order[:4]], LAYERS, HEADS)
    assert curve["loss"].iloc[2] == pytest.approx(float(importance.losses(model, scope, inputs, [half])[0]),
                                                  abs=1e-5)


def test_normalise_and_prunable_fraction():
    values = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(importance.normalise(values), [[0.6, 0.8], [0.0, 0.0]])
    np.testing.assert_allclose(importance.normalise(values, min_max=True), [[0.75, 1.0], [0.0, 0.0]])
    import pandas as pd
    curve = pd.DataFrame({"fraction": [0.0, 0.5, 1.0], "loss": [1.0, 1.04, 2.0]})
    assert importance.prunable_fraction(curve, 1.0, 0.05) == 0.5
    assert importance.prunable_fraction(curve, 1.0, 0.01) == 0.0


def test_cli_runs_importance_on_a_tiny_model_with_the_prose_cut_to_probe_tokens(tmp_path: Path,
                                                                              tiny_llama_dir: Path) -> None:
    code = run_cli("analyze", str(tiny_llama_dir), "--analyses", "importance", "--set", "importance.batch_size=3",
                   "--set", "importance.probe_tokens=16", "--out", str(tmp_path), "--figures", "html", "-q")

    assert code == 0
    result = Results.load(tmp_path / "results.json")["importance"]
    assert result.status == "ok", result.error
    assert set(result.metrics()) == {"gradient_per_token", "gradient_per_token_normalised", "gradient_per_batch",
                                     "gradient_per_batch_normalised", "ablation_zero", "ablation_mean"}
    assert result.map("ablation_zero").values.shape == (2, 4)
    assert result.params["batch_size"] == 3
    assert result.summary["tokens"] == 16  # the shipped prose, cut to probe_tokens
    assert -1 <= result.summary["spearman_gradient_per_token_vs_ablation_zero"] <= 1
    assert (tmp_path / "figures" / "importance-pruning.html").is_file()
    saved = importance.export_npy(result, tmp_path / "head_importance.npy")
    np.testing.assert_allclose(np.load(saved), result.map("gradient_per_token_normalised").values, rtol=1e-6)


# --- the packaged model ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_packaged_smollm2_importance(tmp_path: Path) -> None:
    if not zoo.PACKAGED["smollm2-135m"].installed():
        pytest.skip(f"run `{zoo.PACKAGED['smollm2-135m'].install}`")
    started, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # a real model gains from every core, unlike the tiny ones
    try:
        result = analyze(RunOptions(model="smollm2-135m", analyses=["importance"], out=tmp_path, figures=(),
                                    max_tokens=64))["importance"]
    finally:
        torch.set_num_threads(threads)
    assert result.status == "ok", result.error
    print(f"\nsmollm2-135m importance on 64 tokens ({result.seconds:.1f} s, {time.perf_counter() - started:.1f} s "
          f"with loading):")
    for key, value in result.summary.items():
        print(f"  {key}: {value}")
    print(result.tables["pruning"].to_string())
    # measured (64 tokens of the prose): Spearman 0.29, prunable fraction 0.3, random order worse at every step
    assert result.summary["spearman_gradient_per_token_vs_ablation_zero"] > 0.1
    curve = result.tables["pruning"].iloc[1:-1]
    assert (curve["loss"] < curve["loss_random"]).all()
    assert result.summary["prunable_fraction"] >= 0.1
