"""``headscope plot``: re-renders a saved map for a paper at the asked width and format; bad input exits 2.

The results file is written by hand (no model runs). Static formats go through kaleido and Chromium; those
cases are skipped where no browser is installed.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from cli_runner import run_cli
from PIL import Image

from headscope import plotting
from headscope.results import AnalysisResult, HeadMap, Results

HAS_BROWSER = any(shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome", "chrome"))
needs_browser = pytest.mark.skipif(not HAS_BROWSER, reason="static export needs Chrome or Chromium (kaleido)")


@pytest.fixture
def results_json(tmp_path: Path) -> Path:
    """sinks: sink_score on stacks self and cross; summary: a signed entropy map; explodes: failed."""
    sinks = AnalysisResult("sinks")
    sinks.add_map("sink_score", HeadMap(np.linspace(0, 1, 12).reshape(3, 4), "self", "alpha"))
    sinks.add_map("sink_score", HeadMap(np.linspace(0, 1, 8).reshape(2, 4), "cross", "alpha"))
    summary = AnalysisResult("summary")
    summary.add_map("entropy", HeadMap(np.linspace(-1, 1, 12).reshape(3, 4), "self", "signed", signed=True))
    failed = AnalysisResult("explodes", status="failed", error="RuntimeError: boom")
    return Results({"sinks": sinks, "summary": summary, "explodes": failed}).save(tmp_path / "results.json")


def plot(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """``headscope plot ARGS...``: the exit code and what went to stderr."""
    capsys.readouterr()
    code = run_cli("plot", *args)
    return code, capsys.readouterr().err


@needs_browser
def test_png_is_inches_times_dpi_pixels_wide(results_json: Path, capsys: pytest.CaptureFixture) -> None:
    out = results_json.parent / "entropy.png"
    code, err = plot(capsys, str(results_json), "--metric", "entropy", "--width", "column", "--dpi", "150",
                     "--out", str(out), "-q")

    assert code == 0, err
    assert Image.open(out).size[0] == round(3.5 * 150)


@needs_browser
def test_svg_states_the_page_width_in_inches(results_json: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = plot(capsys, str(results_json), "--metric", "sink_score", "--stack", "cross", "--format", "svg",
                     "--width", "page", "-q")

    assert code == 0, err
    svg = (results_json.parent / "sinks-sink_score-cross.svg").read_text()
    root = re.match(r"<svg\b[^>]*>", svg).group(0)
    assert 'width="7in"' in root and 'viewBox="0 0 672 ' in root


@needs_browser
def test_pdf_page_is_the_asked_width(results_json: Path, capsys: pytest.CaptureFixture) -> None:
    out = results_json.parent / "five.pdf"
    code, err = plot(capsys, str(results_json), "--metric", "sink_score", "--stack", "self", "--width", "5",
                     "--out", str(out), "-q")

    assert code == 0, err
    data = out.read_bytes()
    assert data.startswith(b"%PDF")
    width = float(re.search(rb"/MediaBox \[0 0 ([0-9.]+) ", data).group(1))
    assert width == pytest.approx(5 * 72, abs=1)


def test_html_is_one_self_contained_file(results_json: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = plot(capsys, str(results_json), "--metric", "entropy", "--format", "html", "-q")

    assert code == 0, err
    page = (results_json.parent / "summary-entropy-self.html").read_text()
    assert "summary: entropy (self)" in page and "Plotly.newPlot" in page
    assert not re.search(r"<script[^>]*\bsrc=", page)


def test_default_output_path_is_printed(results_json: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = plot(capsys, str(results_json), "--metric", "entropy", "--format", "html")

    assert code == 0, err
    assert err.strip() == f"wrote {results_json.parent / 'summary-entropy-self.html'}"


@pytest.mark.parametrize(("args", "expected"), [
    (["--metric", "entropy"], "no such file"),
    (["--metric", "nope"], "the metrics are sinks: sink_score; summary: entropy"),
    (["--metric", "entropy", "--analysis", "other"], "choose from sinks, summary, explodes"),
    (["--metric", "sink_score"], "pass --stack, one of self, cross"),
    (["--metric", "sink_score", "--stack", "vision"], "choose from self, cross"),
    (["--metric", "entropy", "--width", "wide"], "width must be column, page or a number of inches"),
    (["--metric", "entropy", "--format", "gif"], "unknown format 'gif'"),
    (["--metric", "entropy", "--format", "png", "--dpi", "0"], "dpi must be from 10 to 2400"),
    (["--metric", "entropy", "--out", "/no/such/folder/x.pdf"], "does not exist"),
    (["--metric", "entropy", "--analysis"], "requires an argument"),
], ids=["missing-file", "unknown-metric", "unknown-analysis", "ambiguous-stack", "unknown-stack", "bad-width",
        "bad-format", "bad-dpi", "missing-folder", "option-without-value"])
def test_bad_input_exits_2_with_one_line(results_json: Path, capsys: pytest.CaptureFixture, args: list[str],
                                         expected: str) -> None:
    source = results_json.parent / "missing.json" if expected == "no such file" else results_json
    code, err = plot(capsys, str(source), *args)

    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("headscope: error: "), err
    assert expected in lines[0]
    assert sorted(p.name for p in results_json.parent.iterdir()) == ["results.json"]


@pytest.mark.parametrize("text", ["{not json", '{"schema": "other"}', '{"schema": "headscope.results", '
                                  '"schema_version": 1, "provenance": {}, "analyses": {"a": {"maps": 3}}}'])
def test_malformed_results_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, text: str) -> None:
    source = tmp_path / "results.json"
    source.write_text(text)
    code, err = plot(capsys, str(source), "--metric", "entropy")

    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"headscope: error: {source}: ")


def test_kaleido_failing_before_its_page_loaded_is_tried_again_and_other_failures_name_their_cause() -> None:
    calls = []

    def slow_page() -> str:
        calls.append(1)
        if len(calls) < 3:  # what kaleido raises when it calls into the page before Chromium loaded it
            raise RuntimeError("ReferenceError: kaleido_scopes is not defined")
        return "image"

    assert plotting._static("png", slow_page) == "image" and len(calls) == 3

    def never_loads() -> None:
        raise RuntimeError("ReferenceError: kaleido_scopes is not defined")

    with pytest.raises(plotting.StaticExportError, match=r"PDF export failed in kaleido \(RuntimeError: Reference"):
        plotting._static("pdf", never_loads)

    def no_browser() -> None:
        raise RuntimeError("Kaleido requires Google Chrome to be installed.")

    with pytest.raises(plotting.StaticExportError, match="SVG export needs Chrome or Chromium"):
        plotting._static("svg", no_browser)
