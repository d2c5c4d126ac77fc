"""Figures: layer x head heatmaps of per-head maps, saved as interactive HTML and static PNG/SVG/PDF.

:func:`export` writes one figure for a paper: sized to a one-column (3.5 in) or two-column (7 in) width, or any
width in inches, with font sizes in points that stay legible at that width; PNG at a chosen dpi, SVG and PDF
at that physical size. Plotly lays figures out in CSS pixels, 96 to the inch, so a 3.5 in figure is 336
pixels wide, a PNG at 300 dpi is 1050 pixels wide, and a PDF page is 252 points wide.

Static export goes through kaleido, which drives a Chrome/Chromium found on the machine; when none is
there, the interactive HTML is still written and the caller is told once why the static files are not.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.io.base_renderers import PngRenderer

from headscope.errors import HeadscopeError
from headscope.results import HeadMap

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


def heatmap(head_map: HeadMap, title: str) -> go.Figure:
    """A layer x head heatmap; hover shows ``layer.head``, the value and what the metric means."""
    values = np.asarray(head_map.values, dtype=float)
    layers, heads = values.shape
    labels = [[f"{layer}.{head}" for head in range(heads)] for layer in range(layers)]
    limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    figure = go.Figure(
        go.Heatmap(
            z=values,
            x=list(range(heads)),
            y=list(range(layers)),
            customdata=labels,
            colorscale=DIVERGING if head_map.signed else SEQUENTIAL,
            zmid=0.0 if head_map.signed else None,
            zmin=-limit if head_map.signed else None,
            zmax=limit if head_map.signed else None,
            hovertemplate="head %{customdata}<br>value %{z:.4f}<br>" + escape_label(head_map.description)
            + "<extra></extra>",
        )
    )
    figure.update_layout(
        title=escape_label(title),
        xaxis_title="head",
        yaxis_title="layer",
        yaxis_autorange="reversed",
        template="simple_white",
        # wide enough for the title too (plotly never wraps it; about 9 px a character at its default size)
        width=max(360, 60 + 28 * heads, min(900, 100 + 9 * len(title))),
        height=max(300, 120 + 18 * layers),
    )
    return figure


def save(figure: go.Figure, stem: Path, formats: Iterable[str] = ("html", *STATIC_FORMATS)) -> list[Path]:
    """Write ``figure`` as ``stem.<format>`` for each format; returns the files written.

    HTML files load plotly.js from a ``plotly.min.js`` written once beside them (no network needed).
    Raises :class:`StaticExportError` when static export is impossible on this machine, after the HTML.
    """
    written = []
    formats = list(formats)
    if "html" in formats:
        path = stem.with_suffix(".html")
        figure.write_html(path, include_plotlyjs="directory", full_html=True)
        written.append(path)
    for fmt in (f for f in formats if f != "html"):
        path = stem.with_suffix(f".{fmt}")
        _static(fmt, lambda fmt=fmt, path=path: figure.write_image(path, format=fmt, scale=2 if fmt == "png" else 1))
        written.append(path)
    return written


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
    tall = min(MAX_HEIGHT_INCHES, inches * ratio) if height is None else float(height)
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
        paper.write_html(path, include_plotlyjs=True, full_html=True)
        return path
    if fmt == "svg":
        svg = _static(fmt, lambda: paper.to_image(format="svg").decode("utf-8"))
        path.write_text(_svg_in_inches(svg), encoding="utf-8")
    else:
        _static(fmt, lambda: paper.write_image(path, format=fmt, scale=dpi / PIXELS_PER_INCH if fmt == "png" else 1))
    return path


# kaleido 1.x can run its first script call in the blank page's context when Chromium is slow to load its own page
# (a loaded machine): the call then fails with "kaleido_scopes is not defined". A new kaleido (each call starts one)
# loads the page afresh, so that error alone is tried again, a few times.
_PAGE_NOT_LOADED = "kaleido_scopes is not defined"
_STATIC_TRIES = 4


def _static(fmt: str, write: Callable[[], Any]) -> Any:
    """``write()`` through kaleido; :class:`StaticExportError` naming the cause when it cannot be done."""
    for attempt in range(_STATIC_TRIES):
        try:
            return write()
        except Exception as error:
            if _PAGE_NOT_LOADED in str(error) and attempt + 1 < _STATIC_TRIES:
                continue
            raise StaticExportError(_static_failure(fmt, error)) from error
    raise AssertionError("unreachable")


class NotebookPng(PngRenderer):
    """plotly's PNG renderer, with headscope's handling of kaleido's slow-page failure (tried again) and its one-line
    error otherwise; registered as the renderer ``"headscope_png"`` (the notebooks use
    ``pio.renderers.default = "plotly_mimetype+headscope_png"``)."""

    def to_mimebundle(self, fig_dict: dict) -> dict:
        return _static("png", lambda: super(NotebookPng, self).to_mimebundle(fig_dict))


pio.renderers["headscope_png"] = NotebookPng()


def _static_failure(fmt: str, error: BaseException) -> str:
    if "Chrome" in str(error) or "chrome" in type(error).__name__.lower():
        return (f"static {fmt.upper()} export needs Chrome or Chromium for kaleido ({type(error).__name__}): "
                "install Debian's `chromium` package (the set-up script does when run as root)")
    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    return f"static {fmt.upper()} export failed in kaleido ({type(error).__name__}: {first})"


class StaticExportError(RuntimeError):
    """Static figure export is impossible on this machine (no browser for kaleido)."""


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
