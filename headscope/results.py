"""The :class:`Results` container and its file format, ``results.json``.

A :class:`Results` holds one :class:`AnalysisResult` per analysis and the provenance of the run (headscope
version, model source, architecture, dtype, input hashes, library versions, device, seed, wall time). An
analysis result carries its parameters, L x H maps (:class:`HeadMap`) keyed by (metric, stack) so that one
metric can be stored for several attention stacks, tables, a short summary, a status, an error message when
it failed, and its timing.

On disk the file is strict JSON in UTF-8::

    {
      "schema": "headscope.results",
      "schema_version": 1,
      "provenance": {...},
      "analyses": {
        "<analysis name>": {
          "status": "ok" | "failed" | "skipped",
          "error": null | "<message>",
          "seconds": <wall seconds>,
          "params": {...},
          "summary": {...},
          "maps": [{"metric": "<metric>", "stack": "self", "description": "...", "signed": false,
                    "values": [[<layer 0 head 0>, <layer 0 head 1>, ...], ...]}, ...],
          "tables": {"<table>": {"columns": ["<column>", ...], "rows": [[...], ...]}}
        }
      }
    }

``maps`` is a list, in the order the maps were added; a (metric, stack) pair appears at most once. NaN and
infinite numbers are written as ``null``; ``null`` in a map reads back as NaN. A table's index is
not stored. Readers ignore fields they do not know. Field by field, with the versioning policy:
``docs/results-format.md``.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Literal, TypeAlias, get_args

import numpy as np
import pandas as pd

from headscope.errors import HeadscopeError

StackKind = Literal["self", "cross", "encoder", "decoder", "vision", "audio"]
Stack: TypeAlias = str
"""An attention stack's name: a base name from :data:`STACKS`, alone (``"decoder"``) or numbered when a model
has a second stack of the same kind (``"self:1"``, ``"self:2"``, as the capture adapter names them)."""
Status = Literal["ok", "failed", "skipped"]
Notable = Literal["high", "low", "magnitude", "label"]
NOTABLE: tuple[str, ...] = get_args(Notable)
STACKS: tuple[str, ...] = get_args(StackKind)
"""The base names of attention stacks; a :data:`Stack` is one of these, optionally followed by ``:<n>``, n >= 1."""
STATUSES: tuple[str, ...] = get_args(Status)
SCHEMA = "headscope.results"
SCHEMA_VERSION = 1
FRAME_COLUMNS = ("analysis", "stack", "metric", "layer", "head", "value")
_STACK_NUMBER = re.compile(r"[1-9][0-9]*")


def is_stack(name: object) -> bool:
    """Whether ``name`` is a valid stack name: a base name from :data:`STACKS`, optionally ``:<n>`` with n >= 1."""
    if not isinstance(name, str):
        return False
    base, colon, number = name.partition(":")
    return base in STACKS and (not colon or _STACK_NUMBER.fullmatch(number) is not None)


def to_jsonable(obj: Any, key: str = "value") -> Any:
    """Return ``obj`` built from plain JSON types only: dict (str keys), list, str, int, float, bool, None.

    numpy scalars and arrays become numbers and lists, tuples become lists, paths and torch dtypes become
    their ``str()``; NaN, infinities and pandas' missing values become ``None``. Anything else raises a
    :class:`TypeError` naming where it sits, starting from ``key`` (e.g. ``summary['top'][2]``).
    """
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item(), key)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist(), key)
    if isinstance(obj, Mapping):
        converted = {}
        for name, value in obj.items():
            if not isinstance(name, str):
                raise TypeError(f"{key}: key {name!r} is not a str; results.json needs str keys")
            converted[name] = to_jsonable(value, f"{key}[{name!r}]")
        return converted
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(value, f"{key}[{i}]") for i, value in enumerate(obj)]
    if isinstance(obj, PurePath):
        return str(obj)
    if obj is pd.NA or obj is pd.NaT:
        return None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.dtype):
        return str(obj)
    raise TypeError(f"{key}: a {type(obj).__name__} cannot be stored in results.json; convert it first")


@dataclass(eq=False)
class HeadMap:
    """One number per (layer, head) of one attention stack.

    ``values`` has shape (layers, heads); NaN marks a head that does not exist in a layer or was not
    measured. ``stack`` is a base name from :data:`STACKS`, optionally numbered (``"self:1"``).
    ``description`` says what the metric means (shown on hover); ``signed`` asks plots for a diverging
    colour scale; ``unit`` is the values' unit (``"nats"``, ``"share"`` of attention; empty for a plain score).
    ``notable`` says which heads stand out, what :meth:`top` ranks first: ``"high"`` values, ``"low"`` ones, the largest
    ``"magnitude"`` (the default of a signed map: a task metric's most helpful head is its most negative), or
    ``"label"`` for values that are categories (cluster labels), which are never ranked. ``metric`` is the map's name,
    set when it is added to a result. Maps are equal when their fields are, NaN counting as equal to NaN.
    """

    values: np.ndarray
    stack: Stack
    description: str = ""
    signed: bool = False
    unit: str = ""
    notable: Notable | None = None
    metric: str = ""

    def __post_init__(self) -> None:
        if self.notable is None:
            self.notable = "magnitude" if self.signed else "high"
        if self.notable not in NOTABLE:
            raise ValueError(f"notable must be one of {', '.join(NOTABLE)}; got {self.notable!r}")
        self.values = np.asarray(self.values, dtype=float)
        if self.values.ndim != 2 or self.values.size == 0:
            raise ValueError(f"a head map needs shape (layers, heads), both nonzero; got {self.values.shape}")
        if not is_stack(self.stack):
            raise ValueError(
                f"stack must be one of {', '.join(STACKS)}, optionally numbered like 'self:1'; got {self.stack!r}"
            )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HeadMap):
            return NotImplemented
        fields = (self.stack, self.description, self.signed, self.unit, self.notable)
        same_fields = fields == (other.stack, other.description, other.signed, other.unit, other.notable)
        return same_fields and np.array_equal(self.values, other.values, equal_nan=True)

    def top(self, k: int = 5, notable: Notable | None = None) -> list[tuple[int, int, float]]:
        """The ``k`` most notable heads (see ``notable``) as (layer, head, value), most notable first; NaN values are
        skipped and equal values keep (layer, head) order. ``notable`` overrides the map's own (``"low"`` lists the
        heads that most lower a task metric, say). ``ValueError`` for a map of labels."""
        if k < 0:
            raise ValueError(f"k must be 0 or more; got {k}")
        if self.notable == "label":
            raise ValueError(f"map {self.metric or self.stack!r} holds labels (categories), not scores: "
                             "no head ranks above another")
        notable = self.notable if notable is None else notable
        if notable not in ("high", "low", "magnitude"):
            raise ValueError(f"notable must be one of high, low, magnitude; got {notable!r}")
        flat = self.values.ravel()
        measured = np.flatnonzero(~np.isnan(flat))
        key = {"high": -flat, "low": flat, "magnitude": -np.abs(flat)}[notable][measured]
        best = measured[np.argsort(key, kind="stable")][:k]
        heads = self.values.shape[1]
        return [(int(i // heads), int(i % heads), float(flat[i])) for i in best]

    def plot(self, title: str | None = None):
        """This map as an interactive layer x head heatmap (a plotly ``Figure``; ``.show()`` it, or let Jupyter draw
        it)."""
        from headscope import plotting

        return plotting.heatmap(self, title or f"{self.metric or 'map'} ({self.stack})")


@dataclass(eq=False)
class AnalysisResult:
    """What one analysis produced: its parameters, maps, tables, summary, status, timing.

    ``maps`` is keyed by ``(metric, stack)``, so one metric can be stored for several attention stacks
    (``("entropy", "encoder")``, ``("entropy", "cross")``); the key's stack must be the map's own and the
    metric a non-empty string. :meth:`add_map` adds one, :meth:`map` finds one, :meth:`metrics` lists the
    metric names.

    ``params`` and ``summary`` are converted with :func:`to_jsonable` on construction, so anything that
    cannot be saved fails here, where it was made. ``error`` holds the message of a failed analysis (or
    why one was skipped); ``seconds`` its wall time. Two results are equal when they would be saved alike:
    maps compare with NaN equal to NaN, tables by columns and values (not dtypes or index).
    """

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    maps: dict[tuple[str, Stack], HeadMap] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    status: Status = "ok"
    error: str | None = None
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}; got {self.status!r}")
        self.seconds = float(self.seconds)
        if not math.isfinite(self.seconds):
            raise ValueError(f"seconds must be a finite number; got {self.seconds}")
        self.params = _json_dict(self.params, "params")
        _check_maps(self.maps)
        _check_named(self.tables, pd.DataFrame, "tables")

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "summary":  # however it is set, the summary reads by attribute and holds JSON values
            value = Summary(_json_dict(value, "summary"))
        super().__setattr__(name, value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AnalysisResult):
            return NotImplemented
        if self.name != other.name or self.maps != other.maps:
            return False
        mine, theirs = _encode_analysis(self), _encode_analysis(other)
        del mine["maps"], theirs["maps"]  # compared above, NaN-aware and in any order
        return mine == theirs

    def to_frame(self) -> pd.DataFrame:
        """This analysis's maps as tidy rows (columns analysis, stack, metric, layer, head, value), as
        :meth:`Results.to_frame` gives them."""
        return Results({self.name: self}).to_frame()

    def metrics(self) -> list[str]:
        """The metric names of the maps, each once, in the order the maps were added."""
        return list(dict.fromkeys(metric for metric, _ in self.maps))

    def add_map(self, metric: str, head_map: HeadMap) -> None:
        """Add ``head_map`` under ``(metric, head_map.stack)``; ``ValueError`` if that key is already held."""
        if not isinstance(head_map, HeadMap):
            raise TypeError(f"can only add a HeadMap, not a {type(head_map).__name__}")
        _check_metric(metric)
        key = (metric, head_map.stack)
        if key in self.maps:
            raise ValueError(f"analysis {self.name!r} already holds a map {metric!r} for stack {head_map.stack!r}")
        head_map.metric = metric
        self.maps[key] = head_map

    def map(self, metric: str, stack: Stack | None = None) -> HeadMap:
        """The map of ``metric`` for ``stack``.

        ``stack`` may be left out when ``metric`` exists for exactly one stack. Otherwise, and when there is
        no such map, ``KeyError`` saying which metrics (or which stacks of ``metric``) exist.
        """
        stacks = [s for m, s in self.maps if m == metric]
        if not stacks:
            raise KeyError(f"analysis {self.name!r} has no map {metric!r}; its metrics are {self.metrics()}")
        if stack is None:
            if len(stacks) > 1:
                raise KeyError(
                    f"analysis {self.name!r} has map {metric!r} for several stacks {stacks}; pass stack= to pick one"
                )
            stack = stacks[0]
        if (metric, stack) not in self.maps:
            raise KeyError(
                f"analysis {self.name!r} has no map {metric!r} for stack {stack!r}; it has {metric!r} for {stacks}"
            )
        return self.maps[(metric, stack)]

    def top_heads(self, metric: str | None = None, k: int = 5, stack: Stack | None = None,
                  notable: Notable | None = None) -> list[tuple[int, int, float]]:
        """The ``k`` most notable heads of map ``metric`` as (layer, head, value), most notable first: the highest
        values, the lowest or the largest magnitude, as the map says (:attr:`HeadMap.notable`).

        The map is found with :meth:`map`: ``stack`` may be left out when ``metric`` exists for one stack only, and
        ``metric`` when the result has one metric, or names its main one (``summary["main_metric"]``). NaN values
        are skipped; equal values keep (layer, head) order; a map of labels raises ``ValueError``. ``notable``
        (``"high"``, ``"low"``, ``"magnitude"``) ranks another end than the map's own.
        """
        return self.map(self._metric(metric), stack).top(k, notable)

    def _metric(self, metric: str | None) -> str:
        if metric is not None:
            return metric
        main = self.summary.get("main_metric")
        if main is not None:
            return main
        metrics = self.metrics()
        if len(metrics) != 1:
            raise KeyError(f"analysis {self.name!r} has several metrics {metrics}: name one")
        return metrics[0]

    def plot(self, name: str | None = None):
        """This analysis's figures: all of them as ``{name: Figure}`` (one heatmap per map, ``METRIC-STACK``,
        then the analysis's own figures), or the one named ``name``: a metric (its heatmap; the stack's name
        after a dash when the metric exists for several, ``"entropy-cross"``) or one of the analysis's own figures.

        Works on a loaded result, without the model. A figure of the analysis's own that cannot be drawn raises.
        """
        from headscope import figures

        drawn = figures.of(self)
        if name is None:
            return drawn
        if name in drawn:
            return drawn[name]
        stacks = [stack for metric, stack in self.maps if metric == name]
        if len(stacks) == 1:
            return drawn[f"{name}-{stacks[0].replace(':', '_')}"]
        if stacks:
            raise KeyError(f"map {name!r} exists for several stacks: name one of "
                           f"{[f'{name}-{s}' for s in stacks]}")
        raise KeyError(f"analysis {self.name!r} has no figure {name!r}; its figures are {list(drawn)}")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write this result alone as a ``results.json`` (:meth:`Results.save`); ``Results.load(path)[name]`` reads
        it back."""
        return Results({self.name: self}).save(path)

    def export(self, folder: str | os.PathLike[str]) -> list[Path]:
        """Write this analysis's export files into ``folder`` (the files ``headscope analyze`` puts in
        ``exports/``: ``head_importance.npy`` for importance, Retrieval_Head's JSON for retrieval, ...) and return
        their paths. Works on a loaded result; an analysis with no exports raises ``HeadscopeError``."""
        from headscope import registry

        return registry.export(self, folder)


class Summary(dict):
    """An analysis's summary: a dict of JSON values whose keys also read as attributes (``summary.sink_rate_self``);
    a key that is not there raises ``KeyError`` (``AttributeError`` for an attribute) naming the ones that are."""

    def __getitem__(self, key: str) -> Any:
        if key not in self:
            raise KeyError(f"no summary key {key!r}; the keys are {list(self)}")
        return super().__getitem__(key)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        try:
            return self[key]
        except KeyError as error:
            raise AttributeError(error.args[0]) from None

    def __dir__(self) -> list[str]:
        return [*super().__dir__(), *(key for key in self if key.isidentifier())]


@dataclass
class Results(Mapping[str, AnalysisResult]):
    """The analyses of one run, by name, and the run's provenance; saved as ``results.json``.

    Reads as a mapping from analysis name to :class:`AnalysisResult` (``results["sinks"]``,
    ``"sinks" in results``, ``len(results)``); :meth:`add` puts one in. ``provenance`` is converted with
    :func:`to_jsonable` on construction.
    """

    analyses: dict[str, AnalysisResult] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.provenance = _json_dict(self.provenance, "provenance")
        for name, result in self.analyses.items():
            if not isinstance(result, AnalysisResult) or result.name != name:
                raise ValueError(f"analyses[{name!r}] must be an AnalysisResult named {name!r}")

    def __getitem__(self, name: str) -> AnalysisResult:
        """The result of analysis ``name``; ``KeyError`` listing the analyses held when there is none."""
        if name not in self.analyses:
            raise KeyError(f"no analysis {name!r} in these results; they hold {sorted(self.analyses)}")
        return self.analyses[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.analyses)

    def __len__(self) -> int:
        return len(self.analyses)

    def add(self, result: AnalysisResult) -> None:
        """Add one analysis result; ``ValueError`` if one with the same name is already held."""
        if not isinstance(result, AnalysisResult):
            raise TypeError(f"can only add an AnalysisResult, not a {type(result).__name__}")
        if result.name in self.analyses:
            raise ValueError(f"these results already hold an analysis named {result.name!r}")
        self.analyses[result.name] = result

    def to_frame(self) -> pd.DataFrame:
        """Every map as tidy rows: columns analysis, stack, metric, layer, head, value.

        One row per (layer, head) of each map, NaN values included, in analysis, map, layer, head order.
        """
        frames = [
            _map_frame(result.name, metric, head_map)
            for result in self.analyses.values()
            for (metric, _), head_map in result.maps.items()
        ]
        if not frames:
            dtypes = (str, str, str, "int64", "int64", float)
            return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(FRAME_COLUMNS, dtypes, strict=True)})
        return pd.concat(frames, ignore_index=True)

    def to_dict(self) -> dict[str, Any]:
        """The document :meth:`save` writes, in plain JSON types (finite floats only)."""
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "provenance": to_jsonable(self.provenance, "provenance"),
            "analyses": {name: _encode_analysis(result) for name, result in self.analyses.items()},
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "results document") -> Results:
        """Build Results from a parsed ``results.json`` document, checking it field by field.

        Raises :class:`HeadscopeError` with one line, starting with ``source``, saying what is wrong.
        """
        try:
            return _decode(data)
        except _Malformed as e:
            raise HeadscopeError(f"{source}: {e}") from None
        except RecursionError:
            raise HeadscopeError(f"{source}: nested too deeply to be a headscope results file") from None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``results.json`` atomically (:func:`write_atomically`) and return its path; the document is
        serialised first, so a value that cannot be written leaves any previous file as it was."""
        text = json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return write_atomically(path, (text + "\n").encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Results:
        """Read a ``results.json`` written by :meth:`save`.

        Raises :class:`HeadscopeError` with one line naming the file and what is wrong: missing or
        unreadable file, not JSON, not a headscope results file, a newer schema version, a malformed field.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise HeadscopeError(f"{path}: no such file") from None
        except UnicodeDecodeError as e:
            raise HeadscopeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise HeadscopeError(f"{path}: cannot be read ({e.strerror})") from None
        try:
            data = json.loads(text, parse_constant=_reject_constant)
        except ValueError as e:
            raise HeadscopeError(f"{path}: not valid JSON ({e})") from None
        except RecursionError:
            raise HeadscopeError(f"{path}: nested too deeply to be a headscope results file") from None
        return cls.from_dict(data, source=str(path))


def _json_dict(obj: Any, key: str) -> dict[str, Any]:
    if not isinstance(obj, Mapping):
        raise TypeError(f"{key} must be a dict; got a {type(obj).__name__}")
    return to_jsonable(obj, key)


def _check_named(items: Any, kind: type, key: str) -> None:
    if not isinstance(items, Mapping):
        raise TypeError(f"{key} must be a dict of {kind.__name__} by name; got a {type(items).__name__}")
    for name, value in items.items():
        if not isinstance(name, str) or not isinstance(value, kind):
            raise TypeError(f"{key}[{name!r}]: expected a {kind.__name__} under a str name")


def _check_metric(metric: Any) -> None:
    if not isinstance(metric, str):
        raise TypeError(f"a metric name must be a str; got a {type(metric).__name__}")
    if not metric:
        raise ValueError("a metric name must be a non-empty string")


def _check_maps(maps: Any) -> None:
    if not isinstance(maps, Mapping):
        raise TypeError(f"maps must be a dict of HeadMap by (metric, stack); got a {type(maps).__name__}")
    for key, head_map in maps.items():
        if not (isinstance(key, tuple) and len(key) == 2 and isinstance(head_map, HeadMap)):
            raise TypeError(f"maps[{key!r}]: expected a HeadMap under a (metric, stack) tuple")
        metric, stack = key
        _check_metric(metric)
        if stack != head_map.stack:
            raise ValueError(f"maps[{key!r}]: the key's stack {stack!r} is not the map's stack {head_map.stack!r}")
        head_map.metric = metric


def _map_frame(analysis: str, metric: str, head_map: HeadMap) -> pd.DataFrame:
    layers, heads = head_map.values.shape
    return pd.DataFrame(
        {
            "analysis": analysis,
            "stack": head_map.stack,
            "metric": metric,
            "layer": np.repeat(np.arange(layers, dtype="int64"), heads),
            "head": np.tile(np.arange(heads, dtype="int64"), layers),
            "value": head_map.values.ravel(),
        }
    )


def write_atomically(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one, never a part.

    The bytes go to a temporary file in the same folder, are flushed, fsynced and moved over ``path``: a
    failure at any point (a full disk, a kill) leaves any previous file as it was and no temporary file behind.
    results.json, the report and every figure file are written this way.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` survive a crash (POSIX only: other systems cannot open a folder)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Writing


def _encode_analysis(result: AnalysisResult) -> dict[str, Any]:
    where = f"analyses[{result.name!r}]"
    _check_maps(result.maps)
    return {
        "status": result.status,
        "error": result.error,
        "seconds": result.seconds,
        "params": to_jsonable(result.params, f"{where}.params"),
        "summary": to_jsonable(result.summary, f"{where}.summary"),
        "maps": [_encode_map(metric, head_map) for (metric, _), head_map in result.maps.items()],
        "tables": {name: _encode_table(table, f"{where}.tables[{name!r}]") for name, table in result.tables.items()},
    }


def _encode_map(metric: str, head_map: HeadMap) -> dict[str, Any]:
    return {
        "metric": metric,
        "stack": head_map.stack,
        "description": head_map.description,
        "signed": head_map.signed,
        "unit": head_map.unit,
        "notable": head_map.notable,
        "values": to_jsonable(head_map.values),
    }


def _encode_table(table: pd.DataFrame, key: str) -> dict[str, Any]:
    columns = list(table.columns)
    for column in columns:
        if not isinstance(column, str):
            raise TypeError(f"{key}: column names must be str; got {column!r}")
    cells = [to_jsonable(table.iloc[:, j].tolist(), f"{key}[{c!r}]") for j, c in enumerate(columns)]
    return {"columns": columns, "rows": [list(row) for row in zip(*cells, strict=True)]}


# Reading


class _Malformed(Exception):
    """A document that does not follow the schema; the message says where and how."""


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON; results.json stores it as null")


_JSON_NAMES = {
    dict: "an object",
    list: "a list",
    str: "a string",
    bool: "true or false",
    int: "an integer",
    float: "a number",
    type(None): "null",
}


def _expect(value: Any, kinds: tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join(_JSON_NAMES[kind] for kind in kinds if not (kind is int and float in kinds))
        found = _JSON_NAMES.get(type(value), type(value).__name__)
        raise _Malformed(f"malformed field {where}: must be {expected}, found {found}")
    return value


def _get(data: dict[str, Any], key: str, kinds: tuple[type, ...], where: str) -> Any:
    path = f"{where}.{key}" if where else key
    if key not in data:
        raise _Malformed(f"missing field {path}")
    return _expect(data[key], kinds, path)


def _decode(data: Any) -> Results:
    if not isinstance(data, dict):
        found = _JSON_NAMES.get(type(data), type(data).__name__)
        raise _Malformed(f"not a headscope results file (the top level is {found}, not an object)")
    schema = data.get("schema")
    if schema != SCHEMA:
        raise _Malformed(f"not a headscope results file (expected schema {SCHEMA!r}, found {schema!r})")
    version = _get(data, "schema_version", (int,), "")
    if version < 1:
        raise _Malformed(f"malformed field schema_version: must be 1 or more, found {version}")
    if version > SCHEMA_VERSION:
        raise _Malformed(
            f"written by a newer headscope (schema_version {version}, this one reads up to "
            f"{SCHEMA_VERSION}); upgrade headscope to read it"
        )
    provenance = _get(data, "provenance", (dict,), "")
    analyses = _get(data, "analyses", (dict,), "")
    return Results(
        {name: _decode_analysis(name, body, f"analyses.{name}") for name, body in analyses.items()},
        provenance,
    )


def _decode_analysis(name: str, body: Any, where: str) -> AnalysisResult:
    _expect(body, (dict,), where)
    maps = _decode_maps(_get(body, "maps", (list,), where), f"{where}.maps")
    tables = _get(body, "tables", (dict,), where)
    try:
        return AnalysisResult(
            name=name,
            params=_get(body, "params", (dict,), where),
            maps=maps,
            tables={table: _decode_table(t, f"{where}.tables.{table}") for table, t in tables.items()},
            summary=_get(body, "summary", (dict,), where),
            status=_get(body, "status", (str,), where),
            error=_get(body, "error", (str, type(None)), where),
            seconds=_get(body, "seconds", (int, float), where),
        )
    except ValueError as e:
        raise _Malformed(f"malformed field {where}: {e}") from None


def _decode_maps(entries: list[Any], where: str) -> dict[tuple[str, str], HeadMap]:
    maps: dict[tuple[str, str], HeadMap] = {}
    first: dict[tuple[str, str], int] = {}
    for i, entry in enumerate(entries):
        here = f"{where}[{i}]"
        _expect(entry, (dict,), here)
        metric = _get(entry, "metric", (str,), here)
        if not metric:
            raise _Malformed(f"malformed field {here}.metric: must be a non-empty string")
        head_map = _decode_map(entry, here)
        key = (metric, head_map.stack)
        if key in maps:
            raise _Malformed(
                f"malformed field {here}: duplicate map {metric!r} for stack {head_map.stack!r} "
                f"(already at {where}[{first[key]}])"
            )
        maps[key], first[key] = head_map, i
    return maps


def _decode_map(data: dict[str, Any], where: str) -> HeadMap:
    rows = _get(data, "values", (list,), where)
    width = len(rows[0]) if rows and isinstance(rows[0], list) else 0
    if not width or not all(isinstance(row, list) and len(row) == width for row in rows):
        raise _Malformed(f"malformed field {where}.values: must be a non-empty layers x heads list of lists")
    if not all(v is None or _is_number(v) for row in rows for v in row):
        raise _Malformed(f"malformed field {where}.values: must hold only numbers and null")
    try:
        return HeadMap(
            np.array(rows, dtype=float),
            stack=_get(data, "stack", (str,), where),
            description=_get(data, "description", (str,), where),
            signed=_get(data, "signed", (bool,), where),
            unit=_get(data, "unit", (str,), where) if "unit" in data else "",
            notable=_get(data, "notable", (str,), where) if "notable" in data else None,
            metric=_get(data, "metric", (str,), where),
        )
    except ValueError as e:
        raise _Malformed(f"malformed field {where}: {e}") from None


def _is_number(value: Any) -> bool:
    """A JSON number that fits a float64 (an integer beyond its range, such as 10**400, does not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, float) or abs(value) <= sys.float_info.max


def _decode_table(data: Any, where: str) -> pd.DataFrame:
    _expect(data, (dict,), where)
    columns = _get(data, "columns", (list,), where)
    rows = _get(data, "rows", (list,), where)
    if not all(isinstance(column, str) for column in columns):
        raise _Malformed(f"malformed field {where}.columns: must be a list of strings")
    if not all(isinstance(row, list) and len(row) == len(columns) for row in rows):
        raise _Malformed(f"malformed field {where}.rows: each row must be a list of {len(columns)} values")
    return pd.DataFrame(rows, columns=columns)
