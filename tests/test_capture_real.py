"""The capture engine is exact on the real packaged models, every stack, to the float32 tolerance of
``tests/reference.py`` (a small multiple of eager float32's own error against the float64 twin).

SmolLM2 (Llama, grouped-query attention) on a left-padded batch, MiniLM (BERT) on a right-padded batch,
and Whisper tiny.en's encoder self-attention, decoder self-attention and cross-attention on the shipped
speech clip: every statistic equals the same one computed from eager ``output_attentions=True``.
"""

from __future__ import annotations

import functools

import pytest
import reference as ref
import torch

import headscope
from headscope.probes import audio, text

pytestmark = pytest.mark.slow


@functools.cache
def _loaded(alias: str) -> headscope.Loaded:
    return headscope.load(alias)


def _text_batch(tokenizer, padding_side: str, lengths=(48, 31)) -> dict[str, torch.Tensor]:
    words = text.prose().split()
    sentences = [" ".join(words[: length]) for length in lengths]
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(sentences, return_tensors="pt", padding=True, truncation=True, max_length=64)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _whisper_inputs(processor) -> dict[str, torch.Tensor]:
    waveform, rate, transcript = audio.load_speech()
    features = processor.feature_extractor(waveform, sampling_rate=rate, return_tensors="pt")["input_features"]
    decoder_ids = processor.tokenizer(transcript, return_tensors="pt")["input_ids"][:, :24]
    return {"input_features": features, "decoder_input_ids": decoder_ids}


CASES = {
    "smollm2-135m": ("decoder", lambda loaded: _text_batch(loaded.processor, "left")),
    "minilm-l6": ("encoder", lambda loaded: _text_batch(loaded.processor, "right")),
    "whisper-tiny.en": ("encoder-decoder", lambda loaded: _whisper_inputs(loaded.processor)),
}


@functools.cache
def _expected(alias: str) -> dict:
    kind, make_inputs = CASES[alias]
    loaded = _loaded(alias)
    return ref.forward_attention(ref.eager_copy(loaded.model), kind, make_inputs(loaded))


@pytest.mark.parametrize("path", ["auto", "chunked"])
@pytest.mark.parametrize("alias", list(CASES))
def test_real_model_statistics_equal_eager(alias: str, path: str) -> None:
    """On both paths: "auto" is the kernel path for key mass and entropy (all but nothing here needs rows), and
    for mean distance on causal attention."""
    loaded = _loaded(alias)
    inputs = CASES[alias][1](loaded)
    expected = _expected(alias)

    mass, entropy, distance = headscope.KeyMass(), headscope.Entropy(), headscope.MeanDistance()
    scale = ref.LogitScale()
    scope = headscope.Scope(loaded.model)
    with torch.no_grad():
        with scope.capture(mass, entropy, scale, path=path):
            loaded.model(**inputs)
        if path == "auto":
            assert set(scope.paths) == {"kernel"}, scope.paths
        with scope.capture(distance, path=path):
            loaded.model(**inputs)

    assert set(mass.result()) == set(expected)
    for stack, calls in expected.items():
        ref.assert_exact(mass.result()[stack], ref.key_mass, [calls], err_msg=stack)
        ref.assert_exact(entropy.result()[stack], ref.entropy, [calls], err_msg=stack,
                         floor=ref.kernel_entropy_floor(scale.scale(stack)))
        if stack != "cross":  # distances reach hundreds of positions: the tolerance scales with them
            ref.assert_exact(distance.result()[stack], ref.mean_distance, [calls], err_msg=stack)
