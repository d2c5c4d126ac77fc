"""Figures: layer x head heatmaps of per-head maps, saved as interactive HTML and static PNG/SVG/PDF.

Static export goes through kaleido, which drives a Chrome/Chromium found on the machine; when none is
there, the interactive HTML is still written and the caller is told once why the static files are not.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from headscope.results import HeadMap

STATIC_FORMATS = ("png", "svg", "pdf")
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
            hovertemplate="head %{customdata}<br>value %{z:.4f}<br>" + _escape(head_map.description)
            + "<extra></extra>",
        )
    )
    figure.update_layout(
        title=title,
        xaxis_title="head",
        yaxis_title="layer",
        yaxis_autorange="reversed",
        template="simple_white",
        width=max(360, 60 + 28 * heads),
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
        try:
            figure.write_image(path, format=fmt, scale=2 if fmt == "png" else 1)
        except Exception as error:  # kaleido raises several types when no browser is found
            raise StaticExportError(
                f"static {fmt.upper()} export needs Chrome or Chromium for kaleido ({type(error).__name__}): "
                "install Debian's `chromium` package (the set-up script does when run as root)"
            ) from error
        written.append(path)
    return written


class StaticExportError(RuntimeError):
    """Static figure export is impossible on this machine (no browser for kaleido)."""


def _escape(text: str) -> str:
    """Escape text for plotly's HTML-like hover labels."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
