"""Text probes: the shipped prose passages and tokenisation that respects the model's context."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import torch

from headscope.errors import HeadscopeError

DATA_DIR = Path(__file__).parent / "data"


def prose() -> str:
    """The shipped English prose (written for the project; see ``data/README.md``)."""
    return (DATA_DIR / "prose.txt").read_text(encoding="utf-8").strip()


def one_token(tokenizer, text: str, what: str) -> int:
    """The id of ``text`` as one token (no special tokens); refused, naming ``what``, when it is more or none."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise HeadscopeError(f"{what} {text!r} is {len(ids)} tokens; the metric needs one token each (a leading "
                             "space often makes a word one token, e.g. ' Paris')")
    return ids[0]


def read_text(path: str | Path) -> str:
    """The text of a user's input file (UTF-8), refused when empty or unreadable."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HeadscopeError(f"no such input file: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise HeadscopeError(f"cannot read {path} as UTF-8 text: {error.__class__.__name__}") from None
    return text


def encode(
    tokenizer, text: str, context: int | None, max_tokens: int | None = None
) -> dict[str, torch.Tensor]:
    """Tokenise ``text`` for one forward pass: ``input_ids`` and ``attention_mask`` of shape (1, T).

    Text longer than the model's ``context`` (or than ``max_tokens``, when given) is refused unless
    ``max_tokens`` says to truncate; empty text is refused.
    """
    if not text or not text.strip():
        raise HeadscopeError("the input text is empty: give some text with --text or --input")
    encoded = tokenizer(text, return_tensors="pt", verbose=False)
    length = encoded["input_ids"].shape[1]
    if max_tokens is not None:
        if max_tokens < 1:
            raise HeadscopeError(f"--max-tokens must be at least 1, got {max_tokens}")
        limit = min(max_tokens, context) if context else max_tokens
        encoded = {name: tensor[:, :limit] for name, tensor in encoded.items()}
    elif context is not None and length > context:
        raise HeadscopeError(
            f"the input is {length} tokens, longer than the model's context of {context}: "
            f"shorten it, or pass --max-tokens {context} to truncate"
        )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def readable(tokenizer, ids: list[int]) -> list[str]:
    """Each token's own text, as the tokenizer decodes it alone (no ``Ġ`` or ``▁``); special tokens as they are."""
    return [tokenizer.decode([i]) for i in ids]


LANGUAGE_TAG = re.compile(r"^(>>[a-z_]{2,12}<<|__[a-z]{2,3}(_[A-Za-z]+)?__|[a-z]{3}_[A-Z][a-z]{3}|<\|[a-z]{2,3}\|>)$")
"""Language tags of multilingual tokenizers (Marian, NLLB, M2M, Whisper), which are not content."""


def noncontent(tokenizer, ids: list[int]) -> list[str]:
    """Why each source token is non-content ("" for a content token): special tokens (end of sequence among
    them), language tags, punctuation-only and whitespace-only tokens. Function words stay content."""
    special = set(tokenizer.all_special_ids)
    reasons = []
    for token_id in ids:
        piece = tokenizer.convert_ids_to_tokens(token_id)
        text = tokenizer.decode([token_id]).strip()
        if token_id in special:
            reasons.append("special")
        elif LANGUAGE_TAG.match(piece or "") or LANGUAGE_TAG.match(text):
            reasons.append("language tag")
        elif not text:
            reasons.append("whitespace")
        elif all(unicodedata.category(c).startswith("P") for c in text):
            reasons.append("punctuation")
        else:
            reasons.append("")
    return reasons
