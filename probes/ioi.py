"""Clean/corrupted prompt pairs with known answers, for activation patching.

Two families, both written for headscope:

- ``ioi``: indirect-object identification in the style of Wang et al. (2023), "Interpretability in the Wild":
  "When Mary and John went to the market, John gave a book to" -> " Mary" (the indirect object), not " John"
  (the subject). The corrupted prompt repeats the other name ("..., Mary gave a book to"), which swaps the right
  answer: the logit difference logit(answer) - logit(wrong) is positive on the clean prompt and negative on the
  corrupted one. Names, places and objects are drawn from the lists below with a seed.
- ``capitals``: factual recall, "The capital of France is" -> " Paris", corrupted to another country
  ("The capital of Italy is", whose answer " Rome" is the pair's wrong answer).

A pair is kept only when, under the model's tokenizer, both answers are one token each (with their leading
space) and the clean and corrupted prompts have the same number of tokens: patching matches positions one to one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from headscope.errors import HeadscopeError

Family = Literal["ioi", "capitals"]
FAMILIES: tuple[Family, ...] = ("ioi", "capitals")

NAMES = ("Mary", "John", "Anna", "Paul", "Sarah", "David", "Emma", "James", "Laura", "Peter", "Kate", "Tom",
         "Lucy", "Mark", "Alice", "Daniel", "Rose", "Adam", "Clara", "Simon")
PLACES = ("market", "station", "park", "library", "school", "garden", "office", "beach", "museum", "hospital")
OBJECTS = ("book", "letter", "key", "ring", "bottle", "ticket", "basket", "coin", "drink", "pencil")
IOI_TEMPLATES = (
    "When {a} and {b} went to the {place}, {s} gave a {thing} to",
    "After {a} and {b} arrived at the {place}, {s} handed a {thing} to",
    "Then {a} and {b} were working at the {place}. {s} decided to give a {thing} to",
    "While {a} and {b} were sitting in the {place}, {s} passed the {thing} to",
)
CAPITALS = (("France", "Paris"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
            ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Russia", "Moscow"), ("Greece", "Athens"),
            ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Norway", "Oslo"), ("Ireland", "Dublin"),
            ("Portugal", "Lisbon"), ("Sweden", "Stockholm"), ("Canada", "Ottawa"), ("China", "Beijing"))
CAPITAL_TEMPLATES = (
    "The capital of {country} is",
    "The city that is the capital of {country} is called",
)


@dataclass(frozen=True)
class Pair:
    """One clean/corrupted pair: the answer is right on ``clean``, ``wrong`` is right on ``corrupt``.

    Attributes:
        clean, corrupt: the two prompts, of the same token length.
        answer, wrong: one token each, with their leading space (" Mary").
        family: "ioi", "capitals" or "user".
        template: the template's index in its family: pairs of one template share their token positions' roles.
    """

    clean: str
    corrupt: str
    answer: str
    wrong: str
    family: str
    template: int = 0


def pairs(family: Family, tokenizer, count: int = 8, seed: int = 0) -> list[Pair]:
    """``count`` pairs of ``family`` that fit ``tokenizer`` (one-token answers, equal token lengths), drawn with
    ``seed``; templates in turn. One :class:`HeadscopeError` when the tokenizer fits none."""
    if family not in FAMILIES:
        raise HeadscopeError(f"the probe set is one of {', '.join(FAMILIES)}; got {family!r}")
    generator = random.Random(seed)
    draw = _ioi if family == "ioi" else _capital
    found: list[Pair] = []
    for attempt in range(50 * count):
        pair = draw(generator, attempt % len(IOI_TEMPLATES if family == "ioi" else CAPITAL_TEMPLATES))
        if pair not in found and fits(tokenizer, pair):
            found.append(pair)
            if len(found) == count:
                break
    if not found:
        raise HeadscopeError(f"no {family} pair fits this tokenizer: its answers are not one token each (with a "
                             "leading space) or its prompts differ in length; give patching.clean, patching.corrupt "
                             "and patching.answers")
    return found


def _ioi(generator: random.Random, template: int) -> Pair:
    a, b = generator.sample(NAMES, 2)
    place, thing = generator.choice(PLACES), generator.choice(OBJECTS)
    text = IOI_TEMPLATES[template]
    clean = text.format(a=a, b=b, place=place, s=b, thing=thing)
    corrupt = text.format(a=a, b=b, place=place, s=a, thing=thing)
    return Pair(clean, corrupt, f" {a}", f" {b}", "ioi", template)


def _capital(generator: random.Random, template: int) -> Pair:
    (country, capital), (other, other_capital) = generator.sample(CAPITALS, 2)
    text = CAPITAL_TEMPLATES[template]
    return Pair(text.format(country=country), text.format(country=other), f" {capital}", f" {other_capital}",
                "capitals", template)


def fits(tokenizer, pair: Pair) -> bool:
    """Both answers one token each and both prompts of one token length, under ``tokenizer``."""
    def length(text: str, special: bool = True) -> int:
        return len(tokenizer(text, add_special_tokens=special)["input_ids"])

    return (length(pair.answer, False) == 1 and length(pair.wrong, False) == 1
            and length(pair.clean) == length(pair.corrupt))
