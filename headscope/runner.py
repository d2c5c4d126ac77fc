"""Running analyses end to end: load, capture, save results as each analysis finishes, then figures and
``report.html``.

One failing analysis records its error (status ``failed``) and the others still run; ``results.json`` is
rewritten atomically after each analysis, so finished work is never lost.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import torch

from headscope import plotting, report
from headscope._version import __version__
from headscope.capture.engine import Scope
from headscope.errors import HeadscopeError
from headscope.models.load import Loaded, load
from headscope.probes import inputs as probe_inputs
from headscope.registry import Context, get, select
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
    dtype: str = "float32"
    max_tokens: int | None = None
    seed: int = 0
    figures: tuple[str, ...] = ("html", *plotting.STATIC_FORMATS)
    trust_remote_code: bool = False
    allow_pickle: bool = False
    params: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def analyze(options: RunOptions, progress: Callable[[str], None] = lambda message: None) -> Results:
    """Run the analyses ``options`` asks for; write ``results.json``, figures and ``report.html`` into
    ``options.out``."""
    started = time.perf_counter()
    if options.text is not None and options.input_path is not None:
        raise HeadscopeError("give either --text or --input, not both")
    out = _writable_folder(options.out)
    progress("loading model")
    loaded = load(options.model, dtype=options.dtype, device=options.device,
                  trust_remote_code=options.trust_remote_code, allow_pickle=options.allow_pickle)
    chosen = select(options.analyses, loaded.info.kind)
    unknown = sorted(set(options.params) - {analysis.name for analysis in chosen})
    if unknown:
        raise HeadscopeError(f"--set names analysis '{unknown[0]}', which is not being run: choose from "
                             f"{', '.join(a.name for a in chosen)}")
    probe = probe_inputs.build(loaded, options.text, options.input_path, options.max_tokens)  # bad input fails here
    results = Results(provenance=provenance(loaded, options, probe.digest))
    scope = Scope(loaded.model)
    for analysis in chosen:
        progress(f"running {analysis.name}")
        torch.manual_seed(options.seed)
        context = Context(loaded, scope, options.text, options.input_path, options.max_tokens, options.seed,
                          params=dict(options.params.get(analysis.name, {})))
        results.add(_run_one(analysis, context))
        results.save(out / "results.json")
    progress("writing figures")
    figures = analysis_figures(results, options.notes)
    write_figures(results, out, options, figures)
    results.provenance["wall_seconds"] = round(time.perf_counter() - started, 3)
    results.save(out / "results.json")
    progress("writing report")
    report.write(results, out / "report.html", figures)
    return results


def _run_one(analysis, context: Context) -> AnalysisResult:
    started = time.perf_counter()
    try:
        return analysis.run(context)
    except HeadscopeError:
        raise
    except Exception as error:  # one failing analysis must not lose the others' results
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
        figures = {f"{metric}-{stack.replace(':', '_')}": plotting.heatmap(head_map, f"{name}: {metric} ({stack})")
                   for (metric, stack), head_map in result.maps.items()}
        analysis = get(name)
        if analysis.figures is not None:
            try:
                figures.update(analysis.figures(result))
            except Exception as error:  # a figure must not cost the results or the other figures
                if notes is not None:
                    notes.append(f"figures of {name} failed: {type(error).__name__}: {error}".splitlines()[0])
        out[name] = figures
    return out


def write_figures(results: Results, out: Path, options: RunOptions,
                  figures: dict[str, dict[str, go.Figure]] | None = None) -> None:
    """One heatmap per map and each analysis's own figures (``figures``, by default
    :func:`analysis_figures`): interactive HTML, plus static formats where this machine can make them."""
    formats = list(options.figures)
    if not formats:
        return
    folder = out / "figures"
    folder.mkdir(exist_ok=True)
    for name, named in (analysis_figures(results) if figures is None else figures).items():
        for figure_name, figure in named.items():
            try:
                plotting.save(figure, folder / f"{name}-{figure_name}", formats)
            except plotting.StaticExportError as error:
                options.notes.append(str(error))
                formats = ["html"]


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
        "seed": options.seed,
        "input_sha256": input_digest,
        "max_tokens": options.max_tokens,
        "libraries": {"torch": torch.__version__, "transformers": transformers.__version__,
                      "python": platform.python_version()},
        "platform": platform.platform(),
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _writable_folder(path: Path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as error:
        raise HeadscopeError(f"cannot write to output folder {path}: {error.strerror or error}") from None
    if not os.access(path, os.W_OK):
        raise HeadscopeError(f"cannot write to output folder {path}: permission denied")
    return path
