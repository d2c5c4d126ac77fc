"""The ``headscope`` command line.

Bad input gets one line on stderr saying what is wrong and what to do, and exit code 2, never a
traceback; exit code 1 when an analysis failed (the others' results are still written). Ctrl-C (SIGINT) stops
with one line and exit code 130, SIGTERM the same way with exit code 143; the analyses finished by then are in
``results.json`` and ``headscope analyze --resume`` goes on from there.
"""

from __future__ import annotations

import re
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Column, Table

from headscope.errors import HeadscopeError

app = typer.Typer(
    name="headscope",
    help="Inspect the attention heads of Hugging Face transformers models.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
console = Console(stderr=True)


@app.command()
def analyze(
    model: Annotated[str | None, typer.Argument(
        help="packaged alias, local folder, .gguf file or hub id (default: the packaged smollm2-135m)")] = None,
    analyses: Annotated[str | None, typer.Option(
        "--analyses", "-a", help="comma-separated analyses to run (default: those that fit the model; costly "
        "ones such as importance, and summary, whose maps sinks and patterns hold, run only when named)")] = None,
    text: Annotated[str | None, typer.Option(help="text to analyse instead of the default probe")] = None,
    input_path: Annotated[str | None, typer.Option(
        "--input", help="file to analyse: UTF-8 text, a .wav file for speech models, or an image for "
        "vision-language models (with --text as its prompt)")] = None,
    out: Annotated[Path, typer.Option(help="output folder for results.json and figures")] = Path("headscope-out"),
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or mps")] = "cpu",
    device_map: Annotated[str | None, typer.Option(
        "--device-map", help="spread a model too large for one device with accelerate: auto, balanced, sequential, "
        "a JSON object {\"module\": \"device\"} (cuda:N, cpu, disk) or a .json file (instead of --device)")] = None,
    offload_folder: Annotated[str | None, typer.Option(
        "--offload-folder", help="where --device-map keeps weights offloaded to disk (default: a temporary "
        "folder)")] = None,
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16")] = "float32",
    max_tokens: Annotated[int | None, typer.Option(help="truncate inputs to this many tokens")] = None,
    seed: Annotated[int, typer.Option(help="seed for probes and sampling")] = 0,
    figures: Annotated[str, typer.Option(
        help="figure formats, comma-separated from html,png,svg,pdf; 'none' for no figures")] = "html,png,svg,pdf",
    trust_remote_code: Annotated[bool, typer.Option(
        "--trust-remote-code", help="allow the model repository's own Python code to run")] = False,
    allow_pickle: Annotated[bool, typer.Option(
        "--allow-pickle", help="accept pickle checkpoints (they can run code when loaded)")] = False,
    settings: Annotated[list[str] | None, typer.Option(
        "--set", help="an analysis parameter, ANALYSIS.NAME=VALUE, read by the parameter's type (headscope analyses "
        "lists them; a list is comma-separated or JSON); repeatable, e.g. --set sinks.protocol=gu --set "
        "patterns.length=64")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="keep the finished analyses of an earlier run into --out made with the same model, input, "
        "options and parameters; run only the others")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress or tables, for scripts")] = False,
) -> None:
    """Run the analyses that fit MODEL; write results.json and figures into --out."""
    from headscope import distributed
    from headscope.runner import RunOptions
    from headscope.runner import analyze as run

    quiet = quiet or not distributed.is_main()  # under torchrun, rank 0 alone reports

    options = RunOptions(
        model=model,
        analyses=[name.strip() for name in analyses.split(",") if name.strip()] if analyses else None,
        text=text,
        input_path=input_path,
        out=out,
        device=device,
        device_map=device_map,
        offload_folder=offload_folder,
        dtype=dtype,
        max_tokens=max_tokens,
        seed=seed,
        figures=_figure_formats(figures),
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        params=_parameters(settings or []),
        resume=resume,
    )
    from headscope import progress

    try:
        if quiet:
            results = run(options)
        elif console.is_terminal:
            with progress.Rich(console) as shown, progress.reporting(shown):
                results = run(options, progress=shown.phase)
        else:  # a log or a pipe: plain lines, at most one every few seconds per step
            with progress.reporting(progress.Plain()) as shown:
                results = run(options, progress=shown.phase)
    except KeyboardInterrupt as stop:
        saved = out / "results.json"
        where = (f"the analyses finished so far are in {saved}; add --resume to run only the rest"
                 if saved.exists() else "no analysis had finished")
        raise _Stopped(f"{'terminated' if isinstance(stop, _Terminated) else 'interrupted'}: {where}",
                       143 if isinstance(stop, _Terminated) else 130) from None
    for note in dict.fromkeys(options.notes) if distributed.is_main() else ():
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    if not quiet:
        _print_top_heads(results)
        console.print(f"results: {out / 'results.json'}", highlight=False)
    failed = [name for name, result in results.items() if result.status == "failed"]
    if failed:
        for name in failed:
            console.print(f"analysis {name} failed: {results[name].error}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@app.command()
def plot(
    results_json: Annotated[Path, typer.Argument(help="a results.json written by headscope analyze")],
    metric: Annotated[str, typer.Option(help="the map to draw, e.g. sink_score")],
    analysis: Annotated[str | None, typer.Option(
        help="the analysis holding the map (needed when several hold the metric)")] = None,
    stack: Annotated[str | None, typer.Option(
        help="the attention stack (needed when the metric exists for several)")] = None,
    fmt: Annotated[str | None, typer.Option(
        "--format", help="png, svg, pdf or html (default: --out's suffix, else pdf)")] = None,
    width: Annotated[str, typer.Option(
        help="column (3.5 in), page (7 in) or a width in inches")] = "column",
    dpi: Annotated[int, typer.Option(help="dots per inch for PNG")] = 300,
    out: Annotated[Path | None, typer.Option(
        help="file to write (default: ANALYSIS-METRIC-STACK.FORMAT beside RESULTS_JSON)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="do not print the path written")] = False,
) -> None:
    """Re-render one saved map of RESULTS_JSON as a figure for a paper, without rerunning the model."""
    from headscope import plotting
    from headscope.results import Results

    results = Results.load(results_json)
    name, head_map = _find_map(results, metric, analysis, stack)
    fmt = (fmt or (out.suffix.lstrip(".") if out is not None and out.suffix else "pdf")).lower()
    if fmt not in plotting.EXPORT_FORMATS:
        raise HeadscopeError(f"unknown format '{fmt}': choose from {', '.join(plotting.EXPORT_FORMATS)}")
    plotting.paper_width(width)  # refuse a bad width before any work
    if out is None:
        out = results_json.parent / (re.sub(r"[^\w.-]", "_", f"{name}-{metric}-{head_map.stack}") + f".{fmt}")
    if not out.parent.is_dir():
        raise HeadscopeError(f"cannot write {out}: folder {out.parent} does not exist")
    figure = plotting.heatmap(head_map, f"{name}: {metric} ({head_map.stack})")
    try:
        plotting.export(figure, out, fmt, width=width, dpi=dpi)
    except plotting.StaticExportError as error:
        raise HeadscopeError(str(error)) from None
    except OSError as error:
        raise HeadscopeError(f"cannot write {out}: {error.strerror or error}") from None
    if not quiet:
        console.print(f"wrote {out}", highlight=False, soft_wrap=True)


def _find_map(results, metric: str, analysis: str | None, stack: str | None):
    """The analysis name and map that ``--metric``/``--analysis``/``--stack`` pick; one line naming the
    available choices otherwise."""
    if not len(results):
        raise HeadscopeError("these results hold no analyses, so no maps to plot")
    if analysis is not None and analysis not in results:
        raise HeadscopeError(f"no analysis '{analysis}' in these results: choose from {', '.join(results)}")
    names = [analysis] if analysis is not None else list(results)
    holders = [name for name in names if metric in results[name].metrics()]
    if not holders:
        available = "; ".join(f"{name}: {', '.join(results[name].metrics()) or '(none)'}" for name in names)
        raise HeadscopeError(f"no map '{metric}' in these results: the metrics are {available}")
    if len(holders) > 1:
        raise HeadscopeError(f"several analyses hold map '{metric}': pass --analysis, one of {', '.join(holders)}")
    result = results[holders[0]]
    stacks = [s for m, s in result.maps if m == metric]
    if stack is None and len(stacks) > 1:
        raise HeadscopeError(f"map '{metric}' exists for several stacks: pass --stack, one of {', '.join(stacks)}")
    if stack is not None and stack not in stacks:
        raise HeadscopeError(f"no stack '{stack}' for map '{metric}' in {holders[0]}: choose from {', '.join(stacks)}")
    return holders[0], result.map(metric, stack)


@app.command(name="analyses")
def list_analyses(
    name: Annotated[str | None, typer.Argument(help="one analysis to show (default: all)")] = None,
) -> None:
    """List the analyses: the model kinds each fits, what it costs, and its parameters with their types, defaults
    and meaning (set them with analyze --set ANALYSIS.NAME=VALUE, or as keywords of headscope.run)."""
    from headscope import registry

    chosen = [registry.get(name)] if name is not None else [registry.get(n) for n in registry.list_analyses()]
    out = Console()
    for analysis in chosen:
        runs = "runs by default" if analysis.default else "runs only when named (--analyses)"
        out.print(f"[bold]{analysis.name}[/bold]: {analysis.description}", highlight=False, soft_wrap=True)
        out.print(f"  fits: {', '.join(analysis.kinds)}; {runs}" + (f"; cost: {analysis.cost}" if analysis.cost
                                                                    else ""), highlight=False, soft_wrap=True)
        table = Table(Column("parameter", no_wrap=True), "type", "default", "meaning", box=None, padding=(0, 1))
        for parameter, words, default, doc in analysis.parameters():
            table.add_row(parameter, words, _shown(default), doc)
        if analysis.parameters():
            out.print(table)
        out.print()


def _shown(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return "none" if value is None else str(value)


@app.command()
def models() -> None:
    """List the packaged models: alias, whether installed, size, licence."""
    from headscope.models.zoo import DEFAULT_ALIAS, PACKAGED

    # the alias is what users type: never cut it short, however narrow the terminal
    table = Table(Column("alias", no_wrap=True), "installed", "kind", "layers x heads", "size", "licence", "install")
    for alias, model in PACKAGED.items():
        table.add_row(alias + (" (default)" if alias == DEFAULT_ALIAS else ""), "yes" if model.installed() else "no",
                      model.kind + (" (SYNTHETIC)" if model.synthetic else ""), model.layers_heads,
                      f"{model.size_mb} MB", model.licence, model.install)
    Console().print(table)
    for alias, model in PACKAGED.items():
        if model.synthetic:
            Console().print(f"{alias} is synthetic, for offline demos: {model.synthetic}", highlight=False,
                            soft_wrap=True)


@app.command()
def reproduce(
    names: Annotated[list[str] | None, typer.Argument(
        help="the findings to reproduce (default: all; --list names them)", show_default=False)] = None,
    docs: Annotated[Path | None, typer.Option(
        help="rewrite the generated block of this page (docs/published.md) with the numbers measured; needs "
             "every finding")] = None,
    json_out: Annotated[Path | None, typer.Option(
        "--json", help="write each finding's rows and claims to this JSON file")] = None,
    list_: Annotated[bool, typer.Option("--list", help="list the findings and stop")] = False,
) -> None:
    """Reproduce published findings on the packaged models: the paper's and headscope's numbers, and whether each
    claim reproduces. Exit code 1 when a claim's outcome is not the one recorded (or a finding could not run)."""
    import datetime
    import json

    from headscope import published
    from headscope.results import write_atomically

    if list_:
        for finding in published.chosen():
            Console().print(f"[bold]{finding.name}[/bold]: {finding.title} ({finding.source})", highlight=False,
                            soft_wrap=True)
        return
    findings = published.chosen(names or ())
    if docs is not None and len(findings) < len(published.FINDINGS):
        raise HeadscopeError("--docs rewrites the whole page: run every finding (name none)")
    for path in (docs, json_out):
        if path is not None and not path.parent.is_dir():
            raise HeadscopeError(f"cannot write {path}: folder {path.parent} does not exist")
    if docs is not None:
        published.check_page(docs)  # before hours of work, not after
    reproductions = []
    for finding in findings:
        console.print(f"reproducing {finding.name} ...", highlight=False)
        one = finding.attempt()
        reproductions.append(one)
        _print_reproduction(one)
        if json_out is not None:  # after each finding, so that an interrupted run keeps what it measured
            write_atomically(json_out, (json.dumps([r.to_json() for r in reproductions], indent=2) + "\n").encode())
    failed = [one.finding.name for one in reproductions if not one.as_expected]
    if docs is not None:
        when = datetime.date.today().isoformat()
        published.write_docs(docs, published.render(reproductions, when))
        console.print(f"wrote {docs}", highlight=False, soft_wrap=True)
    if failed:
        console.print(f"not as recorded: {', '.join(failed)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _print_reproduction(one) -> None:
    """One finding's claims on stdout: verdict, claim and the numbers behind it."""
    out = Console()
    out.print(f"[bold]{one.finding.name}[/bold] ({one.seconds:.0f} s)", highlight=False)
    if one.error is not None:
        out.print(f"  could not be measured: {one.error}", highlight=False, soft_wrap=True, markup=False)
    for claim in one.claims:
        verdict = "reproduces" if claim.holds else "does not reproduce"
        flag = "" if claim.as_expected else "  [NOT AS RECORDED]"
        out.print(f"  {verdict}: {claim.text}: {claim.measured}{flag}", highlight=False, soft_wrap=True,
                  markup=False)


def _parameters(settings: list[str]) -> dict[str, dict[str, object]]:
    """``["sinks.protocol=gu", ...]`` -> ``{"sinks": {"protocol": "gu"}}``: the values stay text, which the
    analysis's parameters read by their types (``headscope analyses`` lists them)."""
    params: dict[str, dict[str, object]] = {}
    for setting in settings:
        name, equals, raw = setting.partition("=")
        analysis, dot, key = name.partition(".")
        if not equals or not dot or not analysis or not key:
            raise HeadscopeError(f"--set takes ANALYSIS.NAME=VALUE, got '{setting}' (e.g. --set sinks.protocol=gu)")
        params.setdefault(analysis, {})[key] = raw
    return params


def _figure_formats(spec: str) -> tuple[str, ...]:
    if spec.strip().lower() == "none":
        return ()
    formats = tuple(f.strip().lower() for f in spec.split(",") if f.strip())
    unknown = [f for f in formats if f not in ("html", "png", "svg", "pdf")]
    if unknown:
        raise HeadscopeError(f"unknown figure format '{unknown[0]}': choose from html, png, svg, pdf, or none")
    return formats


def _print_top_heads(results) -> None:
    table = Table("analysis", "metric", "stack", "top heads (layer.head = value)")
    for name, result in results.items():
        for (metric, stack), head_map in result.maps.items():
            if head_map.notable == "label":  # categories, not scores
                continue
            top = head_map.top(3)
            table.add_row(name, metric, stack, ", ".join(f"{layer}.{head} = {value:.3g}" for layer, head, value in top))
    Console().print(table)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it stops as cleanly as on Ctrl-C (captures restore the model,
    a results.json being written is left whole)."""


class _Stopped(Exception):
    """An interrupted ``analyze``: its one line, and the exit code (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _terminate(signum, frame) -> None:
    raise _Terminated


def main() -> None:
    """Entry point: run the app, turning every user error into one line and exit code 2."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        _main()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _main() -> None:
    try:
        code = app(standalone_mode=False)  # outside standalone mode, click returns a typer.Exit's code
    except HeadscopeError as error:
        _fail(str(error), 2)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except _Stopped as stop:
        _fail(str(stop), stop.code)
    except (typer.Abort, KeyboardInterrupt) as stop:  # click turns a KeyboardInterrupt into Abort, cause kept
        terminated = isinstance(stop, _Terminated) or isinstance(stop.__cause__, _Terminated)
        _fail("terminated" if terminated else "interrupted", 143 if terminated else 130)
    except Exception as error:
        if not hasattr(error, "format_message"):  # a bug, not the user's input: keep the traceback
            raise
        if type(error).__name__ == "NoArgsIsHelpError":
            print(error.ctx.get_help())
            sys.exit(0)
        _fail(f"{error.format_message()} (see headscope --help)", getattr(error, "exit_code", 2))
    if isinstance(code, int) and code:
        sys.exit(code)


def _fail(message: str, code: int) -> None:
    console.print(f"headscope: error: {message}", highlight=False, soft_wrap=True)
    sys.exit(code)
