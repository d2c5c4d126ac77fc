#!/usr/bin/env python
"""GPU benchmark: per-head statistics at long context on a Llama-3-8B-shaped model, headscope's kernel path against
the plain SDPA forward.

A Llama with Llama-3-8B's shape (32 layers, 32 query heads, 8 key/value heads, hidden 4096, MLP 14336, vocabulary
128256) and random weights, bfloat16, on one GPU; one sequence of T random tokens, no KV cache, the logits of the
last position only. Per length, each method's fastest of ``--repeats`` forwards (after one untimed warm-up) and its
peak ``torch.cuda.max_memory_allocated``:

    sdpa               the plain forward (SDPA attention): the floor.
    headscope-sinks    the sinks analysis's default statistics on the kernel path: mass on the first token, the
                       sink score, and the residual mass (``KeyMass``, ``SinkMass``, ``ResidualMass``).
    headscope          ``KeyMass(positions=(0,))`` and ``Entropy()`` on the kernel path (entropy takes one more
                       kernel call, in float32).
    headscope-chunked  the same on the chunked path.
    eager              where it fits (it keeps every layer's (heads, T, T) map: at 8B's shape, not even at 8k).

nnsight and TransformerLens are not on the GPU image and the script installs nothing; they are compared on CPU by
``benchmarks/capture.py``, which also holds the eager baseline the statistics are checked against.

A cell whose estimated time would overrun ``--budget`` seconds is skipped and says so; a cell that runs out of
memory says so. Writes ``benchmarks/results/gpu.json`` and prints the markdown table for docs/performance.md.

    bash benchmarks/gpu.sh                      # installs nothing beyond the repository itself; < 8 minutes
    python benchmarks/gpu.py --lengths 8192 --layers 4 --repeats 1   # a quick check
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("sdpa", "headscope-sinks", "headscope", "headscope-chunked", "eager")
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
             "rope_theta": 500000.0}
GIB = 2**30


def build(layers: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": layers})
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return model


def runner(method: str, model):
    """``run(ids)`` for the method, and the scope whose paths it records (headscope's), or None."""
    from headscope.capture.engine import Scope
    from headscope.capture.reducers import Entropy, KeyMass

    if method == "sdpa":
        return (lambda ids: model(input_ids=ids, use_cache=False, logits_to_keep=1)), None
    if method == "eager":
        def eager(ids):
            model.set_attn_implementation("eager")
            try:
                model(input_ids=ids, use_cache=False, logits_to_keep=1, output_attentions=True)
            finally:
                model.set_attn_implementation("sdpa")
        return eager, None
    scope = Scope(model)
    if method == "headscope-sinks":
        from headscope.analyses.sink_reducers import ResidualMass, SinkMass

        def sinks(ids):
            with scope.capture(KeyMass(positions=(0,)), SinkMass(positions=(0,), exclude_own=False), ResidualMass()):
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
        return sinks, scope
    path = "chunked" if method == "headscope-chunked" else "auto"

    def statistics(ids):
        with scope.capture(KeyMass(positions=(0,)), Entropy(), path=path):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return statistics, scope


def measure(method: str, model, tokens: int, repeats: int, device: str) -> dict[str, Any]:
    run, scope = runner(method, model)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device,
                        generator=torch.Generator(device).manual_seed(tokens))
    times, peaks = [], []
    with torch.no_grad():
        run(ids[:, :256])  # warm-up
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            run(ids)
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            peaks.append(torch.cuda.max_memory_allocated(device))
    cell = {"status": "ok", "time_s": min(times), "times_s": times, "peak_bytes": max(peaks)}
    if scope is not None:
        cell["paths"] = dict(scope.paths)
    return cell


def render(report: dict[str, Any]) -> str:
    run = report["run"]
    lines = [f"Measured {run['date']} with `{run['command']}` on {run['device_name']}: torch {run['torch']}, "
             f"transformers {run['transformers']}; a Llama-3-8B-shaped model ({run['layers']} layers), random "
             f"weights, bfloat16, batch 1, no KV cache; the fastest of {run['repeats']} forwards.", "",
             "| tokens | method | time (s) | vs sdpa | peak (GiB) | vs sdpa | note |",
             "|---:|---|---:|---:|---:|---:|---|"]
    for tokens in run["lengths"]:
        floor = report["cells"].get(f"sdpa@{tokens}", {})
        for method in run["methods"]:
            cell = report["cells"].get(f"{method}@{tokens}", {"status": "not run", "note": "not run"})
            if cell["status"] != "ok":
                lines.append(f"| {tokens} | {method} | – | – | – | – | {cell['note']} |")
                continue
            ratio = (f"{cell['time_s'] / floor['time_s']:.2f}x" if floor.get("status") == "ok" else "–")
            memory = (f"{cell['peak_bytes'] / floor['peak_bytes']:.2f}x" if floor.get("status") == "ok" else "–")
            paths = ", ".join(f"{k}: {v}" for k, v in cell.get("paths", {}).items())
            lines.append(f"| {tokens} | {method} | {cell['time_s']:.2f} | {ratio} | {cell['peak_bytes'] / GIB:.1f} | "
                         f"{memory} | {paths} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="8192,32768,131072")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--layers", type=int, default=LLAMA3_8B["num_hidden_layers"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for all cells (skips what would overrun)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path, default=RESULTS / "gpu.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device: this benchmark needs a GPU (benchmarks/capture.py is the CPU one)",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    lengths = [int(v) for v in args.lengths.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    model = build(args.layers, args.device)
    cells: dict[str, dict[str, Any]] = {}
    per_token2: dict[str, float] = {}  # seconds per forward / T^2 seen so far, per method: the estimate
    for tokens in lengths:
        for method in methods:
            key = f"{method}@{tokens}"
            left = args.budget - (time.perf_counter() - started)
            estimate = per_token2.get(method, 0.0) * tokens**2 * (args.repeats + 1)
            if method == "eager" and tokens * tokens * LLAMA3_8B["num_attention_heads"] * 2 * args.layers > 0.6 * (
                    torch.cuda.mem_get_info(args.device)[0]):
                cells[key] = {"status": "skipped", "note": "skipped: every layer's (heads, T, T) map does not fit"}
                continue
            if estimate > left:
                cells[key] = {"status": "skipped", "note": f"skipped: estimated {estimate:.0f} s, {left:.0f} s left"}
                continue
            try:
                cells[key] = measure(method, model, tokens, args.repeats, args.device)
                per_token2[method] = cells[key]["time_s"] / tokens**2
            except torch.cuda.OutOfMemoryError as error:
                cells[key] = {"status": "oom", "note": f"out of memory: {str(error).splitlines()[0][:120]}"}
            except Exception as error:  # one cell's failure must not cost the others
                cells[key] = {"status": "failed", "note": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
            gc.collect()
            torch.cuda.empty_cache()
            print(key, cells[key], flush=True)
    import transformers

    report = {"run": {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                      "command": "python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
                      "device_name": torch.cuda.get_device_name(args.device), "torch": torch.__version__,
                      "transformers": transformers.__version__, "layers": args.layers, "repeats": args.repeats,
                      "lengths": lengths, "methods": methods,
                      "wall_s": round(time.perf_counter() - started, 1)},
              "cells": cells}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print()
    print(render(report))
    ok = [c for c in cells.values() if c["status"] == "ok"]
    return 0 if ok and not math.isnan(sum(c["time_s"] for c in ok)) else 1


if __name__ == "__main__":
    sys.exit(main())
