"""Repeated random tokens: [BOS] + r + r, with r drawn uniformly from the model's vocabulary.

On such a sequence the answers are known by construction: a query in the second copy of r at position t
finds the same token at t - len(r) (duplicate-token), the token that followed it at t - (len(r) - 1)
(induction, Olsson et al. 2022), and the previous token at t - 1. Nothing in r is predictable from
language, so a head that attends to these positions does so by mechanism, not by meaning.

Position 0 is what the tokenizer puts before any text (Llama/Gemma: ``<bos>``; BERT: ``[CLS]``, and
``[SEP]`` after the second copy). A tokenizer that adds nothing (SmolLM2) gets its ``bos_token`` (else its
``eos_token``) as position 0, so every model has a first token to park attention on; with neither, the
sequence starts with r directly.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import torch

from headscope.errors import HeadscopeError

DEFAULT_LENGTH = 50
DEFAULT_SAMPLES = 10
# Placeholder tokens some vocabularies hold as ordinary entries (BERT's "[unused12]"): never trained.
PLACEHOLDER = re.compile(r"[\[<]unused\d+[\]>]")


@dataclass
class Repeated:
    """A batch of [prefix] + r + r + [suffix] sequences, all of the same length (no padding).

    Attributes:
        input_ids: (samples, tokens) long.
        attention_mask: (samples, tokens) long, all ones.
        prefix: tokens before the first copy of r (0 or 1 in practice).
        length: len(r).
        seed: the seed r was drawn with.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prefix: int
    length: int
    seed: int

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]

    def second_copy(self) -> torch.Tensor:
        """(samples, tokens) bool: the queries of the second copy of r."""
        mask = torch.zeros_like(self.input_ids, dtype=torch.bool)
        mask[:, self.prefix + self.length:self.prefix + 2 * self.length] = True
        return mask

    def after_first(self) -> torch.Tensor:
        """(samples, tokens) bool: every query after the first token."""
        mask = torch.ones_like(self.input_ids, dtype=torch.bool)
        mask[:, 0] = False
        return mask

    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.input_ids.numpy().tobytes()).hexdigest()


def added_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The token ids the tokenizer itself adds before and after a text (Llama/Gemma: ``<bos>`` before; BERT:
    ``[CLS]`` before, ``[SEP]`` after; SmolLM2: nothing)."""
    probe = "repeated tokens"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    framed = tokenizer(probe)["input_ids"]
    for start in range(len(framed) - len(plain) + 1):
        if framed[start:start + len(plain)] == plain:
            return list(framed[:start]), list(framed[start + len(plain):])
    return [], []


def special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The token ids the tokenizer adds before and after a text (:func:`added_frame`); for a tokenizer that adds
    none before, its ``bos_token`` (else ``eos_token``) as the prefix, when it has one."""
    prefix, suffix = added_frame(tokenizer)
    if not prefix:
        first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        prefix = [first] if first is not None else []
    return prefix, suffix


def candidate_ids(tokenizer, vocab_size: int | None = None) -> torch.Tensor:
    """(N,) the ids r is drawn from: the tokenizer's vocabulary (within the model's embedding size) less its
    special and added tokens (Gemma's ``<unused..>`` and image tokens, chat markers) and placeholders
    (BERT's ``[unused..]``)."""
    size = len(tokenizer) if vocab_size is None else min(len(tokenizer), vocab_size)
    excluded = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    excluded |= {i for i, token in enumerate(tokens) if token is not None and PLACEHOLDER.fullmatch(token)}
    keep = torch.ones(size, dtype=torch.bool)
    keep[[i for i in excluded if 0 <= i < size]] = False
    ids = keep.nonzero()[:, 0]
    if len(ids) < 2:
        raise HeadscopeError("the tokenizer has fewer than 2 ordinary tokens to draw repeated sequences from")
    return ids


def build(
    tokenizer,
    length: int = DEFAULT_LENGTH,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    context: int | None = None,
    vocab_size: int | None = None,
) -> Repeated:
    """``samples`` sequences [prefix] + r + r + [suffix], r of ``length`` tokens drawn uniformly (with
    replacement) from :func:`candidate_ids` by a generator seeded with ``seed``.

    ``length`` shrinks to fit ``context`` (the model's maximum positions) when it would not.
    """
    if length < 2 or samples < 1:
        raise HeadscopeError(f"repeated-token probes need length >= 2 and samples >= 1; got {length}, {samples}")
    prefix, suffix = special_frame(tokenizer)
    if context is not None:
        length = min(length, (context - len(prefix) - len(suffix)) // 2)
        if length < 2:
            raise HeadscopeError(f"a context of {context} tokens is too short for repeated-token probes")
    ids = candidate_ids(tokenizer, vocab_size)
    generator = torch.Generator().manual_seed(seed)
    r = ids[torch.randint(len(ids), (samples, length), generator=generator)]
    frame = [torch.tensor([prefix] * samples, dtype=torch.long).view(samples, -1), r, r,
             torch.tensor([suffix] * samples, dtype=torch.long).view(samples, -1)]
    input_ids = torch.cat(frame, dim=1)
    return Repeated(input_ids, torch.ones_like(input_ids), len(prefix), length, seed)
