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
from headscope.models import zoo
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
    recorded = Results.load(out / "results.json").provenance["input"]
    assert recorded["kind"] == "text" and recorded["tokens"] == 64 < recorded["cut_from"]  # cut to the context
    assert f"shipped prose (probes/data/prose.txt), 64 tokens (cut from {recorded['cut_from']} to fit)" in page


def test_views_that_fail_on_one_probe_keep_the_others_and_say_so(tmp_path: Path, tiny_llama_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    from headscope import views

    def broken(*args: object) -> None:
        raise RuntimeError("deliberate view failure")

    monkeypatch.setattr(views, "_repeated_views", broken)
    out = tmp_path / "out"
    capsys.readouterr()
    assert run_cli("analyze", str(tiny_llama_dir), "-a", "patterns", "--out", str(out), "--figures", "none",
                   "-q") == 0

    note = "pattern views: no repeated-token views: RuntimeError: deliberate view failure"
    assert f"note: {note}" in capsys.readouterr().err.splitlines()
    assert note in Results.load(out / "results.json").provenance["notes"]
    page = (out / "report.html").read_text(encoding="utf-8")
    data = json.loads(page.split('id="headscope-views">')[1].split("</script>")[0])
    assert data["maps"] and not any(name.startswith("repeated/") for name in data["maps"])  # the prose views stay
    assert 'data-probe="repeated"' not in page


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


def _headless_dom(path: Path, tmp_path: Path, window: tuple[int, int] = (1200, 4000)) -> tuple[str, list[str]]:
    """The DOM of ``path`` after headless Chromium ran its scripts, and the console lines it logged."""
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--hide-scrollbars",
         f"--window-size={window[0]},{window[1]}", "--dump-dom",
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


# --- reading the report: overview, banners, numbers, parameters, layout ------------------------------------------


@pytest.fixture
def run_results() -> Results:
    """What a run of sinks on a synthetic text model leaves: a sink rate, a massive activation, a map with a NaN
    head, a table of long floats, parameters that apply to other models only, and the run's notes."""
    sinks = AnalysisResult("sinks", params={"eps": 0.3, "silence_db": 40.0, "visual_tau": 20.0, "top_k": 5},
                           summary={"input": "user text", "tokens": [12], "eps": 0.3, "sink_rate_self": 47.41,
                                    "top_activation": {"layer": 11, "token": "The", "dimension": 507,
                                                       "value": 22552.041015625},
                                    "massive_activations": 19, "main_metric": "sink_score"},
                           tables={"layers": pd.DataFrame({"layer": [0, 1], "sink_mass": [0.123456789012, 2 / 3]})})
    values = np.linspace(0, 1, 8).reshape(2, 4)
    values[0, 1] = np.nan
    sinks.add_map("sink_score", HeadMap(values, "self", "alpha", unit="share"))
    return Results({"sinks": sinks}, {
        "model": {"type": "local", "path": "/models/tiny", "synthetic": "random weights, built from a config"},
        "architecture": "LlamaForCausalLM", "kind": "decoder",
        "input": {"kind": "text", "source": "user text", "tokens": 12},
        "stacks": {"self": {"name": "self", "layers": 2, "heads": 4}},
        "notes": ["synthetic model: random weights, built from a config",
                  "truncated input: the user text was cut to its first 12 of 40 tokens to fit --max-tokens 12",
                  f"2 of 4 figure files not written (a.png, b.png): static PNG export failed {HOSTILE}"]})


def test_the_overview_gives_the_model_the_input_and_each_analysis_headline(run_results: Results) -> None:
    page = report.render(run_results)
    overview = page.split('id="overview"')[1].split("</section>")[0]

    assert "/models/tiny, LlamaForCausalLM, decoder" in overview
    assert "self: 2 layers x 4 heads" in overview and "user text, 12 tokens" in overview
    assert "47.4% of self heads are sinks (sink score above 0.3)" in overview
    assert ("19 massive activations; the largest activation 2.255e+04 at layer 11, token &#x27;The&#x27;, dimension "
            "507") in overview
    assert "top sink_score head (self) 1.3 = 1 (median 0.5714)" in overview
    assert page.index('id="overview"') < page.index('id="analysis-sinks"')


def test_every_caveat_is_a_banner_above_the_analyses(run_results: Results) -> None:
    page = report.render(run_results)
    banners = re.findall(r'<p class="banner( severe)?">(.*?)</p>', page)

    assert banners == [
        (" severe", "Synthetic model: random weights, built from a config"),
        ("", "truncated input: the user text was cut to its first 12 of 40 tokens to fit --max-tokens 12"),
        ("", f"2 of 4 figure files not written (a.png, b.png): static PNG export failed {ESCAPED}"),
        ("", "sinks: 1 of 8 heads have no value (NaN) in sink_score (self): not measured, or not there in that "
             "layer"),
    ]
    assert page.index("banner") < page.index('id="overview"')


def test_numbers_are_shown_to_their_precision_and_tables_scroll(run_results: Results) -> None:
    section = report.render(run_results).split('id="analysis-sinks"')[1]

    assert '<td class="number">0.1235</td><td class="number">0.6667</td>' not in section  # one row each
    assert '<td class="number">0</td><td class="number">0.1235</td>' in section
    assert '<td class="number">1</td><td class="number">0.6667</td>' in section
    assert '<div class="scroll"><table><tr><th>layer</th>' in section
    assert "22552.041015625" not in section and "value&quot;: 22550.0" in section  # the summary's dict too


def test_only_the_parameters_that_apply_to_the_model_are_listed(run_results: Results) -> None:
    section = report.render(run_results).split('id="analysis-sinks"')[1]
    parameters = section.split("<h3>Parameters</h3>")[1]

    assert "<th>eps</th>" in parameters and "<th>top_k</th>" in parameters
    assert '<th>eps</th><td class="value">0.3</td>' in parameters  # as given, never rounded
    assert "<th>silence_db</th>" not in parameters and "<th>visual_tau</th>" not in parameters
    assert "not shown: silence_db, visual_tau, which do not apply to this model" in parameters


# In the page at a given window width: whether anything is wider than the window, and each figure's drawn size.
MEASURE_LAYOUT = """
<script>
window.addEventListener("load", function () { setTimeout(function () {
  var wide = [];
  document.querySelectorAll("body *").forEach(function (element) {
    var box = element.getBoundingClientRect();
    if (box.right > document.documentElement.clientWidth + 1 && !element.closest(".scroll, .figure")) {
      wide.push(element.tagName + "." + element.className);
    }
  });
  var sizes = Array.prototype.map.call(document.querySelectorAll(".figure .js-plotly-plot"), function (plot) {
    var box = plot.getBoundingClientRect();
    return [Math.round(box.width), Math.round(box.height), plot.querySelectorAll(".main-svg").length];
  });
  document.body.setAttribute("data-layout", JSON.stringify({
    page: document.documentElement.scrollWidth, window: document.documentElement.clientWidth, wide: wide,
    figures: sizes}));
}, 500); });
</script>
"""


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary")
@pytest.mark.parametrize("width", [1400, 800])
def test_at_a_laptop_and_a_narrow_width_nothing_overflows_and_every_figure_is_drawn(
        width: int, tmp_path: Path, tiny_llama_dir: Path) -> None:
    out = tmp_path / "out"
    assert run_cli("analyze", str(tiny_llama_dir), "-a", "patterns,sinks", "--out", str(out), "--figures", "none",
                   "--text", f"{HOSTILE} The harbour was quiet. " * 2, "--max-tokens", "60", "-q") == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    measured = tmp_path / "measured.html"
    measured.write_text(page.replace("</body>", MEASURE_LAYOUT + "</body>"), encoding="utf-8")

    dom = _headless_dom(measured, tmp_path, window=(width, 3000))[0]
    layout = json.loads(html_unescape(re.search(r'data-layout="([^"]*)"', dom).group(1)))

    assert layout["page"] <= layout["window"] == width and layout["wide"] == []
    assert len(layout["figures"]) == page.count('class="figure"') >= 8
    assert all(w > 200 and h > 200 and svgs >= 1 for w, h, svgs in layout["figures"]), layout["figures"]
    assert "<img" not in dom and ESCAPED in dom  # the hostile token is text, in the tables and the views' data
    assert "truncated input: the user text was cut to its first 60 of" in dom
    screenshot = _screenshot(out / "report.html", tmp_path, width)
    assert screenshot.size == (width, 3000) and len(screenshot.convert("RGB").getcolors(2**24)) > 50


def html_unescape(text: str) -> str:
    import html

    return html.unescape(text)


def _screenshot(path: Path, tmp_path: Path, width: int):
    """A PNG of the top of ``path`` at ``width`` pixels, as headless Chromium draws it."""
    from PIL import Image

    shot = tmp_path / f"report-{width}.png"
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         f"--user-data-dir={tmp_path / 'shot-profile'}", "--virtual-time-budget=5000", f"--window-size={width},3000",
         f"--screenshot={shot}", path.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    return Image.open(shot)


def test_induction_heads_are_viewed_on_the_repeated_tokens_they_were_found_on(tmp_path: Path,
                                                                            tiny_llama_dir: Path) -> None:
    out = tmp_path / "out"
    assert run_cli("analyze", str(tiny_llama_dir), "-a", "patterns", "--set", "patterns.length=12", "--out", str(out),
                   "--figures", "none", "-q") == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    data = json.loads(page.split('id="headscope-views">')[1].split("</script>")[0])
    results = Results.load(out / "results.json")

    for metric in ("induction", "previous_token", "duplicate_token"):
        assert f'title="{metric}-self" data-stack="self" data-view="pattern-0" data-probe="repeated"' in page
        for layer, head, _ in results["patterns"].top_heads(metric, k=3):
            rows = data["maps"][f"repeated/self:{layer}.{head}"]
            assert len(rows) == len(rows[0]) == 2 * 12 + 1  # [BOS] + r + r, the analysis's own first sequence
    assert 'title="entropy-self" data-stack="self" data-view="pattern-0">' in page  # on the prose
    tokens = data["labels"]["repeated/self"]["keys"]
    assert tokens[1:13] == tokens[13:25] and not any(token.startswith(("Ġ", "▁")) for token in tokens)


@pytest.mark.slow
@pytest.mark.skipif(not zoo.PACKAGED["whisper-tiny.en"].installed(), reason="whisper-tiny.en is not installed")
def test_whisper_cross_attention_is_viewed_over_the_clips_time(tmp_path: Path) -> None:
    assert run_cli("analyze", "whisper-tiny.en", "--out", str(tmp_path), "--figures", "none", "-q") == 0
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    data = json.loads(page.split('id="headscope-views">')[1].split("</script>")[0])

    cross = data["labels"]["cross"]
    frames = len(cross["keys"])
    assert cross["keys"][:3] == ["0.00 s", "0.02 s", "0.04 s"] and cross["key_title"] == "audio time (encoder frame)"
    assert 100 < frames < 1500  # the clip's frames, not the 30 s window Whisper pads to
    assert "weather" in "".join(cross["queries"]).lower()  # readable transcript tokens
    shown = [name for name in data["maps"] if name.startswith("cross:")]
    assert shown and all(len(data["maps"][name][0]) == frames for name in shown)
    assert not any(name.startswith("encoder:") for name in data["maps"])  # frames x frames: too large for a page
    assert Results.load(tmp_path / "results.json").provenance["input"]["kind"] == "audio"
    parameters = page.split('id="analysis-sinks"')[1].split("<h3>Parameters</h3>")[1]
    assert "<th>silence_db</th>" in parameters and "<th>visual_tau</th>" not in parameters  # audio's apply
