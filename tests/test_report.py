"""``report.html``: one self-contained page, a section per analysis, every token and user text escaped; opened
in headless Chromium, its figures render, nothing reaches the console and a hostile token shows as text."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli_runner import run_cli

from headscope import report
from headscope.results import AnalysisResult, HeadMap, Results

HOSTILE = "<img src=x onerror=alert(1)>"
ESCAPED = "&lt;img src=x onerror=alert(1)&gt;"
CHROMIUM = next((path for path in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if path and Path(path).exists()), None)


@pytest.fixture
def hostile_results() -> Results:
    """Two finished analyses and a failed one, with a hostile token in a summary, a table, parameters, an
    error message and the provenance."""
    sinks = AnalysisResult("sinks", params={"note": HOSTILE}, summary={"top_tokens": [HOSTILE, "the"]},
                           tables={"sink_tokens": pd.DataFrame({"token": [HOSTILE, "the"], "mass": [0.9, np.nan]})})
    sinks.add_map("sink_score", HeadMap(np.linspace(0, 1, 8).reshape(2, 4), "self", "alpha " + HOSTILE))
    summary = AnalysisResult("summary", summary={"tokens": 12})
    summary.add_map("entropy", HeadMap(np.linspace(-1, 1, 8).reshape(2, 4), "self", "nats", signed=True))
    failed = AnalysisResult("explodes", status="failed", error=f"RuntimeError: bad token {HOSTILE}")
    return Results({"sinks": sinks, "summary": summary, "explodes": failed},
                   {"model": {"type": "hub", "id": HOSTILE, "revision": "main"}, "seed": 0})


def test_report_is_self_contained_with_a_section_per_analysis(hostile_results: Results, tmp_path: Path) -> None:
    page = report.write(hostile_results, tmp_path / "report.html").read_text(encoding="utf-8")

    assert not re.search(r"<script[^>]*\bsrc=", page)
    assert page.count("* plotly.js v") == 1 and "Plotly.newPlot" in page  # plotly.js inlined once, then figures
    for name in ("sinks", "summary", "explodes"):
        assert f'<section class="analysis" id="analysis-{name}">' in page
    assert '<section id="provenance">' in page
    assert "1.3 = 1.000" in page  # top heads of sink_score: layer 1, head 3 is highest
    assert len(page.encode()) < 6_000_000
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary file left


def test_failed_analysis_shows_its_error(hostile_results: Results) -> None:
    page = report.render(hostile_results)
    section = page.split('id="analysis-explodes"')[1].split("</section>")[0]

    assert f'<p class="error">RuntimeError: bad token {ESCAPED}</p>' in section
    assert "figure-" not in section


def test_hostile_token_is_escaped_everywhere(hostile_results: Results) -> None:
    page = report.render(hostile_results)

    assert HOSTILE not in page
    assert "<img" not in page
    for where in ("<title>headscope report: " + ESCAPED, f"<td class=\"value\">{ESCAPED}</td>",
                  f"{ESCAPED}</p>"):
        assert where in page, where


def test_analyze_writes_the_report(tmp_path: Path, tiny_llama_dir: Path) -> None:
    out = tmp_path / "out"
    code = run_cli("analyze", str(tiny_llama_dir), "--analyses", "summary", "--out", str(out), "--figures", "none",
                   "-q")

    assert code == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    assert '<section class="analysis" id="analysis-summary">' in page
    assert page.count('class="figure"') == 2  # one heatmap per map
    assert str(tiny_llama_dir.resolve()) in page and "wall_seconds" in page


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary")
def test_report_renders_in_headless_chromium(hostile_results: Results, tmp_path: Path) -> None:
    path = report.write(hostile_results, tmp_path / "report.html")
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom", path.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )
    dom = done.stdout

    assert done.returncode == 0, done.stderr[-2000:]
    assert not [line for line in done.stderr.splitlines() if ":CONSOLE" in line]  # no errors, nothing logged
    figures = re.findall(r'<div id="(figure-[0-9-]+)" class="([^"]*)"', dom)
    assert len(figures) == 2 and all("js-plotly-plot" in classes for _, classes in figures), figures
    assert dom.count('class="main-svg"') >= 2
    assert "<img" not in dom  # the token never became an element
    assert ESCAPED in dom  # it is text
