"""Fuzzing the ``results.json`` loader with hypothesis: whatever a file holds (a truncated document, a field of
the wrong type, huge numbers, deep nesting, random JSON), loading it either gives Results or raises one
``HeadscopeError`` line naming the file; never another exception, and nothing in the file is evaluated."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_results import valid_document

from headscope.errors import HeadscopeError
from headscope.results import Results

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _load_text(path: Path, text: str) -> Results | None:
    """Load ``text`` as a results file; None when refused with one clean line."""
    path.write_text(text, encoding="utf-8")
    try:
        return Results.load(path)
    except HeadscopeError as error:
        message = str(error)
        assert message.startswith(f"{path}: ") and "\n" not in message, message
        return None


def _paths(document, prefix=()):
    """Every path (tuple of keys and indices) into the document."""
    yield prefix
    if isinstance(document, dict):
        for key, value in document.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from _paths(value, (*prefix, index))


DOCUMENT = valid_document()
PATHS = list(_paths(DOCUMENT))[1:]


@FUZZ
@given(cut=st.integers(min_value=0, max_value=len(json.dumps(DOCUMENT)) - 2))
def test_a_truncated_file_is_refused(tmp_path: Path, cut: int) -> None:
    text = json.dumps(DOCUMENT)[:cut]
    assert _load_text(tmp_path / "results.json", text) is None


@FUZZ
@given(where=st.sampled_from(PATHS), value=JSON_VALUES)
def test_any_field_replaced_by_any_json_value_loads_or_is_refused_cleanly(tmp_path: Path, where: tuple,
                                                                          value: object) -> None:
    document = copy.deepcopy(DOCUMENT)
    target = document
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    loaded = _load_text(tmp_path / "results.json", json.dumps(document))
    if loaded is not None:  # what loads saves and loads back equal
        assert Results.load(loaded.save(tmp_path / "again.json")) == loaded


@FUZZ
@given(where=st.sampled_from(PATHS))
def test_any_field_deleted_loads_or_is_refused_cleanly(tmp_path: Path, where: tuple) -> None:
    document = copy.deepcopy(DOCUMENT)
    target = document
    for key in where[:-1]:
        target = target[key]
    del target[where[-1]]
    _load_text(tmp_path / "results.json", json.dumps(document))


@FUZZ
@given(document=JSON_VALUES)
def test_random_json_is_refused(tmp_path: Path, document: object) -> None:
    assert _load_text(tmp_path / "results.json", json.dumps(document)) is None


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deep_nesting_is_refused_not_a_crash(tmp_path: Path, depth: int) -> None:
    for text in ("[" * depth + "]" * depth, '{"analyses": ' + "[" * depth + "]" * depth + "}"):
        assert _load_text(tmp_path / "results.json", text) is None


def test_huge_numbers_and_code_are_data_not_evaluated(tmp_path: Path) -> None:
    document = copy.deepcopy(DOCUMENT)
    document["analyses"]["sinks"]["summary"]["x"] = "__import__('os').system('touch pwned')"
    document["analyses"]["sinks"]["maps"][0]["values"][0][0] = 10**400
    loaded = _load_text(tmp_path / "results.json", json.dumps(document))
    assert loaded is None or loaded["sinks"].summary["x"].startswith("__import__")
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
