"""The Results container and its results.json file: round trip, tidy frames, atomic saves, loud loads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from headscope.errors import HeadscopeError
from headscope.results import STACKS, AnalysisResult, HeadMap, Results, is_stack, to_jsonable


def make_results() -> Results:
    """Three analyses over several stacks, NaN heads, a mixed-type table and unicode tokens."""
    sinks = AnalysisResult(
        name="sinks",
        params={"sink_tokens": (0,), "threshold": np.float32(0.3), "dtype": "float32"},
        maps={
            ("mass", "decoder"): HeadMap(
                np.array([[0.9, 0.1, np.nan], [0.5, np.nan, 0.25]]), stack="decoder", description="sink mass"
            ),
            ("cross_mass", "cross"): HeadMap(np.array([[0.8, 0.7], [0.6, 0.5]]), stack="cross"),
            ("delta", "encoder"): HeadMap(np.array([[-1.5, 2.0]]), stack="encoder", signed=True),
        },
        tables={
            "tokens": pd.DataFrame(
                {
                    "position": [0, 1, 2],
                    "token": ["<|startoftranscript|>", "café", "東京 🚀"],
                    "mass": [0.5, np.nan, 0.125],
                    "is_sink": [True, False, False],
                }
            )
        },
        summary={"top_heads": [(0, 0, 0.9)], "sink_token": "Ġthe", "over_threshold": np.int64(3)},
        seconds=1.25,
    )
    skipped = AnalysisResult(name="vhd", status="skipped", error="the model has no vision stack")
    return Results(
        analyses={"sinks": sinks, "patterns": make_whisper_patterns(), "vhd": skipped},
        provenance={"headscope": "0.1.0", "model": {"hub_id": "openai/whisper-tiny.en"}, "seed": 0},
    )


def make_whisper_patterns() -> AnalysisResult:
    """A Whisper-like analysis: ``entropy`` on the encoder, decoder and cross stacks, plus one more metric."""
    patterns = AnalysisResult(name="patterns", params={"length": 50})
    entropy = "mean attention entropy (nats)"
    patterns.add_map("entropy", HeadMap(np.array([[1.0, 2.0], [3.0, np.nan]]), stack="encoder", description=entropy))
    patterns.add_map("entropy", HeadMap(np.array([[0.5, 0.25], [0.75, 0.125]]), stack="decoder", description=entropy))
    patterns.add_map("induction", HeadMap(np.array([[0.0, 0.9], [0.1, 0.2]]), stack="decoder"))
    patterns.add_map("entropy", HeadMap(np.array([[4.0, 0.0], [2.5, 1.5]]), stack="cross", description=entropy))
    return patterns


def write(path: Path, document: object) -> Path:
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def valid_document() -> dict:
    return make_results().to_dict()


# Round trip


def test_save_then_load_gives_equal_results(tmp_path: Path) -> None:
    results = make_results()

    loaded = Results.load(results.save(tmp_path / "results.json"))

    assert loaded == results
    assert np.isnan(loaded["sinks"].maps[("mass", "decoder")].values[0, 2])
    assert list(loaded["patterns"].maps) == list(results["patterns"].maps)
    assert loaded["patterns"].map("entropy", "cross") == results["patterns"].map("entropy", "cross")
    assert loaded["sinks"].tables["tokens"]["token"].tolist() == ["<|startoftranscript|>", "café", "東京 🚀"]
    assert loaded["sinks"].summary["sink_token"] == "Ġthe"
    assert loaded["vhd"].status == "skipped"
    assert list(loaded) == ["sinks", "patterns", "vhd"]


def test_file_names_its_schema_and_stores_nan_as_null_in_utf8(tmp_path: Path) -> None:
    path = make_results().save(tmp_path / "results.json")

    raw = path.read_bytes()
    document = json.loads(raw.decode("utf-8"))
    assert (document["schema"], document["schema_version"]) == ("headscope.results", 1)
    assert document["analyses"]["sinks"]["maps"][0] == {
        "metric": "mass",
        "stack": "decoder",
        "description": "sink mass",
        "signed": False,
        "unit": "",
        "notable": "high",
        "values": [[0.9, 0.1, None], [0.5, None, 0.25]],
    }
    maps = document["analyses"]["patterns"]["maps"]
    assert [(m["metric"], m["stack"]) for m in maps] == [
        ("entropy", "encoder"),
        ("entropy", "decoder"),
        ("induction", "decoder"),
        ("entropy", "cross"),
    ]
    assert document["analyses"]["sinks"]["tables"]["tokens"] == {
        "columns": ["position", "token", "mass", "is_sink"],
        "rows": [
            [0, "<|startoftranscript|>", 0.5, True],
            [1, "café", None, False],
            [2, "東京 🚀", 0.125, False],
        ],
    }
    assert "東京".encode() in raw
    assert b"NaN" not in raw


def test_maps_that_differ_in_one_head_are_not_equal() -> None:
    values = np.array([[0.1, np.nan]])

    assert HeadMap(values, "self") == HeadMap(values.copy(), "self")
    assert HeadMap(values, "self") != HeadMap(np.array([[0.2, np.nan]]), "self")
    assert HeadMap(values, "self") != HeadMap(values, "cross")


def test_results_with_the_same_maps_added_in_another_order_are_equal() -> None:
    patterns = make_whisper_patterns()
    reordered = AnalysisResult(name="patterns", params={"length": 50}, maps=dict(reversed(patterns.maps.items())))

    assert reordered == patterns
    reordered.maps[("entropy", "cross")].values[0, 0] = 4.5
    assert reordered != make_whisper_patterns()


def test_results_that_differ_in_a_table_cell_are_not_equal() -> None:
    other = make_results()
    other["sinks"].tables["tokens"].loc[1, "token"] = "cafe"

    assert other != make_results()


# Construction


def test_params_and_summary_become_plain_json_on_construction() -> None:
    result = make_results()["sinks"]

    assert result.params == {"sink_tokens": [0], "threshold": pytest.approx(0.3), "dtype": "float32"}
    assert result.summary == {"top_heads": [[0, 0, 0.9]], "sink_token": "Ġthe", "over_threshold": 3}
    assert type(result.summary["over_threshold"]) is int


def test_unstorable_summary_fails_on_construction_naming_the_key() -> None:
    with pytest.raises(TypeError, match=r"summary\['heads'\]\[1\]: a set cannot be stored"):
        AnalysisResult(name="sinks", summary={"heads": [1, {2}]})


def test_head_map_must_be_two_dimensional_and_name_a_known_stack() -> None:
    with pytest.raises(ValueError, match="shape"):
        HeadMap(np.zeros(4), stack="self")
    with pytest.raises(ValueError, match="stack must be one of"):
        HeadMap(np.zeros((2, 2)), stack="speech")


@pytest.mark.parametrize("stack", ["self", "cross", "encoder", "decoder", "vision", "audio", "self:1", "decoder:12"])
def test_a_stack_is_a_base_name_optionally_numbered(stack: str) -> None:
    assert HeadMap(np.zeros((1, 1)), stack=stack).stack == stack
    assert is_stack(stack)


@pytest.mark.parametrize("stack", ["speech", "speech:1", "self:", "self:0", "self:01", "self:x", "self:1:2", "", None])
def test_a_stack_that_is_not_a_base_name_optionally_numbered_is_refused(stack: object) -> None:
    assert not is_stack(stack)
    with pytest.raises(ValueError, match="stack must be one of self, cross, encoder, decoder, vision"):
        HeadMap(np.zeros((1, 1)), stack=stack)  # type: ignore[arg-type]


def test_stacks_lists_the_base_names() -> None:
    assert STACKS == ("self", "cross", "encoder", "decoder", "vision", "audio")


def test_maps_are_keyed_by_metric_and_the_maps_own_stack() -> None:
    head_map = HeadMap(np.zeros((1, 2)), stack="encoder")

    with pytest.raises(ValueError, match=r"key's stack 'decoder' is not the map's stack 'encoder'"):
        AnalysisResult(name="patterns", maps={("entropy", "decoder"): head_map})
    with pytest.raises(ValueError, match="metric name must be a non-empty string"):
        AnalysisResult(name="patterns", maps={("", "encoder"): head_map})
    with pytest.raises(TypeError, match="metric name must be a str"):
        AnalysisResult(name="patterns", maps={(3, "encoder"): head_map})
    with pytest.raises(TypeError, match=r"maps\['entropy'\]: expected a HeadMap under a \(metric, stack\) tuple"):
        AnalysisResult(name="patterns", maps={"entropy": head_map})  # type: ignore[dict-item]


def test_saving_refuses_a_map_put_under_a_key_of_another_stack() -> None:
    results = make_results()
    results["patterns"].maps[("entropy", "vision")] = HeadMap(np.zeros((1, 1)), stack="self")

    with pytest.raises(ValueError, match="key's stack 'vision' is not the map's stack 'self'"):
        results.to_dict()


# Maps by metric and stack


def test_add_map_keys_by_metric_and_stack_and_refuses_a_duplicate() -> None:
    patterns = make_whisper_patterns()

    assert list(patterns.maps) == [
        ("entropy", "encoder"),
        ("entropy", "decoder"),
        ("induction", "decoder"),
        ("entropy", "cross"),
    ]
    with pytest.raises(ValueError, match="already holds a map 'entropy' for stack 'cross'"):
        patterns.add_map("entropy", HeadMap(np.zeros((2, 2)), stack="cross"))
    with pytest.raises(ValueError, match="non-empty string"):
        patterns.add_map("", HeadMap(np.zeros((2, 2)), stack="self"))
    with pytest.raises(TypeError, match="can only add a HeadMap"):
        patterns.add_map("entropy", np.zeros((2, 2)))  # type: ignore[arg-type]
    assert len(patterns.maps) == 4
    patterns.add_map("entropy", HeadMap(np.zeros((2, 2)), stack="self:1"))
    assert patterns.map("entropy", "self:1").values.shape == (2, 2)


def test_metrics_lists_each_metric_once_in_the_order_added() -> None:
    assert make_whisper_patterns().metrics() == ["entropy", "induction"]
    assert AnalysisResult(name="vhd").metrics() == []


def test_map_finds_a_metric_with_or_without_its_stack() -> None:
    patterns = make_whisper_patterns()

    assert patterns.map("entropy", "cross").values[0, 0] == 4.0
    assert patterns.map("entropy", stack="encoder").values[0, 0] == 1.0
    assert patterns.map("induction").stack == "decoder"
    assert patterns.map("induction", "decoder") is patterns.maps[("induction", "decoder")]


def test_map_without_a_stack_for_a_metric_on_several_stacks_lists_them() -> None:
    with pytest.raises(KeyError, match=r"'entropy' for several stacks \['encoder', 'decoder', 'cross'\]; pass stack="):
        make_whisper_patterns().map("entropy")


def test_map_that_does_not_exist_says_what_does() -> None:
    patterns = make_whisper_patterns()

    with pytest.raises(KeyError, match=r"no map 'mass'; its metrics are \['entropy', 'induction'\]"):
        patterns.map("mass")
    with pytest.raises(KeyError, match=r"no map 'induction' for stack 'cross'; it has 'induction' for \['decoder'\]"):
        patterns.map("induction", "cross")


def test_adding_a_second_analysis_with_the_same_name_is_refused() -> None:
    results = make_results()

    with pytest.raises(ValueError, match="already hold an analysis named 'sinks'"):
        results.add(AnalysisResult(name="sinks"))
    results.add(AnalysisResult(name="retrieval"))
    assert list(results) == ["sinks", "patterns", "vhd", "retrieval"]


def test_asking_for_a_missing_analysis_lists_those_held() -> None:
    with pytest.raises(KeyError, match=r"no analysis 'retrieval'.*\['patterns', 'sinks', 'vhd'\]"):
        make_results()["retrieval"]


# to_jsonable


def test_to_jsonable_converts_numpy_tuples_paths_and_non_finite_numbers() -> None:
    value = {
        "a": np.arange(3),
        "b": (np.float64(0.5), np.bool_(True)),
        "c": Path("x") / "y.txt",
        "d": [float("nan"), float("inf"), pd.NA],
    }

    expected = {"a": [0, 1, 2], "b": [0.5, True], "c": str(Path("x/y.txt")), "d": [None, None, None]}
    assert to_jsonable(value) == expected


def test_to_jsonable_writes_a_torch_dtype_as_its_name() -> None:
    torch = pytest.importorskip("torch")

    assert to_jsonable({"dtype": torch.bfloat16}) == {"dtype": "torch.bfloat16"}


def test_to_jsonable_refuses_non_string_keys_naming_where() -> None:
    with pytest.raises(TypeError, match=r"params\['layers'\]: key 3 is not a str"):
        to_jsonable({"layers": {3: "x"}}, "params")


# to_frame


def test_to_frame_gives_one_tidy_row_per_layer_and_head() -> None:
    results = Results()
    results.add(
        AnalysisResult(
            name="patterns",
            maps={
                ("induction", "self"): HeadMap(np.array([[0.0, 0.5], [np.nan, 1.0]]), stack="self"),
                ("entropy", "cross"): HeadMap(np.array([[2.0, 3.0]]), stack="cross"),
                ("entropy", "self:1"): HeadMap(np.array([[4.0]]), stack="self:1"),
            },
        )
    )

    expected = pd.DataFrame(
        {
            "analysis": ["patterns"] * 7,
            "stack": ["self"] * 4 + ["cross"] * 2 + ["self:1"],
            "metric": ["induction"] * 4 + ["entropy"] * 3,
            "layer": np.array([0, 0, 1, 1, 0, 0, 0], dtype="int64"),
            "head": np.array([0, 1, 0, 1, 0, 1, 0], dtype="int64"),
            "value": [0.0, 0.5, np.nan, 1.0, 2.0, 3.0, 4.0],
        }
    )
    pd.testing.assert_frame_equal(results.to_frame(), expected)


def test_to_frame_of_results_without_maps_has_the_tidy_columns() -> None:
    frame = Results(analyses={"vhd": AnalysisResult(name="vhd", status="skipped")}).to_frame()

    assert list(frame.columns) == ["analysis", "stack", "metric", "layer", "head", "value"]
    assert frame.empty
    assert (frame["layer"].dtype, frame["value"].dtype) == ("int64", "float64")


# top_heads


def test_top_heads_ranks_highest_first_skipping_nan_and_keeping_ties_in_order() -> None:
    result = AnalysisResult(
        name="retrieval",
        maps={("score", "self"): HeadMap(np.array([[0.2, np.nan, 0.9], [0.9, 0.1, np.nan]]), stack="self")},
    )

    assert result.top_heads("score", k=3) == [(0, 2, 0.9), (1, 0, 0.9), (0, 0, 0.2)]
    assert result.top_heads("score", k=10) == [(0, 2, 0.9), (1, 0, 0.9), (0, 0, 0.2), (1, 1, 0.1)]
    assert result.top_heads("score", k=0) == []


def test_top_heads_finds_its_map_by_metric_and_stack() -> None:
    patterns = make_whisper_patterns()

    assert patterns.top_heads("entropy", k=2, stack="cross") == [(0, 0, 4.0), (1, 0, 2.5)]
    assert patterns.top_heads("entropy", k=2, stack="encoder") == [(1, 0, 3.0), (0, 1, 2.0)]
    assert patterns.top_heads("induction", k=1) == [(0, 1, 0.9)]


def test_top_heads_refuses_an_ambiguous_or_missing_map() -> None:
    patterns = make_whisper_patterns()

    with pytest.raises(KeyError, match="several stacks"):
        patterns.top_heads("entropy")
    with pytest.raises(KeyError, match="no map 'induction' for stack 'encoder'"):
        patterns.top_heads("induction", stack="encoder")
    with pytest.raises(KeyError, match="no map 'mass'"):
        patterns.top_heads("mass")
    with pytest.raises(ValueError, match="k must be 0 or more"):
        patterns.top_heads("induction", k=-1)


# Atomic save


def test_failed_serialisation_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = make_results().save(tmp_path / "results.json")
    before = path.read_bytes()
    broken = make_results()
    broken["sinks"].tables["tokens"]["token"] = [object(), "a", "b"]

    with pytest.raises(TypeError, match=r"tables\['tokens'\]\['token'\]\[0\]: a object cannot be stored"):
        broken.save(path)

    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["results.json"]


def test_failed_write_keeps_the_previous_file_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_results().save(tmp_path / "results.json")
    before = path.read_bytes()

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        Results().save(path)

    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["results.json"]


# Loading files that are wrong


def test_loading_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(HeadscopeError, match=r"results\.json: no such file"):
        Results.load(tmp_path / "results.json")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ('{"schema": NaN}', "NaN is not JSON"),
        ("[]", "the top level is a list, not an object"),
    ],
)
def test_loading_text_that_is_not_json_says_so(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "results.json"
    path.write_text(text, encoding="utf-8")

    with pytest.raises(HeadscopeError, match=message) as caught:
        Results.load(path)
    assert str(caught.value).startswith(f"{path}: ")


DELETE = object()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("schema", "other.tool", "not a headscope results file (expected schema 'headscope.results'"),
        ("schema_version", 2, "written by a newer headscope (schema_version 2, this one reads up to 1)"),
        ("schema_version", "1", "malformed field schema_version: must be an integer, found a string"),
        ("provenance", DELETE, "missing field provenance"),
        ("analyses.sinks.status", "done", "field analyses.sinks: status must be one of ok, failed, skipped"),
        ("analyses.sinks.seconds", True, "sinks.seconds: must be a number, found true or false"),
        ("analyses.vhd.error", 3, "field analyses.vhd.error: must be a string or null, found an integer"),
        ("analyses.vhd.tables", [], "field analyses.vhd.tables: must be an object, found a list"),
        ("analyses.sinks.maps", {}, "field analyses.sinks.maps: must be a list, found an object"),
        ("analyses.sinks.maps", DELETE, "missing field analyses.sinks.maps"),
        ("analyses.sinks.maps.1", "cross_mass", "field analyses.sinks.maps[1]: must be an object, found a string"),
        ("analyses.sinks.maps.0.metric", DELETE, "missing field analyses.sinks.maps[0].metric"),
        ("analyses.sinks.maps.0.metric", 3, "field analyses.sinks.maps[0].metric: must be a string, found an integer"),
        ("analyses.sinks.maps.0.metric", "", "field analyses.sinks.maps[0].metric: must be a non-empty string"),
        ("analyses.sinks.maps.0.stack", DELETE, "missing field analyses.sinks.maps[0].stack"),
        ("analyses.sinks.maps.0.stack", "speech", "field analyses.sinks.maps[0]: stack must be one of"),
        ("analyses.sinks.maps.0.stack", "self:0", "field analyses.sinks.maps[0]: stack must be one of"),
        ("analyses.sinks.maps.0.signed", "no", "sinks.maps[0].signed: must be true or false, found a string"),
        ("analyses.sinks.maps.0.values", [[1.0, 2.0], [3.0]], "maps[0].values: must be a non-empty layers x"),
        ("analyses.sinks.maps.0.values", [], "maps[0].values: must be a non-empty layers x heads"),
        ("analyses.sinks.maps.0.values", [["0.5", 1.0]], "maps[0].values: must hold only numbers and null"),
        ("analyses.patterns.maps.3.stack", "decoder", "patterns.maps[3]: duplicate map 'entropy' for stack 'decoder'"),
        ("analyses.sinks.tables.tokens.rows", [[1, "café"]], "tokens.rows: each row must be a list of 4"),
        ("analyses.sinks.tables.tokens.columns", [7, "a", "b", "c"], "tokens.columns: must be a list of str"),
    ],
)
def test_loading_a_malformed_file_names_the_file_and_the_fault(
    tmp_path: Path, field: str, value: object, message: str
) -> None:
    document = valid_document()
    *parents, last = field.split(".")
    target = document
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    index = int(last) if isinstance(target, list) else last
    if value is DELETE:
        del target[index]
    else:
        target[index] = value
    path = write(tmp_path / "results.json", document)

    with pytest.raises(HeadscopeError) as caught:
        Results.load(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_fields_a_reader_does_not_know_are_ignored(tmp_path: Path) -> None:
    document = valid_document()
    document["comment"] = "added by a later minor release"
    document["analyses"]["sinks"]["maps"][0]["colour_scale"] = "viridis"

    assert Results.load(write(tmp_path / "results.json", document)) == make_results()


def test_an_analysis_gives_its_own_tidy_frame() -> None:
    results = make_results()
    for name, result in results.items():
        mine = result.to_frame()
        everything = results.to_frame()
        expected = everything[everything["analysis"] == name].reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, expected)
