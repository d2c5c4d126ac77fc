"""The ``importance`` analysis: batched ablations (with and without prefix reuse) equal one-at-a-time
ablations on every architecture, uniform attention equals a hand-made mean of the visible values, gate
gradients equal autograd's sum over tokens of z . dL/dz, the objectives equal their plain definitions, a planted
head is ranked first, the pruning curve ends where it must (with a floor and with re-estimation), and the
command line runs it on a decoder, an encoder and an encoder-decoder. The ``slow`` test measures the packaged
SmolLM2 and prints its numbers.
"""

from __future__ import annotations

import copy
import re
import time
from pathlib import Path

import numpy as np
import pytest
import tiny_models as tm
import torch
from cli_runner import run_cli

import headscope
from headscope.analyses import importance
from headscope.capture.engine import Scope
from headscope.capture.gates import Gates
from headscope.errors import HeadscopeError
from headscope.models import zoo
from headscope.results import AnalysisResult, Results
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
@pytest.mark.parametrize("prefix_reuse", [False, True])
def test_batched_ablation_equals_one_at_a_time_for_every_head(kind, batch_size, prefix_reuse):
    model = tm.get("llama").model
    scope, inputs = Scope(model), _probe()
    batched = importance.ablation_importance(model, scope, inputs, kind, batch_size=batch_size,
                                             prefix_reuse=prefix_reuse)
    alone = _one_at_a_time(model, scope, inputs, kind)
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-5)
    clean = float(importance.losses(model, scope, inputs)[0])
    assert np.abs(alone - clean).max() > 1e-2  # the ablations matter


def _goal(name: str, model, scope) -> importance.Objective:
    """An objective for each kind of tiny model: its own loss where it has one, the preservation loss else."""
    inputs = tm.get(name).inputs(1)
    if name == "bert":
        return importance.preservation_loss(model, scope, inputs)
    if "decoder_input_ids" in inputs:  # the decoder loss on the given decoder tokens
        targets = inputs["decoder_input_ids"][:, 1:]

        def decoder_loss(outputs, rows: int) -> torch.Tensor:
            logits = outputs.logits[:, :-1].float().transpose(1, 2)
            return torch.nn.functional.cross_entropy(logits, targets.expand(rows, -1), reduction="none").mean(1)

        return importance.Objective("loss", "decoder loss", inputs, decoder_loss)
    return importance.next_token_loss(inputs)


@pytest.mark.parametrize("kind", ["zero", "uniform"])
@pytest.mark.parametrize("name", ["gpt2", "gemma3", "bert", "whisper", "t5"])
def test_batched_ablation_with_prefix_reuse_equals_one_at_a_time_on_every_stack(name, kind):
    """Rows widened at their first ablated layer (the encoder's, the decoder's or a cross-attention layer)
    measure what a pass per head with a shared (layers, heads) gate measures."""
    model = tm.get(name).model
    scope = Scope(model)
    goal, stacks = _goal(name, model, scope), importance.scored_stacks(scope)
    batched = importance.ablation_importance(model, scope, goal, kind, stacks, batch_size=5, prefix_reuse=True)
    for site, head in importance.heads(scope, stacks):
        shape = (scope.stacks[site.stack].layers, scope.stacks[site.stack].heads)
        alone = torch.zeros(shape, dtype=torch.bool)
        alone[site.layer, head] = True
        gate = Gates(site.stack, scale=(~alone).float()) if kind == "zero" else Gates(site.stack, uniform=alone)
        expected = float(importance.evaluate(model, scope, goal, [gate])[0])
        assert batched[site.stack][site.layer, head] == pytest.approx(expected, abs=2e-6), (site.stack, site.layer)
    clean = float(importance.evaluate(model, scope, goal)[0])
    assert max(np.abs(values - clean).max() for values in batched.values()) > 1e-3  # the ablations matter


@pytest.mark.parametrize("layer,head", [(0, 1), (1, 3)])
def test_uniform_attention_equals_the_mean_of_the_visible_values_by_hand(layer, head):
    """Under a causal mask a uniform head's output at token t is the mean of v over tokens 0..t: read v from
    v_proj, average it by hand, and write it into the head's slice of o_proj's input with plain hooks."""
    model = tm.get("llama").model
    scope, inputs = Scope(model), _probe()
    attention = model.model.layers[layer].self_attn
    kv_head = head // (HEADS // model.config.num_key_value_heads)
    values: dict[str, torch.Tensor] = {}

    def keep_v(_module, _args, output):
        values["v"] = output.view(*output.shape[:2], -1, HEAD_DIM)[:, :, kv_head]

    def write_mean(_module, args):
        x = args[0].clone()
        v = values["v"]
        running = v.cumsum(1) / torch.arange(1, v.shape[1] + 1)[None, :, None]
        x[:, :, head * HEAD_DIM:(head + 1) * HEAD_DIM] = running
        return (x, *args[1:])

    handles = [attention.v_proj.register_forward_hook(keep_v),
               attention.o_proj.register_forward_pre_hook(write_mean)]
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    by_hand = float(importance.next_token_losses(logits, inputs["input_ids"], inputs["attention_mask"])[0])
    mask = torch.zeros(LAYERS, HEADS, dtype=torch.bool)
    mask[layer, head] = True
    found = float(importance.losses(model, scope, inputs, [Gates(uniform=mask)])[0])
    assert found == pytest.approx(by_hand, abs=1e-5)
    assert abs(found - float(importance.losses(model, scope, inputs)[0])) > 1e-3


def test_gate_gradient_equals_autograd_sum_over_tokens_of_z_dot_dloss_dz():
    model = tm.get("llama").model
    scope, inputs = Scope(model), _probe()
    found = importance.gradient_importance(model, scope, importance.next_token_loss(inputs))["self"]

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
    # triangle inequality, to the float32 rounding of summing `tokens` terms (equality where all share one sign)
    eps = np.finfo(np.float32).eps
    assert (found["per_token"] >= found["per_batch"] * (1 - tokens * eps)).all()


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
    gradient = importance.gradient_importance(model, scope, importance.next_token_loss(inputs))["self"]
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
    for column in ("value", "value_random"):
        assert curve[column].iloc[0] == pytest.approx(clean, abs=1e-5)
        assert curve[column].iloc[-1] == pytest.approx(zeroed, abs=1e-5)
    assert abs(zeroed - clean) > 1e-2
    half = Gates.zero([(int(i // HEADS), int(i % HEADS)) for i in order[:4]], LAYERS, HEADS)
    assert curve["value"].iloc[2] == pytest.approx(float(importance.losses(model, scope, inputs, [half])[0]),
                                                   abs=1e-5)


def test_pruning_keeps_the_floor_of_heads_per_layer():
    model = tm.get("llama").model
    scope, inputs = Scope(model), _probe()
    params = importance.Params(batch_size=8, step=0.25, random_orders=1, min_heads_per_layer=1)
    order = np.arange(LAYERS * HEADS)  # layer 0's heads first: its last head is skipped, layer 1's come next
    curve = importance.pruning_curve(model, scope, inputs, order, params)

    assert list(curve["heads_masked"]) == [0, 2, 4, 6]  # at most 3 of each layer's 4 heads
    kept = Gates.zero([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)], LAYERS, HEADS)
    assert curve["value"].iloc[-1] == pytest.approx(float(importance.losses(model, scope, inputs, [kept])[0]),
                                                    abs=1e-5)
    assert curve["value_random"].iloc[-1] < curve["value"].iloc[0] + 10  # one random order, floored too


def test_pruning_with_re_estimation_masks_the_least_important_remaining_heads():
    model = tm.get("llama").model
    scope, inputs = Scope(model), _probe()
    goal = importance.next_token_loss(inputs)
    params = importance.Params(batch_size=8, step=0.25, random_orders=0, reestimate=True)
    order = np.arange(LAYERS * HEADS)  # ignored after the first step's re-estimate
    curve = importance.pruning_curve(model, scope, goal, order, params)

    every = importance.heads(scope, ("self",))
    masked: list[int] = []
    for count, value in zip(curve["heads_masked"], curve["value"], strict=True):
        if count > len(masked):  # by hand: re-estimate under the current mask, mask the least important
            scale = torch.ones(LAYERS, HEADS)
            for index in masked:
                scale[every[index][0].layer, every[index][1]] = 0.0
            score = importance.normalise(importance.gradient_importance(
                model, scope, goal, scale={"self": scale})["self"]["per_token"]).ravel()
            remaining = [i for i in np.argsort(score, kind="stable") if i not in masked]
            masked += remaining[:count - len(masked)]
        gate = Gates.zero([(every[i][0].layer, every[i][1]) for i in masked], LAYERS, HEADS)
        assert value == pytest.approx(float(importance.losses(model, scope, inputs, [gate])[0]), abs=1e-5)
    assert curve["value_random"].isna().all()


def test_normalise_and_prunable_fraction():
    values = np.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(importance.normalise(values), [[0.6, 0.8], [0.0, 0.0]])
    np.testing.assert_allclose(importance.normalise(values, min_max=True), [[0.75, 1.0], [0.0, 0.0]])
    import pandas as pd
    curve = pd.DataFrame({"fraction": [0.0, 0.5, 1.0], "value": [1.0, 1.04, 2.0]})
    assert importance.prunable_fraction(curve, 1.0, 0.05) == 0.5
    assert importance.prunable_fraction(curve, 1.0, 0.01) == 0.0
    metric = pd.DataFrame({"fraction": [0.0, 0.5, 1.0], "value": [4.0, 3.9, 1.0]})  # higher is better
    assert importance.prunable_fraction(metric, 4.0, 0.05, loss=False) == 0.5
    preserved = pd.DataFrame({"fraction": [0.0, 0.5, 1.0], "value": [0.0, 0.03, 0.9]})  # clean 0: absolute
    assert importance.prunable_fraction(preserved, 0.0, 0.05) == 0.5


def test_the_logit_difference_and_its_gradient_equal_their_plain_definitions():
    model = tm.get("llama").model
    scope, inputs = Scope(model), _probe()
    goal = importance.logit_difference(inputs, answer=5, wrong=9)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    assert float(importance.evaluate(model, scope, goal)[0]) == pytest.approx(float(logits[5] - logits[9]), abs=1e-5)
    assert not goal.loss

    gate = torch.ones(LAYERS, HEADS, requires_grad=True)
    with Scope(model).capture(gates=[Gates(scale=gate)]):
        out = model(**inputs).logits[0, -1]
    (out[5] - out[9]).backward()
    model.zero_grad(set_to_none=True)
    found = importance.gradient_importance(model, scope, goal)["self"]["per_batch"]
    np.testing.assert_allclose(found, gate.grad.abs().numpy() / inputs["input_ids"].shape[1], rtol=1e-4, atol=1e-8)


def test_the_decoder_loss_equals_transformers_own_loss_on_the_same_labels():
    """T5 shifts ``labels`` right behind its start token: the loss it returns is ours on that sequence."""
    t5 = tm.get("t5")
    model, scope = t5.model, Scope(t5.model)
    inputs = {name: tensor for name, tensor in t5.inputs(1).items() if not name.startswith("decoder_")}
    decoded = importance.decoding.own_output(model, inputs, max_new_tokens=6)
    goal = importance.seq2seq_loss(model, None, inputs, "", max_new_tokens=6)
    with torch.no_grad():
        expected = float(model(**inputs, labels=decoded.targets).loss)
    assert decoded.start == 1 and decoded.sequence.shape[1] == 7
    assert float(importance.evaluate(model, scope, goal)[0]) == pytest.approx(expected, abs=1e-5)


def test_the_preservation_loss_is_zero_clean_and_relative_when_ablated():
    bert = tm.get("bert")
    model, scope, inputs = bert.model, Scope(bert.model), bert.inputs(1)
    goal = importance.preservation_loss(model, scope, inputs)
    assert float(importance.evaluate(model, scope, goal)[0]) == pytest.approx(0.0, abs=1e-10)
    gate = Gates.zero([(1, 2)], LAYERS, HEADS)
    with torch.no_grad():
        clean = model(**inputs).last_hidden_state
        with scope.capture(gates=[gate]):
            ablated = model(**inputs).last_hidden_state
    by_hand = float(((ablated - clean) ** 2).sum() / (clean ** 2).sum())
    assert float(importance.evaluate(model, scope, goal, [gate])[0]) == pytest.approx(by_hand, rel=1e-4)
    assert by_hand > 1e-3


def test_cli_runs_importance_on_a_tiny_model_with_the_prose_cut_to_probe_tokens(tmp_path: Path,
                                                                              tiny_llama_dir: Path) -> None:
    code = run_cli("analyze", str(tiny_llama_dir), "--analyses", "importance", "--set", "importance.batch_size=3",
                   "--set", "importance.probe_tokens=16", "--out", str(tmp_path), "--figures", "html", "-q")

    assert code == 0
    result = Results.load(tmp_path / "results.json")["importance"]
    assert result.status == "ok", result.error
    assert set(result.metrics()) == {"gradient_per_token", "gradient_per_token_normalised", "gradient_per_batch",
                                     "gradient_per_batch_normalised", "ablation_zero", "ablation_mean",
                                     "ablation_uniform"}
    assert result.map("ablation_zero").values.shape == (2, 4)
    assert result.params["batch_size"] == 3
    assert result.summary["tokens"] == 16  # the shipped prose, cut to probe_tokens
    assert -1 <= result.summary["spearman_gradient_per_token_vs_ablation_zero"] <= 1
    assert (tmp_path / "figures" / "importance-pruning.html").is_file()
    exported = np.load(tmp_path / "exports" / "head_importance.npy")  # written by the run, run_bertology's file
    np.testing.assert_allclose(exported, result.map("gradient_per_token_normalised").values, rtol=1e-6)
    saved = importance.export_npy(result, tmp_path / "ablation.npy", "ablation_zero")
    np.testing.assert_allclose(np.load(saved), result.map("ablation_zero").values, rtol=1e-6)


def test_cli_scores_an_encoder_by_output_preservation_without_gradient_maps(tmp_path: Path,
                                                                             tiny_bert_dir: Path) -> None:
    code = run_cli("analyze", str(tiny_bert_dir), "--analyses", "importance", "--set", "importance.probe_tokens=12",
                   "--set", "importance.random_orders=1", "--out", str(tmp_path), "--figures", "html", "-q")

    assert code == 0
    result = Results.load(tmp_path / "results.json")["importance"]
    assert result.status == "ok", result.error
    assert set(result.metrics()) == {"ablation_zero", "ablation_mean", "ablation_uniform"}
    assert "output preservation" in result.summary["objective"]
    assert result.summary["clean_loss"] == pytest.approx(0.0, abs=1e-9)
    assert (result.map("ablation_zero").values > 0).all()  # any head removed changes the output
    exported = np.load(tmp_path / "exports" / "head_importance.npy")  # no gradient maps: the zero ablation
    np.testing.assert_allclose(exported, result.map("ablation_zero").values, rtol=1e-6)


def test_cli_scores_every_stack_of_an_encoder_decoder_on_its_own_output(tmp_path: Path, tiny_t5_dir: Path) -> None:
    code = run_cli("analyze", str(tiny_t5_dir), "--analyses", "importance", "--set", "importance.probe_tokens=12",
                   "--set", "importance.max_new_tokens=5", "--set", "importance.ablations=zero",
                   "--out", str(tmp_path), "--figures", "html", "-q")

    assert code == 0
    result = Results.load(tmp_path / "results.json")["importance"]
    assert result.status == "ok", result.error
    shapes = {(metric, stack): result.map(metric, stack).values.shape for metric, stack in result.maps}
    assert shapes[("ablation_zero", "encoder")] == (2, 4)
    assert shapes[("gradient_per_token", "decoder")] == (3, 4) == shapes[("ablation_zero", "cross")]
    assert "own greedy output" in result.summary["objective"]
    assert len(result.tables["pruning"]) == 11
    exported = np.load(tmp_path / "exports" / "head_importance-cross.npy")  # one file per stack
    np.testing.assert_allclose(exported, result.map("gradient_per_token_normalised", "cross").values, rtol=1e-6)


def test_cli_task_metric_and_bad_parameters(tmp_path: Path, tiny_llama_dir: Path, capsys) -> None:
    code = run_cli("analyze", str(tiny_llama_dir), "--analyses", "importance", "--text", "the river and the",
                   "--set", "importance.answer= the", "--set", "importance.wrong= and", "--set",
                   "importance.ablations=zero", "--out", str(tmp_path / "metric"), "--figures", "html", "-q")
    assert code == 0
    result = Results.load(tmp_path / "metric" / "results.json")["importance"]
    assert result.status == "ok", result.error
    assert "task metric" in result.summary["objective"] and "clean_metric" in result.summary

    for settings, expected in [(["importance.ablations=zero,random"], "'zero,random'"),
                               (["importance.answer=the river", "importance.wrong=x"], "'the river' is 7 tokens"),
                               (["importance.answer=x"], "needs both importance.answer and importance.wrong"),
                               (["importance.memory_gib=0.0001"], "GiB of logits per pass")]:
        capsys.readouterr()
        sets = [part for setting in settings for part in ("--set", setting)]
        code = run_cli("analyze", str(tiny_llama_dir), "--analyses", "importance", *sets, "--out",
                       str(tmp_path / "bad"), "-q")
        assert code == 2, settings
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and expected in error, error


def test_layers_and_heads_limit_the_ablations_to_the_heads_they_name(tiny_llama_dir: Path, tmp_path: Path) -> None:
    common = {"probe_tokens": 12, "ablations": "zero", "random_orders": 1, "progress": False}
    every = headscope.run("importance", str(tiny_llama_dir), **common)
    layer = headscope.run("importance", str(tiny_llama_dir), layers=[1], **common)
    pair = headscope.run("importance", str(tiny_llama_dir), heads="0.1,1.3", **common)

    full = every.map("ablation_zero").values
    assert np.isnan(layer.map("ablation_zero").values[0]).all()
    np.testing.assert_array_equal(layer.map("ablation_zero").values[1], full[1])  # the same passes, same rows
    finite = np.isfinite(pair.map("ablation_zero").values)
    assert sorted(zip(*finite.nonzero(), strict=True)) == [(0, 1), (1, 3)]
    np.testing.assert_array_equal(pair.map("ablation_zero").values[finite], full[finite])
    np.testing.assert_array_equal(layer.map("gradient_per_token").values, every.map("gradient_per_token").values)
    assert len(layer.tables["pruning"]) == len(every.tables["pruning"])  # pruning still ranks every head
    assert layer.top_heads("ablation_zero", k=9)[0][0] == 1  # the NaN heads are never listed
    (written,) = layer.export(tmp_path)  # the front door to run_bertology's file
    assert written == tmp_path / "head_importance.npy"
    expected = layer.map("gradient_per_token_normalised").values.astype(np.float32)
    np.testing.assert_array_equal(np.load(written), expected)
    with pytest.raises(HeadscopeError, match="has no exports; save the whole result"):
        AnalysisResult("sinks").export(tmp_path)

    for settings, expected in [({"layers": [2]}, "2 is past the self stack's 2 layers x 4 heads"),
                               ({"heads": "1.4"}, "1.4 is past"),
                               ({"heads": "1-2"}, "layer.head pairs such as 3.1"),
                               ({"layers": [0], "heads": "1.1"}, "layers or heads, not both")]:
        with pytest.raises(HeadscopeError, match=re.escape(expected)):
            headscope.run("importance", str(tiny_llama_dir), **common, **settings)


# --- the packaged model ------------------------------------------------------------------------------------


PACKAGED_RUNS = {  # alias: (max_tokens, params); every stack of each kind of packaged model, kept short
    "smollm2-135m": (32, {"ablations": "zero,uniform", "random_orders": "2"}),
    "minilm-l6": (32, {"random_orders": "2"}),
    "whisper-tiny.en": (None, {"ablations": "zero", "max_new_tokens": "16", "random_orders": "1"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("alias", list(PACKAGED_RUNS))
def test_packaged_model_importance(tmp_path: Path, alias: str) -> None:
    if not zoo.PACKAGED[alias].installed():
        pytest.skip(f"run `{zoo.PACKAGED[alias].install}`")
    max_tokens, params = PACKAGED_RUNS[alias]
    started = time.perf_counter()
    result = analyze(RunOptions(model=alias, analyses=["importance"], out=tmp_path, figures=(),
                                max_tokens=max_tokens, params={"importance": params}))["importance"]
    assert result.status == "ok", result.error
    curve = result.tables["pruning"]
    clean = result.summary["clean_loss"]
    assert curve["value"].iloc[0] == pytest.approx(clean, abs=1e-4)
    assert curve["value"].iloc[-1] > clean + 0.1  # every head masked hurts
    assert (tmp_path / "exports").is_dir()
    print(f"\n{alias} importance ({result.seconds:.1f} s, {time.perf_counter() - started:.1f} s with loading):")
    for key, value in result.summary.items():
        print(f"  {key}: {value}")
    print(curve.to_string())
