"""The analyses registry: each analysis registers under a name; the CLI and the API read it.

Adding an analysis adds its ``headscope analyze --analyses`` option for free.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import os
import tempfile
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from headscope.errors import HeadscopeError

if TYPE_CHECKING:
    from headscope.capture.engine import Scope
    from headscope.models.load import Loaded
    from headscope.results import AnalysisResult


@dataclass
class Context:
    """What an analysis runs on: the loaded model, its scope, and the user's input and options.

    ``text`` is the user's free text (``--text``/``--input``), or None for the analysis's default probe;
    ``max_tokens`` truncates inputs; ``params`` holds the analysis's parameters (its :class:`Parameters`, already
    read, when the runner made the context; a dict of overrides otherwise). :meth:`probe` is the run's input,
    built once by the runner and shared by the analyses.
    """

    loaded: Loaded
    scope: Scope
    text: str | None = None
    input_path: str | None = None
    max_tokens: int | None = None
    seed: int = 0
    params: Any = field(default_factory=dict)
    built: Any = None  # the probe of (text, input_path, max_tokens), once built

    def probe(self) -> Any:
        """The run's input (:func:`headscope.probes.inputs.build` of ``text``, ``input_path`` and ``max_tokens``),
        built on first use and kept."""
        if self.built is None:
            from headscope.probes import inputs

            self.built = inputs.build(self.loaded, self.text, self.input_path, self.max_tokens)
        return self.built


@dataclass(frozen=True)
class Analysis:
    """A registered analysis: its name, the model kinds it fits, what it computes, what it costs, its parameters
    (a :class:`Parameters` dataclass), and the functions that run it, draw its own figures and export its results."""

    name: str
    kinds: tuple[str, ...]
    description: str
    run: Callable[[Context], AnalysisResult]
    figures: Callable[[AnalysisResult], dict[str, Any]] | None = None
    default: bool = True  # part of a run that names no analyses
    exports: Callable[[AnalysisResult, Path], list[Path]] | None = None
    params: type | None = None
    cost: str = ""
    main_metric: str | None = None

    def fits(self, kind: str) -> bool:
        return kind in self.kinds

    def read_params(self, given: Mapping[str, Any] | None = None, seed: int | None = None) -> Any:
        """The analysis's parameters with ``given`` read over the defaults (:func:`read_params`); ``given`` itself
        for an analysis that declares no parameters class, which must then be empty."""
        if self.params is None:
            if given:
                raise HeadscopeError(f"analysis {self.name} takes no parameters; got {', '.join(given)}")
            return dict(given or {})
        try:
            return self.params.read(given, seed=seed)
        except HeadscopeError as error:  # say whose parameter it is, if the message does not
            raise HeadscopeError(str(error) if self.name in str(error) else f"{self.name}: {error}") from None

    def parameters(self) -> list[tuple[str, str, Any, str]]:
        """Each parameter as (name, type in words, default, one-line doc), in declaration order."""
        if self.params is None:
            return []
        hints, docs = get_type_hints(self.params), parameter_docs(self.params)
        return [(f.name, type_words(hints[f.name]), f.default, docs.get(f.name, "")) for f in fields(self.params)]


_REGISTRY: dict[str, Analysis] = {}
ENTRY_POINTS = "headscope.analyses"
"""The entry-point group a package names its analyses in: ``[project.entry-points."headscope.analyses"]``,
``NAME = "package.module"`` (a module that registers with :func:`register` when imported)."""


def register(
    name: str,
    *,
    kinds: tuple[str, ...],
    description: str,
    figures: Callable[[AnalysisResult], dict[str, Any]] | None = None,
    default: bool = True,
    exports: Callable[[AnalysisResult, Path], list[Path]] | None = None,
    params: type | None = None,
    cost: str = "",
    main_metric: str | None = None,
):
    """Decorator: register ``run(context) -> AnalysisResult`` as the analysis ``name``.

    ``params`` is the analysis's parameters, a frozen dataclass deriving from :class:`Parameters` (the runner reads
    ``--set`` values and :func:`headscope.run`'s keywords into it before any analysis runs, and ``headscope
    analyses`` lists its fields). ``cost`` says in a few words what a run costs (``"about 2 s on smollm2-135m"``).
    ``main_metric`` names the map that ``result.top_heads()`` ranks when no metric is named.
    ``figures(result)``, when given, returns the analysis's own figures beyond the per-map heatmaps
    (``{name: plotly Figure}``); ``headscope analyze`` saves them beside the heatmaps. ``default=False``
    keeps a costly analysis out of runs that name no analyses (``--analyses`` still runs it).
    ``exports(result, folder)``, when given, writes the result in the formats of the research code people
    already use into ``folder`` and returns the paths; ``headscope analyze`` moves them into ``OUT/exports``.
    """

    if params is not None and not (isinstance(params, type) and issubclass(params, Parameters)):
        raise TypeError(f"analysis {name}: params must be a dataclass deriving from headscope.Parameters")

    def decorate(run: Callable[[Context], AnalysisResult]) -> Callable[[Context], AnalysisResult]:
        _REGISTRY[name] = Analysis(name=name, kinds=kinds, description=description, run=run, figures=figures,
                                   default=default, exports=exports, params=params, cost=cost,
                                   main_metric=main_metric)
        return run

    return decorate


def check_names(analysis: str, params_class: type, given: Mapping[str, Any]) -> None:
    """One clear error when ``given`` names a parameter the dataclass ``params_class`` does not have."""
    known = [f.name for f in fields(params_class)]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise HeadscopeError(f"unknown {analysis} parameter(s) {', '.join(unknown)}: the parameters are "
                             f"{', '.join(known)}")


class Parameters:
    """Base of an analysis's parameters: a frozen dataclass whose fields are the parameters, each with a typed
    default and a line in the class docstring's ``Attributes:`` section (what ``headscope analyses`` shows).

    ``analysis`` names the analysis the parameters belong to (for messages). :meth:`read` is the one reader of
    parameters, for the CLI's ``--set`` strings and for Python values alike; :meth:`check` (override it) refuses a
    combination of values that are each of the right type but do not fit together (with a :class:`HeadscopeError`
    or a ``ValueError``).
    """

    analysis: ClassVar[str] = "analysis"
    applies: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    """Parameters that matter for some models only: name -> the model kinds (``"encoder-decoder"``) or inputs
    (``"audio"``, ``"image"``) it applies to. The report lists only the parameters that apply to the run's model
    (results.json keeps all)."""

    @classmethod
    def applicable(cls, names: Iterable[str], kind: str | None, inputs: str | None) -> list[str]:
        """Those of ``names`` that apply to a model of ``kind`` whose input is ``inputs`` (``"text"``, ``"audio"``,
        ``"image"``); every name when neither is known."""
        if kind is None and inputs is None:
            return list(names)
        return [name for name in names if name not in cls.applies or {kind, inputs} & set(cls.applies[name])]

    @classmethod
    def read(cls: type[P], given: Mapping[str, Any] | P | None = None, seed: int | None = None) -> P:
        """These parameters, with their defaults overridden by ``given`` (see :func:`read_params`)."""
        return read_params(cls, given, seed=seed)

    def check(self) -> None:
        """Raise :class:`HeadscopeError` when the values do not fit together; the base accepts any."""


P = TypeVar("P", bound=Parameters)
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def read_params(cls: type[P], given: Mapping[str, Any] | P | None = None, seed: int | None = None) -> P:
    """The parameters ``cls`` with ``given``'s values, each converted to its field's type.

    A value is the field's type already, or text to read as it: a bool reads true/false, yes/no, on/off or 1/0; a
    number reads as Python writes one; a tuple reads a JSON list or comma-separated items; a ``Literal`` one of its
    choices; ``None`` (where allowed) reads none or null. Anything else, and a name the parameters do not have, is a
    :class:`HeadscopeError` naming the parameter; no value turns silently into another. ``seed``, when given, is the
    run's seed, used for a ``seed`` parameter that ``given`` does not set.
    """
    if isinstance(given, cls):
        given.check()
        return given
    given = dict(given or {})
    check_names(cls.analysis, cls, given)
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    values: dict[str, Any] = {"seed": seed} if seed is not None and "seed" in names and "seed" not in given else {}
    for name, value in given.items():
        try:
            values[name] = convert(value, hints[name])
        except (TypeError, ValueError):
            raise HeadscopeError(f"{cls.analysis}.{name} takes {type_words(hints[name])}, not {value!r}") from None
    try:
        params = cls(**values)
        params.check()
    except ValueError as error:  # a plugin's check may raise ValueError: still the user's input
        raise HeadscopeError(str(error) if cls.analysis in str(error) else f"{cls.analysis}: {error}") from None
    return params


def convert(value: Any, hint: Any) -> Any:
    """``value`` as the type ``hint`` (see :func:`read_params`); ``ValueError`` when it is not one."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        if value in args:
            return value
        raise ValueError(value)
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(value, arg)
            except (TypeError, ValueError):
                continue
        raise ValueError(value)
    if origin is tuple:
        items = _items(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(item, args[0]) for item in items)
        if len(items) != len(args):
            raise ValueError(value)
        return tuple(convert(item, arg) for item, arg in zip(items, args, strict=True))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
            return value.strip().lower() in TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(value)
    if hint is int:
        if isinstance(value, bool):
            raise ValueError(value)
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return int(value.strip())
        raise ValueError(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(value)
        return float(value.strip() if isinstance(value, str) else value)
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(value)
    return value


def _items(value: Any) -> list:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = json.loads(text)
            if not isinstance(value, list):
                raise ValueError(text)
            return value
        return [item.strip() for item in text.split(",") if item.strip()]
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def type_words(hint: Any) -> str:
    """The type ``hint`` in words, for messages and ``headscope analyses``."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        words = [type_words(a) for a in args if a is not type(None)]
        return " or ".join(words + (["none"] if type(None) in args else []))
    if origin is tuple:
        inner = type_words(args[0]) if args else "values"
        return f"a list of {inner.removeprefix('a ').removeprefix('an ')}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(hint, str(hint))


def parameter_docs(cls: type) -> dict[str, str]:
    """Each parameter's line from the ``Attributes:`` section of ``cls``'s docstring (continuation lines joined);
    a line naming several parameters (``a, b: ...``) gives each of them."""
    docs: dict[str, str] = {}
    text = inspect.getdoc(cls) or ""
    _, found, section = text.partition("Attributes:")
    if not found:
        return docs
    names: list[str] = []
    for line in section.splitlines():
        if not line.strip():
            continue
        if not line.startswith(" "):
            break
        head, colon, rest = line.strip().partition(":")
        if line.startswith("    ") and not line.startswith("     ") and colon and \
                all(n.strip().isidentifier() for n in head.split(",")):
            names = [n.strip() for n in head.split(",")]
            for name in names:
                docs[name] = rest.strip()
        else:
            for name in names:
                docs[name] += " " + line.strip()
    return docs


def export(result: AnalysisResult, folder: str | Path) -> list[Path]:
    """Write ``result``'s exports (its analysis's ``exports`` hook: ``head_importance.npy``, Retrieval_Head's
    JSON file, ...) into ``folder`` and return their paths. Each is written in a temporary folder beside them,
    then moved into place, so a failing export leaves no partial file. An analysis without exports, or a
    result that did not finish, raises :class:`HeadscopeError`."""
    analysis = get(result.name)
    if analysis.exports is None:
        raise HeadscopeError(f"analysis {result.name!r} has no exports; save the whole result with .save(path)")
    if result.status != "ok":
        raise HeadscopeError(f"analysis {result.name!r} did not finish ({result.status}): nothing to export")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(dir=folder, prefix=".tmp-") as scratch:
        for path in analysis.exports(result, Path(scratch)):
            os.replace(path, folder / path.name)
            written.append(folder / path.name)
    return written


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


_PLUGINS_LOADED: list[str] = []


def _load_builtin() -> None:
    """Register the built-in analyses, then those of installed packages (entry-point group :data:`ENTRY_POINTS`),
    once. A package whose analysis fails to import is one :class:`HeadscopeError` naming it."""
    import headscope.analyses  # noqa: F401  (registers the built-in analyses)

    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED.append("done")
    for point in importlib.metadata.entry_points(group=ENTRY_POINTS):
        try:
            point.load()
        except Exception as error:
            _PLUGINS_LOADED.clear()
            raise HeadscopeError(f"the analysis {point.name!r} of an installed package ({point.value}) failed to "
                                 f"load: {type(error).__name__}: {error}".splitlines()[0]) from None
