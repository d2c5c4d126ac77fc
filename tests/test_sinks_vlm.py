"""The vision-language part of ``sinks``: attention on image tokens equals a sum over eager attention, a planted
visual sink token is the only one found, the image-centric rule holds on hand-made numbers and finds a planted
image-centric head (and not a planted sink-reading head), and the command line runs ``sinks`` on tiny LLaVA and
Idefics3 folders.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import reference as ref
import tiny_models as tm
import tiny_vlms
import torch
from conftest import BOS
from test_cli import headscope

import headscope as hs
from headscope.analyses import sinks, sinks_vlm
from headscope.capture.engine import Scope
from headscope.probes import images
from headscope.registry import Context

LAYERS, HEADS, WIDTH, HEAD_DIM = 2, 4, 32, 8
NEW_TOKENS = 3
# Planted LLaVA: hidden dimensions and the image patch that becomes a visual sink.
SINK_DIM, CONSTANT, IMAGE_DIM = 0, 30, 31
PATCH, FEATURE, UNIT = 5, 7, 0  # image token 5 (row 1, column 1 of 4 x 4); the vision feature and projector unit
CENTRIC_HEAD, SINK_HEAD = 0, 2  # layer-0 heads (key/value heads 0 and 1)
PLANTED = {"visual_tau": 4.0, "visual_min_layer": 0, "max_new_tokens": NEW_TOKENS}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with tm.one_thread():
        yield


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory) -> dict[str, Path]:
    return {name: tiny_vlms.BUILDERS[name](tmp_path_factory.mktemp(f"tiny-{name}")) for name in ("llava", "idefics3")}


def run_sinks(loaded, **params) -> hs.AnalysisResult:
    return sinks.run(Context(loaded, Scope(loaded.model), params=params))


def eager_run(loaded: hs.Loaded, max_new_tokens: int) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """The default probe (shipped picture 0) with its greedy continuation but its last token, and an eager copy of
    the model to read attention over it with (:func:`eager_attentions`): transformers alone."""
    model = loaded.model
    loaded_inputs = images.encode(loaded, images.shipped(1)[0])
    with torch.no_grad():
        sequence = model.generate(**loaded_inputs, max_new_tokens=max_new_tokens, do_sample=False)[:, :-1]
    grown = sequence.shape[1] - loaded_inputs["input_ids"].shape[1]
    forced = {**loaded_inputs, "input_ids": sequence,
              "attention_mask": torch.cat([loaded_inputs["attention_mask"], torch.ones(1, grown, dtype=torch.long)], 1)}
    return forced, ref.eager_copy(model)


def eager_attentions(eager: torch.nn.Module, forced: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return eager(**forced, output_attentions=True, use_cache=False).attentions


def _eager_mass(eager: torch.nn.Module, forced: dict[str, torch.Tensor], keys: torch.Tensor,
                rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_mass` of eager float32 attention and of the float64 twin's, on the same inputs."""
    return (_mass(eager_attentions(eager, forced), keys, rows),
            _mass(eager_attentions(ref.float64_twin(eager), ref.float64_inputs(forced)), keys, rows))


def _image_rows(forced: dict[str, torch.Tensor], image_token: int) -> tuple[torch.Tensor, torch.Tensor]:
    image = forced["input_ids"][0] == image_token
    after = torch.arange(len(image)) > int(image.nonzero().max())
    return image, after


def _mass(attentions, keys: torch.Tensor, rows: torch.Tensor) -> np.ndarray:
    """(layers, heads): mean over the ``rows`` queries of the attention on the ``keys``, from eager maps."""
    return np.stack([a[0][:, rows][..., keys].sum(-1).double().mean(-1).numpy() for a in attentions])


# --- attention on image tokens against eager attention -------------------------------------------------------------


def test_image_mass_equals_eager_output_attentions(vlm_dirs):
    loaded = hs.load(vlm_dirs["llava"])
    result = run_sinks(loaded, max_new_tokens=NEW_TOKENS)
    forced, eager = eager_run(loaded, NEW_TOKENS)
    image, after = _image_rows(forced, loaded.model.config.image_token_id)
    want, exact = _eager_mass(eager, forced, image, after)

    ref.assert_matches_eager(result.map("image_mass", "self").values, want, exact)
    assert result.summary["image_tokens"] == 16 and result.summary["image_grid"] == "4 x 4"
    assert result.summary["image_queries"] == int(after.sum()) > NEW_TOKENS
    assert 0.05 < want.mean() < 0.95  # the random heads do share attention between image and text
    assert result.summary["tokens"] == [forced["input_ids"].shape[1]]
    labels = result.tables["attention_by_position"]
    first = int(image.nonzero()[0])
    assert labels.loc[(labels["stack"] == "self") & (labels["position"] == first + PATCH), "token"].item() \
        == f"<image> #{PATCH} (row 1, column 1)"


def test_vision_tower_gets_the_generic_maps_equal_to_eager(vlm_dirs):
    loaded = hs.load(vlm_dirs["llava"])
    result = run_sinks(loaded, max_new_tokens=1)
    pixels = {"pixel_values": images.encode(loaded, images.shipped(1)[0])["pixel_values"]}

    def first_patch_score(tower: torch.nn.Module, inputs: dict) -> np.ndarray:
        with torch.no_grad():
            attentions = tower(**inputs, output_attentions=True).attentions
        return np.stack([a[0, :, :, 0].double().mean(-1).numpy() for a in attentions])  # every patch sees position 0

    tower = ref.eager_copy(loaded.model.model.vision_tower)
    want = first_patch_score(tower, pixels)
    exact = first_patch_score(ref.float64_twin(tower), ref.float64_inputs(pixels))
    ref.assert_matches_eager(result.map("sink_score", "vision").values, want, exact)
    assert ("image_mass", "vision") not in result.maps


def test_default_thresholds_find_no_visual_sink_in_a_tiny_untrained_model(vlm_dirs):
    loaded = hs.load(vlm_dirs["llava"])
    narrow = run_sinks(loaded, max_new_tokens=1)
    assert "not looked for" in narrow.summary["visual_sinks"]  # 2 layers, none at or above layer 2
    assert ("visual_sink_mass", "self") not in narrow.maps and not len(narrow.tables["visual_sinks"])
    judged = run_sinks(loaded, max_new_tokens=1, visual_min_layer=0)
    assert judged.summary["visual_tau_reachable"].startswith("no: ")  # sqrt(32) < 20
    assert judged.summary["visual_sink_tokens"] == 0 and judged.summary["image_centric_heads"] == 0
    assert (judged.map("visual_sink_mass", "self").values == 0).all()


def test_the_continuation_read_back_never_holds_a_generated_image_placeholder(vlm_dirs):
    loaded = hs.load(vlm_dirs["idefics3"])  # this random model ranks "<image>" first within 64 greedy tokens
    image_token = loaded.model.config.image_token_id
    inputs = images.encode(loaded, images.shipped(1)[0])
    forced, new = sinks_vlm.decoded(loaded.model, Scope(loaded.model), inputs, 64)
    assert not bool((new == image_token).any())
    assert int((forced["input_ids"] == image_token).sum()) == int((inputs["input_ids"] == image_token).sum())
    assert forced["input_ids"].shape[1] == inputs["input_ids"].shape[1] + len(new) - 1


# --- visual sinks and image-centric heads on a planted model -------------------------------------------------------


def planted_llava(model: torch.nn.Module) -> torch.nn.Module:
    """The tiny LLaVA with a visual sink token and two layer-0 heads planted through its weights.

    Sink dimension: the first token ``<s>`` alone holds a large SINK_DIM coordinate among text embeddings. The
    vision tower's layers are silenced (zero output projections), so an image feature is the pre-layer-norm of its
    patch and position embeddings; FEATURE is 0 in every patch embedding and position embedding but that of image
    token PATCH (position PATCH + 1, after CLIP's class token), so only that token's normalised feature stands out
    in FEATURE. Projector unit UNIT reads FEATURE above a threshold, and writes SINK_DIM: image token PATCH gets a
    massive SINK_DIM coordinate, the others none. Every image token gets a large IMAGE_DIM coordinate (projector
    bias) that is not a sink dimension (the first token lacks it), and every token a CONSTANT one.

    Layer 0, head CENTRIC_HEAD: query from CONSTANT, key from IMAGE_DIM: attends to the image tokens, all but the
    sink (whose normalised IMAGE_DIM is small): image-centric. Head SINK_HEAD: key from SINK_DIM: attends to
    ``<s>`` and the visual sink token only: most of its image attention is on the visual sink.
    """
    model = copy.deepcopy(model)
    tower = model.model.vision_tower
    projector = model.model.multi_modal_projector
    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        for layer in tower.encoder.layers:
            for silenced in (layer.self_attn.out_proj, layer.mlp.fc2):
                silenced.weight.zero_()
                silenced.bias.zero_()
        tower.embeddings.patch_embedding.weight[FEATURE] = 0.0
        tower.embeddings.position_embedding.weight[:, FEATURE] = 0.0
        tower.embeddings.position_embedding.weight[PATCH + 1, FEATURE] = 1000.0
        projector.linear_1.weight[UNIT] = 0.0
        projector.linear_1.weight[UNIT, FEATURE] = 10.0
        projector.linear_1.bias[UNIT] = -20.0
        projector.linear_2.weight[:, UNIT] = 0.0
        projector.linear_2.weight[[SINK_DIM, CONSTANT, IMAGE_DIM]] = 0.0
        projector.linear_2.weight[SINK_DIM, UNIT] = 50.0
        projector.linear_2.bias[[SINK_DIM, CONSTANT, IMAGE_DIM]] = torch.tensor([0.0, 1.0, 100.0])
        embeddings[:, [SINK_DIM, IMAGE_DIM]] = 0.0
        embeddings[:, CONSTANT] = 1.0
        embeddings[BOS, SINK_DIM] = 1000.0
        attention = model.model.language_model.layers[0].self_attn
        for head, kv_head, key_dim in ((CENTRIC_HEAD, 0, IMAGE_DIM), (SINK_HEAD, 1, SINK_DIM)):
            # the lowest-frequency rotary pair (3, 7): position hardly matters over a few dozen tokens
            attention.q_proj.weight[head * HEAD_DIM:(head + 1) * HEAD_DIM] = 0.0
            attention.q_proj.weight[head * HEAD_DIM + 3, CONSTANT] = 10.0
            attention.k_proj.weight[kv_head * HEAD_DIM:(kv_head + 1) * HEAD_DIM] = 0.0
            attention.k_proj.weight[kv_head * HEAD_DIM + 3, key_dim] = 2.0
    return model


@pytest.fixture(scope="module")
def planted(vlm_dirs) -> hs.Loaded:
    loaded = hs.load(vlm_dirs["llava"])
    return loaded._replace(model=planted_llava(loaded.model))


def test_planted_visual_sink_token_is_the_only_one_found(planted):
    result = run_sinks(planted, **PLANTED)
    found = result.tables["visual_sinks"]
    ids = images.encode(planted, images.shipped(1)[0])["input_ids"][0]
    position = int((ids == planted.model.config.image_token_id).nonzero()[PATCH])
    print(f"\nplanted visual sink: {found[['layer', 'position', 'dimension', 'value']].to_dict('records')}")

    assert sorted(found["layer"]) == [0, 1]  # found in every judged layer, and nothing else is
    assert set(found["position"]) == {position} and set(found["image_index"]) == {PATCH}
    assert set(found["row"]) == {1} and set(found["column"]) == {1} and set(found["dimension"]) == {SINK_DIM}
    assert (found["value"] > PLANTED["visual_tau"]).all()
    dimensions = result.summary["sink_dimensions"]
    assert len(dimensions) == 1 and dimensions[0].startswith(f"{SINK_DIM} ")
    assert result.summary["visual_sink_tokens"] == 1
    # every image token holds a large IMAGE_DIM, which is no sink dimension: none of them is a visual sink
    plain = run_sinks(planted, **{**PLANTED, "visual_min_layer": 1})
    assert sorted(plain.tables["visual_sinks"]["layer"]) == [1]
    assert "visual-sinks" in sinks.figures(result)


def test_visual_sink_detection_reads_the_rms_normalised_state():
    first = [torch.tensor([30.0, 1.0, 1.0, 1.0] + [0.0] * 28)] * 2  # phi[0] = 30 / sqrt(903 / 32) = 5.65
    dimensions = sinks_vlm.sink_dimensions(first, tau=5.0, layers=[1])
    assert list(dimensions) == [0] and dimensions[0] == pytest.approx(30 / np.sqrt(903 / 32), rel=1e-6)
    hidden = [torch.zeros(4, 32), torch.zeros(4, 32)]
    hidden[1][1, 0] = -30.0  # an image token, massive (negative) in the sink dimension
    hidden[1][2, 5] = 30.0  # an image token, massive outside the sink dimensions
    hidden[1][3, 0] = 30.0  # a text token, massive in the sink dimension
    hidden[1][:, 1] = 1.0
    image = torch.tensor([False, True, True, False])
    found = sinks_vlm.visual_sinks(hidden, image, list(dimensions), tau=5.0, layers=[1])
    assert [(position, dimension) for position, dimension, _, _ in found[1]] == [(1, 0)]
    assert found[1][0][2] < -5.0 and found[1][0][3] == -30.0
    assert sinks_vlm.visual_sinks(hidden, image, list(dimensions), tau=6.0, layers=[1]) == {1: []}


def test_image_centric_rule_on_hand_made_numbers():
    image = np.array([0.8, 0.8, 0.8, 0.19, 0.2, np.nan, 0.0, 0.9])
    sink = np.array([0.1, 0.4, 0.41, 0.0, 0.1, 0.0, 0.0, 0.05])
    assert sinks_vlm.image_centric(image, sink).tolist() == [True, True, False, False, True, False, False, True]
    has_sinks = np.array([True] * 7 + [False])
    assert not sinks_vlm.image_centric(image, sink, has_sinks=has_sinks)[-1]
    assert sinks_vlm.image_centric(image, sink, ratio=0.2, mass=0.5).tolist() == [
        True, False, False, False, False, False, False, True]


def test_planted_image_centric_head_is_found_and_sink_head_is_not(planted):
    result = run_sinks(planted, **PLANTED)
    forced, eager = eager_run(planted, NEW_TOKENS)
    image, after = _image_rows(forced, planted.model.config.image_token_id)
    sink = torch.zeros_like(image)
    sink[int(image.nonzero()[PATCH])] = True
    image_mass, image_exact = _eager_mass(eager, forced, image, after)
    sink_mass, sink_exact = _eager_mass(eager, forced, sink, after)
    share = result.map("visual_sink_share", "self").values
    centric = result.map("image_centric", "self").values
    heads = result.tables["image_centric_heads"]
    print(f"\nplanted heads: image mass {image_mass[0, [CENTRIC_HEAD, SINK_HEAD]]}, sink share "
          f"{share[0, [CENTRIC_HEAD, SINK_HEAD]]}, image-centric heads {heads[['layer', 'head']].values.tolist()}")

    ref.assert_matches_eager(result.map("image_mass", "self").values, image_mass, image_exact)
    ref.assert_matches_eager(result.map("visual_sink_mass", "self").values, sink_mass, sink_exact)
    assert image_mass[0, CENTRIC_HEAD] > 0.9 and share[0, CENTRIC_HEAD] < 0.05
    assert image_mass[0, SINK_HEAD] > 0.2 and share[0, SINK_HEAD] > 0.95
    assert centric[0, CENTRIC_HEAD] == 1.0 and centric[0, SINK_HEAD] == 0.0
    listed = set(map(tuple, heads[["layer", "head"]].values.tolist()))
    assert (0, CENTRIC_HEAD) in listed and (0, SINK_HEAD) not in listed
    want = sinks_vlm.image_centric(image_mass, sink_mass, has_sinks=np.ones((LAYERS, 1), dtype=bool))
    assert listed == set(zip(*np.nonzero(want), strict=True)) and result.summary["image_centric_heads"] == len(listed)


# --- command line ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_cli_runs_sinks_on_a_vision_language_model(vlm_dirs, family, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    run = headscope(monkeypatch, capsys, "analyze", str(vlm_dirs[family]), "--analyses", "sinks", "--out", str(out),
                    "--figures", "html", "--set", "sinks.max_new_tokens=4", "--set", "sinks.visual_min_layer=0",
                    "--set", "sinks.visual_tau=3", "-q")
    assert run.code == 0, run.err
    saved = json.loads((out / "results.json").read_text())
    analysis = saved["analyses"]["sinks"]
    assert analysis["status"] == "ok" and saved["provenance"]["kind"] == "vision-language"
    maps = {(m["metric"], m["stack"]): np.array(m["values"], dtype=float) for m in analysis["maps"]}
    for key in (("sink_mass", "self"), ("sink_score", "self"), ("sink_mass", "vision"), ("sink_score", "vision"),
                ("image_mass", "self"), ("visual_sink_mass", "self"), ("visual_sink_share", "self")):
        assert key in maps and maps[key].shape[0] == LAYERS, key
    assert ((maps["image_mass", "self"] > 0) & (maps["image_mass", "self"] < 1)).all()
    summary = analysis["summary"]
    assert summary["image_tokens"] == {"llava": 16, "idefics3": 4}[family]
    assert summary["image_grid"] == {"llava": "4 x 4", "idefics3": "2 x 2"}[family]
    assert {"visual_sinks", "image_centric_heads", "massive_activations"} <= set(analysis["tables"])
    for figure in ("sinks-image_mass-self", "sinks-sink_score-vision", "sinks-profile", "sinks-where-self"):
        assert (out / "figures" / f"{figure}.html").is_file(), figure


def test_cli_refuses_a_bad_visual_parameter(vlm_dirs, tmp_path, monkeypatch, capsys):
    run = headscope(monkeypatch, capsys, "analyze", str(vlm_dirs["llava"]), "--analyses", "sinks", "--out",
                    str(tmp_path), "--set", "sinks.visual_tau=-1", "-q")
    assert run.code == 2 and "visual_tau" in run.err and len(run.err.strip().splitlines()) == 1
