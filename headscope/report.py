"""``report.html``: one self-contained page for a run, written by ``headscope analyze``.

plotly.js is inlined once (no network needed to open the file). The page opens with an overview (the model, the
input, each analysis's headline numbers) and a banner for each caveat (a synthetic model, a truncated input, heads
with no value, figures not written, an analysis that failed); then a section per analysis: its status and timing,
its error when it failed, its heatmaps as small multiples (the stacks of one metric side by side), its own
figures, a table of the top heads of each map, its summary, the first rows of its tables (scrolling, numbers to
4 significant digits) and the parameters that apply to the model; the run's provenance closes the page. Every
string that comes from a model, an input or a user (token text, summaries, parameters, error messages) is
escaped with :func:`html.escape` before it reaches the page; figure data goes through plotly's JSON encoder, which
escapes ``<``.

Linked views: with :class:`headscope.views.Views` given, clicking a head in a layer x head heatmap draws that
head's attention pattern (query x key, readable token text on the axes) beside the clicked heatmap, on the probe
the head's map was measured on (the repeated tokens for induction heads, the prose for sinks). The patterns are
embedded once as JSON with ``<`` escaped, token labels are escaped for plotly's HTML-like labels, and messages
are set as text, never as HTML.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from headscope import plotting, registry
from headscope.results import AnalysisResult, Results, to_jsonable, write_atomically
from headscope.views import Views

TOP_HEADS = 5
TABLE_ROWS = 10
"""Rows of each analysis table shown in the report; the rest are in ``results.json``."""

Figures = Mapping[str, Mapping[str, go.Figure]]
"""Figures by analysis name, then by figure name."""

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1500px; padding: 1em 2em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.value { font-family: ui-monospace, monospace; white-space: pre-wrap; }
td.number { font-family: ui-monospace, monospace; text-align: right; white-space: nowrap; }
.status-ok { color: #1a7f37; } .status-failed, .error { color: #b42318; } .status-skipped { color: #8a6d00; }
.error { font-family: ui-monospace, monospace; background: #fff4f2; padding: .5em; }
.note { color: #666; }
.scroll { max-width: 100%; max-height: 26em; overflow: auto; margin: .5em 0 1em; }
.scroll table { margin: 0; } .scroll th { position: sticky; top: 0; }
.banner { border-left: 5px solid #c99700; background: #fff8e1; padding: .45em .9em; margin: .4em 0; }
.banner.severe { border-color: #b42318; background: #fff4f2; }
.overview td.headline { max-width: 60em; }
.figures { display: flex; flex-wrap: wrap; gap: 8px 16px; align-items: flex-start; margin: .5em 0 1em; }
.figure { flex: 0 1 auto; max-width: 100%; overflow-x: auto; }
.pattern-view { flex: 1 1 440px; max-width: 100%; border: 1px dashed #bbb; padding: .5em; min-height: 3em; }
"""

# Clicking a heatmap cell of stack S at (head x, layer y) draws the stored pattern of S:y.x on the probe the figure
# names (data-probe: the heads' own probe, such as the repeated tokens induction heads were found on), beside the
# clicked heatmap, or says why not.
_LINKING = """
window.addEventListener("load", function () {
  var data = JSON.parse(document.getElementById("headscope-views").textContent);
  function show(view, box, layer, head) {
    var probe = box.dataset.probe ? box.dataset.probe + "/" : "", stack = box.dataset.stack;
    var name = stack + ":" + layer + "." + head, rows = data.maps[probe + name], labels = data.labels[probe + stack];
    var note = data.notes[box.dataset.probe || ""] || data.note;
    var message = view.querySelector(".pattern-message"), plot = view.querySelector(".pattern-plot");
    box.after(view);
    if (!rows || !labels) {
      Plotly.purge(plot);
      message.textContent = "No stored pattern for head " + name + ": the report keeps the top heads of each map ("
        + Object.keys(data.maps).length + " patterns). " + note;
      return;
    }
    message.textContent = "Attention pattern of head " + name + " (" + note + ").";
    var queries = labels.queries.map(function (_, i) { return i; });
    var keys = labels.keys.map(function (_, i) { return i; });
    var every = Math.max(1, Math.ceil(keys.length / 40)), ticks = keys.filter(function (i) { return i % every === 0; });
    var rowsEvery = Math.max(1, Math.ceil(queries.length / 40));
    var rowTicks = queries.filter(function (i) { return i % rowsEvery === 0; });
    Plotly.newPlot(plot, [{type: "heatmap", z: rows, x: keys, y: queries, colorscale: "Viridis", zmin: 0,
      colorbar: {title: {text: "share", side: "right"}},
      customdata: queries.map(function (q) { return keys.map(function (k) {
        return [labels.queries[q], labels.keys[k]]; }); }),
      hovertemplate: "query %{y} %{customdata[0]}<br>key %{x} %{customdata[1]}<br>%{z:.3f}<extra></extra>"}],
      {title: {text: name}, template: "simple_white", height: 560, margin: {l: 120, b: 120, t: 40},
       xaxis: {title: {text: labels.key_title || "key"}, tickvals: ticks,
               ticktext: ticks.map(function (i) { return labels.keys[i]; }), tickangle: -60, tickfont: {size: 9}},
       yaxis: {title: {text: "query"}, tickvals: rowTicks, autorange: "reversed", tickfont: {size: 9},
               ticktext: rowTicks.map(function (i) { return labels.queries[i]; })}},
      {displaylogo: false, responsive: true});
    view.setAttribute("data-shown", probe + name);
  }
  document.querySelectorAll(".figure[data-stack]").forEach(function (box) {
    var plot = box.querySelector(".js-plotly-plot"), view = document.getElementById(box.dataset.view);
    if (!plot || !view) { return; }
    plot.on("plotly_click", function (event) {
      var point = event.points[0];
      show(view, box, point.y, point.x);
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
    sections = "".join(_section(name, result, figures.get(name, {}), index, views, results.provenance)
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
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>headscope report: {_e(model)}</title>
<style>{_STYLE}</style>
<script>{get_plotlyjs()}</script>
</head>
<body>
<h1>headscope report: {_e(model)}</h1>
{_banners(results)}
{_overview(results)}
{sections}
<section id="provenance"><h2>Provenance</h2>{_pairs(results.provenance, rounded=False)}</section>
{linking}
</body>
</html>
"""


def _overview(results: Results) -> str:
    """The model, the input, and one row per analysis with its status, time and headline numbers."""
    provenance = results.provenance
    rows = [("model", _model_line(provenance))]
    stacks = provenance.get("stacks")
    if isinstance(stacks, Mapping) and stacks:
        rows.append(("attention", "; ".join(
            f"{name}: {info.get('layers')} layers x {info.get('heads')} heads" for name, info in stacks.items()
            if isinstance(info, Mapping))))
    shown = _input_line(results)
    if shown:
        rows.append(("input", shown))
    table = "".join(f"<tr><th>{_e(key)}</th><td>{_e(value)}</td></tr>" for key, value in rows)
    analyses = "".join(
        f'<tr><td><a href="#analysis-{_e(name)}">{_e(name)}</a></td>'
        f'<td class="status-{_e(result.status)}">{_e(result.status)}</td>'
        f'<td class="number">{result.seconds:.1f} s</td>'
        f'<td class="headline">{"<br>".join(_e(line) for line in headline(name, result))}</td></tr>'
        for name, result in results.items())
    return (f'<section class="overview" id="overview"><table>{table}</table>'
            f"<table><tr><th>analysis</th><th>status</th><th>time</th><th>headline</th></tr>{analyses}"
            '<tr><td colspan="4"><a href="#provenance">provenance</a></td></tr></table></section>')


def _model_line(provenance: Mapping[str, Any]) -> str:
    parts = [_model_name(provenance.get("model"))]
    parts += [str(provenance[key]) for key in ("architecture", "kind", "dtype", "device") if provenance.get(key)]
    return ", ".join(parts)


def _input_line(results: Results) -> str:
    """The run's input and its length, as the runner recorded it (``provenance.input``); for results written
    without it, the first analysis summary's ``input`` and ``tokens``."""
    given = results.provenance.get("input")
    if isinstance(given, Mapping) and isinstance(given.get("source"), str):
        for key, unit in (("tokens", "tokens"), ("seconds", "s of audio")):
            if isinstance(given.get(key), (int, float)):
                cut = (f" (cut from {given['cut_from']} to fit)" if isinstance(given.get("cut_from"), int)
                       else "")
                return f"{given['source']}, {_number(given[key])} {unit}{cut}"
        return given["source"]
    for result in results.values():
        source, tokens = result.summary.get("input"), result.summary.get("tokens")
        if isinstance(tokens, list) and len(tokens) == 1:
            tokens = tokens[0]
        if isinstance(source, str):
            return source + (f", {tokens} tokens" if isinstance(tokens, int) else "")
    return ""


def headline(name: str, result: AnalysisResult) -> list[str]:
    """The few numbers that say what ``result`` found, as lines of text: for every analysis the top head of its
    main metric per stack; for ``sinks`` the share of sink heads and the largest massive activation too."""
    if result.status != "ok":
        return [f"{result.status}: {result.error or ''}".strip()]
    lines = []
    summary = result.summary
    for key, value in summary.items():
        if key.startswith("sink_rate_") and isinstance(value, (int, float)):
            eps = summary.get("eps")
            lines.append(f"{value:.3g}% of {key.removeprefix('sink_rate_')} heads are sinks"
                         + (f" (sink score above {eps:g})" if isinstance(eps, (int, float)) else ""))
    top = summary.get("top_activation")
    if isinstance(top, Mapping) and isinstance(top.get("value"), (int, float)):
        lines.append(f"{summary.get('massive_activations', 'some')} massive activations; the largest activation "
                     f"{_number(top['value'])} at layer {top.get('layer')}, token {top.get('token')!r}, dimension "
                     f"{top.get('dimension')}")
    metric = summary.get("main_metric")
    for (name_, stack), head_map in result.maps.items():
        if name_ != metric or head_map.notable == "label":
            continue
        best = head_map.top(1)
        if best:
            layer, head, value = best[0]
            finite = head_map.values[np.isfinite(head_map.values)]
            median = f" (median {_number(float(np.median(finite)))})" if finite.size else ""
            lines.append(f"top {metric} head ({stack}) {layer}.{head} = {_number(value)}"
                         f"{' ' + head_map.unit if head_map.unit and head_map.unit != 'share' else ''}{median}")
    return lines or ["no maps"]


def _banners(results: Results) -> str:
    """One banner per caveat a reader must not miss: a synthetic model, every note of the run (a truncated input,
    figure files not written), heads with no value (NaN), an analysis that failed."""
    provenance = results.provenance
    severe, notes = [], []
    synthetic = provenance.get("model", {}).get("synthetic") if isinstance(provenance.get("model"), Mapping) else None
    if synthetic:
        severe.append(f"Synthetic model: {synthetic}")
    for note in provenance.get("notes", []) if isinstance(provenance.get("notes"), list) else []:
        if not str(note).startswith("synthetic model:"):
            notes.append(str(note))
    for name, result in results.items():
        if result.status == "failed":
            severe.append(f"{name} failed: {result.error}")
        for (metric, stack), head_map in result.maps.items():
            missing = int(np.isnan(np.asarray(head_map.values, dtype=float)).sum())
            if missing:
                notes.append(f"{name}: {missing} of {head_map.values.size} heads have no value (NaN) in {metric} "
                             f"({stack}): not measured, or not there in that layer")
    return "".join([f'<p class="banner severe">{_e(text)}</p>' for text in severe]
                   + [f'<p class="banner">{_e(text)}</p>' for text in notes])


def _view_data(views: Views) -> dict[str, Any]:
    """The views with every token label escaped for plotly's HTML-like tick labels."""
    labels = {stack: {axis: [plotting.escape_label(token) for token in tokens] if isinstance(tokens, list)
                      else plotting.escape_label(str(tokens)) for axis, tokens in axes.items()}
              for stack, axes in views.labels.items()}
    return {"labels": labels, "maps": views.maps, "note": views.note, "notes": views.notes}


def _section(name: str, result: AnalysisResult, figures: Mapping[str, go.Figure], index: int,
             views: Views | None = None, provenance: Mapping[str, Any] | None = None) -> str:
    parts = [
        f'<section class="analysis" id="analysis-{_e(name)}">',
        f'<h2>{_e(name)} <span class="status-{_e(result.status)}">({_e(result.status)})</span></h2>',
        f'<p class="note">{result.seconds:.2f} s</p>',
    ]
    if result.error:
        parts.append(f'<p class="error">{_e(result.error)}</p>')
    if result.maps:
        parts.append("<h3>Top heads</h3>" + _top_heads(result))
    heatmaps = {f"{metric}-{stack.replace(':', '_')}": (metric, stack) for metric, stack in result.maps}
    view = f"pattern-{index}"
    linked = views is not None
    by_metric: dict[str, list[str]] = {}  # small multiples: the heatmaps, one metric's stacks side by side
    for figure_name in figures:
        if figure_name in heatmaps:
            by_metric.setdefault(heatmaps[figure_name][0], []).append(figure_name)
    own = [figure_name for figure_name in figures if figure_name not in heatmaps]
    number = 0
    for members in ([name for names in by_metric.values() for name in names], own):
        boxes = []
        for figure_name in members:
            figure = figures[figure_name]
            div = pio.to_html(figure, include_plotlyjs=False, full_html=False, div_id=f"figure-{index}-{number}",
                              config={"displaylogo": False})
            number += 1
            link = ""
            if linked and figure_name in heatmaps:
                metric, stack = heatmaps[figure_name]
                probe = views.routes.get(f"{name}/{metric}", "")
                link = f' data-stack="{_e(stack)}" data-view="{view}"' + (f' data-probe="{_e(probe)}"' if probe else "")
            boxes.append(f'<div class="figure" title="{_e(figure_name)}"{link}>{div}</div>')
        if boxes:
            parts.append(f'<div class="figures">{"".join(boxes)}</div>')
    if linked and any(name in heatmaps for name in figures):
        parts.append(f'<div class="pattern-view" id="{view}"><p class="note pattern-message">Click a head in a '
                     'heatmap to see its attention pattern here.</p><div class="pattern-plot"></div></div>')
    if result.summary:
        parts.append("<h3>Summary</h3>" + _pairs(result.summary))
    for table_name, table in result.tables.items():
        shown = table.head(TABLE_ROWS)
        more = (f'<p class="note">first {TABLE_ROWS} of {len(table)} rows; all are in results.json</p>'
                if len(table) > TABLE_ROWS else "")
        header = "".join(f"<th>{_e(column)}</th>" for column in table.columns)
        rows = "".join("<tr>" + "".join(_cell(cell) for cell in row) + "</tr>" for row in shown.itertuples(index=False))
        parts.append(f'<h3>Table {_e(table_name)}</h3><div class="scroll"><table><tr>{header}</tr>{rows}</table></div>'
                     f"{more}")
    if result.params:
        parts.append(_parameters(name, result.params, provenance or {}))
    parts.append("</section>")
    return "\n".join(parts)


def _parameters(name: str, params: Mapping[str, Any], provenance: Mapping[str, Any]) -> str:
    """The parameters that apply to the run's model (:attr:`headscope.Parameters.applies`), and a note naming the
    others."""
    cls = None
    with contextlib.suppress(Exception):  # an analysis this installation does not have: show every parameter
        cls = registry.get(name).params
    shown = list(params)
    if cls is not None and hasattr(cls, "applicable"):
        given = provenance.get("input")
        reads = given.get("kind") if isinstance(given, Mapping) else None
        shown = cls.applicable(params, provenance.get("kind"), reads)
    hidden = [key for key in params if key not in shown]
    note = (f'<p class="note">not shown: {_e(", ".join(hidden))}, which do not apply to this model (all are in '
            "results.json)</p>" if hidden else "")
    return "<h3>Parameters</h3>" + _pairs({key: params[key] for key in shown}, rounded=False) + note


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


def _pairs(mapping: Mapping[str, Any], rounded: bool = True) -> str:
    """A two-column table; numbers to 4 significant digits unless ``rounded`` is false (parameters and provenance
    are shown as given: ``eps = 0.12345`` is what ran)."""
    rows = "".join(f'<tr><th>{_e(key)}</th><td class="value">{_e(_text(value) if rounded else _given(value))}</td></tr>'
                   for key, value in mapping.items())
    return f'<div class="scroll"><table>{rows}</table></div>'


def _cell(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return f'<td class="value">{_e(_text(value))}</td>'
    return f'<td class="number">{_e(_number(value))}</td>'


def _number(value: Any) -> str:
    """A number to its precision: integers whole, other values to 4 significant digits (no 16-digit floats)."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    if not np.isfinite(value):
        return "NaN" if np.isnan(value) else ("inf" if value > 0 else "-inf")
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}"


def _given(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(to_jsonable(value), ensure_ascii=False)
    except TypeError:
        return str(value)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, np.integer, np.floating)):
        return _number(value)
    try:
        return json.dumps(_rounded(to_jsonable(value)), ensure_ascii=False)
    except TypeError:
        return str(value)


def _rounded(value: Any) -> Any:
    """``value`` (JSON-safe) with every float to 4 significant digits."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return value


def _model_name(model: Any) -> str:
    if isinstance(model, Mapping):
        return str(model.get("id") or model.get("alias") or model.get("path") or model.get("type") or "model")
    return str(model or "model")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)
