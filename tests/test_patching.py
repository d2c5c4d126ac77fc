"""Activation patching of head outputs z: a run patched with its own z is unchanged; every head patched from the
clean run restores the clean outputs wherever the corruption did not touch the token (the only path between
positions is attention, and every z is patched); batched per-example patch rows equal one run per patch;
attribution patching equals (z_source - z_base) . dM/dz by autograd and the finite-difference slope of a tiny
patch; a planted head ranks first in both; the analysis runs from the command line and from Python, with one clear
line for bad input; the probe set fits a real tokenizer.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tiny_models as tm
import torch
from cli_runner import run_cli

import headscope
from headscope.analyses import patching
from headscope.capture.engine import Scope
from headscope.capture.gates import Gates
from headscope.errors import HeadscopeError
from headscope.models import zoo
from headscope.probes import ioi
from headscope.results import Results

LAYERS, HEADS, HEAD_DIM = 2, 4, 8
EPS = torch.finfo(torch.float32).eps
# A patched run repeats the clean run's float32 arithmetic at the positions compared; reordered sums may move a
# value by a few units in the last place of the outputs' magnitude. 16 eps of it is far below any real change.
ULPS = 16
CORRUPTED = 4  # the position whose token the corrupted prompt changes


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with tm.one_thread():
        yield


def _output(outputs) -> torch.Tensor:
    return outputs.logits if getattr(outputs, "logits", None) is not None else outputs.last_hidden_state


def _corrupted(inputs: dict) -> dict:
    ids = inputs["input_ids"].clone()
    ids[:, CORRUPTED] = (ids[:, CORRUPTED] - 3 + 41) % (tm.VOCAB - 3) + 3  # another ordinary token
    return {**inputs, "input_ids": ids}


def _run(model, inputs: dict, *gates: Gates) -> torch.Tensor:
    with torch.no_grad(), Scope(model).capture(gates=list(gates)):
        return _output(model(**inputs))


def _read(model, inputs: dict) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    reader = Gates(read="all")
    return _run(model, inputs, reader), reader.z()


def _layers(model) -> int:
    return Scope(model).stacks["self"].layers


def _tolerance(reference: torch.Tensor) -> float:
    return ULPS * EPS * float(reference.abs().max())


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma3", "bert"])
def test_patching_a_run_with_its_own_z_changes_nothing(name):
    model = tm.get(name).model
    inputs = tm.get(name).inputs(1)
    plain, z = _read(model, inputs)
    layers = _layers(model)
    every = _run(model, inputs, Gates(patch=z, patch_mask=torch.ones(layers, HEADS, dtype=torch.bool)))
    assert torch.equal(every, plain)
    rows = torch.zeros(3, layers, HEADS, inputs["input_ids"].shape[1], dtype=torch.bool)
    rows[0, 0, 1], rows[1, 1, :, 2], rows[2] = True, True, True  # one head; one position of a layer; everything
    widened = {key: value.expand(3, -1) for key, value in inputs.items()}
    assert torch.equal(_run(model, widened, Gates(patch=z, patch_mask=rows)), plain.expand(3, *plain.shape[1:]))


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma3", "qwen2", "bert"])
def test_patching_every_head_from_the_clean_run_restores_its_outputs_where_the_tokens_agree(name):
    tiny = tm.get(name)
    clean_inputs = tiny.inputs(1)
    corrupt = _corrupted(clean_inputs)
    clean, z = _read(tiny.model, clean_inputs)
    corrupted = _run(tiny.model, corrupt)
    tokens, layers = clean.shape[1], _layers(tiny.model)
    agree = torch.arange(tokens) != CORRUPTED
    assert (corrupted - clean)[:, agree].abs().max() > 1e-3  # the corruption reaches the other positions

    everything = _run(tiny.model, corrupt, Gates(patch=z, patch_mask=torch.ones(layers, HEADS, dtype=torch.bool)))
    torch.testing.assert_close(everything[:, agree], clean[:, agree], rtol=0, atol=_tolerance(clean))
    assert (everything - clean)[:, CORRUPTED].abs().max() > 1e-3  # its own embedding still differs there

    if tiny.kind == "decoder":  # causal: patching the last position alone restores the last position's logits
        last = torch.zeros(1, layers, HEADS, tokens, dtype=torch.bool)
        last[..., -1] = True
        restored = _run(tiny.model, corrupt, Gates(patch=z, patch_mask=last))
        torch.testing.assert_close(restored[:, -1], clean[:, -1], rtol=0, atol=_tolerance(clean))
        last_layer = torch.zeros(layers, HEADS, dtype=torch.bool)
        last_layer[-1] = True  # the last layer alone leaves the earlier layers' corrupted residual stream
        partly = _run(tiny.model, corrupt, Gates(patch=z, patch_mask=last_layer))
        assert (partly - clean)[:, -1].abs().max() > 1e-3


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("batch_size", [3, 8])
def test_batched_single_head_patches_equal_one_patch_per_run(name, batch_size):
    tiny = tm.get(name)
    model, scope = tiny.model, Scope(tiny.model)
    clean_inputs = tiny.inputs(1)
    corrupt = _corrupted(clean_inputs)
    _, z = _read(model, clean_inputs)
    batched = patching.patched_logits(model, scope, corrupt, z, patching.single_head_masks(LAYERS, HEADS),
                                      batch_size)
    tokens = clean_inputs["input_ids"].shape[1]
    positions = torch.zeros(tokens, LAYERS, HEADS, tokens, dtype=torch.bool)
    for position in range(tokens):
        positions[position, 1, 2, position] = True
    per_position = patching.patched_logits(model, scope, corrupt, z, positions, batch_size)
    corrupted = _run(model, corrupt)[0, -1]
    for layer in range(LAYERS):
        for head in range(HEADS):
            mask = torch.zeros(LAYERS, HEADS, dtype=torch.bool)
            mask[layer, head] = True
            alone = _run(model, corrupt, Gates(patch=z, patch_mask=mask))[0, -1]
            torch.testing.assert_close(batched[layer * HEADS + head], alone, rtol=0, atol=1e-5)
    for position in range(tokens):
        alone = _run(model, corrupt, Gates(patch=z, patch_mask=positions[position:position + 1]))[0, -1]
        torch.testing.assert_close(per_position[position], alone, rtol=0, atol=1e-5)
    assert (batched - corrupted).abs().max() > 1e-2 and (per_position - corrupted).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma3", "qwen2"])
def test_a_shared_prefix_run_once_gives_the_logits_of_every_token_run(name):
    """The tokens before the corruption run once into a cache; the patched passes extend it. Same logits as
    passes over every token, for whole-head and per-position patches, in both directions."""
    tiny = tm.get(name)
    model, scope = tiny.model, Scope(tiny.model)
    clean_inputs = tiny.inputs(1)
    corrupt = _corrupted(clean_inputs)
    layers, tokens = _layers(model), clean_inputs["input_ids"].shape[1]
    _, clean_z = _read(model, clean_inputs)
    _, corrupt_z = _read(model, corrupt)
    pair = SimpleNamespace(clean=clean_inputs, corrupt=corrupt, length=tokens)
    assert patching.shared_prefix(model, scope, pair) == CORRUPTED
    positions = torch.zeros(tokens, layers, HEADS, tokens, dtype=torch.bool)
    positions[torch.arange(tokens), -1, 1, torch.arange(tokens)] = True
    for inputs, source in ((corrupt, clean_z), (clean_inputs, corrupt_z)):
        for masks in (patching.single_head_masks(layers, HEADS), positions):
            every = patching.patched_logits(model, scope, inputs, source, masks, 5)
            reused = patching.patched_logits(model, scope, inputs, source, masks, 5, prefix=CORRUPTED)
            torch.testing.assert_close(reused, every, rtol=0, atol=_tolerance(every))
            assert (every - every[:1]).abs().max() > 1e-3  # the rows differ: the patches act
    bert = tm.get("bert")
    assert patching.shared_prefix(bert.model, Scope(bert.model), pair) == 0  # bidirectional: every z may change


def test_groups_of_heads_and_whole_layers_patch_together():
    model = _planted()
    scope, pair = Scope(model), _pair(model)
    heads = patching.patch_heads(model, scope, [pair])
    table = patching.patch_groups(model, scope, [pair], [[(0, 1), PLANTED]], heads).set_index("group")
    assert list(table.index) == ["layer 0", "layer 1", "0.1+1.2"]
    _, z = _read(model, pair.clean)
    answer, wrong = pair.answer, pair.wrong
    for group, cells in (("layer 1", [(1, head) for head in range(HEADS)]), ("0.1+1.2", [(0, 1), PLANTED])):
        mask = torch.zeros(LAYERS, HEADS, dtype=torch.bool)
        for cell in cells:
            mask[cell] = True
        logits = _run(model, pair.corrupt, Gates(patch=z, patch_mask=mask))[0, -1]
        assert table.loc[group, "patch_metric"] == pytest.approx(float(logits[answer] - logits[wrong]), abs=1e-5)
        assert table.loc[group, "heads"] == len(cells)
    assert table.loc["0.1+1.2", "patch_effect"] > 0.5  # the planted head is in it


def test_a_patch_of_another_length_or_without_a_layer_is_one_clear_error():
    tiny = tm.get("llama")
    _, z = _read(tiny.model, tiny.inputs(1))
    longer = {key: torch.cat([value, value[:, :2]], dim=1) for key, value in tiny.inputs(1).items()}
    with pytest.raises(HeadscopeError, match=re.escape("has shape (1, 11, 4, 8), this run's (1, 13, 4, 8)")):
        _run(tiny.model, longer, Gates(patch=z, patch_mask=torch.ones(LAYERS, HEADS, dtype=torch.bool)))
    with pytest.raises(HeadscopeError, match="patches self layer 1, but patch holds no z for it"):
        _run(tiny.model, tiny.inputs(1), Gates(patch={0: z[0]}, patch_mask=torch.ones(LAYERS, HEADS,
                                                                                     dtype=torch.bool)))


# --- the analysis's pieces on a planted head ---------------------------------------------------------------------


PLANTED = (1, 2)


def _planted() -> torch.nn.Module:
    """The tiny Llama with one head that carries what the corrupted token changes to the last position: every
    head's slice of its layer's o_proj columns is scaled by 0.01, head PLANTED's by 4, so the other heads write
    almost nothing into the residual stream and the planted head is the one path from position CORRUPTED to the
    last."""
    model = copy.deepcopy(tm.get("llama").model)
    with torch.no_grad():
        for layer in range(LAYERS):
            weight = model.model.layers[layer].self_attn.o_proj.weight  # (hidden, heads * head_dim)
            for head in range(HEADS):
                weight[:, head * HEAD_DIM:(head + 1) * HEAD_DIM] *= 4.0 if (layer, head) == PLANTED else 0.01
    return model


def _pair(model, metric: str = "logit_diff", name: str = "llama") -> patching.Prepared:
    """The tiny inputs and their corruption, answered by the two tokens whose last logit the corruption lowers
    and raises most."""
    clean_inputs = tm.get(name).inputs(1)
    corrupt = _corrupted(clean_inputs)
    change = _run(model, clean_inputs)[0, -1] - _run(model, corrupt)[0, -1]
    return patching.prepare_inputs(model, Scope(model), clean_inputs, corrupt, int(change.argmax()),
                                   int(change.argmin()), metric)


@pytest.mark.parametrize("metric", ["logit_diff", "probability", "kl"])
def test_a_planted_head_ranks_first_in_patching_and_attribution_patching(metric):
    model = _planted()
    scope, pair = Scope(model), _pair(model, metric)
    heads = patching.patch_heads(model, scope, [pair], metric, batch_size=5)
    attributed = heads.normalise(patching.attribution_patching(model, scope, [pair], metric).sum(-1) + heads.base)
    flat = PLANTED[0] * HEADS + PLANTED[1]
    for effect in (heads.effect, attributed):
        ranked = np.argsort(-np.abs(effect.ravel()))
        assert ranked[0] == flat, effect
        assert abs(effect.ravel()[ranked[1]]) < 0.2 * abs(effect.ravel()[ranked[0]])
    assert heads.effect[PLANTED] > 0.5  # the planted head alone restores most of the clean metric
    direct = patching.direct_logit_attribution(model, scope, pair.clean, pair.answer, pair.wrong).heads
    assert np.argmax(np.abs(direct).ravel()) == flat
    if metric == "kl":
        assert heads.clean == pytest.approx(0.0, abs=1e-6)


def test_attribution_patching_equals_autograd_and_the_slope_of_a_small_patch():
    """(z_clean - z_corrupted) . dM/dz at the corrupted run, per head and position: by autograd through plain
    hooks, and as the central-difference slope of patching z_corrupted + a (z_clean - z_corrupted), on GPT-2 in
    float64 (Llama's RMSNorm computes in float32 whatever the model's dtype)."""
    model = copy.deepcopy(tm.get("gpt2").model).double()
    scope = Scope(model)
    pair = _pair(model, name="gpt2")
    found = patching.attribution_patching(model, scope, [pair])  # (layers, heads, tokens)

    kept: dict[int, torch.Tensor] = {}

    def keep(layer):
        def hook(_module, args):
            args[0].retain_grad()
            kept[layer] = args[0]
        return hook

    handles = [model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(keep(layer)) for layer in range(LAYERS)]
    try:
        pair.value(model(**pair.corrupt).logits[:, -1]).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    model.zero_grad(set_to_none=True)
    for layer in range(LAYERS):
        grad = kept[layer].grad.view(1, -1, HEADS, HEAD_DIM)
        by_hand = ((pair.clean_z[layer] - pair.corrupted_z[layer]) * grad).sum(-1)[0].T  # (heads, tokens)
        np.testing.assert_allclose(found[layer], by_hand.numpy(), rtol=1e-10, atol=1e-12)
    assert np.abs(found).max() > 1e-2

    step = 1e-5  # central differences: truncation ~ step^2, rounding ~ float64 eps / step, both below 1e-8
    for layer in range(LAYERS):
        for head in range(HEADS):
            mask = torch.zeros(LAYERS, HEADS, dtype=torch.bool)
            mask[layer, head] = True
            moved = []
            for sign in (1, -1):
                nudged = {at: pair.corrupted_z[at] + sign * step * (pair.clean_z[at] - pair.corrupted_z[at])
                          for at in range(LAYERS)}
                with torch.no_grad(), scope.capture(gates=[Gates(patch=nudged, patch_mask=mask)]):
                    moved.append(float(pair.value(model(**pair.corrupt).logits[:, -1])[0]))
            slope = (moved[0] - moved[1]) / (2 * step)
            assert slope == pytest.approx(found[layer, head].sum(), rel=1e-6, abs=1e-8), (layer, head)


# --- the command line and Python ------------------------------------------------------------------------------


CLEAN, CORRUPT, ANSWERS = "the sea and the", "the wind and the", (" the", " and")  # 6 tokens each


def _check_prompts(tokenizer) -> None:
    lengths = {len(tokenizer(text)["input_ids"]) for text in (CLEAN, CORRUPT)}
    assert len(lengths) == 1 and all(len(tokenizer(a, add_special_tokens=False)["input_ids"]) == 1 for a in ANSWERS)


def test_cli_runs_patching_on_a_tiny_model(tmp_path: Path, tiny_llama_dir: Path, tokenizer) -> None:
    _check_prompts(tokenizer)
    code = run_cli("analyze", str(tiny_llama_dir), "--analyses", "patching", "--set", f"patching.clean={CLEAN}",
                   "--set", f"patching.corrupt={CORRUPT}", "--set", 'patching.answers= the, and',
                   "--set", "patching.batch_size=3", "--out", str(tmp_path), "--figures", "html", "-q")
    assert code == 0
    result = Results.load(tmp_path / "results.json")["patching"]
    assert result.status == "ok", result.error
    assert set(result.metrics()) == {"patch_effect", "patch_metric", "attribution_effect", "dla"}
    assert result.summary["dla"]["total"] == pytest.approx(result.summary["dla"]["logit_diff"], abs=1e-4)
    assert result.params["answers"] == [" the", " and"]  # the leading spaces kept
    effect = result.map("patch_effect").values
    assert effect.shape == (2, 4) and np.isfinite(effect).all()
    positions = result.tables["positions"]
    assert len(positions) == 3 * len(tokenizer(CLEAN)["input_ids"])  # top_k 3 heads x every position
    layer_positions = result.tables["layer_positions"]
    assert len(layer_positions) == 2 * len(tokenizer(CLEAN)["input_ids"]) and set(layer_positions["head"]) == {-1}
    assert list(result.tables["groups"]["group"]) == ["layer 0", "layer 1"]
    for name in ("patching-positions.html", "patching-layer_positions.html", "patching-attribution.html",
                 "patching-patch_effect-self.html"):
        assert (tmp_path / "figures" / name).is_file(), name


def test_python_api_patching_equals_one_patch_per_run(tiny_llama_dir: Path) -> None:
    result = headscope.run("patching", str(tiny_llama_dir), clean=CLEAN, corrupt=CORRUPT, answers=ANSWERS,
                           heads="1.2", progress=False)
    loaded = headscope.load(str(tiny_llama_dir))
    tokenizer, model = loaded.processor, loaded.model
    clean_inputs = dict(tokenizer(CLEAN, return_tensors="pt"))
    corrupt = dict(tokenizer(CORRUPT, return_tensors="pt"))
    answer, wrong = (tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in ANSWERS)

    def metric(inputs: dict, *gates: Gates) -> float:
        logits = _run(model, inputs, *gates)[0, -1]
        return float(logits[answer] - logits[wrong])

    _, z = _read(model, clean_inputs)
    clean, corrupted = metric(clean_inputs), metric(corrupt)
    assert result.summary["clean_metric"] == pytest.approx(clean, abs=1e-5)
    assert result.summary["corrupted_metric"] == pytest.approx(corrupted, abs=1e-5)
    for layer, head in [(0, 0), (1, 2), (1, 3)]:
        mask = torch.zeros(LAYERS, HEADS, dtype=torch.bool)
        mask[layer, head] = True
        patched = metric(corrupt, Gates(patch=z, patch_mask=mask))
        want = (patched - corrupted) / (clean - corrupted)
        assert result.map("patch_effect").values[layer, head] == pytest.approx(want, abs=1e-4)
    positions = result.tables["positions"]
    assert set(zip(positions["layer"], positions["head"], strict=True)) == {(1, 2)}
    assert list(positions["token"]) == ["<s>", "t", "he", " sea→ wind", " and", " the"]
    before = positions["position"] < 3  # the tokens before the corruption: z is the same in both runs
    assert (positions.loc[before, ["patch_effect", "attribution_effect"]].abs() < 1e-6).all().all()
    assert positions["attribution_effect"].sum() == pytest.approx(result.map("attribution_effect").values[1, 2],
                                                                  abs=1e-5)  # one pair: the positions sum to the head
    figures = result.plot()
    assert figures["patch_effect-self"].data[0].zmid == 0  # a signed map: centred, diverging
    assert figures["positions"].data[0].zmid == 0
    assert result.top_heads()[0][:2] == result.top_heads("patch_effect")[0][:2]


def test_bad_input_is_one_clear_line(tmp_path: Path, tiny_llama_dir: Path, capsys) -> None:
    for settings, expected in [
        ([f"patching.clean={CLEAN}", "patching.corrupt=the river and the", "patching.answers= the, and"],
         "both need the same token length"),
        ([f"patching.clean={CLEAN}", f"patching.corrupt={CORRUPT}", "patching.answers=the sea, and"],
         "the answer 'the sea' is"),
        ([f"patching.clean={CLEAN}", f"patching.corrupt={CORRUPT}"], "needs patching.answers"),
        ([f"patching.clean={CLEAN}"], "needs both patching.clean and patching.corrupt"),
        ([f"patching.clean={CLEAN}", f"patching.corrupt={CLEAN}", "patching.answers= the, and"],
         "give the same logit_diff"),
        (["patching.probe=ioi"], "no ioi pair fits this tokenizer"),
    ]:
        capsys.readouterr()
        sets = [part for setting in settings for part in ("--set", setting)]
        code = run_cli("analyze", str(tiny_llama_dir), "--analyses", "patching", *sets, "--out",
                       str(tmp_path / "bad"), "-q")
        assert code == 2, settings
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and expected in error, error


@pytest.mark.slow
def test_the_probe_sets_fit_a_real_tokenizer() -> None:
    if not zoo.PACKAGED["smollm2-135m"].installed():
        pytest.skip(f"run `{zoo.PACKAGED['smollm2-135m'].install}`")
    tokenizer = headscope.load("smollm2-135m").processor
    for family in ioi.FAMILIES:
        found = ioi.pairs(family, tokenizer, 8, seed=3)
        assert len(found) == 8 and len(set(found)) == 8
        assert {pair.template for pair in found} == set(range(len(ioi.IOI_TEMPLATES if family == "ioi"
                                                                 else ioi.CAPITAL_TEMPLATES)))
        for pair in found:
            assert ioi.fits(tokenizer, pair) and pair.clean != pair.corrupt
            if family == "ioi":  # the corrupted prompt repeats the other name: the answers swap
                assert pair.clean.count(pair.wrong.strip()) == 2 and pair.corrupt.count(pair.answer.strip()) == 2


# --- direct logit attribution ----------------------------------------------------------------------------------


COMPONENTS = {  # the residual stream's other writers, spelled out per architecture: embeddings and each MLP
    "llama": (lambda m: [m.model.embed_tokens], lambda m, layer: m.model.layers[layer].mlp,
              lambda m, layer: m.model.layers[layer].self_attn.o_proj),
    "qwen2": (lambda m: [m.model.embed_tokens], lambda m, layer: m.model.layers[layer].mlp,
              lambda m, layer: m.model.layers[layer].self_attn.o_proj),
    "gpt2": (lambda m: [m.transformer.drop], lambda m, layer: m.transformer.h[layer].mlp,
             lambda m, layer: m.transformer.h[layer].attn.c_proj),
}


@pytest.mark.parametrize("name", list(COMPONENTS))
def test_direct_logit_attribution_sums_to_the_logit_difference(name):
    """Heads + output biases + rest + norm constant = logit(answer) - logit(wrong); each layer's heads sum to its
    output projection's write without the bias, and the rest is the embeddings plus the MLPs, all read by plain
    hooks through the final norm at frozen scale."""
    model = tm.get(name).model
    scope, pair = Scope(model), _pair(model, name=name)
    found = patching.direct_logit_attribution(model, scope, pair.clean, pair.answer, pair.wrong)
    embeddings, mlp, projection = COMPONENTS[name]
    outputs: dict[str, torch.Tensor] = {}
    modules = {"embedding": embeddings(model)[0], "norm": patching.final_norm(model)}
    modules.update({f"mlp{layer}": mlp(model, layer) for layer in range(LAYERS)})
    modules.update({f"attn{layer}": projection(model, layer) for layer in range(LAYERS)})
    handles = [module.register_forward_hook(
        lambda _m, args, output, key=key: outputs.update({key: output[0, -1].double(),
                                                          f"{key}-in": args[0][0, -1].double()}))
        for key, module in modules.items()]
    try:
        with torch.no_grad():
            logits = model(**pair.clean).logits[0, -1].double()
    finally:
        for handle in handles:
            handle.remove()
    linear, constant = patching.frozen_norm(modules["norm"], outputs["norm-in"], outputs["norm"])
    weight = model.get_output_embeddings().weight
    direction = (weight[pair.answer] - weight[pair.wrong]).detach().double()

    # float32 dot products of length n: |error| <= n eps sum_i |a_i b_i| (Higham), with n the hidden size
    hidden = outputs["norm"].shape[0]
    bound = hidden * float(EPS) * float((direction * outputs["norm"]).abs().sum())
    assert found.logit_diff == pytest.approx(float(logits[pair.answer] - logits[pair.wrong]), abs=bound)
    assert found.total == pytest.approx(found.logit_diff, abs=bound)
    assert abs(found.logit_diff) > 0.1 and np.abs(found.heads).max() > 1e-2
    zero = torch.zeros(1, 1, HEADS * HEAD_DIM)
    rest = outputs["embedding"] + sum(outputs[f"mlp{layer}"] for layer in range(LAYERS))
    assert found.rest == pytest.approx(float(linear(rest) @ direction), abs=bound)
    assert found.constant == pytest.approx(float(constant @ direction), abs=bound)  # GPT-2's ln_f bias; else 0
    for layer in range(LAYERS):
        with torch.no_grad():
            bias = projection(model, layer)(zero)[0, 0].double()
        write = float(linear(outputs[f"attn{layer}"] - bias) @ direction)
        assert found.heads[layer].sum() == pytest.approx(write, abs=bound), layer


def test_direct_logit_attribution_refuses_a_model_that_normalises_attention_outputs():
    model = tm.get("gemma3").model
    with pytest.raises(HeadscopeError, match="normalises each attention output"):
        patching.direct_logit_attribution(model, Scope(model), tm.get("gemma3").inputs(1), 5, 9)


def test_noising_leaves_the_clean_run_where_a_head_does_not_matter():
    """Noising patches the corrupted z into the clean run: the planted head's patch falls furthest from 1 (the
    clean metric kept), and patching nothing is exactly 1."""
    model = _planted()
    scope, pair = Scope(model), _pair(model)
    heads = patching.patch_heads(model, scope, [pair], direction="noising", batch_size=8)
    assert heads.base == pytest.approx(heads.clean) and float(heads.normalise(heads.clean)) == pytest.approx(1.0)
    distance = np.abs(1 - heads.effect).ravel()
    assert np.argmax(distance) == PLANTED[0] * HEADS + PLANTED[1]
    assert distance.max() > 0.5
