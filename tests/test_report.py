"""``report.html``: one self-contained page, a section per analysis, every token and user text escaped; opened
in headless Chromium, its figures render, nothing reaches the console and a hostile token shows as text."""

from __future__ import annotations

import json
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
    assert "<td>1.3 = 1, " in page  # top heads of sink_score (3 significant digits): layer 1, head 3 is highest
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


CLICK_TOP_CELL = """
<script>
window.addEventListener("load", function () { setTimeout(function () {
  var gd = document.querySelector(".figure[data-stack] .js-plotly-plot");
  var z = gd.calcdata[0][0].z, best = [0, 0];
  z.forEach(function (row, layer) { row.forEach(function (value, head) {
    if (value > z[best[0]][best[1]]) { best = [layer, head]; } }); });
  var drag = gd.querySelector(".nsewdrag"), box = drag.getBoundingClientRect();
  var x = box.left + gd._fullLayout.xaxis.l2p(best[1]), y = box.top + gd._fullLayout.yaxis.l2p(best[0]);
  ["mousemove", "mousedown", "mouseup"].forEach(function (type) {
    var pressed = type === "mousedown" ? 1 : 0;
    drag.dispatchEvent(new MouseEvent(type, {clientX: x, clientY: y, bubbles: true, buttons: pressed}));
  });
  document.body.setAttribute("data-clicked", best[0] + "." + best[1]);
}, 300); });
</script>
"""


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary")
def test_a_click_on_a_heatmap_cell_draws_that_heads_pattern(tmp_path: Path, tiny_llama_dir: Path) -> None:
    out = tmp_path / "out"
    assert run_cli("analyze", str(tiny_llama_dir), "--analyses", "summary", "--out", str(out), "--figures", "none",
                   "-q") == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.count('data-stack="self"') == 2 and 'id="headscope-views"' in page
    clicked = tmp_path / "clicked.html"
    clicked.write_text(page.replace("</body>", CLICK_TOP_CELL + "</body>"), encoding="utf-8")

    dom, console = _headless_dom(clicked, tmp_path)

    assert not console
    layer_head = re.search(r'data-clicked="(\d+\.\d+)"', dom).group(1)
    view = dom.split('id="pattern-0"')[1].split("</section>")[0]
    assert f'data-shown="self:{layer_head}"' in dom
    assert "main-svg" in view and f"Attention pattern of head self:{layer_head}" in view


def _headless_dom(path: Path, tmp_path: Path) -> tuple[str, list[str]]:
    """The DOM of ``path`` after headless Chromium ran its scripts, and the console lines it logged."""
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--window-size=1200,4000", "--dump-dom",
         path.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


def test_view_tokens_are_escaped_and_cannot_close_the_script(hostile_results: Results) -> None:
    from headscope.views import Views

    tokens = [HOSTILE, "</script><script>alert(2)</script>", "the"]
    views = Views(labels={"self": {"queries": tokens, "keys": tokens}},
                  maps={"self:1.3": [[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]]}, note="3 tokens")
    page = report.render(hostile_results, views=views)

    assert HOSTILE not in page and "</script><script>" not in page
    assert page.count("</script>") == page.count("<script")  # the payload closes no script
    assert 'data-stack="self" data-view="pattern-0"' in page
    data = json.loads(page.split('id="headscope-views">')[1].split("</script>")[0])
    assert data["labels"]["self"]["keys"][0] == "&lt;img src=x onerror=alert(1)&gt;"  # plotly shows it as text
    assert data["maps"]["self:1.3"][2] == [0.2, 0.3, 0.5]
