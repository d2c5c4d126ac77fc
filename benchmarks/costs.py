"""What each analysis costs at its defaults on the packaged models: the wall time of ``headscope.run``, the
model already loaded (its load time reported beside it), on this machine's threads.

    python benchmarks/costs.py [--out benchmarks/results/costs-cpu.json] [--only NAME,...]

These are the numbers ``headscope analyses`` and the README quote as each analysis's cost. One run per cell:
they are costs to plan by, not speed targets (those are in capture.py, importance.py and retrieval.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from common import write

import headscope

RUNS = [  # (analysis, packaged model): every analysis on the packaged model of each kind it fits
    ("summary", "smollm2-135m"), ("patterns", "smollm2-135m"), ("sinks", "smollm2-135m"),
    ("importance", "smollm2-135m"), ("retrieval", "smollm2-135m"), ("eviction", "smollm2-135m"),
    ("patching", "smollm2-135m"),
    ("summary", "whisper-tiny.en"), ("sinks", "whisper-tiny.en"), ("saliency", "whisper-tiny.en"),
    ("importance", "whisper-tiny.en"),
    ("sinks", "synthetic-llava-smollm2"), ("vhd", "synthetic-llava-smollm2"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "costs-cpu.json")
    parser.add_argument("--only", default="", help="comma-separated analyses to measure (default: all)")
    args = parser.parse_args()
    only = {name for name in args.only.split(",") if name}
    rows, loaded, load_s = [], {}, {}
    for analysis, alias in RUNS:
        if only and analysis not in only:
            continue
        if alias not in loaded:
            started = time.perf_counter()
            loaded = {alias: headscope.load(alias)}  # one model in memory at a time
            load_s[alias] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        result = headscope.run(analysis, loaded[alias], progress=False)
        seconds = time.perf_counter() - started
        rows.append({"analysis": analysis, "model": alias, "seconds": round(seconds, 1), "status": result.status,
                     "load_average_after": os.getloadavg()[0]})
        print(f"{analysis} on {alias}: {seconds:.1f} s", flush=True)
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if only and args.out.exists():  # the other analyses keep their rows; the new ones say when they were measured
        for row in rows:
            row["measured"] = f"{now}, python benchmarks/costs.py --only {args.only}"
        earlier = json.loads(args.out.read_text())
        new = {(row["analysis"], row["model"]): row for row in rows}
        rows = [new.pop((row["analysis"], row["model"]), row) for row in earlier["rows"]] + list(new.values())
        write({**earlier, "rows": rows}, args.out)
        return
    write({"command": "python benchmarks/costs.py", "date": now,
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "threads": torch.get_num_threads()},
           "load_s": load_s, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
