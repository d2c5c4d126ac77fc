"""An analysis result's figures: one layer x head heatmap per map, then the analysis's own figures.

The same figures back :meth:`AnalysisResult.plot`, ``headscope analyze``'s ``figures/`` folder and the report. They
need the result alone, never the model, so a result loaded from ``results.json`` draws them too.
"""

from __future__ import annotations

import plotly.graph_objects as go

from headscope import plotting, registry
from headscope.results import AnalysisResult


def heatmaps(result: AnalysisResult) -> dict[str, go.Figure]:
    """One heatmap per map of ``result``, named ``METRIC-STACK`` (a numbered stack's ``:`` written ``_``)."""
    return {f"{metric}-{stack.replace(':', '_')}": plotting.heatmap(head_map, f"{result.name}: {metric} ({stack})")
            for (metric, stack), head_map in result.maps.items()}


def own(result: AnalysisResult) -> dict[str, go.Figure]:
    """The figures of ``result``'s analysis beyond the heatmaps (its ``figures`` hook); none for an analysis this
    installation does not have."""
    if result.name not in registry.list_analyses():
        return {}
    hook = registry.get(result.name).figures
    return {} if hook is None else {name: plotting.fit_title(figure) for name, figure in hook(result).items()}


class Figures(dict):
    """Figures by name; Jupyter draws every one of them when this is a cell's value."""

    def _ipython_display_(self) -> None:
        from IPython.display import display

        for figure in self.values():
            display(figure)


def of(result: AnalysisResult) -> Figures:
    """Every figure of a finished ``result``: :func:`heatmaps`, then :func:`own`."""
    if result.status != "ok":
        raise ValueError(f"analysis {result.name!r} {result.status}: {result.error or 'it has no figures'}")
    return Figures({**heatmaps(result), **own(result)})
