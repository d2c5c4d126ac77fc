"""Vision-language models and the ``vhd`` analysis: tiny LLaVA, Idefics3 and Qwen2-VL folders load through
``headscope.load``; their language heads' captured attention equals eager attention; VHD equals the L2
difference of head outputs read by plain hooks in two forward passes; a planted image-reading head ranks first
and an image-blind head scores zero; VHR scales exactly the heads it chose; the command line runs it end to end
and refuses bad input in one line.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import reference as ref
import tiny_models as tm
import tiny_vlms
import torch
from test_cli import headscope

import headscope as hs
from headscope.analyses import vhd
from headscope.capture.engine import Scope
from headscope.capture.reducers import FullMaps
from headscope.errors import HeadscopeError
from headscope.probes import images
from headscope.registry import Context

FAMILIES = tuple(tiny_vlms.BUILDERS)
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
LAYERS, HEADS = 2, 4
NEW_TOKENS = 5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with tm.one_thread():
        yield


@pytest.fixture(scope="session")
def vlm_dirs(tmp_path_factory) -> dict[str, Path]:
    """One saved tiny folder per family."""
    return {name: build(tmp_path_factory.mktemp(f"tiny-{name}")) for name, build in tiny_vlms.BUILDERS.items()}


def _load(vlm_dirs, family: str):
    return hs.load(vlm_dirs[family])


def _pair(loaded, family: str, folder: Path, seed: int = 0) -> images.ImagePair:
    """The image / no-image inputs of the shipped picture ``seed``: through the processor, or for Qwen2-VL without
    torchvision, from its tokenizer and image processor with the image tokens expanded as its processor would."""
    probe = images.shipped(1, seed)[0]
    image_token = loaded.model.config.image_token_id
    if family != "qwen2_vl" or HAS_TORCHVISION:
        return images.pair(loaded, probe, image_token)
    from transformers import AutoImageProcessor

    pixels = AutoImageProcessor.from_pretrained(folder)(images=[probe.image], return_tensors="pt")
    count = int(pixels["image_grid_thw"].prod()) // 4
    text = f"user: <|vision_start|>{'<|image_pad|>' * count}<|vision_end|>{probe.prompt}\nassistant:"
    with_image = {**loaded.processor(text, return_tensors="pt"), **pixels}
    with_image["mm_token_type_ids"] = (with_image["input_ids"] == image_token).long()  # 1: image, 0: text
    text_only, mask = images.without_image(with_image, image_token)
    return images.ImagePair(with_image, text_only, mask, probe)


def _layers(model) -> torch.nn.ModuleList:
    return model.get_decoder().layers


# --- loading --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_vlm_folder_loads_as_vision_language_with_its_processor(vlm_dirs, family):
    model, processor, info = loaded = _load(vlm_dirs, family)
    assert info.kind == "vision-language"
    assert set(info.stacks) == {"self", "vision"}
    assert (info.stacks["self"].layers, info.stacks["self"].heads, info.stacks["self"].kv_heads) == (LAYERS, HEADS, 2)
    scope = Scope(model)
    assert scope.adapter.image_token_id == model.config.image_token_id
    pair = _pair(loaded, family, vlm_dirs[family])
    positions = scope.adapter.image_positions(pair.with_image["input_ids"])[0]
    assert torch.equal(positions, pair.image_mask) and int(positions.sum()) in (4, 16)
    assert pair.without_image["input_ids"].shape[1] == pair.with_image["input_ids"].shape[1] - int(positions.sum())
    if family != "qwen2_vl" or HAS_TORCHVISION:
        assert processor.image_processor is not None and hasattr(processor, "image_token")
    else:  # no torchvision: AutoProcessor cannot build Qwen2VLProcessor; the loader keeps the tokenizer
        with pytest.raises(HeadscopeError, match="torchvision"):
            images.encode(loaded, pair.probe)


def test_text_models_have_no_image_positions():
    assert Scope(tm.get("llama").model).adapter.image_positions(torch.ones(1, 3, dtype=torch.long)) is None


# --- capture on the language stack ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_language_stack_attention_equals_eager_output_attentions(vlm_dirs, family):
    loaded = _load(vlm_dirs, family)
    pair = _pair(loaded, family, vlm_dirs[family])
    heads = [("self", layer, head) for layer in range(LAYERS) for head in range(HEADS)]
    maps = FullMaps(heads)
    with torch.no_grad(), Scope(loaded.model).capture(maps):
        loaded.model(**pair.with_image, use_cache=False)

    def eager_attentions(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return model(**inputs, output_attentions=True, use_cache=False).attentions

    eager = ref.eager_copy(loaded.model)
    want = eager_attentions(eager, pair.with_image)
    exact = eager_attentions(ref.float64_twin(eager), ref.float64_inputs(pair.with_image))
    got = maps.result()
    tokens = pair.with_image["input_ids"].shape[1]
    for stack, layer, head in heads:
        found = got[(0, stack, layer, head)]
        assert found.shape == (1, tokens, tokens)
        ref.assert_matches_eager(found, want[layer][:, head], exact[layer][:, head],
                                 err_msg=f"layer {layer} head {head}")
    image = pair.image_mask
    assert float(want[1][0, :, ~image][:, :, image].sum()) > 0.1  # text queries do attend to image tokens


# --- VHD ------------------------------------------------------------------------------------------------------


def _hooked_outputs(model, inputs) -> torch.Tensor:
    """(layers, tokens, heads, head_dim) input of each language layer's o_proj, read by plain forward pre-hooks."""
    kept: dict[int, torch.Tensor] = {}
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda _module, args, index=index: kept.__setitem__(index, args[0][0].detach().clone()))
        for index, layer in enumerate(_layers(model))]
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([kept[i].view(kept[i].shape[0], HEADS, -1) for i in range(len(kept))])


@pytest.mark.parametrize("family", FAMILIES)
def test_vhd_equals_l2_difference_from_two_plain_forward_passes(vlm_dirs, family):
    loaded = _load(vlm_dirs, family)
    model, scope = loaded.model, Scope(loaded.model)
    pair = _pair(loaded, family, vlm_dirs[family])
    generated = vhd.generate(model, scope, pair.with_image, NEW_TOKENS)
    assert len(generated) == NEW_TOKENS
    found = vhd.divergence(model, scope, pair, generated[:-1])
    assert found.shape == (NEW_TOKENS, LAYERS, HEADS)

    prefix = generated[:-1][None]
    with_ids, without_ids = dict(pair.with_image), {}
    for inputs, extended in ((pair.with_image, with_ids), (pair.without_image, without_ids)):
        extended["input_ids"] = torch.cat([inputs["input_ids"], prefix], 1)
        extended["attention_mask"] = torch.ones_like(extended["input_ids"])
        if "mm_token_type_ids" in inputs:  # Qwen2-VL: the generated tokens are text
            extended["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(prefix)], 1)
    z_with, z_without = _hooked_outputs(model, with_ids), _hooked_outputs(model, without_ids)
    start_with = pair.with_image["input_ids"].shape[1] - 1
    start_without = pair.without_image["input_ids"].shape[1] - 1
    for step in range(NEW_TOKENS):
        for layer in range(LAYERS):
            for head in range(HEADS):
                want = torch.linalg.vector_norm(z_with[layer, start_with + step, head]
                                                - z_without[layer, start_without + step, head])
                assert found[step, layer, head] == pytest.approx(float(want), rel=1e-5, abs=1e-5)
    assert found.min() > 1e-3 and np.ptp(found) > 0.1  # the image matters, and differently per head


def test_t_vhd_is_the_mean_of_each_tokens_top_k_heads():
    per_step = np.arange(2 * 2 * 3, dtype=float).reshape(2, 2, 3)
    per_step[1] = per_step[1][::-1]
    np.testing.assert_allclose(vhd.t_vhd(per_step, 2), [4.5, 10.5])
    np.testing.assert_allclose(vhd.t_vhd(per_step, 100), per_step.reshape(2, -1).mean(1))


PLANTED, BLIND = (0, 0), (0, 2)
MARKER, CONSTANT = 31, 30  # hidden dimensions: set only on image tokens, set on every token


def _planted(model) -> torch.nn.Module:
    """The tiny LLaVA with two layer-0 heads planted through their weights.

    Image tokens get a large MARKER coordinate (the projector's bias) that text embeddings lack, and every
    token a CONSTANT one. Head 0 (key/value head 0) scores keys by MARKER alone (on the lowest-frequency rotary
    pair, so position hardly matters) with a query read from CONSTANT: it attends to the image tokens only, and
    its values read MARKER strongly. Head 2 (key/value head 1) scores MARKER negatively: it never sees an image
    token, and since layer-0 values of text tokens do not depend on position, its output cannot change when the
    image tokens are removed.
    """
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, MARKER] = 0.0
        model.get_input_embeddings().weight[:, CONSTANT] = 1.0
        projector = model.model.multi_modal_projector.linear_2
        projector.weight[[MARKER, CONSTANT]] = 0.0
        projector.bias[MARKER], projector.bias[CONSTANT] = 100.0, 1.0
        attention = _layers(model)[0].self_attn
        head_dim = 8
        for head, kv_head, sign in ((PLANTED[1], 0, 1.0), (BLIND[1], 1, -1.0)):
            attention.q_proj.weight[head * head_dim:(head + 1) * head_dim] = 0.0
            attention.q_proj.weight[head * head_dim + 3, CONSTANT] = 10.0
            attention.k_proj.weight[kv_head * head_dim:(kv_head + 1) * head_dim] = 0.0
            attention.k_proj.weight[kv_head * head_dim + 3, MARKER] = 2.0 * sign
        attention.v_proj.weight[:head_dim, MARKER] = 3.0
    return model


def test_planted_image_reader_ranks_first_and_image_blind_head_scores_zero(vlm_dirs):
    loaded = _load(vlm_dirs, "llava")
    planted = loaded._replace(model=_planted(loaded.model))
    result = vhd.run(Context(planted, Scope(planted.model), params={"prompts": 2, "max_new_tokens": 4,
                                                                    "vhr": False}))
    values = result.map("vhd").values
    ranked = [(layer, head) for layer, head, _ in result.top_heads("vhd", k=LAYERS * HEADS)]
    assert ranked[0] == PLANTED
    assert values[PLANTED] > 3 * values[1:].max()  # head 1 shares its values (key/value head 0), so rank second
    assert values[BLIND] < 1e-4
    others = np.delete(values.ravel(), [PLANTED[1], BLIND[1]])
    assert others.min() > 1e-3
    plain = vhd.run(Context(loaded, Scope(loaded.model), params={"prompts": 2, "max_new_tokens": 4, "vhr": False}))
    assert plain.map("vhd").values[BLIND] > 1e-2  # the same head unplanted does see the image


@pytest.mark.parametrize("family", FAMILIES)
def test_image_attention_of_each_generation_step_equals_eager(vlm_dirs, family):
    loaded = _load(vlm_dirs, family)
    model, scope = loaded.model, Scope(loaded.model)
    pair = _pair(loaded, family, vlm_dirs[family])
    view = vhd.ImageAttention(pair.image_mask)
    generated = vhd.generate(model, scope, pair.with_image, NEW_TOKENS, reducers=(view.reducer,))
    assert torch.equal(generated, vhd.generate(model, scope, pair.with_image, NEW_TOKENS))  # capture changes nothing
    forced = vhd.extended(pair.with_image, generated[:-1])
    first = pair.with_image["input_ids"].shape[1] - 1
    image = torch.cat([pair.image_mask, torch.zeros(NEW_TOKENS - 1, dtype=torch.bool)])

    def image_rows(eager: torch.nn.Module, inputs: dict) -> np.ndarray:
        """(layers, heads, image tokens): each generation step's attention on the image, mean over the steps."""
        with torch.no_grad():
            maps = eager(**inputs, output_attentions=True, use_cache=False).attentions
        return torch.stack([m[0, :, first:first + NEW_TOKENS][:, :, image].double().mean(1) for m in maps]).numpy()

    eager = ref.eager_copy(model)
    want, exact = image_rows(eager, forced), image_rows(ref.float64_twin(eager), ref.float64_inputs(forced))
    ref.assert_matches_eager(view.rows(), want, exact)
    ref.assert_matches_eager(view.mass(), want.sum(-1), exact.sum(-1))
    assert view.mass().max() > 0.05
    tokens = int(pair.image_mask.sum())
    assert vhd.patch_grid(model, pair.with_image, tokens) == {16: (4, 4), 4: (2, 2)}[tokens]


# --- VHR ------------------------------------------------------------------------------------------------------


def test_select_heads_drops_outliers_then_takes_heads_above_the_median():
    values = np.array([1.0, 2.0, 3.0, 4.0, 100.0])  # Q1 2, Q3 4: fence 4 + 1.5 x 2 = 7
    assert vhd.select_heads(values).tolist() == [False, False, True, True, False]
    assert vhd.select_heads(values, outlier_iqr=100.0).tolist() == [False, False, False, True, True]


def _manually_scaled(model, scale: torch.Tensor):
    """Plain forward pre-hooks that multiply each language head's o_proj input by ``scale`` (layers, heads)."""
    def hook(index):
        def scale_heads(_module, args):
            x = args[0]
            z = x.view(*x.shape[:2], HEADS, -1) * scale[index][None, None, :, None]
            return (z.view(x.shape), *args[1:])
        return scale_heads

    return [layer.self_attn.o_proj.register_forward_pre_hook(hook(index))
            for index, layer in enumerate(_layers(model))]


@pytest.mark.parametrize("layerwise", [True, False])
def test_vhr_scales_exactly_the_chosen_heads(vlm_dirs, layerwise):
    loaded = _load(vlm_dirs, "llava")
    model, scope = loaded.model, Scope(loaded.model)
    pair = _pair(loaded, "llava", vlm_dirs["llava"])
    chosen = vhd.reinforcement(model, scope, pair, alpha=2.0, layerwise=layerwise)
    expected = torch.where(torch.from_numpy(chosen.selected), 2.0, 1.0)
    assert torch.equal(chosen.gates.scale, expected)
    assert 0 < chosen.selected.sum() < LAYERS * HEADS
    for layer in range(LAYERS):
        assert chosen.selected[layer].tolist() == vhd.select_heads(chosen.first_step[layer]).tolist()
    clean_first = vhd.divergence(model, scope, pair)[0]
    np.testing.assert_allclose(chosen.first_step[0], clean_first[0], rtol=1e-6)
    if layerwise:  # layer 1 measured with layer 0 reinforced
        scaled = vhd.divergence(model, scope, pair, scale=torch.where(torch.arange(LAYERS)[:, None] == 0,
                                                                       expected, 1.0))[0]
        np.testing.assert_allclose(chosen.first_step[1], scaled[1], rtol=1e-6)
        assert not np.allclose(chosen.first_step[1], clean_first[1])

    with torch.no_grad(), scope.capture(gates=[chosen.gates]):
        gated = model(**pair.with_image, use_cache=False).logits
    handles = _manually_scaled(model, expected)
    try:
        with torch.no_grad():
            manual = model(**pair.with_image, use_cache=False).logits
        manual_generation = model.generate(**pair.with_image, max_new_tokens=8, do_sample=False,
                                           suppress_tokens=[scope.adapter.image_token_id])[0, -8:]
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(gated, manual, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        clean = model(**pair.with_image, use_cache=False).logits
    assert (gated - clean).abs().max() > 1e-2
    assert torch.equal(vhd.generate(model, scope, pair.with_image, 8, chosen.gates), manual_generation)


def test_vhr_with_alpha_one_leaves_generation_identical(vlm_dirs):
    loaded = _load(vlm_dirs, "llava")
    model, scope = loaded.model, Scope(loaded.model)
    pair = _pair(loaded, "llava", vlm_dirs["llava"], seed=1)
    gates = vhd.reinforce(model, scope, pair, alpha=1.0)
    assert torch.equal(gates.scale, torch.ones(LAYERS, HEADS))
    assert torch.equal(vhd.generate(model, scope, pair.with_image, 12, gates),
                       vhd.generate(model, scope, pair.with_image, 12))


# --- command line ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_runs_vhd_end_to_end(vlm_dirs, family, tmp_path, monkeypatch, capsys):
    if family == "qwen2_vl" and not HAS_TORCHVISION:
        pytest.skip("Qwen2-VL's processor needs torchvision, which is not installed here")
    out = tmp_path / "out"
    run = headscope(monkeypatch, capsys, "analyze", str(vlm_dirs[family]), "--analyses", "vhd", "--out", str(out),
                    "--figures", "html", "--set", "vhd.prompts=2", "--set", "vhd.max_new_tokens=4", "-q")
    assert run.code == 0, run.err
    saved = json.loads((out / "results.json").read_text())
    analysis = saved["analyses"]["vhd"]
    assert analysis["status"] == "ok" and saved["provenance"]["kind"] == "vision-language"
    maps = {m["metric"]: np.array(m["values"]) for m in analysis["maps"]}
    assert set(maps) == {"vhd", "vhd_first_step", "image_attention", "vhr_selected"}
    assert maps["vhd"].shape == (LAYERS, HEADS) and (maps["vhd"] > 0).all()
    assert len(analysis["tables"]["t_vhd"]["rows"]) == 2 * 4
    assert len(analysis["tables"]["generations"]["rows"]) == 2
    assert analysis["summary"]["prompts"] == 2
    for figure in ("vhd-vhd-self", "vhd-t_vhd", "vhd-image_attention_grid", "vhd-image_attention-self"):
        assert (out / "figures" / f"{figure}.html").is_file(), figure
    assert (out / "report.html").is_file()


def test_a_long_continuation_never_produces_the_image_placeholder(vlm_dirs, tmp_path, monkeypatch, capsys):
    """Untrained Idefics3 ranks its image token first within 64 steps; read back, it would need image features."""
    out = tmp_path / "out"
    run = headscope(monkeypatch, capsys, "analyze", str(vlm_dirs["idefics3"]), "--analyses", "vhd", "--out",
                    str(out), "--figures", "html", "--set", "vhd.prompts=1", "--set", "vhd.max_new_tokens=64", "-q")
    assert run.code == 0, run.err
    analysis = json.loads((out / "results.json").read_text())["analyses"]["vhd"]
    assert analysis["status"] == "ok", analysis.get("error")


def test_cli_takes_a_user_image_and_prompt(vlm_dirs, tmp_path, monkeypatch, capsys):
    picture, _ = images.shapes(7, size=48)
    path = tmp_path / "mine.png"
    picture.save(path)
    out = tmp_path / "out"
    run = headscope(monkeypatch, capsys, "analyze", str(vlm_dirs["llava"]), "--analyses", "vhd", "--input",
                    str(path), "--text", "Is there a circle?", "--out", str(out), "--figures", "none",
                    "--set", "vhd.max_new_tokens=3", "--set", "vhd.vhr=false", "-q")
    assert run.code == 0, run.err
    analysis = json.loads((out / "results.json").read_text())["analyses"]["vhd"]
    assert analysis["summary"]["input"] == ["user image (mine.png)"]
    generations = analysis["tables"]["generations"]
    row = dict(zip(generations["columns"], generations["rows"][0], strict=True))
    assert row["text"] == "Is there a circle?" and "output_vhr" not in row


def test_cli_refuses_vhd_on_a_text_model(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    run = headscope(monkeypatch, capsys, "analyze", str(tiny_llama_dir), "--analyses", "vhd", "--out",
                    str(tmp_path / "out"))
    assert "analysis 'vhd' does not fit a decoder model (it fits vision-language)" in run.error_line()


def test_cli_refuses_an_input_that_is_not_an_image(vlm_dirs, tmp_path, monkeypatch, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    run = headscope(monkeypatch, capsys, "analyze", str(vlm_dirs["llava"]), "--analyses", "vhd", "--input",
                    str(notes), "--out", str(tmp_path / "out"))
    assert "cannot read" in run.error_line() and "as an image" in run.error_line()
    fake = tmp_path / "fake.png"
    fake.write_text("not a picture either")
    run = headscope(monkeypatch, capsys, "analyze", str(vlm_dirs["llava"]), "--analyses", "vhd", "--input",
                    str(fake), "--text", "what?", "--out", str(tmp_path / "out"))
    assert "cannot read" in run.error_line() and "fake.png" in run.error_line()


def test_cli_refuses_a_bad_vhd_parameter(vlm_dirs, tmp_path, monkeypatch, capsys):
    run = headscope(monkeypatch, capsys, "analyze", str(vlm_dirs["llava"]), "--analyses", "vhd", "--out",
                    str(tmp_path / "out"), "--set", "vhd.average=median")
    assert "vhd.average takes one of 'prompts', 'tokens', not 'median'" in run.error_line()


# --- probes ---------------------------------------------------------------------------------------------------


def test_shipped_pictures_are_deterministic_and_described():
    first, description = images.shapes(3)
    again, same = images.shapes(3)
    other, _ = images.shapes(4)
    assert np.array_equal(np.asarray(first), np.asarray(again)) and description == same
    assert not np.array_equal(np.asarray(first), np.asarray(other))
    assert description.endswith("background") and any(shape in description for shape in images.SHAPES)


def test_a_text_only_chat_template_falls_back_to_the_image_placeholder(vlm_dirs):
    processor = copy.deepcopy(_load(vlm_dirs, "llava").processor)
    assert images.prompt_text(processor, "Where?") == "user: <image>Where?\nassistant:"
    processor.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}"
    assert images.prompt_text(processor, "Where?") == "<image>\nWhere?"
