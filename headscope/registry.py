"""The analyses registry: each analysis registers under a name; the CLI and the API read it.

Adding an analysis adds its ``headscope analyze --analyses`` option for free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headscope.errors import HeadscopeError

if TYPE_CHECKING:
    from headscope.capture.engine import Scope
    from headscope.models.load import Loaded
    from headscope.results import AnalysisResult


@dataclass
class Context:
    """What an analysis runs on: the loaded model, its scope, and the user's input and options.

    ``text`` is the user's free text (``--text``/``--input``), or None for the analysis's default probe;
    ``max_tokens`` truncates inputs; ``params`` holds per-analysis parameter overrides.
    """

    loaded: Loaded
    scope: Scope
    text: str | None = None
    input_path: str | None = None
    max_tokens: int | None = None
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Analysis:
    """A registered analysis: its name, the model kinds it fits, and the function that runs it."""

    name: str
    kinds: tuple[str, ...]
    description: str
    run: Callable[[Context], AnalysisResult]
    figures: Callable[[AnalysisResult], dict[str, Any]] | None = None
    default: bool = True  # part of a run that names no analyses
    exports: Callable[[AnalysisResult, Path], list[Path]] | None = None

    def fits(self, kind: str) -> bool:
        return kind in self.kinds


_REGISTRY: dict[str, Analysis] = {}


def register(
    name: str,
    *,
    kinds: tuple[str, ...],
    description: str,
    figures: Callable[[AnalysisResult], dict[str, Any]] | None = None,
    default: bool = True,
    exports: Callable[[AnalysisResult, Path], list[Path]] | None = None,
):
    """Decorator: register ``run(context) -> AnalysisResult`` as the analysis ``name``.

    ``figures(result)``, when given, returns the analysis's own figures beyond the per-map heatmaps
    (``{name: plotly Figure}``); ``headscope analyze`` saves them beside the heatmaps. ``default=False``
    keeps a costly analysis out of runs that name no analyses (``--analyses`` still runs it).
    ``exports(result, folder)``, when given, writes the result in the formats of the research code people
    already use into ``folder`` and returns the paths; ``headscope analyze`` moves them into ``OUT/exports``.
    """

    def decorate(run: Callable[[Context], AnalysisResult]) -> Callable[[Context], AnalysisResult]:
        _REGISTRY[name] = Analysis(name=name, kinds=kinds, description=description, run=run, figures=figures,
                                   default=default, exports=exports)
        return run

    return decorate


def check_names(analysis: str, params_class: type, given: dict[str, Any]) -> None:
    """One clear error when ``given`` names a parameter the dataclass ``params_class`` does not have."""
    known = [f.name for f in fields(params_class)]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise HeadscopeError(f"unknown {analysis} parameter(s) {', '.join(unknown)}: the parameters are "
                             f"{', '.join(known)}")


def read_scalars(analysis: str, params_class: type, given: dict[str, Any], **fixed: Any) -> Any:
    """``params_class`` (a dataclass of bool, int, float and str fields) with ``given``'s values, each converted to
    its default's type (``--set`` gives strings; a bool reads 1, true or yes), and ``fixed`` set as they are."""
    check_names(analysis, params_class, given)
    values = dict(fixed)
    for name, value in given.items():
        default = getattr(params_class, name)
        if isinstance(default, bool) and isinstance(value, str):
            value = value.lower() in ("1", "true", "yes")
        try:
            values[name] = type(default)(value)
        except (TypeError, ValueError):
            wanted = {int: "an integer", float: "a number"}.get(type(default), type(default).__name__)
            raise HeadscopeError(f"{analysis}.{name} takes {wanted}, not {value!r}") from None
    return params_class(**values)


def list_analyses() -> list[str]:
    """Names of every registered analysis."""
    _load_builtin()
    return list(_REGISTRY)


def get(name: str) -> Analysis:
    """The analysis ``name``; one clear error naming the known ones otherwise."""
    _load_builtin()
    if name not in _REGISTRY:
        raise HeadscopeError(f"unknown analysis '{name}': choose from {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def select(names: list[str] | None, kind: str) -> list[Analysis]:
    """The analyses to run on a model of ``kind``: the named ones (each must fit), or the default ones that fit."""
    _load_builtin()
    if not names:
        return [a for a in _REGISTRY.values() if a.default and a.fits(kind)]
    chosen = [get(name) for name in names]
    for analysis in chosen:
        if not analysis.fits(kind):
            raise HeadscopeError(
                f"analysis '{analysis.name}' does not fit a {kind} model (it fits {', '.join(analysis.kinds)})"
            )
    return chosen


def _load_builtin() -> None:
    import headscope.analyses  # noqa: F401  (registers the built-in analyses)
