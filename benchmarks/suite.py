#!/usr/bin/env python
"""The benchmark suite: headscope beside the tools users would pick instead, in one run, one table of ratios.

Runs, each in its own processes: ``capture.py`` (per-head statistics against SDPA, eager ``output_attentions``,
nnsight and TransformerLens, 512 to 8192 tokens), ``retrieval.py`` (retrieval scoring against plain greedy
generation and Wu et al.'s ``output_attentions`` decode loop) and ``importance.py`` (batched against looped
ablations, gradient importance against a forward and backward pass). Then it reads their numbers, fits the growth
exponent of time and memory as the tokens double, checks each target, prints the summary with the machine it ran
on, and writes it into ``docs/performance.md`` between its markers (each script writes its own block or JSON
too) and into ``benchmarks/results/suite-<device>.json``.

    python benchmarks/suite.py                       # everything (about two hours on 2 CPU cores)
    python benchmarks/suite.py --reuse-capture       # the capture table from benchmarks/results/capture-cpu.json
    python benchmarks/suite.py --device cuda         # a GPU: results kept apart (suite-cuda.json, its own block)
    python benchmarks/suite.py --smoke               # a tiny random model, seconds of work: checks the suite runs
    python benchmarks/suite.py --summarise           # only the summary, from the JSON files of earlier runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import capture

BENCH = Path(__file__).resolve().parent
TARGETS_START, TARGETS_END = "<!-- suite:{device}:start -->", "<!-- suite:{device}:end -->"


def _run(script: str, arguments: list[str], timeout: float) -> None:
    command = [sys.executable, str(BENCH / script), *arguments]
    print("suite: " + " ".join(command[1:]), flush=True)
    done = subprocess.run(command, cwd=BENCH.parent, timeout=timeout, check=False)
    if done.returncode != 0:
        raise SystemExit(f"suite: {script} failed with exit {done.returncode}")


def _cell(cells: list[dict[str, Any]], method: str, tokens: int) -> dict[str, Any] | None:
    return next((c for c in cells if c["method"] == method and c["tokens"] == tokens and c.get("status") == "ok"),
                None)


def _note(cells: list[dict[str, Any]], method: str, tokens: int) -> str:
    cell = next((c for c in cells if c["method"] == method and c["tokens"] == tokens), None)
    return "not run" if cell is None else cell.get("note", cell.get("status", ""))


def targets(capture_report: dict, retrieval_report: dict, importance_report: dict, cuda: bool) -> list[dict]:
    """Each target of the suite: what it asks, what was measured, and whether it was met (None: not measured)."""
    cells = capture_report["cells"]
    rows = []

    def add(target: str, measured: str, met: bool | None) -> None:
        rows.append({"target": target, "measured": measured, "met": met})

    for tokens in (2048, 4096):
        ours, floor = _cell(cells, "headscope", tokens), _cell(cells, "sdpa", tokens)
        if ours and floor:
            time_ratio, memory_ratio = ours["time_s"] / floor["time_s"], ours["peak_bytes"] / floor["peak_bytes"]
            add(f"capture time <= 1.5x SDPA at {tokens} tokens", f"{time_ratio:.2f}x", time_ratio <= 1.5)
            add(f"capture peak memory <= 1.2x SDPA at {tokens} tokens", f"{memory_ratio:.2f}x", memory_ratio <= 1.2)
        else:
            add(f"capture time <= 1.5x SDPA at {tokens} tokens", "not measured", None)
            add(f"capture peak memory <= 1.2x SDPA at {tokens} tokens", "not measured", None)
    ours, peer = _cell(cells, "headscope", 4096), _cell(cells, "nnsight", 4096)
    if ours and peer:
        speedup = peer["time_s"] / ours["time_s"]
        add(">= 2x faster than nnsight at 4096 tokens", f"{speedup:.1f}x", speedup >= 2)
    else:
        add(">= 2x faster than nnsight at 4096 tokens", f"nnsight: {_note(cells, 'nnsight', 4096)}", None)
    ours = _cell(cells, "headscope", 8192)
    peers = "; ".join(f"{m}: {_note(cells, m, 8192) if not _cell(cells, m, 8192) else 'ran'}"
                      for m in ("eager", "transformerlens"))
    if ours:
        fits = ours["peak_bytes"] < 24 * capture.GIB
        add("8192 tokens within 24 GiB (where eager and TransformerLens cannot)",
            f"{ours['peak_bytes'] / capture.GIB:.1f} GiB peak; {peers}", fits)
    else:
        add("8192 tokens within 24 GiB (where eager and TransformerLens cannot)", "not measured", None)
    ratios = [(row["prompt_tokens"], row["scored_over_generate"]) for row in retrieval_report["rows"]]
    worst = max(ratio for _, ratio in ratios)
    add("retrieval scoring within 1.3x of greedy generation",
        ", ".join(f"{ratio:.2f}x at {tokens}" for tokens, ratio in ratios), worst <= 1.3)
    speedup = importance_report["speedup"]
    goal = 5.0 if cuda else 2.5
    add(f"batched ablation >= {goal:g}x faster than the single-head loop",
        f"{speedup:.2f}x ({importance_report['heads']} heads, {importance_report['tokens']} tokens)", speedup >= goal)
    return rows


def render(report: dict[str, Any]) -> str:
    """The summary block: machine, targets, growth exponents, retrieval and importance numbers."""
    machine, capture_run = report["machine"], report["capture"]["run"]
    lines = [f"Measured {report['date']} with `{report['command']}`.", "",
             f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB RAM; device "
             f"`{machine['device']}` ({machine['device_name']}).",
             "- Versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v) + ".",
             f"- Capture table: {capture_run['date']} (`{capture_run['command']}`), model `{capture_run['model']}`.",
             "", "| target | measured | met |", "|---|---|---|"]
    for row in report["targets"]:
        met = {True: "yes", False: "**no**", None: "–"}[row["met"]]
        lines.append(f"| {row['target']} | {row['measured']} | {met} |")
    lines += ["", "Growth as the tokens double (exponent b of tokens^b, least squares over the measured lengths):", "",
              "| method | time | peak memory | added memory |", "|---|---:|---:|---:|"]
    for method, exponents in report["growth"].items():
        cells = [f"{value:.2f}" if value is not None else "–" for value in exponents.values()]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Retrieval scoring, one needle test per length (seconds; the same tokens decoded):", "",
              "| prompt tokens | steps | generate | greedy loop | headscope scored | vs generate | "
              "Retrieval_Head loop | vs headscope | same argmax |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in report["retrieval"]["rows"]:
        lines.append(f"| {row['prompt_tokens']} | {row['generated_tokens']} | {row['generate_s']:.2f} | "
                     f"{row['plain_loop_s']:.2f} | {row['scored_s']:.2f} | {row['scored_over_generate']:.2f}x | "
                     f"{row['retrieval_head_s']:.2f} | {row['retrieval_head_over_scored']:.2f}x | "
                     f"{row['same_argmax_as_retrieval_head']:.1%} |")
    imp = report["importance"]
    lines += ["", f"Importance, {imp['heads']} heads, {imp['tokens']} tokens: every single-head zero ablation "
              f"{imp['ablation_loop_s']:.1f} s as a loop, {imp['ablation_batched_no_prefix_s']:.1f} s batched "
              f"({imp['speedup_no_prefix']:.2f}x), {imp['ablation_batched_s']:.1f} s batched with prefix reuse "
              f"({imp['speedup']:.2f}x; largest difference from the loop {imp['max_abs_difference']:.1e}); gradient "
              f"importance {imp['gradient_s']:.2f} s = {imp['gradient_over_forward_backward']:.2f}x a plain forward "
              f"and backward ({imp['forward_backward_s']:.2f} s), {imp['gradient_over_forward']:.2f}x a forward."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=capture._cores())
    parser.add_argument("--smoke", action="store_true", help="tiny random models and short inputs, to a temp folder")
    parser.add_argument("--reuse-capture", action="store_true",
                        help="read the capture table of an earlier run (benchmarks/results/capture-<device>.json)")
    parser.add_argument("--lengths", default="512,2048,4096,8192", help="capture lengths")
    parser.add_argument("--methods", help="capture methods (default: every installed one)")
    parser.add_argument("--retrieval-lengths", default="1024,4096")
    parser.add_argument("--importance-tokens", type=int, default=256)
    parser.add_argument("--summarise", action="store_true",
                        help="run nothing: summarise the JSON files the three benchmarks wrote earlier")
    parser.add_argument("--out", type=Path, help="folder of the JSON files (default benchmarks/results)")
    parser.add_argument("--docs", type=Path, help="markdown file for the tables (default docs/performance.md)")
    parser.add_argument("--timeout", type=float, default=3 * 3600.0, help="seconds per script")
    args = parser.parse_args(argv)
    tag = args.device.replace(":", "")
    scratch = Path(tempfile.mkdtemp(prefix="headscope-suite-")) if args.smoke else None
    out = args.out or scratch or capture.RESULTS
    docs = args.docs or (scratch / "performance.md" if scratch else capture.DOCS)
    common = ["--device", args.device, "--threads", str(args.threads)]
    capture_json = out / f"capture-{tag}.json"
    if args.reuse_capture or args.summarise:
        capture_json = capture.RESULTS / f"capture-{tag}.json"
    else:
        size = ["--smoke"] if args.smoke else ["--lengths", args.lengths]
        size += ["--methods", args.methods] if args.methods else []
        _run("capture.py", [*size, "--device", args.device, "--threads", str(args.threads), "--json",
                            str(capture_json), "--docs", str(docs)], args.timeout)
    smoke = ["--smoke"] if args.smoke else []
    if not args.summarise:
        _run("retrieval.py", [*smoke, *common, "--lengths", args.retrieval_lengths, "--json",
                              str(out / f"retrieval-{tag}.json")], args.timeout)
        _run("importance.py", [*smoke, *common, "--tokens", str(args.importance_tokens), "--json",
                               str(out / f"importance-{tag}.json")], args.timeout)

    capture_report = json.loads(capture_json.read_text())
    retrieval_report = json.loads((out / f"retrieval-{tag}.json").read_text())
    importance_report = json.loads((out / f"importance-{tag}.json").read_text())
    cells = capture_report["cells"]
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/suite.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": capture.machine_info(args.device, cells),
        "capture": {"run": capture_report["run"], "json": str(capture_json)},
        "targets": targets(capture_report, retrieval_report, importance_report, args.device.startswith("cuda")),
        "growth": {method: {key: capture.growth(cells, method, key)
                            for key in ("time_s", "peak_bytes", "increase_bytes")}
                   for method in capture_report["run"]["methods"]},
        "retrieval": retrieval_report,
        "importance": importance_report,
    }
    report["machine"]["versions"].update(capture_report["machine"]["versions"])
    block = render(report)
    print("\n" + block)
    (out / f"suite-{tag}.json").write_text(json.dumps(report, indent=1) + "\n")
    capture.write_docs(docs, block, TARGETS_START.format(device=tag), TARGETS_END.format(device=tag))
    print(f"raw numbers: {out}\ntables: {docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
