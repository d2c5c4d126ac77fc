"""The decoder side of an encoder-decoder probe: the model's own greedy output, or a given target, teacher-forced.

``generate`` does not return everything the decoder read (Whisper's leaves its start tokens
``<|startoftranscript|><|notimestamps|>`` and the end-of-text token out), so the start tokens are recorded where
the decoder reads them and the output is read from each step's scores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from headscope.errors import HeadscopeError
from headscope.models.cache import cache_kwargs


@dataclass
class Decoded:
    """A decoder sequence for teacher forcing: ``sequence`` (1, tokens) holds the start tokens the decoder
    was given (``start`` of them) then the output, its end-of-sequence token included when it produced one."""

    sequence: torch.Tensor
    start: int

    @property
    def decoder_input_ids(self) -> torch.Tensor:
        return self.sequence[:, :-1]

    @property
    def targets(self) -> torch.Tensor:
        return self.sequence[:, 1:]

    def scored(self) -> torch.Tensor:
        """(1, tokens - 1) bool: the targets that are the output (not the forced start tokens)."""
        positions = torch.arange(1, self.sequence.shape[1], device=self.sequence.device)
        return (positions >= self.start)[None]


@contextlib.contextmanager
def decoder_inputs(model) -> Iterator[list[torch.Tensor]]:
    """Record the ``input_ids`` of each call of an encoder-decoder's decoder, (B, new tokens) per call."""
    fed: list[torch.Tensor] = []

    def record(module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            fed.append(ids.detach())

    handle = model.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield fed
    finally:
        handle.remove()


def own_output(model, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> Decoded:
    """The model's greedy output for ``inputs`` (batch 1), with the start tokens its decoder read first.

    The output is read from the scores of each decoding step (after the model's logits processors, so the
    token each step chose), not from what ``generate`` returns: Whisper's leaves out the end-of-text token it
    stopped on."""
    with torch.no_grad(), decoder_inputs(model) as fed:
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                   return_dict_in_generate=True, output_scores=True, **cache_for_generate(model))
    if not fed or not generated.scores:
        raise HeadscopeError(f"{type(model).__name__}.generate never called its decoder")
    produced = torch.stack([score.argmax(-1) for score in generated.scores], dim=1).to(fed[0].device)
    return Decoded(torch.cat([fed[0], produced], dim=1), fed[0].shape[1])


def cache_for_generate(model) -> dict:
    """transformers 5 sizes an encoder-decoder's cache by the encoder's layer count (T5's ``num_layers``), which
    breaks decoding when the decoder has more layers; caches that grow as layers are met do not."""
    from transformers import DynamicCache, EncoderDecoderCache

    config = model.config
    decoder_layers = getattr(config, "num_decoder_layers", None)
    if decoder_layers is None or decoder_layers == getattr(config, "num_layers", decoder_layers):
        return {}
    return cache_kwargs(model, EncoderDecoderCache(DynamicCache(), DynamicCache()))


def given_target(model, tokenizer, inputs: dict[str, torch.Tensor], target: str) -> Decoded:
    """``target`` text as the decoder's output: the model's start tokens, the text's tokens, end of sequence."""
    start = own_output(model, inputs, max_new_tokens=1)
    prefix = start.sequence[:, :start.start]
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise HeadscopeError("the target text is empty: give the output the decoder should be scored on")
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    tail = torch.tensor([ids + ([eos] if eos is not None else [])], device=prefix.device)
    return Decoded(torch.cat([prefix, tail], dim=1), prefix.shape[1])
