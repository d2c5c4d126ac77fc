"""Interrupted and resumed runs: a ``headscope analyze`` killed at any point leaves ``results.json`` absent or
complete; ``--resume`` keeps the finished analyses made with the same model, input, options, versions and
parameters, runs the rest, and ends with the results of an uninterrupted run. SIGINT and SIGTERM stop with one
line (exit codes 130 and 143)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models as tm
from cli_runner import run_cli

from headscope import registry
from headscope.results import AnalysisResult, Results

ANALYSES = ["summary", "patterns", "sinks"]
ARGS = ["-a", ",".join(ANALYSES), "--figures", "html", "-q"]
PAUSED_CLI = Path(__file__).with_name("paused_cli.py")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with tm.one_thread():  # the subprocesses run on one thread too (OMP_NUM_THREADS=1): the same sums, bit for bit
        yield


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path, tmp_path_factory) -> Path:
    """The out folder of an uninterrupted run."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert run_cli("analyze", str(tiny_llama_dir), *ARGS, "--out", str(out)) == 0
    return out


def without_timing(result: AnalysisResult) -> AnalysisResult:
    return dataclasses.replace(result, seconds=0.0)


def assert_same_results(out: Path, reference: Path) -> None:
    """Maps, tables, summaries and parameters equal those of the uninterrupted run (timings aside); the same
    figures and a report were written."""
    results, expected = Results.load(out / "results.json"), Results.load(reference / "results.json")
    assert list(results) == list(expected)
    for name in expected:
        assert without_timing(results[name]) == without_timing(expected[name]), name
    figures = [sorted(p.name for p in (folder / "figures").iterdir()) for folder in (out, reference)]
    assert figures[0] == figures[1]
    assert (out / "report.html").is_file()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".write-test")]


def saved_analyses(out: Path) -> list[str] | None:
    """The analyses in ``out/results.json`` (None when there is no file); fails unless the file is complete."""
    try:
        return list(Results.load(out / "results.json"))  # raises on a torn or malformed file
    except Exception:
        if not (out / "results.json").exists():
            return None
        raise


STOPS: dict[str, tuple[int, str]] = {
    "sigkill-inside-the-second-analysis": (signal.SIGKILL, "analysis:patterns"),
    "sigkill-inside-the-third-analysis": (signal.SIGKILL, "analysis:sinks"),
    "sigkill-during-figures-and-report": (signal.SIGKILL, "figures"),
    "sigkill-while-results-json-is-replaced": (signal.SIGKILL, "writing:2"),
    "sigint": (signal.SIGINT, "analysis:patterns"),
    "sigterm": (signal.SIGTERM, "analysis:patterns"),
}
"""Each run, the signal it gets and the point it waits at for it (:mod:`paused_cli`): inside the second analysis,
inside the third, while figures are written, and between writing the second version of results.json in full and
moving it over the first."""


def saved_before(point: str) -> list[str]:
    """The analyses a run has saved when it reaches ``point``: those before the analysis named, those of the
    previous write, or all of them."""
    where, _, name = point.partition(":")
    if where == "analysis":
        return ANALYSES[: ANALYSES.index(name)]
    return ANALYSES[: int(name) - 1] if where == "writing" else list(ANALYSES)


def _python_handles_sigint() -> None:  # a background job may inherit SIGINT ignored
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(model: Path, out: Path, log: Path, point: str) -> subprocess.Popen:
    """``headscope analyze`` in a real process, on one thread, offline, that waits at ``point`` (its stdout says
    when it got there)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with log.open("w") as stderr:
        return subprocess.Popen([sys.executable, str(PAUSED_CLI), point, "analyze", str(model), *ARGS, "--out",
                                 str(out)], env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                preexec_fn=_python_handles_sigint)


@pytest.fixture(scope="module")
def stopped(tiny_llama_dir: Path, tmp_path_factory) -> dict[str, tuple[subprocess.Popen, Path]]:
    """The runs of :data:`STOPS`, all started at once, each signalled once it says it waits at its point: process
    and out folder. The logs beside the folders hold each one's stderr."""
    folder = tmp_path_factory.mktemp("stopped")
    runs = {name: (spawn(tiny_llama_dir, folder / name, folder / f"{name}.log", point), folder / name)
            for name, (_, point) in STOPS.items()}
    for name, (process, _) in runs.items():
        signal_number, point = STOPS[name]
        said = process.stdout.readline()  # blocks until the run is at its point (or has ended)
        assert said == f"paused at {point}\n", (said, (folder / f"{name}.log").read_text())
        process.send_signal(signal_number)
    for process, _ in runs.values():
        process.wait(timeout=120)
        process.stdout.close()
    return runs


@pytest.mark.parametrize("point", [name for name in STOPS if name.startswith("sigkill")])
def test_sigkill_at_any_point_leaves_complete_results_and_resume_finishes_the_rest(
    point: str, stopped, tiny_llama_dir: Path, reference: Path, capsys: pytest.CaptureFixture,
) -> None:
    process, out = stopped[point]
    kept = saved_before(STOPS[point][1])
    assert process.returncode == -signal.SIGKILL
    assert saved_analyses(out) == kept  # complete and loadable, nothing torn, nothing of the analysis killed
    # only a kill inside a write leaves the temporary file of the new version, which --resume removes
    assert len(list(out.glob(".results.json.*.tmp"))) == STOPS[point][1].startswith("writing:")
    before = Results.load(out / "results.json")
    capsys.readouterr()
    assert run_cli("analyze", str(tiny_llama_dir), *ARGS, "--out", str(out), "--resume") == 0
    rest = [name for name in ANALYSES if name not in kept]
    assert capsys.readouterr().err.splitlines() == [  # and no note of figures or views that failed on kept results
        f"note: --resume: kept {', '.join(kept)} from {out / 'results.json'}; running {', '.join(rest) or 'nothing'}"]
    after = Results.load(out / "results.json")
    for name in kept:  # kept as saved, timing included: not run again
        assert after[name] == before[name]
    assert after.provenance["resumed"] == kept
    assert_same_results(out, reference)


@pytest.mark.parametrize(("name", "code", "word"), [("sigint", 130, "interrupted"), ("sigterm", 143, "terminated")])
def test_sigint_and_sigterm_stop_with_one_line_and_complete_results(name: str, code: int, word: str,
                                                                    stopped) -> None:
    process, out = stopped[name]
    log = out.with_name(f"{name}.log").read_text()
    assert process.returncode == code, log
    assert log.splitlines() == [f"headscope: error: {word}: the analyses finished so far are in "
                                f"{out / 'results.json'}; add --resume to run only the rest"]
    assert saved_analyses(out) == saved_before(STOPS[name][1]) == ANALYSES[:1]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".write-test")]


# --- what --resume keeps and what it runs again, in-process ---------------------------------------------------


def run_in(out: Path, model: Path, *args: str, capsys: pytest.CaptureFixture) -> tuple[int, Results, str]:
    capsys.readouterr()
    code = run_cli("analyze", str(model), "--figures", "none", "-q", "--out", str(out), *args)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: --resume")]
    assert len(notes) <= 1
    return code, Results.load(out / "results.json"), notes[0] if notes else ""


@pytest.mark.parametrize(("change", "named"), [
    (["--text", "a different text to read"], "input"),
    (["--seed", "1"], "--seed"),
    (["--max-tokens", "32"], "--max-tokens"),
    (["--dtype", "bfloat16"], "--dtype"),
])
def test_resume_against_a_different_run_runs_everything_again_and_says_why(
    change: list[str], named: str, tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    _, first, _ = run_in(tmp_path, tiny_llama_dir, "-a", "summary", capsys=capsys)
    code, again, note = run_in(tmp_path, tiny_llama_dir, "-a", "summary", "--resume", *change, capsys=capsys)

    assert code == 0
    assert note == (f"note: --resume: {tmp_path / 'results.json'} differs from this run in {named}; "
                    "running every analysis again")
    assert again["summary"].seconds != first["summary"].seconds
    assert again.provenance["resumed"] == []
    fresh = tmp_path / "fresh"
    assert run_cli("analyze", str(tiny_llama_dir), "-a", "summary", *change, "--figures", "none", "-q", "--out",
                   str(fresh)) == 0
    assert without_timing(again["summary"]) == without_timing(Results.load(fresh / "results.json")["summary"])


def test_resume_reruns_only_the_analysis_whose_parameters_changed(tiny_llama_dir: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    _, first, _ = run_in(tmp_path, tiny_llama_dir, "-a", "summary,patterns", "--set", "patterns.length=8",
                         capsys=capsys)
    code, again, note = run_in(tmp_path, tiny_llama_dir, "-a", "summary,patterns", "--set", "patterns.length=10",
                               "--resume", capsys=capsys)

    assert code == 0
    assert note == (f"note: --resume: kept summary from {tmp_path / 'results.json'}; "
                    "running patterns (parameters changed)")
    assert again["summary"] == first["summary"]
    assert again["patterns"].params["length"] == 10 and first["patterns"].params["length"] == 8


def test_resume_runs_failed_and_newly_named_analyses_again(tiny_llama_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    from headscope.analyses import summary

    registry.list_analyses()
    calls = []

    def flaky(context):
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("out of luck the first time")
        return dataclasses.replace(summary.run(context), name="flaky")

    registry.register("flaky", kinds=("decoder",), description="fails on its first run")(flaky)
    try:
        code, first, _ = run_in(tmp_path, tiny_llama_dir, "-a", "summary,flaky", capsys=capsys)
        assert code == 1 and first["flaky"].status == "failed"
        code, again, note = run_in(tmp_path, tiny_llama_dir, "-a", "summary,flaky,sinks", "--resume", capsys=capsys)
    finally:
        registry._REGISTRY.pop("flaky", None)

    assert code == 0 and len(calls) == 2
    assert note == (f"note: --resume: kept summary from {tmp_path / 'results.json'}; "
                    "running flaky (failed before), sinks")
    assert again["summary"] == first["summary"]
    assert again["flaky"].status == "ok" and again["sinks"].status == "ok"
    assert list(again) == ["summary", "flaky", "sinks"]


def test_resume_notices_model_files_that_changed_under_the_same_path(tiny_llama_dir: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    model = shutil.copytree(tiny_llama_dir, tmp_path / "model")
    out = tmp_path / "out"
    run_in(out, model, "-a", "summary", capsys=capsys)
    config = json.loads((model / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3  # the same architecture, other numbers
    (model / "config.json").write_text(json.dumps(config))
    code, _, note = run_in(out, model, "-a", "summary", "--resume", capsys=capsys)

    assert code == 0
    assert note == (f"note: --resume: {out / 'results.json'} differs from this run in model files; "
                    "running every analysis again")


def test_resume_of_a_file_without_recorded_parameters_runs_everything_again(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    _, first, _ = run_in(tmp_path, tiny_llama_dir, "-a", "summary", capsys=capsys)
    del first.provenance["parameters"]  # as written before headscope recorded them
    first.save(tmp_path / "results.json")
    code, again, note = run_in(tmp_path, tiny_llama_dir, "-a", "summary", "--resume", capsys=capsys)

    assert code == 0
    assert note.endswith("differs from this run in recorded parameters; running every analysis again")
    assert again["summary"].seconds != first["summary"].seconds


def test_resume_with_nothing_to_resume_runs_everything(tiny_llama_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "new"
    code, results, note = run_in(out, tiny_llama_dir, "-a", "summary", "--resume", capsys=capsys)

    assert code == 0 and results["summary"].status == "ok"
    assert note == f"note: --resume: no {out / 'results.json'} yet; running every analysis"


def test_a_run_removes_the_temporary_files_a_killed_run_left(tiny_llama_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    leftovers = [tmp_path / ".results.json.0badf00d.tmp", tmp_path / ".report.html.0badf00d.tmp",
                 tmp_path / ".write-test-abc"]
    for path in leftovers:
        path.write_text("{half a fi")
    (tmp_path / "exports" / ".tmp-abc").mkdir(parents=True)
    mine = tmp_path / "notes.tmp"
    mine.write_text("the user's own file")
    run_in(tmp_path, tiny_llama_dir, "-a", "summary", capsys=capsys)

    assert not any(path.exists() for path in leftovers) and not (tmp_path / "exports" / ".tmp-abc").exists()
    assert mine.read_text() == "the user's own file"
