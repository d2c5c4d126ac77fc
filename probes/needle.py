"""Needle-in-a-haystack probes: a needle sentence hidden at depth d of a haystack of about n tokens, then a
question about it.

After Kamradt's needle-in-a-haystack test and Wu et al. (2024), "Retrieval Head Mechanistically Explains
Long-Context Factuality". The haystack is natural prose: by default the essays and stories shipped in
``data/haystack/`` (written for the project; see ``data/README.md``), in an order drawn from the seed and
repeated when a length needs more tokens than they hold. A needle is a sentence with a distinctive answer,
with a question about it and the prefix of the needle that a continuation prompt ends with
(``data/needles.jsonl``; users can pass their own file of the same shape).

A test's prompt, built from token ids so that the needle's span is exact::

    [frame before] haystack[:p] needle haystack[p:] [frame after]

The frame holds an instruction before the haystack and, after it, the question and ``Answer:``; the
``"continuation"`` prompt then goes on with the needle's prefix, so the model only has to continue it (small
models answer that far better than the bare question). Models whose tokenizer has a chat template get the
instruction, haystack and question as the user's message and the prefix as the start of the assistant's
reply. The haystack is cut so that the whole prompt takes at most ``length`` tokens, ending at a sentence
end; the needle goes in at the sentence boundary nearest to ``depth`` x the haystack's tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from headscope.errors import HeadscopeError
from headscope.probes import text as probe_text
from headscope.probes.repeated import special_frame

Prompt = Literal["continuation", "question"]
HAYSTACK_DIR = probe_text.DATA_DIR / "haystack"
NEEDLES_FILE = probe_text.DATA_DIR / "needles.jsonl"
FIELDS = ("needle", "question", "prefix", "answer")
INSTRUCTION = "Below is a long text. Read it carefully; a question about it follows."
QUESTION = "Based on the text above, answer the question.\nQuestion: {question}"
ANSWER = "Answer:"
SENTINEL = "\x00HAYSTACK\x00"
SENTENCE_ENDS = (".", "!", "?", '."', '!"', '?"', ".'", "\n")


@dataclass(frozen=True)
class Needle:
    """A needle sentence, the question it answers, the prefix a continuation prompt ends with, and the answer
    (the words the model's output must recall: the needle after its prefix)."""

    needle: str
    question: str
    prefix: str
    answer: str


@dataclass(frozen=True)
class NeedleTest:
    """One prompt of the grid.

    Attributes:
        length: the token budget of the prompt (the grid's length).
        depth: the depth asked for, a fraction of the haystack in [0, 1].
        needle_index: the needle's line in the needles file (0-based).
        needle: the needle.
        input_ids: the prompt's token ids.
        span: (start, stop) of the needle's tokens in ``input_ids``.
        haystack_tokens: haystack tokens in the prompt (needle and frame not counted).
        insert_at: haystack tokens before the needle (``insert_at / haystack_tokens`` is the actual depth).
    """

    length: int
    depth: float
    needle_index: int
    needle: Needle
    input_ids: tuple[int, ...]
    span: tuple[int, int]
    haystack_tokens: int
    insert_at: int

    @property
    def actual_depth(self) -> float:
        return self.insert_at / self.haystack_tokens if self.haystack_tokens else 0.0


def read_needles(path: str | Path | None = None) -> list[Needle]:
    """The needles of a JSONL file (one object per line with string fields needle, question, prefix and
    answer; blank lines skipped), by default the shipped ``data/needles.jsonl``.

    The prefix must begin the needle and the answer must be part of it; any problem is one
    :class:`HeadscopeError` naming the file and line.
    """
    path = NEEDLES_FILE if path is None else Path(path)
    needles = []
    for number, line in enumerate(probe_text.read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise HeadscopeError(f"{where}: not a JSON object ({error.msg})") from None
        if not isinstance(record, dict):
            raise HeadscopeError(f"{where}: expected a JSON object with {', '.join(FIELDS)}")
        missing = [name for name in FIELDS if not isinstance(record.get(name), str) or not record[name].strip()]
        if missing:
            raise HeadscopeError(f"{where}: needs non-empty text fields {', '.join(FIELDS)}; "
                                 f"missing or not text: {', '.join(missing)}")
        needle = Needle(*(record[name].strip() for name in FIELDS))
        if not needle.needle.startswith(needle.prefix):
            raise HeadscopeError(f"{where}: the prefix must be the start of the needle")
        if needle.answer not in needle.needle:
            raise HeadscopeError(f"{where}: the answer must be part of the needle")
        needles.append(needle)
    if not needles:
        raise HeadscopeError(f"{path}: no needles in the file")
    return needles


def haystack_documents(path: str | Path | None = None) -> list[str]:
    """The haystack's documents: the shipped essays and stories (``data/haystack/*.txt``, by name), or the
    one document of a user's UTF-8 text file."""
    if path is not None:
        text = probe_text.read_text(path).strip()
        if not text:
            raise HeadscopeError(f"{path}: the haystack file is empty")
        return [text]
    return [file.read_text(encoding="utf-8").strip() for file in sorted(HAYSTACK_DIR.glob("*.txt"))]


def depth_grid(depths: int | Sequence[float]) -> tuple[float, ...]:
    """``n`` evenly spaced depths from 0 to 1 (both included; 0.5 alone for n = 1), or the given fractions."""
    if isinstance(depths, int):
        if depths < 1:
            raise HeadscopeError(f"depths must be at least 1, got {depths}")
        return (0.5,) if depths == 1 else tuple(float(d) for d in np.linspace(0, 1, depths).round(4))
    grid = tuple(float(d) for d in depths)
    if not grid or not all(0 <= d <= 1 for d in grid):
        raise HeadscopeError(f"depths must be fractions between 0 and 1, got {list(depths)}")
    return grid


def choose_needles(needles: list[Needle], count: int, seed: int) -> list[int]:
    """Indices of ``count`` needles drawn without replacement with ``seed``, in file order; all of them
    when ``count`` is at least their number."""
    if count < 1:
        raise HeadscopeError(f"needles must be at least 1, got {count}")
    if count >= len(needles):
        return list(range(len(needles)))
    return sorted(int(i) for i in np.random.default_rng(seed).choice(len(needles), count, replace=False))


def build(
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    needles: Sequence[tuple[int, Needle]],
    documents: Sequence[str],
    seed: int = 0,
    prompt: Prompt = "continuation",
    chat_template: bool = True,
) -> list[NeedleTest]:
    """The grid of tests: every needle at every length and depth, in needle, length, depth order.

    ``needles`` are (index, needle) pairs; ``documents`` are shuffled with ``seed`` and joined by blank
    lines into the haystack. ``chat_template`` uses the tokenizer's chat template when it has one.
    """
    order = np.random.default_rng(seed).permutation(len(documents))
    text = "\n\n".join(documents[i] for i in order)
    hay = _encode(tokenizer, text)
    if not hay:
        raise HeadscopeError("the haystack holds no tokens")
    repeats = -(-max(lengths) // len(hay))
    if repeats > 1:  # as in the reference code, the haystack is repeated until long enough
        hay = _encode(tokenizer, "\n\n".join([text] * repeats))
    ends = _sentence_ends(tokenizer, hay[: max(lengths)])
    templated = chat_template and bool(getattr(tokenizer, "chat_template", None))
    tests = []
    for index, needle in needles:
        before, after = _frame(tokenizer, needle, prompt, templated)
        needle_ids = _encode(tokenizer, " " + needle.needle)
        for length in lengths:
            budget = length - len(before) - len(after) - len(needle_ids)
            if budget < 1:
                raise HeadscopeError(
                    f"length {length} is too short: the prompt frame and needle {index} alone take "
                    f"{length - budget} tokens; use lengths of at least {length - budget + 16}"
                )
            cut = _last_end(ends, budget) or budget  # end the haystack at a sentence end when there is one
            for depth in depths:
                at = _nearest_end(ends[ends <= cut], depth * cut)
                ids = before + hay[:at] + needle_ids + hay[at:cut] + after
                start = len(before) + at
                tests.append(NeedleTest(length, depth, index, needle, tuple(ids), (start, start + len(needle_ids)),
                                        cut, at))
    return tests


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _frame(tokenizer, needle: Needle, prompt: Prompt, templated: bool) -> tuple[list[int], list[int]]:
    """Token ids before and after the haystack (the needle goes inside the haystack)."""
    question = QUESTION.format(question=needle.question)
    continuation = " " + needle.prefix if prompt == "continuation" else ""
    if templated:
        message = f"{INSTRUCTION}\n\n{SENTINEL}\n\n{question}"
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                                 add_generation_prompt=True)
        head, _, tail = rendered.partition(SENTINEL)
        return _encode(tokenizer, head), _encode(tokenizer, tail + continuation.lstrip())
    prefix, _ = special_frame(tokenizer)
    return (list(prefix) + _encode(tokenizer, INSTRUCTION + "\n\n"),
            _encode(tokenizer, f"\n\n{question}\n{ANSWER}{continuation}"))


def _sentence_ends(tokenizer, ids: list[int]) -> np.ndarray:
    """Positions p (0..len(ids)) where a sentence boundary lies: p = 0, or token p - 1 ends a sentence."""
    unique = sorted(set(ids))
    texts = dict(zip(unique, tokenizer.batch_decode([[i] for i in unique]), strict=True))
    ends = [p + 1 for p, i in enumerate(ids) if texts[i].rstrip(" ").endswith(SENTENCE_ENDS)]
    return np.array([0, *ends])


def _last_end(ends: np.ndarray, position: int) -> int:
    """The last sentence boundary at or before ``position``."""
    return int(ends[np.searchsorted(ends, position, side="right") - 1])


def _nearest_end(ends: np.ndarray, position: float) -> int:
    """The sentence boundary nearest to ``position`` (the earlier one on a tie)."""
    return int(ends[np.argmin(np.abs(ends - position))])
