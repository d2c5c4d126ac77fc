"""Running analyses end to end: load, capture, save results as each analysis finishes, then figures and
``report.html``.

One failing analysis records its error (status ``failed``) and the others still run; ``results.json`` is
rewritten atomically after each analysis, so finished work is never lost, and ``resume`` keeps the finished
analyses of an interrupted run when model, input, options, versions and parameters are the same.
"""

from __future__ import annotations

import collections
import hashlib
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import torch

from headscope import distributed, figures, plotting, registry, report, views
from headscope._version import __version__
from headscope.capture.engine import Scope
from headscope.errors import HeadscopeError
from headscope.models.load import Loaded, load, quiet_transformers
from headscope.probes import images as probe_images
from headscope.probes import inputs as probe_inputs
from headscope.registry import Analysis, Context, get, select
from headscope.results import AnalysisResult, Results


@dataclass
class RunOptions:
    """What ``headscope analyze`` was asked for."""

    model: str | None = None
    analyses: list[str] | None = None
    text: str | None = None
    input_path: str | None = None
    out: Path = Path("headscope-out")
    device: str = "cpu"
    device_map: str | dict | None = None
    offload_folder: str | None = None
    dtype: str = "float32"
    max_tokens: int | None = None
    seed: int = 0
    figures: tuple[str, ...] = ("html", *plotting.STATIC_FORMATS)
    trust_remote_code: bool = False
    allow_pickle: bool = False
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    resume: bool = False
    notes: list[str] = field(default_factory=list)


def analyze(options: RunOptions, progress: Callable[[str], None] = lambda message: None) -> Results:
    """Run the analyses ``options`` asks for; write ``results.json``, figures and ``report.html`` into
    ``options.out``."""
    started = time.perf_counter()
    if options.text is not None and options.input_path is not None and not probe_images.is_image_file(
            options.input_path):  # an image takes a prompt beside it
        raise HeadscopeError("give either --text or --input, not both")
    out = _writable_folder(options.out)
    previous = _previous_results(out / "results.json") if options.resume else None
    progress("loading model")
    if options.device_map is not None and distributed.world_size() > 1:
        raise HeadscopeError("--device-map spreads one model over this machine's devices; under torchrun each "
                             "process holds a whole model: use one or the other")
    device = distributed.setup(options.device)  # under torchrun: join the process group, one device per process
    loaded = load(options.model, dtype=options.dtype, device=device, device_map=options.device_map,
                  offload_folder=options.offload_folder, trust_remote_code=options.trust_remote_code,
                  allow_pickle=options.allow_pickle)
    chosen = select(options.analyses, loaded.info.kind)
    unknown = sorted(set(options.params) - {analysis.name for analysis in chosen})
    if unknown:
        raise HeadscopeError(f"--set names analysis '{unknown[0]}', which is not being run: choose from "
                             f"{', '.join(a.name for a in chosen)}")
    _check_parameters(chosen, options.params, options.seed)
    if loaded.info.source.get("synthetic"):
        options.notes.append(f"synthetic model: {loaded.info.source['synthetic']}")
    probe = probe_inputs.build(loaded, options.text, options.input_path, options.max_tokens)  # bad input fails here
    if probe.cut_from is not None and (options.text is not None or options.input_path is not None):
        # (the shipped probe cut to a short context is the default's design; the user's own text is a caveat)
        context = loaded.info.max_tokens
        why = (f"the model's context of {context}" if context is not None and context < (options.max_tokens or 0)
               else f"--max-tokens {options.max_tokens}")
        options.notes.append(f"truncated input: the {probe.source} was cut to its first {len(probe.tokens)} of "
                             f"{probe.cut_from} tokens to fit {why}")
    results = Results(provenance=provenance(loaded, options, probe.digest))
    results.provenance["input"] = {"kind": input_kind(loaded), **_input_record(probe)}
    kept = _resumable(previous, results, chosen, out / "results.json", options) if options.resume else {}
    if distributed.is_main():
        _remove_leftovers(out)
    scope = Scope(loaded.model)
    for analysis in chosen:
        if analysis.name in kept:
            results.add(kept[analysis.name])
            continue
        progress(f"running {analysis.name}")
        before = collections.Counter(scope.paths)
        result = run_analysis(analysis, loaded, scope, options.text, options.input_path, options.max_tokens,
                              options.seed, options.params.get(analysis.name, {}), probe=probe)
        taken = scope.paths - before
        if taken:  # which attention path computed this analysis's statistics, and why any call was chunked
            results.provenance.setdefault("capture_paths", {})[analysis.name] = dict(sorted(taken.items()))
        if loaded.info.source.get("synthetic") and result.status == "ok":
            result.summary.setdefault("synthetic_model", loaded.info.source["synthetic"])
        results.add(result)
        if distributed.is_main():
            results.save(_made(out) / "results.json")
    if not distributed.is_main():  # under torchrun, rank 0 alone writes
        return results
    _made(out)
    progress("writing figures")
    drawn = analysis_figures(results, options.notes)
    write_figures(results, out, options, drawn)
    write_exports(results, out, options.notes)
    progress("writing report")
    shown = _views(loaded, scope, results, options, probe)
    results.provenance["notes"] = list(dict.fromkeys(options.notes))
    results.provenance["wall_seconds"] = round(time.perf_counter() - started, 3)
    results.save(out / "results.json")
    report.write(results, out / "report.html", drawn, shown)
    return results


def _views(loaded: Loaded, scope: Scope, results: Results, options: RunOptions,
           probe: Any = None) -> views.Views | None:
    """The report's linked views; a failure becomes a note and the report goes without them."""
    try:
        with quiet_transformers():  # (Whisper's views decode: no generation-config chatter in the output)
            shown = views.attention_views(loaded, scope, results, options.text, probe)
    except Exception as error:  # the views must not cost the report
        options.notes.append(f"pattern views failed: {type(error).__name__}: {error}".splitlines()[0])
        return None
    options.notes += [f"pattern views: {note}" for note in shown.notes.values() if note.startswith("no ")]
    return shown


def run_analysis(analysis: Analysis, loaded: Loaded, scope: Scope, text: str | None = None,
                 input_path: str | None = None, max_tokens: int | None = None, seed: int = 0,
                 params: dict[str, Any] | None = None, failures: str = "record", probe: Any = None) -> AnalysisResult:
    """Run one analysis on ``loaded``: seed torch, read its parameters, run it. ``headscope analyze`` and
    :func:`headscope.run` both come here.

    A :class:`HeadscopeError` (bad input) always raises. Any other error raises with ``failures="raise"``;
    with ``"record"`` it becomes a result of status ``failed`` with its message, so that one failing analysis
    does not lose the others' results.
    """
    torch.manual_seed(seed)
    context = Context(loaded, scope, text, input_path, max_tokens, seed,
                      params=analysis.read_params(dict(params or {}), seed), built=probe)
    started = time.perf_counter()
    try:
        with quiet_transformers():
            result = analysis.run(context)
        if analysis.main_metric is not None and result.status == "ok":
            result.summary.setdefault("main_metric", analysis.main_metric)
        return result
    except HeadscopeError:
        raise
    except Exception as error:  # one failing analysis must not lose the others' results
        if failures == "raise":
            raise
        message = f"{type(error).__name__}: {error}".strip().splitlines()[0]
        return AnalysisResult(name=analysis.name, status="failed", error=message,
                              seconds=time.perf_counter() - started)


def analysis_figures(results: Results, notes: list[str] | None = None) -> dict[str, dict[str, go.Figure]]:
    """Each finished analysis's figures by name: one heatmap per map, then the analysis's own figures.

    An analysis whose own figures fail keeps its heatmaps (and its results); the failure goes to ``notes``.
    """
    out: dict[str, dict[str, go.Figure]] = {}
    for name, result in results.items():
        if result.status != "ok":
            continue
        drawn = figures.heatmaps(result)
        try:
            drawn.update(figures.own(result))
        except Exception as error:  # a figure must not cost the results or the other figures
            if notes is not None:
                notes.append(f"figures of {name} failed: {type(error).__name__}: {error}".splitlines()[0])
        out[name] = drawn
    return out


def write_exports(results: Results, out: Path, notes: list[str] | None = None) -> list[Path]:
    """Each finished analysis's exports (its ``exports`` hook) into ``out/exports``: written in a temporary
    folder, then moved into place file by file. A failing export becomes a note and costs nothing else."""
    written: list[Path] = []
    for name, result in results.items():
        if result.status != "ok" or get(name).exports is None:
            continue
        try:
            written += registry.export(result, out / "exports")
        except Exception as error:  # an export must not cost the results or the other exports
            if notes is not None:
                notes.append(f"exports of {name} failed: {type(error).__name__}: {error}".splitlines()[0])
    return written


def write_figures(results: Results, out: Path, options: RunOptions,
                  figures: dict[str, dict[str, go.Figure]] | None = None) -> dict[str, Any]:
    """One heatmap per map and each analysis's own figures (``figures``, by default
    :func:`analysis_figures`), in each format of ``options.figures``; returns what was asked, written and not.

    Static files go through one :class:`~headscope.plotting.StaticSession` (one browser for the run). A file that
    cannot be made is recorded with its analysis and reason, and each distinct reason becomes one note
    (``options.notes``): "N of M figure files not written (...): reason". The record is also stored as
    ``results.provenance["figures"]``.
    """
    formats = list(options.figures)
    record: dict[str, Any] = {"formats": formats, "written": 0, "failed": []}
    results.provenance["figures"] = record
    if not formats:
        return record
    folder = out / "figures"
    folder.mkdir(exist_ok=True)
    session = plotting.StaticSession()
    try:
        for name, named in (analysis_figures(results) if figures is None else figures).items():
            for figure_name, figure in named.items():
                written, failed = plotting.save(figure, folder / f"{name}-{figure_name}", formats, session)
                record["written"] += len(written)
                record["failed"] += [{"analysis": name, "file": str(path.relative_to(out)), "reason": reason}
                                     for path, reason in failed.items()]
    finally:
        session.close()
    total = record["written"] + len(record["failed"])
    by_reason: dict[str, list[str]] = {}
    for failure in record["failed"]:
        by_reason.setdefault(failure["reason"], []).append(Path(failure["file"]).name)
    for reason, files in by_reason.items():
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        options.notes.append(f"{len(files)} of {total} figure files not written ({shown}): {reason}")
    return record


def provenance(loaded: Loaded, options: RunOptions, input_digest: str) -> dict:
    """Where the results come from: versions, model source, dtype, device, seed, input hash."""
    import transformers

    return {
        "headscope": __version__,
        "model": loaded.info.source,
        "architecture": loaded.info.architecture,
        "model_type": loaded.info.model_type,
        "kind": loaded.info.kind,
        "stacks": {name: stack.as_dict() for name, stack in loaded.info.stacks.items()},
        "dtype": options.dtype,
        "device": options.device,
        "device_map": getattr(loaded.model, "hf_device_map", None),
        "processes": distributed.world_size(),
        "seed": options.seed,
        "input_sha256": input_digest,
        "max_tokens": options.max_tokens,
        "parameters": options.params,
        "model_files": _model_files(loaded.info.source),
        "libraries": {"torch": torch.__version__, "transformers": transformers.__version__,
                      "python": platform.python_version()},
        "platform": platform.platform(),
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _input_record(probe: Any) -> dict[str, Any]:
    """What the run read: its source and its length (tokens, or seconds of audio), and the text's whole length
    when it was cut to fit (``cut_from``)."""
    if getattr(probe, "waveform", None) is not None:
        return {"source": probe.source, "seconds": round(len(probe.waveform) / 16000, 2)}
    record = {"source": probe.source, "tokens": len(probe.tokens)}
    if probe.cut_from is not None:
        record["cut_from"] = probe.cut_from
    return record


def input_kind(loaded: Loaded) -> str:
    """What the model reads: ``"audio"`` (a speech encoder-decoder), ``"image"`` (with text: a vision-language
    model) or ``"text"``."""
    if loaded.info.kind == "vision-language":
        return "image"
    return "audio" if hasattr(loaded.processor, "feature_extractor") else "text"


def _writable_folder(path: Path) -> Path:
    """``path`` once it is sure to be a folder this process can write to, or one it can make; the folder itself
    is made only when the first file goes into it (:func:`_made`), so a refused run leaves nothing behind."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise HeadscopeError(f"cannot write to output folder {path}: {existing} is not a folder")
    if existing == path:
        try:
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
                pass
        except OSError as error:
            raise HeadscopeError(f"cannot write to output folder {path}: {error.strerror or error}") from None
    if not os.access(existing, os.W_OK | os.X_OK):
        raise HeadscopeError(f"cannot write to output folder {path}: permission denied")
    return path


def _made(folder: Path) -> Path:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise HeadscopeError(f"cannot write to output folder {folder}: {error.strerror or error}") from None
    return folder


def _remove_leftovers(out: Path) -> None:
    """Remove the temporary files an earlier run killed mid-write left in ``out`` (only headscope's own names)."""
    if not out.is_dir():
        return
    for pattern in (".results.json.*.tmp", ".report.html.*.tmp", ".write-test-*"):
        for path in out.glob(pattern):
            path.unlink(missing_ok=True)
    for path in (out / "exports").glob(".tmp-*"):
        shutil.rmtree(path, ignore_errors=True)


def _check_parameters(chosen: list[Analysis], params: dict[str, dict[str, Any]], seed: int) -> None:
    """Read each analysis's ``--set`` values before any work, so that a typo in the parameters of the last
    analysis fails at once, not after the others have run."""
    for analysis in chosen:
        analysis.read_params(dict(params.get(analysis.name, {})), seed)


RESUME_KEYS = {"model": "model", "model_files": "model files", "input_sha256": "input", "max_tokens": "--max-tokens",
               "seed": "--seed", "dtype": "--dtype", "device": "--device", "headscope": "headscope version",
               "libraries": "library versions"}
"""The provenance fields that must be equal for ``--resume`` to keep an earlier run's analyses, and their names
in the one line that says why it did not."""


def _previous_results(path: Path) -> Results | None:
    """The results ``--resume`` starts from; None when there are none yet, one line when the file is bad."""
    if not path.exists():
        return None
    try:
        return Results.load(path)
    except HeadscopeError as error:
        raise HeadscopeError(f"cannot resume from {error}: move the file away, or run without --resume") from None


def _resumable(previous: Results | None, results: Results, chosen: list[Analysis], path: Path,
               options: RunOptions) -> dict[str, AnalysisResult]:
    """The analyses of ``previous`` that ``--resume`` keeps: finished (status ``ok``) in a run with the same
    :data:`RESUME_KEYS` provenance and the same ``--set`` parameters as this one. One note says what was kept and
    what runs again, and why."""
    now = results.provenance
    now["resumed"] = []
    if previous is None:
        options.notes.append(f"--resume: no {path} yet; running every analysis")
        return {}
    before = previous.provenance
    changed = [label for key, label in RESUME_KEYS.items() if before.get(key) != now.get(key)]
    if not isinstance(before.get("parameters"), dict):
        changed.append("recorded parameters")
    if changed:
        options.notes.append(f"--resume: {path} differs from this run in {', '.join(changed)}; "
                             "running every analysis again")
        return {}
    kept: dict[str, AnalysisResult] = {}
    again: list[str] = []
    for analysis in chosen:
        old = previous.analyses.get(analysis.name)
        if old is None:
            again.append(analysis.name)
        elif old.status != "ok":
            again.append(f"{analysis.name} ({old.status} before)")
        elif before["parameters"].get(analysis.name, {}) != now["parameters"].get(analysis.name, {}):
            again.append(f"{analysis.name} (parameters changed)")
        else:
            kept[analysis.name] = old
    now["resumed"] = list(kept)
    options.notes.append(f"--resume: kept {', '.join(kept) or 'nothing'} from {path}; "
                         f"running {', '.join(again) or 'nothing'}")
    return kept


def _model_files(source: dict[str, Any]) -> str | None:
    """A stamp of a local model's files (names, sizes, modification times), so that ``--resume`` notices weights
    that changed under the same path; None for packaged and hub models, whose version or revision says it."""
    if source.get("type") not in ("local", "gguf") or not source.get("path"):
        return None
    path = Path(source["path"])
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    stamp = hashlib.sha256()
    for file in files:
        stat = file.stat()
        stamp.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return "sha256:" + stamp.hexdigest()
