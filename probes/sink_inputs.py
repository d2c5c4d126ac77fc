"""The three input distributions of Gu et al. (2024), "When Attention Sink Emerges in Language Models": natural
text, random tokens and one repeated token, each a batch of sequences of the same length (no padding).

- ``natural``: paragraphs of natural prose, each tokenised as the model reads a text (the tokenizer's own
  special tokens included) and cut to its first T tokens. Paragraphs shorter than T are left out, as the
  authors' code refuses samples shorter than T. The corpus is the shipped prose and the haystack essays and
  stories (``data/``, written for the project); the sequences are drawn from its paragraphs with the seed.
- ``random``: token ids drawn uniformly, with replacement, from the ordinary tokens of the vocabulary
  (:func:`headscope.probes.repeated.candidate_ids`: special, added and placeholder tokens left out).
- ``repeated``: one token, drawn the same way for each sequence, repeated to fill the sequence.

What the tokenizer itself puts before a text (Llama/Gemma: ``<bos>``; BERT: ``[CLS]``) stays first in random
and repeated sequences too, as the model would see any text; a tokenizer that adds nothing (SmolLM2) gets
nothing. So with such a tokenizer a repeated sequence is one token T times, and in a model with relative
positions (RoPE) every position then holds the same hidden state: nothing marks the first token, and Gu et al.
find no sink (their Proposition: identical tokens, identical states). ``with_prefix=False`` leaves the tokenizer's
prefix out of random and repeated sequences, so that a ``<bos>`` model reads the token ids alone, as that
Proposition assumes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

from headscope.errors import HeadscopeError
from headscope.probes import needle
from headscope.probes import text as probe_text
from headscope.probes.repeated import added_frame, candidate_ids

Kind = Literal["natural", "random", "repeated"]
KINDS: tuple[str, ...] = get_args(Kind)
CORPUS = "the shipped prose and haystack texts (probes/data)"


@dataclass(frozen=True)
class SinkInputs:
    """A batch of sequences of one input kind, all of the same length.

    Attributes:
        kind: ``"natural"``, ``"random"`` or ``"repeated"``.
        input_ids: (sequences, tokens) long.
        prefix: the tokens the tokenizer puts before a text, first in every sequence (0 or 1 in practice).
        seed: the seed the sequences were drawn with.
        source: where the sequences come from, in words.
        available: natural text: the paragraphs long enough to draw from; else the ordinary tokens drawn from.
    """

    kind: str
    input_ids: torch.Tensor
    prefix: int
    seed: int
    source: str
    available: int

    @property
    def sequences(self) -> int:
        return self.input_ids.shape[0]

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def attention_mask(self) -> torch.Tensor:
        """(sequences, tokens) long, all ones."""
        return torch.ones_like(self.input_ids)

    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.input_ids.numpy().tobytes()).hexdigest()


def _generator(kind: str, seed: int) -> np.random.Generator:
    """Each kind's own stream of the seed, so that the kinds do not share draws."""
    return np.random.default_rng([KINDS.index(kind), seed])


def _prefix(tokenizer, tokens: int, keep: bool = True) -> list[int]:
    prefix = added_frame(tokenizer)[0] if keep else []
    if tokens <= len(prefix) + 1:
        raise HeadscopeError(f"Gu et al.'s inputs need more than {len(prefix) + 1} tokens per sequence, got {tokens}")
    return prefix


def paragraphs(documents: Sequence[str]) -> list[str]:
    """The paragraphs (blocks separated by a blank line) of ``documents``, in order, stripped, empty ones left out."""
    return [block.strip() for document in documents for block in document.split("\n\n") if block.strip()]


def corpus() -> list[str]:
    """The natural-text corpus: the shipped prose, then the haystack's essays and stories by file name."""
    return [probe_text.prose(), *needle.haystack_documents()]


def natural(tokenizer, sequences: int, tokens: int, seed: int = 0, documents: Sequence[str] | None = None
            ) -> SinkInputs:
    """``sequences`` paragraphs of ``documents`` (default :func:`corpus`) drawn without replacement with ``seed``
    from those of at least ``tokens`` tokens, in corpus order, each cut to its first ``tokens`` tokens; all of
    them when fewer exist (``source`` says so)."""
    _check(sequences, tokens)
    texts = paragraphs(corpus() if documents is None else documents)
    encoded = tokenizer(texts, verbose=False)["input_ids"] if texts else []
    long = [ids[:tokens] for ids in encoded if len(ids) >= tokens]
    if not long:
        raise HeadscopeError(f"no paragraph of the natural text holds {tokens} tokens")
    count = min(sequences, len(long))
    chosen = sorted(_generator("natural", seed).choice(len(long), count, replace=False).tolist())
    where = CORPUS if documents is None else "the given text"
    source = (f"{count} paragraphs of {where}, drawn with seed {seed} from the {len(long)} of at least {tokens} "
              f"tokens, each cut to its first {tokens}")
    if count < sequences:
        source += f" (only {len(long)} such paragraphs exist, fewer than the {sequences} asked)"
    ids = torch.tensor([long[i] for i in chosen], dtype=torch.long)
    return SinkInputs("natural", ids, _shared_prefix(ids, added_frame(tokenizer)[0]), seed, source, len(long))


def random_tokens(tokenizer, sequences: int, tokens: int, seed: int = 0, vocab_size: int | None = None,
                  with_prefix: bool = True) -> SinkInputs:
    """``sequences`` sequences of the tokenizer's prefix (unless ``with_prefix`` is False) then token ids drawn
    uniformly (with replacement) from :func:`~headscope.probes.repeated.candidate_ids`, ``tokens`` in all."""
    _check(sequences, tokens)
    prefix = _prefix(tokenizer, tokens, with_prefix)
    ids = candidate_ids(tokenizer, vocab_size)
    drawn = ids[torch.from_numpy(_generator("random", seed).integers(len(ids), size=(sequences, tokens - len(prefix))))]
    source = (f"{sequences} sequences of {tokens - len(prefix)} token ids drawn uniformly from the {len(ids)} ordinary "
              f"tokens (special and added tokens left out), seed {seed}{_after(tokenizer, prefix)}")
    return SinkInputs("random", _framed(prefix, drawn), len(prefix), seed, source, len(ids))


def repeated_token(tokenizer, sequences: int, tokens: int, seed: int = 0, vocab_size: int | None = None,
                   with_prefix: bool = True) -> SinkInputs:
    """``sequences`` sequences of the tokenizer's prefix (unless ``with_prefix`` is False) then one token, drawn
    uniformly from :func:`~headscope.probes.repeated.candidate_ids` for each sequence, repeated to ``tokens`` in all."""
    _check(sequences, tokens)
    prefix = _prefix(tokenizer, tokens, with_prefix)
    ids = candidate_ids(tokenizer, vocab_size)
    drawn = ids[torch.from_numpy(_generator("repeated", seed).integers(len(ids), size=sequences))]
    source = (f"{sequences} sequences, each one token drawn uniformly from the {len(ids)} ordinary tokens repeated "
              f"{tokens - len(prefix)} times, seed {seed}{_after(tokenizer, prefix)}")
    return SinkInputs("repeated", _framed(prefix, drawn[:, None].expand(-1, tokens - len(prefix))), len(prefix), seed,
                      source, len(ids))


def build(kind: str, tokenizer, sequences: int, tokens: int, seed: int = 0, vocab_size: int | None = None,
          with_prefix: bool = True) -> SinkInputs:
    """The inputs of ``kind`` (one of :data:`KINDS`); ``with_prefix`` False leaves the tokenizer's prefix out of random
    and repeated tokens (natural text is always tokenised as the model reads a text)."""
    if kind == "natural":
        return natural(tokenizer, sequences, tokens, seed)
    if kind == "random":
        return random_tokens(tokenizer, sequences, tokens, seed, vocab_size, with_prefix)
    if kind == "repeated":
        return repeated_token(tokenizer, sequences, tokens, seed, vocab_size, with_prefix)
    raise HeadscopeError(f"unknown input kind {kind!r}: choose from {', '.join(KINDS)}")


def _check(sequences: int, tokens: int) -> None:
    if sequences < 1 or tokens < 2:
        raise HeadscopeError(f"Gu et al.'s inputs need at least 1 sequence of at least 2 tokens; got {sequences} of "
                             f"{tokens}")


def _framed(prefix: list[int], body: torch.Tensor) -> torch.Tensor:
    head = torch.tensor(prefix, dtype=torch.long).expand(body.shape[0], -1)
    return torch.cat([head, body.long()], dim=1)


def _shared_prefix(ids: torch.Tensor, prefix: list[int]) -> int:
    """How many of the tokenizer's prefix tokens begin every row."""
    head = torch.tensor(prefix, dtype=torch.long)
    return len(prefix) if len(prefix) <= ids.shape[1] and bool((ids[:, : len(prefix)] == head).all()) else 0


def _after(tokenizer, prefix: list[int]) -> str:
    if not prefix and added_frame(tokenizer)[0]:
        return "; no token before them (the tokenizer's own prefix left out)"
    if not prefix:
        return "; no token before them (the tokenizer adds none to a text)"
    return f", after {tokenizer.convert_ids_to_tokens(prefix)} (what the tokenizer puts before a text)"
