"""The packaged ``synthetic-llava-smollm2``: a LLaVA whose language model is the real SmolLM2-135M-Instruct and whose
vision side is random. It builds once into the cache, deterministically; it loads as a vision-language model with
a language and a vision stack; its language side generates exactly what SmolLM2 generates; ``vhd`` runs on it from
the command line; and every result of a model marked synthetic says that its vision side is untrained.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import tiny_models as tm
import tiny_vlms
import torch
from safetensors.torch import load_file
from test_cli import headscope

import headscope as hs
from headscope.analyses import vhd
from headscope.capture.engine import Scope
from headscope.models import synthetic_vlm, zoo
from headscope.probes import images
from headscope.registry import Context

ALIAS = "synthetic-llava-smollm2"
SMOLLM2 = zoo.PACKAGED["smollm2-135m"]
needs_smollm2 = pytest.mark.skipif(not SMOLLM2.installed(),
                                   reason=f"the synthetic LLaVA's language model is SmolLM2: run `{SMOLLM2.install}`")


# --- the synthetic mark, on a tiny model --------------------------------------------------------------------------


def test_models_lists_the_alias_as_synthetic(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "240")  # one table row per line
    run = headscope(monkeypatch, capsys, "models")

    assert run.code == 0, run.err
    row = next(line for line in run.out.splitlines() if ALIAS in line)
    assert "vision-language (SYNTHETIC)" in row
    assert f"{ALIAS} is synthetic, for offline demos: {synthetic_vlm.NOTE}" in " ".join(run.out.split())


@pytest.fixture(scope="module")
def marked_llava(tmp_path_factory) -> Path:
    """A tiny LLaVA folder whose config carries the synthetic mark, as the packaged alias's does."""
    folder = tiny_vlms.llava(tmp_path_factory.mktemp("marked-llava"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "headscope_synthetic": synthetic_vlm.NOTE}))
    return folder


def test_a_model_marked_synthetic_says_so_in_provenance_and_every_summary(marked_llava, tmp_path, monkeypatch,
                                                                           capsys):
    assert "synthetic" not in hs.load(tiny_vlms.llava(tmp_path / "plain")).info.source
    out = tmp_path / "out"
    with tm.one_thread():
        run = headscope(monkeypatch, capsys, "analyze", str(marked_llava), "--analyses", "vhd,sinks", "--out",
                        str(out), "--figures", "html", "--set", "vhd.prompts=1", "--set", "vhd.max_new_tokens=2")

    assert run.code == 0, run.err
    assert f"note: synthetic model: {synthetic_vlm.NOTE}" in " ".join(run.err.split())
    saved = json.loads((out / "results.json").read_text())
    assert saved["provenance"]["model"]["synthetic"] == synthetic_vlm.NOTE
    for name in ("vhd", "sinks"):
        assert saved["analyses"][name]["status"] == "ok"
        assert saved["analyses"][name]["summary"]["synthetic_model"] == synthetic_vlm.NOTE
    assert synthetic_vlm.NOTE in (out / "report.html").read_text()


def test_vhd_from_python_says_the_vision_side_is_untrained(marked_llava):
    loaded = hs.load(marked_llava)
    with tm.one_thread():
        result = vhd.run(Context(loaded, Scope(loaded.model), params={"prompts": 1, "max_new_tokens": 2,
                                                                       "vhr": False}))

    assert result.summary["synthetic_model"] == synthetic_vlm.NOTE


# --- the packaged alias (needs SmolLM2) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic():
    """The alias loaded from the user cache (built there on the first run), and its second load time."""
    if not SMOLLM2.installed():
        pytest.skip(f"the synthetic LLaVA's language model is SmolLM2: run `{SMOLLM2.install}`")
    hs.load(ALIAS)
    started = time.perf_counter()
    loaded = hs.load(ALIAS)
    print(f"\n{ALIAS} load from the cache: {time.perf_counter() - started:.2f} s")
    return loaded


@pytest.mark.slow
@needs_smollm2
def test_builds_once_into_the_cache_deterministically(synthetic, tmp_path, monkeypatch):
    language, cached = zoo.materialise("smollm2-135m"), zoo.materialise(ALIAS)
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path))  # the SmolLM2 conversion is reused there, not repeated
    (tmp_path / language.name).symlink_to(language, target_is_directory=True)
    builds = []
    build = synthetic_vlm.build
    monkeypatch.setattr(synthetic_vlm, "build", lambda *args: builds.append(args) or build(*args))

    started = time.perf_counter()
    first = zoo.materialise(ALIAS)
    built = time.perf_counter() - started
    started = time.perf_counter()
    second = zoo.materialise(ALIAS)
    again = time.perf_counter() - started
    print(f"\n{ALIAS} build {built:.1f} s, then {again * 1000:.1f} ms from the cache")

    assert first == second == tmp_path / f"{ALIAS}-{SMOLLM2.version()}"
    assert len(builds) == 1 and builds[0][0] == tmp_path / language.name
    assert again < 0.5
    config = json.loads((first / "config.json").read_text())
    assert config["headscope_synthetic"] == synthetic_vlm.NOTE
    assert "SYNTHETIC" in (first / "README.md").read_text()
    ours = load_file(first / "model.safetensors")
    theirs = load_file(cached / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)  # the same seed, the same random tower


@pytest.mark.slow
@needs_smollm2
def test_loads_as_vision_language_with_a_language_and_a_vision_stack(synthetic):
    model, processor, info = synthetic

    assert info.kind == "vision-language" and info.architecture == "LlavaForConditionalGeneration"
    assert {name: (stack.layers, stack.heads, stack.kv_heads) for name, stack in info.stacks.items()} == {
        "self": (30, 9, 3), "vision": (4, 4, 4)}
    assert info.source == {"type": "packaged", "alias": ALIAS, "package": SMOLLM2.distribution,
                           "version": SMOLLM2.version(), "synthetic": synthetic_vlm.NOTE}
    assert type(processor).__name__ == "LlavaProcessor"
    pair = images.pair(synthetic, images.shipped(1)[0], model.config.image_token_id)
    assert int(pair.image_mask.sum()) == synthetic_vlm.IMAGE_TOKENS == 64
    text = images.prompt_text(processor, "Describe the image.")
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\n<image>\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
@needs_smollm2
def test_its_language_side_generates_what_smollm2_generates(synthetic):
    smollm2 = hs.load("smollm2-135m")
    tokenizer = smollm2.processor
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, tokenize=False)
    for prompt in ("The capital of France is", chat):
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            ours = synthetic.model.generate(**inputs, max_new_tokens=16, do_sample=False)
            theirs = smollm2.model.generate(**inputs, max_new_tokens=16, do_sample=False)
            logits = synthetic.model(**inputs).logits[..., :len(tokenizer)]
            reference = smollm2.model(**inputs).logits
        print(f"\n{prompt!r} -> {tokenizer.decode(ours[0, inputs['input_ids'].shape[1]:])!r}")
        assert torch.equal(ours, theirs)
        assert torch.equal(logits, reference)
    assert synthetic.processor.tokenizer("The capital of France is")["input_ids"] == tokenizer(
        "The capital of France is")["input_ids"]


@pytest.mark.slow
@needs_smollm2
def test_cli_runs_vhd_on_it_and_says_the_vision_side_is_untrained(synthetic, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    started = time.perf_counter()
    run = headscope(monkeypatch, capsys, "analyze", ALIAS, "--analyses", "vhd", "--out", str(out), "--figures",
                    "html", "--set", "vhd.prompts=1", "--set", "vhd.max_new_tokens=8", "--set",
                    "vhd.layerwise=false")
    seconds = time.perf_counter() - started

    assert run.code == 0, run.err
    assert f"note: synthetic model: {synthetic_vlm.NOTE}" in " ".join(run.err.split())
    saved = json.loads((out / "results.json").read_text())
    assert saved["provenance"]["model"]["synthetic"] == synthetic_vlm.NOTE
    analysis = saved["analyses"]["vhd"]
    assert analysis["status"] == "ok"
    summary = analysis["summary"]
    assert summary["synthetic_model"] == synthetic_vlm.NOTE
    values = np.array(next(m["values"] for m in analysis["maps"] if m["metric"] == "vhd"))
    assert values.shape == (30, 9) and (values > 0).all()
    table = analysis["tables"]["generations"]
    generation = dict(zip(table["columns"], table["rows"][0], strict=True))
    assert generation["image_tokens"] == 64 and generation["output"]
    print(f"\n{ALIAS} vhd from the command line in {seconds:.1f} s: top {summary['top_vhd'][:3]}, mean T-VHD "
          f"{summary['mean_t_vhd']:.3f}, VHR reinforced {summary['vhr_heads_reinforced_mean']:.0f} heads, "
          f"output {generation['output']!r} -> with VHR {generation['output_vhr']!r}")
