"""The front door: ``headscope.run``, a result's ``.plot()``, ``.top_heads()`` and summary, ``patterns_of``,
``headscope analyses`` and analyses registered by another package."""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
import reference as ref
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

import headscope
from headscope import progress, registry
from headscope.probes import inputs
from headscope.results import AnalysisResult, HeadMap, Results

REPO = Path(__file__).resolve().parents[1]
TEXT = "The lighthouse keeper climbed the stairs. The lighthouse keeper climbed the stairs again."


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "headscope", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


# --- headscope.run ------------------------------------------------------------------------------------------


def test_run_gives_what_the_cli_writes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = headscope.run("sinks", tiny_llama_dir, TEXT, eps=0.25)
    done = cli("analyze", str(tiny_llama_dir), "--analyses", "sinks", "--text", TEXT, "--set", "sinks.eps=0.25",
               "--out", str(tmp_path), "--figures", "none", "-q")
    assert done.returncode == 0, done.stderr
    saved = Results.load(tmp_path / "results.json")["sinks"]
    assert result.maps == saved.maps
    assert result.summary.eps == saved.summary["eps"] == 0.25
    assert result.summary.sink_rate_self == saved.summary["sink_rate_self"]


def test_run_takes_a_transformers_model_and_its_tokenizer(tiny_llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    by_path = headscope.run("summary", tiny_llama_dir, TEXT)
    assert headscope.run("summary", (model, tokenizer), TEXT).maps == by_path.maps
    assert headscope.run("summary", model, TEXT, processor=tokenizer).maps == by_path.maps
    with pytest.raises(headscope.HeadscopeError, match="needs its tokenizer or processor"):
        headscope.run("summary", model, TEXT)


@pytest.mark.parametrize(("params", "message"), [
    ({"eps": "high"}, "sinks.eps takes a number, not 'high'"),
    ({"eps": True}, "sinks.eps takes a number, not True"),
    ({"protocol": "nope"}, "sinks.protocol takes one of 'prose', 'gu', not 'nope'"),
    ({"bogus": 1}, "unknown sinks parameter(s) bogus: the parameters are sink_positions, eps"),
    ({"eps": 1.5}, "eps and token_threshold must lie between 0 and 1"),
])
def test_run_refuses_a_bad_parameter_naming_it(tiny_llama_dir: Path, params: dict, message: str) -> None:
    with pytest.raises(headscope.HeadscopeError) as error:
        headscope.run("sinks", tiny_llama_dir, TEXT, **params)
    assert message in str(error.value)


def test_no_text_turns_silently_into_false() -> None:
    vhd = registry.get("vhd")
    assert vhd.read_params({"vhr": "no"}).vhr is False
    assert vhd.read_params({"vhr": "True"}).vhr is True
    for wrong in ("flase", "2", "maybe", ""):
        with pytest.raises(headscope.HeadscopeError, match=r"vhd\.vhr takes true or false"):
            vhd.read_params({"vhr": wrong})


def test_run_refuses_an_analysis_that_does_not_fit(tiny_bert_dir: Path) -> None:
    with pytest.raises(headscope.HeadscopeError, match="analysis 'retrieval' does not fit a encoder model"):
        headscope.run("retrieval", tiny_bert_dir)


# --- one result: plot, top heads, summary, save -------------------------------------------------------------


def test_plot_draws_every_figure_or_the_one_named_also_from_a_loaded_result(tiny_llama_dir: Path,
                                                                             tmp_path: Path) -> None:
    result = headscope.run("sinks", tiny_llama_dir, TEXT)
    drawn = result.plot()
    heatmaps = {f"{metric}-{stack}" for metric, stack in result.maps}
    assert heatmaps < set(drawn) and all(isinstance(f, go.Figure) for f in drawn.values())
    assert set(drawn) - heatmaps == set(registry.get("sinks").figures(result))  # the analysis's own figures
    figure = result.plot("sink_score")
    np.testing.assert_array_equal(np.asarray(figure.data[0].z, dtype=float), result.map("sink_score").values)
    with pytest.raises(KeyError, match="has no figure 'sink_rate'; its figures are"):
        result.plot("sink_rate")

    loaded = Results.load(result.save(tmp_path / "results.json"))["sinks"]
    assert loaded == result
    assert set(loaded.plot()) == set(drawn)
    assert loaded.map("sink_score").metric == "sink_score"
    np.testing.assert_array_equal(np.asarray(loaded.map("sink_score").plot().data[0].z, dtype=float),
                                  result.map("sink_score").values)


def test_top_heads_ranks_the_notable_end_and_never_ranks_labels() -> None:
    values = np.array([[0.5, -3.85, 2.0], [23.4, 0.1, -0.2]])
    result = AnalysisResult("importance", summary={"main_metric": "ablation"})
    result.add_map("ablation", HeadMap(values, "self", signed=True))  # signed: the largest magnitude
    result.add_map("entropy", HeadMap(values, "self", notable="low", unit="nats"))
    result.add_map("cluster", HeadMap(np.array([[0.0, 1.0, 1.0], [2.0, 0.0, 2.0]]), "self", notable="label"))
    assert result.top_heads(k=2) == [(1, 0, 23.4), (0, 1, -3.85)]  # the main metric when none is named
    assert result.top_heads("entropy", k=2) == [(0, 1, -3.85), (1, 2, -0.2)]
    assert HeadMap(values, "self").top(1) == [(1, 0, 23.4)]
    assert result.top_heads(k=1, notable="low") == [(0, 1, -3.85)]  # the head that most lowers a task metric
    assert result.top_heads("entropy", k=1, notable="high") == [(1, 0, 23.4)]
    with pytest.raises(ValueError, match="notable must be one of high, low, magnitude; got 'label'"):
        result.top_heads(notable="label")
    with pytest.raises(ValueError, match="holds labels"):
        result.top_heads("cluster")
    with pytest.raises(ValueError, match="notable must be one of"):
        HeadMap(values, "self", notable="largest")


def test_summary_reads_by_attribute_and_a_missing_key_names_the_ones_there() -> None:
    result = AnalysisResult("sinks", summary={"sink_rate_self": 0.75, "eps": 0.3})
    assert result.summary.sink_rate_self == result.summary["sink_rate_self"] == 0.75
    with pytest.raises(AttributeError, match=r"no summary key 'sink_rate'; the keys are \['sink_rate_self', 'eps'\]"):
        _ = result.summary.sink_rate
    with pytest.raises(KeyError, match="the keys are"):
        result.summary["sink_rate"]
    result.summary = {"tokens": 3}  # however it is set
    assert result.summary.tokens == 3


# --- patterns after the fact --------------------------------------------------------------------------------


def test_patterns_of_equal_eager_attention_with_readable_tokens(tiny_llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    patterns = headscope.patterns_of((model, tokenizer), TEXT, heads=[(0, 1), (1, 3)])
    inputs = tokenizer(TEXT, return_tensors="pt")
    want = ref.forward_attention(ref.eager_copy(model), "decoder", dict(inputs))["self"]
    assert patterns.heads() == [(0, 1), (1, 3)]
    for layer, head in patterns.heads():
        ref.assert_matches_eager(patterns.map(layer, head), want[layer].probs[0, head], want[layer].exact[0, head])
    queries, keys = patterns.tokens["self"]
    assert queries == keys == [tokenizer.decode([i]) for i in inputs["input_ids"][0].tolist()]
    assert not any("Ġ" in token for token in keys) and " lighthouse" in "".join(keys)
    figure = patterns.plot(1, 3)
    np.testing.assert_array_equal(np.asarray(figure.data[0].z), patterns.map(1, 3))
    assert len(set(figure.data[0].x)) == len(keys)  # repeated tokens stay apart on the axis
    assert len(patterns.plot_heads().data) == 2 and len(patterns.plot_grid().data) == 2
    with pytest.raises(KeyError, match=r"no pattern of head 0\.0"):
        patterns.map(0, 0)


def test_the_grid_view_draws_deep_models_with_a_gap_between_heads() -> None:
    """A grid of 120 layers x 16 heads (plotly refuses a fixed gap past 1 / (rows - 1)) keeps every head apart."""
    tokens = ["a", "b", "c"]
    maps = {("self", layer, head): np.eye(3, dtype=np.float32) for layer in range(120) for head in range(16)}
    figure = headscope.Patterns(maps, {"self": (tokens, tokens)}, ["self"]).plot_grid()
    assert len(figure.data) == 120 * 16
    rows = sorted({tuple(figure.layout[name].domain) for name in figure.layout if name.startswith("yaxis")})
    assert len(rows) == 120 and all(below[1] < above[0] for below, above in itertools.pairwise(rows))


def test_patterns_of_an_encoder_decoder_hold_cross_attention(tiny_t5_dir: Path) -> None:
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_t5_dir)
    patterns = headscope.patterns_of((model, tokenizer), TEXT, heads=[("cross", 1, 2), ("encoder", 0, 0)])
    assert patterns.stacks == ["cross", "encoder"]
    queries, keys = patterns.tokens["cross"]
    source = tokenizer(TEXT, return_tensors="pt")
    assert patterns.map(1, 2, "cross").shape == (len(queries), source["input_ids"].shape[1]) == \
        (len(queries), len(keys))
    np.testing.assert_allclose(patterns.map(1, 2, "cross").sum(-1), 1.0, atol=ref.FLOAT32_EPS * len(keys) * 4)


def test_patterns_of_every_head_is_refused_past_the_budget(tiny_llama_dir: Path) -> None:
    all_heads = headscope.patterns_of(tiny_llama_dir, TEXT)
    assert len(all_heads.maps) == 2 * 4
    with pytest.raises(headscope.HeadscopeError, match=r"the patterns of 8 heads on \d+ tokens need .* over "
                                                       r"memory_gib=1e-06"):
        headscope.patterns_of(tiny_llama_dir, TEXT, memory_gib=1e-6)
    with pytest.raises(headscope.HeadscopeError, match=r"no head 5\.0 in stack 'self': it has 2 layers of 4 heads"):
        headscope.patterns_of(tiny_llama_dir, TEXT, heads=[(5, 0)])


# --- listing and extending ----------------------------------------------------------------------------------


def test_headscope_analyses_lists_every_analysis_with_its_parameters() -> None:
    done = cli("analyses")
    assert done.returncode == 0, done.stderr
    for name in registry.list_analyses():
        analysis = registry.get(name)
        assert f"{name}: {analysis.description}" in " ".join(done.stdout.split())
        for parameter, _, _, doc in analysis.parameters():
            assert parameter in done.stdout
            assert doc, f"{name}.{parameter} has no line in its Params docstring"
    one = cli("analyses", "sinks")
    assert "eps" in one.stdout and "retrieval" not in one.stdout


def test_each_analysis_states_the_cost_its_benchmark_measured() -> None:
    """``headscope analyses`` and README quote ``benchmarks/results/costs-cpu.json``: each measured cell, none
    missing, the same seconds (README rounds to whole seconds, the cost line to a few words)."""
    measured = json.loads((REPO / "benchmarks" / "results" / "costs-cpu.json").read_text())["rows"]
    assert {row["analysis"] for row in measured} == set(registry.list_analyses())
    assert all(row["status"] == "ok" for row in measured)
    readme = (REPO / "README.md").read_text().splitlines()
    header = next(line for line in readme if line.startswith("| analysis | smollm2-135m"))
    models = [cell.strip() for cell in header.strip("|").split("|")][1:]
    table = {}
    for line in readme[readme.index(header) + 2:]:
        if not line.startswith("|"):
            break
        name, *cells = (cell.strip() for cell in line.strip("|").split("|"))
        table[name.split()[0]] = dict(zip(models, cells, strict=True))
    for row in measured:
        assert table[row["analysis"]][row["model"]] == f"{row['seconds']:.0f}", row
        assert row["model"] in registry.get(row["analysis"]).cost, row
    assert sum(cell != "" for cells in table.values() for cell in cells.values()) == len(measured)


EXTENDING = REPO / "docs" / "extending.md"


def docs_example(page: Path, language: str = "python") -> str:
    """The first ``language`` code block of a docs page."""
    text = page.read_text()
    start = text.index(f"```{language}\n") + len(language) + 4
    return text[start:text.index("```", start)]


def test_an_analysis_of_another_package_shows_up_in_the_cli(tiny_llama_dir: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "previous_plugin").mkdir(parents=True)
    (site / "previous_plugin" / "__init__.py").write_text(docs_example(EXTENDING))
    assert 'previous = "previous_plugin"' in docs_example(EXTENDING, "toml")
    info = site / "previous_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: previous-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[headscope.analyses]\nprevious = previous_plugin\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}

    listed = cli("analyses", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "previous: mean attention on the token OFFSET back" in listed.stdout and "offset" in listed.stdout
    done = cli("analyze", str(tiny_llama_dir), "--analyses", "previous", "--set", "previous.offset=2", "--text",
               TEXT, "--out", str(tmp_path / "out"), "--figures", "none", "-q", env=env)
    assert done.returncode == 0, done.stderr
    saved = json.loads((tmp_path / "out" / "results.json").read_text())["analyses"]["previous"]
    assert saved["status"] == "ok" and saved["params"] == {"offset": 2}
    bad = cli("analyze", str(tiny_llama_dir), "--analyses", "previous", "--set", "previous.offset=two",
              "--out", str(tmp_path / "bad"), "-q", env=env)
    assert bad.returncode == 2 and bad.stderr.strip() == "headscope: error: previous.offset takes an integer, not 'two'"
    zero = cli("analyze", str(tiny_llama_dir), "--analyses", "previous", "--set", "previous.offset=0",
               "--out", str(tmp_path / "bad"), "-q", env=env)
    assert zero.returncode == 2 and zero.stderr.strip() == "headscope: error: previous.offset must be at least 1, got 0"

    loaded = headscope.load(tiny_llama_dir)  # the docs' reducer equals the built-in OffsetMass on the same probe
    probe = inputs.build(loaded, TEXT)
    offset = headscope.OffsetMass(offset=2)
    with torch.no_grad(), headscope.Scope(loaded.model).capture(offset):
        loaded.model(**probe.inputs)
    np.testing.assert_allclose(np.array(saved["maps"][0]["values"]), offset.result()["self"], rtol=0,
                               atol=ref.SLACK * ref.FLOAT32_EPS * len(probe.tokens))
    assert float(offset.result()["self"].std()) > 0.01  # the heads differ: the comparison has teeth


# --- the README's example, as written -----------------------------------------------------------------------


@pytest.mark.slow
def test_the_readme_python_example_runs_as_written() -> None:
    readme = REPO / "README.md"
    code = docs_example(readme)
    assert len([line for line in code.splitlines() if line.startswith("result")]) == 3
    scope: dict = {}
    exec(compile(code, str(readme), "exec"), scope)  # the README's own code
    result = scope["result"]
    top = result.top_heads()
    sink_score = result.map("sink_score")
    assert top == sink_score.top(5) and len(top) == 5
    assert sink_score.values.shape == (30, 9)
    assert [value for *_, value in top] == sorted((value for *_, value in top), reverse=True)
    assert top[0][2] > 0.99 and top[-1][2] > 0.5  # SmolLM2's strongest sink heads put ~all their mass on token 0
    figure = result.plot("sink_score")
    np.testing.assert_array_equal(np.asarray(figure.data[0].z, dtype=float), sink_score.values)


# --- long work tells where it is ----------------------------------------------------------------------------


def test_plain_progress_says_counts_and_time_left_and_nothing_before_the_first_step() -> None:
    stream = io.StringIO()
    with progress.reporting(progress.Plain(stream, every=0)):
        assert list(progress.steps(["a", "b", "c"], "work")) == ["a", "b", "c"]
        with pytest.raises(RuntimeError):
            for _ in progress.steps(range(5), "refused"):
                raise RuntimeError  # bad input found at the first item: no line
    lines = stream.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["headscope: work: 1/3", "headscope: work: 2/3",
                                                      "headscope: work: 3/3", "headscope: work: 3/3"]
    assert "left" in lines[0] and lines[-1].endswith("elapsed, done")


def test_a_long_analysis_reports_its_steps_where_output_is_not_a_terminal(tiny_llama_dir: Path,
                                                                           tmp_path: Path) -> None:
    done = cli("analyze", str(tiny_llama_dir), "--analyses", "importance", "--text", TEXT, "--set",
               "importance.ablations=zero", "--set", "importance.batch_size=4", "--set", "importance.random_orders=1",
               "--out", str(tmp_path), "--figures", "none")
    assert done.returncode == 0, done.stderr
    passes = [line for line in done.stderr.splitlines() if line.startswith("headscope: importance: zero ablation")]
    assert passes[0].startswith("headscope: importance: zero ablation passes: 1/2, ") and "left" in passes[0]
    assert passes[-1].startswith("headscope: importance: zero ablation passes: 2/2, ") and passes[-1].endswith("done")
    assert "Warning" not in done.stderr and "it/s" not in done.stderr  # no transformers warnings or tqdm bars


def test_summary_decodes_an_encoder_decoder_whose_decoder_is_deeper(tiny_t5_dir: Path) -> None:
    """The tiny T5's decoder has 3 layers to its encoder's 2: transformers sizes the cache by the encoder's."""
    result = headscope.run("summary", tiny_t5_dir, TEXT)
    assert {stack for _, stack in result.maps} == {"encoder", "decoder", "cross"}
    assert result.map("entropy", "decoder").values.shape == (3, 4) and result.summary.tokens > 1


def test_the_results_format_example_names_only_fields_a_real_run_writes(tiny_t5_dir: Path, tmp_path: Path) -> None:
    from headscope.models.load import _resolve

    example = json.loads(docs_example(REPO / "docs" / "results-format.md", "json"))
    Results.from_dict(example, "the docs' example")  # a valid file
    done = cli("analyze", str(tiny_t5_dir), "--analyses", "summary,sinks", "--set", "sinks.eps=0.3", "--out",
               str(tmp_path), "--figures", "none", "-q")
    assert done.returncode == 0, done.stderr
    real = json.loads((tmp_path / "results.json").read_text())
    assert set(example) == set(real)
    assert set(example["provenance"]) <= set(real["provenance"])
    assert set(example["provenance"]["model"]) == set(_resolve("whisper-tiny.en", None)[1])
    for name, shown in example["analyses"].items():
        assert set(shown) == set(real["analyses"]["summary"])
        if shown["status"] != "ok":
            continue
        written = real["analyses"][name]
        assert set(shown["params"]) <= set(written["params"]), name
        assert set(shown["summary"]) <= set(written["summary"]), name
        keys = {(m["metric"], m["stack"]) for m in written["maps"]}
        assert {(m["metric"], m["stack"]) for m in shown["maps"]} <= keys, name
        for entry in shown["maps"]:
            assert set(entry) == set(written["maps"][0]), name
        for table, body in shown["tables"].items():
            assert set(body["columns"]) <= set(written["tables"][table]["columns"]), (name, table)
