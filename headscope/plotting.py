"""Figures: layer x head heatmaps of per-head maps, saved as interactive HTML and static PNG/SVG/PDF.

:func:`export` writes one figure for a paper: sized to a one-column (3.5 in) or two-column (7 in) width, or any
width in inches, with font sizes in points that stay legible at that width; PNG at a chosen dpi, SVG and PDF
at that physical size. Plotly lays figures out in CSS pixels, 96 to the inch, so a 3.5 in figure is 336
pixels wide, a PNG at 300 dpi is 1050 pixels wide, and a PDF page is 252 points wide.

Static export goes through kaleido, which drives a Chrome/Chromium found on the machine. A
:class:`StaticSession` starts one browser and keeps it for every figure it is given (a run's figures, a
notebook's PNGs), starts a new one when the browser dies, tries again on the browser's transient failures,
and otherwise raises :class:`StaticExportError` with the cause in one line: no browser, a browser that
keeps failing, a path that cannot be written, or kaleido's own error. Every file is written atomically.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import concurrent.futures
import contextlib
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.io.base_renderers import PngRenderer
from plotly.offline import get_plotlyjs

from headscope.errors import HeadscopeError
from headscope.results import HeadMap, write_atomically

STATIC_FORMATS = ("png", "svg", "pdf")
EXPORT_FORMATS = ("png", "svg", "pdf", "html")
PIXELS_PER_INCH = 96  # plotly's layout unit is the CSS pixel
POINTS_PER_INCH = 72
WIDTHS = {"column": 3.5, "page": 7.0}
"""Paper widths in inches: one column of a two-column paper, and the full page (two columns)."""
FONT_POINTS = {"column": 8.0, "page": 9.0}
"""Body font size in points at each preset width; titles are 1 pt larger. Other widths use the nearer preset's."""
MAX_HEIGHT_INCHES = 9.0
DEFAULT_DPI = 300
# Perceptually uniform and readable in grayscale; signed metrics use a diverging scale centred at zero.
SEQUENTIAL = "Viridis"
DIVERGING = "RdBu"
CATEGORICAL = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
"""Okabe and Ito's colour-blind-safe palette: categories (cluster labels) and the lines of one figure."""
DASHES = ("solid", "dot", "dash", "dashdot", "longdash", "longdashdot")
MAX_CELL_INCHES = 0.15
"""A paper heatmap's rows are at most this tall, so a 30 x 9 map at page width is not a full page."""
TITLE_CHARACTERS = 60


def heatmap(head_map: HeadMap, title: str) -> go.Figure:
    """A layer x head heatmap; hover shows ``layer.head``, the value and what the metric means.

    The colour bar is titled with the map's unit (its metric's name when it has none); a signed map gets a
    diverging scale centred at zero, a map of labels (cluster labels) one colour per label from
    :data:`CATEGORICAL`, with the labels as the colour bar's ticks.
    """
    values = np.asarray(head_map.values, dtype=float)
    layers, heads = values.shape
    labels = [[f"{layer}.{head}" for head in range(heads)] for layer in range(layers)]
    limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    unit = head_map.unit or head_map.metric or "value"
    trace: dict[str, Any] = {"colorscale": DIVERGING if head_map.signed else SEQUENTIAL,
                             "colorbar": {"title": {"text": escape_label(unit), "side": "right"}},
                             "hovertemplate": "head %{customdata}<br>value %{z:.4g}<br>"}
    if head_map.signed:
        trace.update(zmid=0.0, zmin=-limit, zmax=limit)
    if head_map.notable == "label":
        trace.update(_categories(values, head_map.metric or "label"))
    trace["hovertemplate"] += escape_label(head_map.description) + "<extra></extra>"
    figure = go.Figure(go.Heatmap(z=values, x=list(range(heads)), y=list(range(layers)), customdata=labels, **trace))
    figure.update_layout(
        title=wrap_title(title),
        xaxis_title="head",
        yaxis_title="layer",
        yaxis_autorange="reversed",
        xaxis={"tickmode": "linear", "dtick": max(1, heads // 12)},
        yaxis={"tickmode": "linear", "dtick": max(1, layers // 15)},
        template="simple_white",
        width=max(330, 130 + 24 * heads, min(640, 100 + 9 * min(len(title), TITLE_CHARACTERS))),
        height=max(300, 140 + 18 * layers),
    )
    return figure


def _categories(values: np.ndarray, name: str) -> dict[str, Any]:
    """A discrete colour scale, one band per label, and colour-bar ticks at the labels' centres."""
    found = sorted({int(v) for v in values[np.isfinite(values)]}) or [0]
    low, high = found[0], found[-1]
    count = high - low + 1
    scale = []
    for index in range(count):
        colour = CATEGORICAL[index % len(CATEGORICAL)]
        scale += [[index / count, colour], [(index + 1) / count, colour]]
    return {"colorscale": scale, "zmin": low - 0.5, "zmax": high + 0.5,
            "colorbar": {"title": {"text": escape_label(name), "side": "right"}, "tickmode": "array",
                         "tickvals": list(range(low, high + 1)), "ticktext": [str(v) for v in range(low, high + 1)]},
            "hovertemplate": f"head %{{customdata}}<br>{escape_label(name)} %{{z:.0f}}<br>"}


def wrap_title(title: str, width: int = TITLE_CHARACTERS) -> str:
    """``title`` escaped for plotly's labels and broken at spaces into lines of at most ``width`` characters
    (plotly never wraps a title; a long one is cut at the figure's edge)."""
    return "<br>".join(escape_label(line) for line in _lines(title, width))


def fit_title(figure: go.Figure) -> go.Figure:
    """Break ``figure``'s title into lines (:func:`wrap_title`; it is plotly markup already, so it is not escaped
    again) when it is longer than fits, with room above the plot for the lines."""
    text = figure.layout.title.text
    if text and "<br>" not in text and len(text) > TITLE_CHARACTERS:
        lines = _lines(text, TITLE_CHARACTERS)
        figure.update_layout(title_text="<br>".join(lines), margin_t=50 + 20 * len(lines))
    return figure


def _lines(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split(" "):
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def save(figure: go.Figure, stem: Path, formats: Iterable[str] = ("html", *STATIC_FORMATS),
         session: StaticSession | None = None) -> tuple[list[Path], dict[Path, str]]:
    """Write ``figure`` as ``stem.<format>`` for each format: the files written, and each file that could not
    be, with why (one line).

    HTML files load plotly.js from a ``plotly.min.js`` written once beside them (no network needed). Static
    files go through ``session`` (default: the process's shared :data:`SESSION`); PNG at twice the layout size.
    """
    session = SESSION if session is None else session
    written, failed = [], {}
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        try:
            if fmt == "html":
                _write_html(figure, path)
            else:
                session.write(figure, path, fmt, scale=2 if fmt == "png" else 1)
        except StaticExportError as error:
            failed[path] = str(error)
            continue
        written.append(path)
    return written, failed


def _write_html(figure: go.Figure, path: Path) -> None:
    bundle = path.with_name("plotly.min.js")
    try:
        if not bundle.exists():
            write_atomically(bundle, get_plotlyjs().encode("utf-8"))
        write_atomically(path, figure.to_html(include_plotlyjs="directory", full_html=True).encode("utf-8"))
    except OSError as error:
        raise StaticExportError(_unwritable(path, error)) from error


def paper_width(width: str | float) -> float:
    """``"column"`` (3.5 in), ``"page"`` (7 in) or a positive number of inches, as inches."""
    if isinstance(width, str) and width.strip().lower() in WIDTHS:
        return WIDTHS[width.strip().lower()]
    try:
        inches = float(width)
    except (TypeError, ValueError):
        inches = float("nan")
    if not np.isfinite(inches) or not 0.5 <= inches <= 40:
        raise HeadscopeError(f"width must be column, page or a number of inches from 0.5 to 40; got '{width}'")
    return inches


def for_paper(figure: go.Figure, width: str | float = "column", height: float | None = None) -> go.Figure:
    """A copy of ``figure`` laid out ``width`` inches wide (``"column"``, ``"page"`` or inches) for a paper.

    ``height`` in inches defaults to the figure's own aspect ratio (at most 9 in). Fonts are set in points
    (8 pt at column width, 9 pt at page width), margins are tightened and colour bars thinned to fit.
    """
    inches = paper_width(width)
    layout = figure.layout
    ratio = (layout.height or 450) / (layout.width or 700)
    tall = min(MAX_HEIGHT_INCHES, inches * ratio, _heatmap_height(figure, inches)) if height is None else float(height)
    if not np.isfinite(tall) or tall <= 0:
        raise HeadscopeError(f"height must be a positive number of inches; got '{height}'")
    points = FONT_POINTS["column" if inches < (WIDTHS["column"] + WIDTHS["page"]) / 2 else "page"]
    pixels = PIXELS_PER_INCH / POINTS_PER_INCH  # CSS pixels per point
    paper = go.Figure(figure)
    paper.update_layout(
        width=round(inches * PIXELS_PER_INCH),
        height=round(tall * PIXELS_PER_INCH),
        font_size=points * pixels,
        title_font_size=(points + 1) * pixels,
        title_x=0.5,
        title_xanchor="center",
        margin={"l": 8 + 5 * points, "r": 8, "t": 12 + 3 * points if layout.title.text else 8, "b": 8 + 4 * points},
    )
    paper.update_traces(colorbar={"thickness": 2 * points, "len": 1.0, "outlinewidth": 0},
                        selector={"type": "heatmap"})
    return paper


def _heatmap_height(figure: go.Figure, inches: float) -> float:
    """For a figure of one heatmap: the height at which its rows are at most :data:`MAX_CELL_INCHES` tall (and no
    taller than its cells are wide), margins included; no limit for other figures."""
    heatmaps = [trace for trace in figure.data if trace.type == "heatmap"]
    if len(heatmaps) != 1 or heatmaps[0].z is None:
        return float("inf")
    rows = np.asarray(heatmaps[0].z, dtype=float)
    if rows.ndim != 2:
        return float("inf")
    cell = max(inches - 1.4, inches / 2) / rows.shape[1]  # the plot's width, less the axis title and colour bar
    margins = 0.9 + 0.15 * bool(figure.layout.title.text)
    return rows.shape[0] * min(cell, MAX_CELL_INCHES) + margins


def export(figure: go.Figure, path: Path, fmt: str | None = None, width: str | float = "column",
           dpi: int = DEFAULT_DPI, height: float | None = None) -> Path:
    """Write ``figure`` for a paper as ``path`` in ``fmt`` (default: ``path``'s suffix); returns ``path``.

    The figure is laid out with :func:`for_paper`. PNG is ``inches x dpi`` pixels wide; SVG states its size
    in inches (``width="3.5in"``, with a view box, so it scales cleanly); PDF's page is the figure's size;
    HTML is one self-contained file (plotly.js inlined). Raises :class:`StaticExportError` when static export
    is impossible on this machine.
    """
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in EXPORT_FORMATS:
        raise HeadscopeError(f"unknown figure format '{fmt}': choose from {', '.join(EXPORT_FORMATS)}")
    if not 10 <= dpi <= 2400:
        raise HeadscopeError(f"dpi must be from 10 to 2400; got {dpi}")
    paper = for_paper(figure, width, height)
    if fmt == "html":
        try:
            write_atomically(path, paper.to_html(include_plotlyjs=True, full_html=True).encode("utf-8"))
        except OSError as error:
            raise StaticExportError(_unwritable(path, error)) from error
        return path
    return SESSION.write(paper, path, fmt, scale=dpi / PIXELS_PER_INCH if fmt == "png" else 1)


# kaleido 1.x can run its first script call in the blank page's context when Chromium is slow to load its own page
# (a loaded machine): the call then fails with "kaleido_scopes is not defined"; the tab is reloaded after every call,
# so the same browser is asked again. A browser that died or stopped answering is replaced by a new one.
_PAGE_NOT_LOADED = "kaleido_scopes is not defined"
_STATIC_TRIES = 4


def _transient(error: BaseException) -> bool:
    """Whether ``error`` is the browser failing (dead, hung, a broken pipe) rather than kaleido refusing a figure."""
    from choreographer.channels import ChannelClosedError, JSONError
    from choreographer.errors import BrowserClosedError, BrowserFailedError

    return isinstance(error, (BrowserClosedError, BrowserFailedError, ChannelClosedError, JSONError, TimeoutError,
                              asyncio.CancelledError, concurrent.futures.CancelledError))


class StaticSession:
    """One kaleido browser for many static figures: started at the first figure, kept until :meth:`close`.

    Starting Chromium costs seconds; a kept one renders a small figure in a fraction of one. The browser runs on
    this session's own thread and event loop, so a session works from a notebook (whose loop is running) as
    from a script. Each figure is tried up to 4 times: again in the same browser when kaleido called into its
    page before the page had loaded, in a new browser when the browser died, hung past ``timeout`` seconds or
    broke its pipe. Any other failure, or the last try's, raises :class:`StaticExportError` in one line with the
    cause. No browser on the machine is remembered: later figures fail at once with the same message.
    """

    def __init__(self, timeout: float = 120.0) -> None:
        self.timeout = timeout
        self._lock = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kaleido: Any = None
        self._unavailable: str | None = None

    def image(self, figure: go.Figure | dict, fmt: str, scale: float = 1) -> bytes:
        """``figure`` rendered as ``fmt`` (png, svg, pdf) bytes, at its layout size times ``scale``."""
        spec = figure.to_plotly_json() if isinstance(figure, go.Figure) else dict(figure)
        layout = spec.get("layout", {})
        opts = {"format": fmt, "scale": scale, "width": layout.get("width") or pio.defaults.default_width,
                "height": layout.get("height") or pio.defaults.default_height}
        with self._lock:
            for attempt in range(_STATIC_TRIES):
                if self._unavailable is not None:
                    raise StaticExportError(f"static {fmt.upper()} export {self._unavailable}")
                try:
                    return self._call(self._render(spec, opts))
                except Exception as error:
                    if _no_browser(error):
                        self._unavailable = _no_browser_reason()
                        raise StaticExportError(f"static {fmt.upper()} export {self._unavailable}") from None
                    last_try = attempt + 1 == _STATIC_TRIES
                    if _PAGE_NOT_LOADED in str(error) and not last_try:
                        continue
                    if _transient(error):
                        self._stop()
                        if not last_try:
                            continue
                        # a browser that fails every time would cost every later figure its tries: give up
                        self._unavailable = _failure(error, attempt + 1) + " earlier; not tried again this session"
                    raise StaticExportError(f"static {fmt.upper()} export {_failure(error, attempt + 1)}") from error
        raise AssertionError("unreachable")

    def write(self, figure: go.Figure | dict, path: Path, fmt: str, scale: float = 1) -> Path:
        """Write ``figure`` to ``path`` as ``fmt`` atomically (an SVG states its size in inches); returns ``path``."""
        data = self.image(figure, fmt, scale)
        if fmt == "svg":
            data = _svg_in_inches(data.decode("utf-8")).encode("utf-8")
        try:
            return write_atomically(path, data)
        except OSError as error:
            raise StaticExportError(_unwritable(path, error)) from error

    def close(self) -> None:
        """Close the browser and stop the session's thread; a later figure starts a new browser."""
        with self._lock:
            self._stop()
            loop, self._loop = self._loop, None
            if loop is not None:
                loop.call_soon_threadsafe(loop.stop)
            self._unavailable = None

    async def _render(self, spec: dict, opts: dict) -> bytes:
        if self._kaleido is None:
            import kaleido

            browser = kaleido.Kaleido(n=1, timeout=None, mathjax=False)  # the session times each call
            try:
                await browser.open()
            except BaseException:
                await asyncio.shield(_close_quietly(browser))
                raise
            self._kaleido = browser
        return await self._kaleido.calc_fig(spec, opts=opts)

    def _call(self, coroutine: Any) -> Any:
        """Run ``coroutine`` on the session's loop; one that outlives ``timeout`` (starting the browser included) is
        cancelled and raises TimeoutError."""
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=_serve, args=(self._loop,), name="headscope-kaleido", daemon=True).start()
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(self.timeout)
        except concurrent.futures.TimeoutError:
            if future.done():  # a TimeoutError of the call itself (kaleido's), not of the wait
                raise
            future.cancel()
            raise TimeoutError(f"the browser did not answer within {self.timeout:g} s") from None

    def _stop(self) -> None:
        """Close the browser (a dead or hung one too); the next figure starts a new one."""
        browser, self._kaleido = self._kaleido, None
        if browser is None or self._loop is None:
            return
        future = asyncio.run_coroutine_threadsafe(browser.close(), self._loop)
        try:
            future.result(30)
        except Exception:  # a browser that cannot even close is abandoned; its process dies with ours
            future.cancel()


async def _close_quietly(browser: Any) -> None:
    with contextlib.suppress(Exception):  # it failed to start; what is left of it dies with this process
        await browser.close()


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()


SESSION = StaticSession()
"""The process's shared session: :func:`save`, :func:`export` and the notebook renderer use it."""
atexit.register(SESSION.close)


class NotebookPng(PngRenderer):
    """plotly's PNG renderer through :data:`SESSION` (one browser for a notebook's figures, tried again on a
    transient failure, a one-line error otherwise); registered as the renderer ``"headscope_png"`` (the notebooks
    use ``pio.renderers.default = "plotly_mimetype+headscope_png"``)."""

    def to_mimebundle(self, fig_dict: dict) -> dict:
        image = SESSION.image(fig_dict, "png", self.scale or 1)
        return {self.mime_type: base64.b64encode(image).decode("ascii")}


pio.renderers["headscope_png"] = NotebookPng()


def _no_browser(error: BaseException) -> bool:
    from choreographer.errors import ChromeNotFoundError

    return isinstance(error, ChromeNotFoundError)


def _no_browser_reason() -> str:
    given = os.environ.get("BROWSER_PATH")
    where = f"BROWSER_PATH='{given}' is not one" if given else "none was found"
    return (f"needs Chrome or Chromium for kaleido, and {where}: install Debian's `chromium` package (the set-up "
            "script does when run as root) or set BROWSER_PATH to a browser")


def _failure(error: BaseException, tries: int) -> str:
    """What went wrong, to follow "static PNG export ": the browser's repeated failure or kaleido's own error."""
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    detail = f"{type(error).__name__}: {first}" if first else type(error).__name__
    if _transient(error) or _PAGE_NOT_LOADED in str(error):
        return f"failed: the browser failed {tries} times in a row ({detail})"
    return f"failed in kaleido ({detail})"


def _unwritable(path: Path, error: OSError) -> str:
    return f"cannot write {path}: {error.strerror or error}"


class StaticExportError(RuntimeError):
    """A static figure could not be made or written; the message says why in one line."""


def _svg_in_inches(svg: str) -> str:
    """State the root ``<svg>``'s width and height in inches; its view box keeps the drawing's coordinates."""
    root = re.match(r"<svg\b[^>]*>", svg)
    if root is None or "viewBox=" not in root.group(0):
        return svg

    def inches(match: re.Match[str]) -> str:
        return f' {match.group(1)}="{float(match.group(2)) / PIXELS_PER_INCH:g}in"'

    tag = re.sub(r'\s(width|height)="([0-9.]+)"', inches, root.group(0), count=2)
    return tag + svg[root.end():]


def escape_label(text: str) -> str:
    """Escape text (a token, a description) for plotly's HTML-like labels: shown as text, never as markup."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
