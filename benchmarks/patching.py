#!/usr/bin/env python
"""Benchmark: activation patching of every single head (``analyses/patching.py``), batched, against a loop of
plain forward passes; attribution patching against one plain forward and backward pass.

Loads a model (the packaged SmolLM2 by default, float32) and builds clean/corrupted pairs from token ids: the
first T tokens of the shipped prose, and a copy with one token replaced by another (seeded) token, at T/2 in the
``mid`` cells (every length) and at 3T/4 in the ``late`` cell (``--late-tokens``, by default the shortest length:
without reuse a pass costs the same wherever the corrupted token is, so a late cell at the longest length would
mostly repeat the mid cell's reuse-off time, the run's largest cost after the loop). The answers are the clean
run's top next token and the corrupted run's (the clean run's second where the two agree); the metric is
M = logit(answer) - logit(wrong) at the last token, denoising (the corrupted prompt, one head's z taken from the
clean run at every position). Methods:

- ``loop``: what a user writes without headscope: one plain forward pass of the corrupted prompt per head, under a
  forward pre-hook on that layer's ``o_proj`` that replaces the head's slice of its input with the clean run's
  (recorded by one clean pass, not timed);
- ``headscope``: ``patching.patch_heads`` on the pair as ``prepare_inputs`` gives it (its two reading passes not
  timed), ``batch_size`` rows per pass; where ``patch_heads`` takes a prefix-reuse keyword, with the prompts'
  shared leading tokens run once (the default) and without.

Each cell is the fastest of ``--repeats`` runs, the methods of a length taking turns so that load on the machine
spreads over them, after one warm-up pass of each kind. Both methods give M_patched per head, and the largest
difference between each headscope run and the loop (in the ``late`` cell, which has no loop, between reuse on and
off) says the work compared is the same. Attribution patching (``attribution_patching``, one pair: one forward and
one backward pass under gates, the products with z_clean - z_corrupted) is timed against a plain forward and
backward pass of the same metric on the corrupted tokens, and its per-head sums are correlated with the patches.

    python benchmarks/patching.py --json benchmarks/results/patching-cpu.json
    python benchmarks/patching.py --quick            # 16 tokens, 1 repeat: checks that it runs
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch

import headscope
from headscope.analyses import patching
from headscope.probes import text

REUSE_KEYWORDS = ("reuse_prefix", "prefix_reuse")  # the names the prefix-reuse switch of patch_heads may take
METRIC = "logit_diff"
SEED = 0


@dataclass
class Cell:
    """One pair of ``tokens`` tokens corrupted at ``fraction`` of them, and what runs on it: the loop or not, and
    headscope's (batch_size, reuse_prefix) runs (reuse None: patch_heads has no such keyword)."""

    name: str
    tokens: int
    fraction: float
    loop: bool
    runs: list[tuple[int, bool | None]] = field(default_factory=list)


def cells(lengths: list[int], batch_size: int, extra_batch_size: int, late_tokens: int,
          keyword: str | None) -> list[Cell]:
    """``mid`` at every length (the loop, headscope with reuse on and off, and at the shortest length
    ``extra_batch_size`` too), and ``late`` at ``late_tokens`` (headscope with reuse on and off)."""
    both = [True, False] if keyword else [None]
    out = []
    for tokens in lengths:
        runs = [(batch_size, reuse) for reuse in both]
        if extra_batch_size and tokens == lengths[0]:
            runs.append((extra_batch_size, both[0]))
        out.append(Cell("mid", tokens, 0.5, True, runs))
    if keyword:
        out.append(Cell("late", late_tokens, 0.75, False, [(batch_size, reuse) for reuse in both]))
    return out


def prose_ids(tokenizer, tokens: int) -> torch.Tensor:
    """(1, tokens) ids: the shipped prose, repeated as often as needed."""
    once = tokenizer(text.prose(), add_special_tokens=False)["input_ids"]
    ids = (once * (tokens // len(once) + 1))[:tokens]
    return torch.tensor([ids])


def corrupted(clean: torch.Tensor, position: int, vocab: int) -> torch.Tensor:
    """A copy of ``clean`` (1, T) with the token at ``position`` replaced by another one drawn with ``SEED``."""
    generator = torch.Generator().manual_seed(SEED + position)
    out = clean.clone()
    while int(out[0, position]) == int(clean[0, position]):
        out[0, position] = int(torch.randint(vocab, (1,), generator=generator))
    return out


@torch.no_grad()
def answers(model, clean: torch.Tensor, corrupt: torch.Tensor) -> tuple[int, int]:
    """The clean run's top next token and the corrupted run's; the clean run's second where they agree."""
    clean_top = model(input_ids=clean, use_cache=False).logits[0, -1].topk(2).indices.tolist()
    wrong = int(model(input_ids=corrupt, use_cache=False).logits[0, -1].argmax())
    return clean_top[0], wrong if wrong != clean_top[0] else clean_top[1]


def out_projections(model) -> list[torch.nn.Module]:
    """Each layer's attention output projection (a Llama-layout decoder)."""
    return [layer.self_attn.o_proj for layer in model.model.layers]


@torch.no_grad()
def record_o_proj_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's o_proj input (1, T, heads * head_dim) on one plain pass of ``ids``."""
    seen: list[torch.Tensor] = []
    handles = [module.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
               for module in out_projections(model)]
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def swap_head(clean: torch.Tensor, head: int, head_dim: int) -> Callable:
    """A forward pre-hook on o_proj: the head's slice of its input (every position) taken from ``clean``."""
    columns = slice(head * head_dim, (head + 1) * head_dim)

    def hook(module, args):
        x = args[0].clone()
        x[..., columns] = clean[..., columns]
        return (x, *args[1:])

    return hook


@torch.no_grad()
def loop_patching(model, corrupt: torch.Tensor, clean_inputs: list[torch.Tensor], answer: int, wrong: int,
                  heads: int, head_dim: int) -> np.ndarray:
    """(layers, heads) M_patched: one plain forward pass of ``corrupt`` per head, that head patched."""
    values = np.zeros((len(clean_inputs), heads))
    for layer, module in enumerate(out_projections(model)):
        for head in range(heads):
            handle = module.register_forward_pre_hook(swap_head(clean_inputs[layer], head, head_dim))
            try:
                logits = model(input_ids=corrupt, use_cache=False).logits[0, -1].float()
            finally:
                handle.remove()
            values[layer, head] = float(logits[answer] - logits[wrong])
    return values


def forward_backward(model, ids: torch.Tensor, answer: int, wrong: int) -> None:
    """The plain model's metric at the last token and its backward pass: what any gradient method costs at least."""
    logits = model(input_ids=ids, use_cache=False).logits[0, -1]
    (logits[answer] - logits[wrong]).backward()
    model.zero_grad(set_to_none=True)


def race(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, Any]]:
    """Each run ``repeats`` times, taking turns; per run its last value, its times and the load average around."""
    out = {name: {"times_s": [], "load_average": []} for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            before = os.getloadavg()[0]
            started = time.perf_counter()
            out[name]["value"] = run()
            out[name]["times_s"].append(round(time.perf_counter() - started, 3))
            out[name]["load_average"].append([round(before, 2), round(os.getloadavg()[0], 2)])
            print(f"  {name}: {out[name]['times_s'][-1]:.2f} s (load {before:.2f})", file=sys.stderr, flush=True)
    for entry in out.values():
        entry["time_s"] = min(entry["times_s"])
    return out


def reuse_keyword() -> str | None:
    """The prefix-reuse keyword of ``patch_heads`` when it has one."""
    parameters = inspect.signature(patching.patch_heads).parameters
    return next((name for name in REUSE_KEYWORDS if name in parameters), None)


def run_name(batch_size: int, reuse: bool | None) -> str:
    return f"headscope bs={batch_size}" + ("" if reuse is None else f" reuse={'on' if reuse else 'off'}")


def measure(model, scope, tokenizer, cell: Cell, keyword: str | None, repeats: int
            ) -> tuple[list[dict[str, Any]], Any, np.ndarray]:
    """The rows of one cell (the loop where it runs, each headscope run: times, ratios, differences), its prepared
    pair and headscope's (layers, heads) M_patched."""
    shape = scope.stacks["self"]
    head_dim = model.config.hidden_size // shape.heads if getattr(model.config, "head_dim", None) is None \
        else model.config.head_dim
    clean = prose_ids(tokenizer, cell.tokens)
    position = int(cell.tokens * cell.fraction)
    corrupt = corrupted(clean, position, model.config.vocab_size)
    answer, wrong = answers(model, clean, corrupt)
    prepared = patching.prepare_inputs(model, scope, {"input_ids": clean}, {"input_ids": corrupt}, answer, wrong,
                                       METRIC)
    clean_inputs = record_o_proj_inputs(model, clean)

    def headscope_run(batch_size: int, reuse: bool | None) -> Callable[[], np.ndarray]:
        options = {} if reuse is None else {keyword: reuse}
        return lambda: patching.patch_heads(model, scope, [prepared], METRIC, "denoising", batch_size,
                                            **options).patched

    runs: dict[str, Callable[[], Any]] = {}
    if cell.loop:
        runs["loop"] = lambda: loop_patching(model, corrupt, clean_inputs, answer, wrong, shape.heads, head_dim)
    for batch_size, reuse in cell.runs:
        runs[run_name(batch_size, reuse)] = headscope_run(batch_size, reuse)
    with torch.no_grad():  # warm-up: one pass of each kind
        model(input_ids=corrupt, use_cache=False)
        one = torch.zeros(1, shape.layers, shape.heads, dtype=torch.bool)
        one[0, 0, 0] = True
        patching.patched_logits(model, scope, prepared.corrupt, prepared.clean_z, one, 1)
    print(f"{cell.name}, {cell.tokens} tokens, corrupted at {position}:", file=sys.stderr, flush=True)
    found = race(runs, repeats)
    reference = "loop" if cell.loop else run_name(*cell.runs[-1])
    rows = []
    for name, entry in found.items():
        batch_size, reuse = (None, None) if name == "loop" else next(r for r in cell.runs if run_name(*r) == name)
        row = {"cell": cell.name, "tokens": cell.tokens, "corrupted_position": position, "method": name.split()[0],
               "batch_size": batch_size, "reuse_prefix": reuse, "times_s": entry["times_s"],
               "time_s": entry["time_s"], "load_average": entry["load_average"]}
        if name != reference:
            row["max_abs_difference"] = float(np.abs(entry["value"] - found[reference]["value"]).max())
            row["compared_with"] = reference
            if cell.loop:
                row["loop_over_this"] = round(found["loop"]["time_s"] / entry["time_s"], 2)
        if reuse:
            off = run_name(batch_size, False)
            if off in found:
                row["reuse_gain"] = round(found[off]["time_s"] / entry["time_s"], 2)
        rows.append(row)
    if cell.loop:
        rows[0]["clean_metric"], rows[0]["corrupted_metric"] = prepared.clean_metric, prepared.corrupted_metric
        rows[0]["answers"] = [answer, wrong]
    return rows, prepared, found[run_name(*cell.runs[0])]["value"]


def attribution(model, scope, prepared, patched: np.ndarray, repeats: int) -> dict[str, Any]:
    """Attribution patching of a prepared pair against a plain forward and backward pass of its corrupted tokens;
    the Pearson r of its per-head sums with the patches' M_patched (layers, heads)."""
    corrupt, answer, wrong, tokens = prepared.corrupt["input_ids"], prepared.answer, prepared.wrong, prepared.length
    forward_backward(model, corrupt, answer, wrong)  # warm-up: the first backward allocates the gradients
    patching.attribution_patching(model, scope, [prepared], METRIC)
    print(f"attribution, {tokens} tokens:", file=sys.stderr, flush=True)
    found = race({"forward_backward": lambda: forward_backward(model, corrupt, answer, wrong),
                  "attribution": lambda: patching.attribution_patching(model, scope, [prepared], METRIC)}, repeats)
    estimate = found["attribution"]["value"].sum(-1).ravel()
    return {"tokens": tokens, "forward_backward_s": found["forward_backward"]["time_s"],
            "forward_backward_times_s": found["forward_backward"]["times_s"],
            "attribution_s": found["attribution"]["time_s"], "attribution_times_s": found["attribution"]["times_s"],
            "attribution_over_forward_backward": round(found["attribution"]["time_s"]
                                                       / found["forward_backward"]["time_s"], 2),
            "pearson_with_patching": float(np.corrcoef(estimate, patched.ravel())[0, 1])}


def machine(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        cpu = next((line.partition(":")[2].strip() for line in handle if line.startswith("model name")), cpu)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(memory, 1), "threads": threads,
            "platform": platform.platform(), "python": platform.python_version(),
            "versions": {name: metadata.version(name) for name in ("torch", "transformers", "headscope")}}


def table(rows: list[dict[str, Any]], attributed: list[dict[str, Any]]) -> str:
    """The markdown tables of docs/performance.md."""
    lines = ["| cell | tokens | corrupted at | method | batch | prefix reuse | time (s) | loop / this | reuse gain "
             "| max abs diff |", "|---|---:|---:|---|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        reuse = {None: "–", True: "on", False: "off"}[row["reuse_prefix"]]
        difference = f"{row['max_abs_difference']:.1e}" if "max_abs_difference" in row else "reference"
        lines.append(f"| {row['cell']} | {row['tokens']} | {row['corrupted_position']} | {row['method']} | "
                     f"{row['batch_size'] or 1} | {reuse} | {row['time_s']:.2f} | "
                     f"{_times(row.get('loop_over_this'))} | {_times(row.get('reuse_gain'))} | {difference} |")
    lines += ["", "| tokens | forward + backward (s) | attribution patching (s) | ratio | Pearson r with patching |",
              "|---:|---:|---:|---:|---:|"]
    lines += [f"| {a['tokens']} | {a['forward_backward_s']:.3f} | {a['attribution_s']:.3f} | "
              f"{a['attribution_over_forward_backward']:.2f}x | {a['pearson_with_patching']:.3f} |" for a in attributed]
    return "\n".join(lines)


def _times(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help=f"an alias, a folder, or {common.TINY}")
    parser.add_argument("--lengths", default="64,256", help="comma-separated token lengths of the pairs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--extra-batch-size", type=int, default=64, help="also at the shortest length (0: none)")
    parser.add_argument("--late-tokens", type=int, help="the length of the late cell (default: the shortest)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="16 tokens, 1 repeat: checks that it runs")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--note", default="", help="a remark kept in the JSON (the machine's state, say)")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.repeats = "16", 1
    lengths = sorted(int(length) for length in args.lengths.split(","))
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), os.getloadavg()

    model, tokenizer = common.load(args.model)
    scope = headscope.Scope(model)
    keyword = reuse_keyword()
    rows, attributed = [], []
    for cell in cells(lengths, args.batch_size, args.extra_batch_size, args.late_tokens or lengths[0], keyword):
        found, prepared, patched = measure(model, scope, tokenizer, cell, keyword, args.repeats)
        rows += found
        if cell.name == "mid":
            attributed.append(attribution(model, scope, prepared, patched, args.repeats))
    shape = scope.stacks["self"]
    report = {
        "machine": machine(args.threads),
        "run": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "command": shlex.join(["python", "benchmarks/patching.py", *sys.argv[1:]]), "model": args.model,
                "shape": {"layers": shape.layers, "heads": shape.heads}, "dtype": "float32", "device": "cpu",
                "metric": f"{METRIC}, denoising", "repeats": args.repeats,
                "reuse_keyword": keyword or "patch_heads has no prefix-reuse keyword",
                "load_average_start": [round(x, 2) for x in load_start],
                "load_average_end": [round(x, 2) for x in os.getloadavg()],
                "total_s": round(time.perf_counter() - started, 1), "note": args.note},
        "cells": rows,
        "attribution": attributed,
    }
    common.write(report, args.json)
    print(table(rows, attributed))


if __name__ == "__main__":
    main()
