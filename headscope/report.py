"""``report.html``: one self-contained page for a run, written by ``headscope analyze``.

plotly.js is inlined once (no network needed to open the file), then a section per analysis: its status and
timing, its error when it failed, its figures (interactive), a table of the top heads of each map, its summary,
the first rows of its tables and its parameters; the run's provenance closes the page. Every string that comes
from a model, an input or a user (token text, summaries, parameters, error messages) is escaped with
:func:`html.escape` before it reaches the page; figure data goes through plotly's JSON encoder, which escapes
``<``.

Linked views: with :class:`headscope.views.Views` given, clicking a head in a layer x head heatmap draws that
head's attention pattern (query x key, token text on the axes) in the section's pattern view. The patterns are
embedded once as JSON with ``<`` escaped, token labels are escaped for plotly's HTML-like labels, and messages
are set as text, never as HTML.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from headscope import plotting
from headscope.results import AnalysisResult, Results, to_jsonable, write_atomically
from headscope.views import Views

TOP_HEADS = 5
TABLE_ROWS = 10
"""Rows of each analysis table shown in the report; the rest are in ``results.json``."""

Figures = Mapping[str, Mapping[str, go.Figure]]
"""Figures by analysis name, then by figure name."""

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 1em 2em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.value { font-family: ui-monospace, monospace; white-space: pre-wrap; }
.status-ok { color: #1a7f37; } .status-failed, .error { color: #b42318; } .status-skipped { color: #8a6d00; }
.error { font-family: ui-monospace, monospace; background: #fff4f2; padding: .5em; }
.figure { margin: .5em 0 1.5em; } .note { color: #666; }
.pattern-view { border: 1px dashed #bbb; padding: .5em; margin: .5em 0 1.5em; min-height: 3em; }
"""

# Clicking a heatmap cell of stack S at (head x, layer y) draws the stored pattern of S:y.x, or says why not.
_LINKING = """
window.addEventListener("load", function () {
  var data = JSON.parse(document.getElementById("headscope-views").textContent);
  function show(view, stack, layer, head) {
    var name = stack + ":" + layer + "." + head, rows = data.maps[name], labels = data.labels[stack];
    var message = view.querySelector(".pattern-message"), plot = view.querySelector(".pattern-plot");
    if (!rows || !labels) {
      Plotly.purge(plot);
      message.textContent = "No stored pattern for head " + name + ": the report keeps the top heads of each map ("
        + Object.keys(data.maps).length + " heads). " + data.note;
      return;
    }
    message.textContent = "Attention pattern of head " + name + " (" + data.note + ").";
    var queries = labels.queries.map(function (_, i) { return i; });
    var keys = labels.keys.map(function (_, i) { return i; });
    Plotly.newPlot(plot, [{type: "heatmap", z: rows, x: keys, y: queries, colorscale: "Viridis", zmin: 0,
      hovertemplate: "query %{y}, key %{x}: %{z:.3f}<extra></extra>"}],
      {title: {text: name}, template: "simple_white", height: 520, margin: {l: 110, b: 110, t: 40},
       xaxis: {title: {text: "key"}, tickvals: keys, ticktext: labels.keys, tickangle: -60, tickfont: {size: 9}},
       yaxis: {title: {text: "query"}, tickvals: queries, ticktext: labels.queries, autorange: "reversed",
               tickfont: {size: 9}}},
      {displaylogo: false});
    view.setAttribute("data-shown", name);
  }
  document.querySelectorAll(".figure[data-stack]").forEach(function (box) {
    var plot = box.querySelector(".js-plotly-plot"), view = document.getElementById(box.dataset.view);
    if (!plot || !view) { return; }
    plot.on("plotly_click", function (event) {
      var point = event.points[0];
      show(view, box.dataset.stack, point.y, point.x);
    });
  });
});
"""


def write(results: Results, path: str | os.PathLike[str], figures: Figures | None = None,
          views: Views | None = None) -> Path:
    """Write the report of ``results`` to ``path`` atomically and return the path.

    ``figures`` are shown per analysis; by default, one heatmap per map. ``views`` feed the linked views.
    """
    return write_atomically(path, render(results, figures, views).encode("utf-8"))


def render(results: Results, figures: Figures | None = None, views: Views | None = None) -> str:
    """The report of ``results`` as one HTML document; with ``views``, heatmap clicks show head patterns."""
    if figures is None:
        figures = {name: {f"{metric}-{stack}": plotting.heatmap(head_map, f"{name}: {metric} ({stack})")
                          for (metric, stack), head_map in result.maps.items()}
                   for name, result in results.items() if result.status == "ok"}
    model = _model_name(results.provenance.get("model"))
    contents = "".join(
        f'<li><a href="#analysis-{_e(name)}">{_e(name)}</a> '
        f'<span class="status-{_e(result.status)}">{_e(result.status)}</span></li>'
        for name, result in results.items()
    )
    sections = "".join(_section(name, result, figures.get(name, {}), index, views is not None)
                       for index, (name, result) in enumerate(results.items()))
    linking = ""
    if views is not None:
        payload = json.dumps(_view_data(views), ensure_ascii=False).replace("<", "\\u003c")
        linking = (f'<script type="application/json" id="headscope-views">{payload}</script>\n'
                   f"<script>{_LINKING}</script>")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>headscope report: {_e(model)}</title>
<style>{_STYLE}</style>
<script>{get_plotlyjs()}</script>
</head>
<body>
<h1>headscope report: {_e(model)}</h1>
<ul>{contents}<li><a href="#provenance">provenance</a></li></ul>
{sections}
<section id="provenance"><h2>Provenance</h2>{_pairs(results.provenance)}</section>
{linking}
</body>
</html>
"""


def _view_data(views: Views) -> dict[str, Any]:
    """The views with every token label escaped for plotly's HTML-like tick labels."""
    labels = {stack: {axis: [plotting.escape_label(token) for token in tokens] for axis, tokens in axes.items()}
              for stack, axes in views.labels.items()}
    return {"labels": labels, "maps": views.maps, "note": views.note}


def _section(name: str, result: AnalysisResult, figures: Mapping[str, go.Figure], index: int,
             linked: bool = False) -> str:
    parts = [
        f'<section class="analysis" id="analysis-{_e(name)}">',
        f'<h2>{_e(name)} <span class="status-{_e(result.status)}">({_e(result.status)})</span></h2>',
        f'<p class="note">{result.seconds:.2f} s</p>',
    ]
    if result.error:
        parts.append(f'<p class="error">{_e(result.error)}</p>')
    if result.maps:
        parts.append("<h3>Top heads</h3>" + _top_heads(result))
    heatmaps = {f"{metric}-{stack.replace(':', '_')}": stack for metric, stack in result.maps}
    view = f"pattern-{index}"
    for number, (figure_name, figure) in enumerate(figures.items()):
        div = pio.to_html(figure, include_plotlyjs=False, full_html=False, div_id=f"figure-{index}-{number}",
                          config={"displaylogo": False})
        stack = heatmaps.get(figure_name) if linked else None
        link = f' data-stack="{_e(stack)}" data-view="{view}"' if stack is not None else ""
        parts.append(f'<div class="figure" title="{_e(figure_name)}"{link}>{div}</div>')
    if linked and any(name in heatmaps for name in figures):
        parts.append(f'<div class="pattern-view" id="{view}"><p class="note pattern-message">Click a head in a '
                     'heatmap above to see its attention pattern on the probe.</p><div class="pattern-plot"></div>'
                     '</div>')
    if result.summary:
        parts.append("<h3>Summary</h3>" + _pairs(result.summary))
    for table_name, table in result.tables.items():
        shown = table.head(TABLE_ROWS)
        more = (f'<p class="note">first {TABLE_ROWS} of {len(table)} rows; all are in results.json</p>'
                if len(table) > TABLE_ROWS else "")
        header = "".join(f"<th>{_e(column)}</th>" for column in table.columns)
        rows = "".join("<tr>" + "".join(f'<td class="value">{_e(_text(cell))}</td>' for cell in row) + "</tr>"
                       for row in shown.itertuples(index=False))
        parts.append(f"<h3>Table {_e(table_name)}</h3><table><tr>{header}</tr>{rows}</table>{more}")
    if result.params:
        parts.append("<h3>Parameters</h3>" + _pairs(result.params))
    parts.append("</section>")
    return "\n".join(parts)


def _top_heads(result: AnalysisResult) -> str:
    rows = []
    for (metric, stack), head_map in result.maps.items():
        if head_map.notable == "label":  # categories, not scores: nothing to rank
            continue
        top = ", ".join(f"{layer}.{head} = {value:.3g}" for layer, head, value in head_map.top(TOP_HEADS))
        rows.append(f"<tr><td>{_e(metric)}</td><td>{_e(stack)}</td><td>{_e(top)}</td>"
                    f"<td>{_e(head_map.description)}</td></tr>")
    return ("<table><tr><th>metric</th><th>stack</th><th>top heads (layer.head = value)</th><th>meaning</th></tr>"
            + "".join(rows) + "</table>")


def _pairs(mapping: Mapping[str, Any]) -> str:
    rows = "".join(f'<tr><th>{_e(key)}</th><td class="value">{_e(_text(value))}</td></tr>'
                   for key, value in mapping.items())
    return f"<table>{rows}</table>"


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(to_jsonable(value), ensure_ascii=False)
    except TypeError:
        return str(value)


def _model_name(model: Any) -> str:
    if isinstance(model, Mapping):
        return str(model.get("id") or model.get("alias") or model.get("path") or model.get("type") or "model")
    return str(model or "model")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)
