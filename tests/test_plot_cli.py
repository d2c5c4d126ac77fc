"""``headscope plot``: re-renders a saved map for a paper at the asked width and format; bad input exits 2.

The results file is written by hand (no model runs). Static formats go through kaleido and Chromium; those
cases are skipped where no browser is installed.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import ClassVar

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


class FakeKaleido:
    """Stands in for ``kaleido.Kaleido``: each render takes the next outcome of ``script`` (an exception to raise,
    "hang" to never answer, or bytes to return); counts the browsers started and the renders asked of each."""

    script: ClassVar[list] = []
    started: ClassVar[list] = []
    on_hang: ClassVar[list] = []

    def __init__(self, **options: object) -> None:
        self.renders = 0
        FakeKaleido.started.append(self)

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def calc_fig(self, spec: dict, opts: dict) -> bytes:
        import asyncio

        self.renders += 1
        outcome = FakeKaleido.script.pop(0) if FakeKaleido.script else b"image"
        if outcome == "hang":
            for call in FakeKaleido.on_hang:
                call()
            await asyncio.sleep(3600)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


@pytest.fixture
def fake_kaleido(monkeypatch: pytest.MonkeyPatch):
    import kaleido

    monkeypatch.setattr(kaleido, "Kaleido", FakeKaleido)
    FakeKaleido.script, FakeKaleido.started, FakeKaleido.on_hang = [], [], []
    session = plotting.StaticSession(timeout=600)
    yield session
    session.close()


def a_figure() -> plotting.go.Figure:
    return plotting.heatmap(HeadMap(np.linspace(0, 1, 6).reshape(2, 3), "self", "test"), "t")


def test_one_browser_serves_every_figure_of_a_session(fake_kaleido: plotting.StaticSession, tmp_path: Path) -> None:
    for n in range(5):
        written, failed = plotting.save(a_figure(), tmp_path / f"f{n}", ("png", "pdf"), fake_kaleido)
        assert failed == {} and [p.read_bytes() for p in written] == [b"image", b"image"]

    assert len(FakeKaleido.started) == 1 and FakeKaleido.started[0].renders == 10


def test_a_page_that_had_not_loaded_is_asked_again_in_the_same_browser(fake_kaleido: plotting.StaticSession) -> None:
    # what kaleido 1.x raises when it calls into its page before Chromium has loaded it (a loaded machine)
    FakeKaleido.script = [RuntimeError("ReferenceError: kaleido_scopes is not defined")] * 2

    assert fake_kaleido.image(a_figure(), "png") == b"image"
    assert len(FakeKaleido.started) == 1 and FakeKaleido.started[0].renders == 3


def test_a_browser_that_dies_is_replaced_and_one_that_keeps_dying_is_named(fake_kaleido: plotting.StaticSession,
                                                                          tmp_path: Path) -> None:
    from choreographer.channels import JSONError
    from choreographer.errors import BrowserClosedError

    FakeKaleido.script = [BrowserClosedError("browser closed"), JSONError("broken pipe")]
    assert fake_kaleido.image(a_figure(), "svg") == b"image"
    assert len(FakeKaleido.started) == 3

    FakeKaleido.script = [BrowserClosedError("browser closed")] * 4
    written, failed = plotting.save(a_figure(), tmp_path / "f", ("html", "pdf"), fake_kaleido)

    assert [p.suffix for p in written] == [".html"] and not (tmp_path / "f.pdf").exists()
    assert failed == {tmp_path / "f.pdf": "static PDF export failed: the browser failed 4 times in a row "
                                          "(BrowserClosedError: browser closed)"}

    started = len(FakeKaleido.started)  # a browser that fails every time: later figures are not tried at all
    with pytest.raises(plotting.StaticExportError, match=r"^static PNG export failed: the browser failed 4 times in "
                                                         r"a row \(BrowserClosedError: browser closed\) earlier; not "
                                                         r"tried again this session$"):
        fake_kaleido.image(a_figure(), "png")
    assert len(FakeKaleido.started) == started


def test_a_browser_that_hangs_is_given_up_after_the_timeout_and_replaced(fake_kaleido: plotting.StaticSession) -> None:
    FakeKaleido.script = ["hang"]
    fake_kaleido.timeout = 0.2  # for the call that hangs; the try after it has all the time it needs
    FakeKaleido.on_hang = [lambda: setattr(fake_kaleido, "timeout", 600)]

    assert fake_kaleido.image(a_figure(), "png") == b"image"
    assert len(FakeKaleido.started) >= 2  # (more only if the machine was too slow to start the first in 0.2 s)


def test_kaleidos_own_error_is_not_tried_again_and_says_what_failed(fake_kaleido: plotting.StaticSession) -> None:
    from kaleido.errors import KaleidoError

    FakeKaleido.script = [KaleidoError(525, "unsupported figure")]

    with pytest.raises(plotting.StaticExportError, match=r"^static PNG export failed in kaleido \(KaleidoError: "):
        fake_kaleido.image(a_figure(), "png")
    assert FakeKaleido.started[0].renders == 1


def test_no_browser_names_the_cause_once_and_every_later_figure_says_the_same(monkeypatch: pytest.MonkeyPatch,
                                                                            tmp_path: Path) -> None:
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chromium"))
    session = plotting.StaticSession()
    try:
        for fmt in ("png", "svg"):
            with pytest.raises(plotting.StaticExportError) as caught:
                session.write(a_figure(), tmp_path / f"f.{fmt}", fmt)
            assert str(caught.value) == (
                f"static {fmt.upper()} export needs Chrome or Chromium for kaleido, and BROWSER_PATH="
                f"'{tmp_path / 'no-such-chromium'}' is not one: install Debian's `chromium` package (the set-up "
                "script does when run as root) or set BROWSER_PATH to a browser")
    finally:
        session.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@needs_browser
def test_a_real_browser_killed_between_figures_is_replaced(tmp_path: Path) -> None:
    import psutil

    session = plotting.StaticSession()
    try:
        first = session.image(a_figure(), "png")
        browsers = [child for child in psutil.Process().children(recursive=True) if "chrom" in child.name().lower()]
        assert browsers
        for browser in browsers:
            browser.kill()
        psutil.wait_procs(browsers, timeout=30)
        second = session.image(a_figure(), "png")
    finally:
        session.close()
    assert first.startswith(b"\x89PNG") and second == first


@needs_browser
def test_an_unwritable_path_is_named_with_its_reason(results_json: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = plot(capsys, str(results_json), "--metric", "entropy", "--out", "/proc/headscope.pdf")

    assert code == 2, err
    assert err.strip() == "headscope: error: cannot write /proc/headscope.pdf: No such file or directory"


def test_a_heatmap_titles_its_colour_bar_with_the_unit_and_gives_labels_one_colour_each() -> None:
    entropy = plotting.heatmap(HeadMap(np.linspace(0, 3, 6).reshape(2, 3), "self", "nats", unit="nats"), "e")
    assert entropy.data[0].colorbar.title.text == "nats"
    mass = HeadMap(np.linspace(0, 1, 6).reshape(2, 3), "self", "mass")
    mass.metric = "sink_mass"
    assert plotting.heatmap(mass, "m").data[0].colorbar.title.text == "sink_mass"  # no unit: the metric's name

    clusters = HeadMap(np.array([[0, 1, 2], [2, 1, 0]], dtype=float), "self", "head type", notable="label")
    trace = plotting.heatmap(clusters, "c").data[0]
    colours = [colour for _, colour in trace.colorscale]
    assert colours == [c for c in plotting.CATEGORICAL[:3] for _ in range(2)]  # a flat band per label
    assert (trace.zmin, trace.zmax) == (-0.5, 2.5) and list(trace.colorbar.tickvals) == [0, 1, 2]


def test_a_small_map_at_page_width_is_not_a_full_page() -> None:
    figure = plotting.heatmap(HeadMap(np.random.default_rng(0).random((30, 9)), "self", "x"), "sinks: x (self)")
    page = plotting.for_paper(figure, "page")
    column = plotting.for_paper(figure, "column")

    assert page.layout.width == 7 * 96 and page.layout.height <= round((30 * 0.15 + 1.05) * 96)  # 5.6 of 9 in
    assert column.layout.height <= page.layout.height
    assert plotting.for_paper(figure, "page", height=8).layout.height == 8 * 96  # an asked height is kept
    narrow = plotting.for_paper(figure, 1.0)  # the narrowest widths still get rows
    assert narrow.layout.width == 96 and narrow.layout.height > 30


@needs_browser
def test_pdf_embeds_its_fonts(results_json: Path, capsys: pytest.CaptureFixture) -> None:
    out = results_json.parent / "fonts.pdf"
    code, err = plot(capsys, str(results_json), "--metric", "entropy", "--out", str(out), "-q")

    assert code == 0, err
    data = out.read_bytes()
    fonts = re.findall(rb"/Type\s*/FontDescriptor", data)
    assert fonts and len(re.findall(rb"/FontFile[23]?\s", data)) == len(fonts)  # every font travels with the file


def test_long_titles_are_wrapped_instead_of_cut() -> None:
    title = "sinks: where attention goes (self; mean over heads, queries and layers; red: sink tokens)"
    figure = plotting.fit_title(plotting.go.Figure(layout={"title": {"text": title}}))

    lines = figure.layout.title.text.split("<br>")
    assert len(lines) == 2 and " ".join(lines) == title and all(len(line) <= 60 for line in lines)
