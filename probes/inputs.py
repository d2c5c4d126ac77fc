"""The default input for a model of each kind: prose for text models, the speech clip for Whisper."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from headscope.errors import HeadscopeError
from headscope.probes import audio, images, text


@dataclass
class Probe:
    """Model inputs for one forward pass (or ``generate``), and what they hold.

    ``tokens`` are the token strings of the text side (for tables and figures); ``generate`` says the
    model needs decoding (encoder-decoders) rather than a single forward pass.
    """

    inputs: dict[str, torch.Tensor]
    tokens: list[str]
    source: str
    digest: str
    generate: bool = False
    waveform: np.ndarray | None = None  # audio models: the 16 kHz clip the features were made from
    cut_from: int | None = None  # text cut to fit (--max-tokens, or the model's context): its length in tokens


def build(loaded, user_text: str | None = None, input_path: str | None = None,
          max_tokens: int | None = None) -> Probe:
    """The probe for ``loaded`` (from ``headscope.load``): user text or audio, else the shipped default."""
    model, processor, info = loaded
    if info.kind == "encoder-decoder" and hasattr(processor, "feature_extractor"):
        return _speech(model, processor, input_path)
    if info.kind == "vision-language":
        return _picture(loaded, user_text, input_path)
    if input_path is not None:
        if user_text is not None:
            raise HeadscopeError("give either --text or --input, not both")
        user_text = text.read_text(input_path)
    body = text.prose() if user_text is None else user_text
    if user_text is None and max_tokens is None:  # the shipped probe is cut to fit; user text never silently
        max_tokens = info.max_tokens
    tokenizer = getattr(processor, "tokenizer", processor)
    inputs = text.encode(tokenizer, body, info.max_tokens, max_tokens)
    tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    source = "user text" if user_text is not None else "shipped prose (probes/data/prose.txt)"
    whole = len(tokenizer(body, verbose=False)["input_ids"]) if max_tokens is not None else len(tokens)
    return Probe(inputs, tokens, source, _digest(body.encode()), generate=info.kind == "encoder-decoder",
                 cut_from=whole if whole > len(tokens) else None)


def _speech(model, processor, input_path: str | None) -> Probe:
    waveform, rate, source = audio.speech_input(input_path)
    features = processor.feature_extractor(waveform, sampling_rate=rate, return_tensors="pt")
    inputs = {"input_features": features["input_features"].to(model.dtype)}
    return Probe(inputs, [], source, _digest(waveform.tobytes()), generate=True, waveform=waveform)


def _picture(loaded, user_text: str | None, input_path: str | None) -> Probe:
    """A vision-language model's probe: an image (the user's, else a shipped shapes picture) and a prompt."""
    shown = (images.user(input_path, user_text) if input_path is not None or user_text is not None
             else images.shipped(1)[0])
    inputs = images.encode(loaded, shown)
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    return Probe(inputs, tokens, shown.source, images.digest(shown), generate=True)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
