"""The capture benchmark suite runs end to end: ``benchmarks/capture.py --smoke`` on a tiny random Llama.

It checks the shape of what the suite writes (every requested cell present, with numeric time and memory
or a reason it was not measured, the statistics agreeing across methods, the marked table), never timings.
nnsight is included when ``benchmarks/setup_peers.sh`` has made its separate venv.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "capture.py"
PEERS_PYTHON = ROOT / "benchmarks" / ".peers-venv" / "bin" / "python"
LENGTHS = (32, 64)
START, END = "<!-- capture-benchmark:start -->", "<!-- capture-benchmark:end -->"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_smoke_suite_writes_every_cell(tmp_path):
    methods = ["sdpa", "eager", "headscope"] + (["nnsight"] if PEERS_PYTHON.exists() else [])
    out_json, docs = tmp_path / "capture.json", tmp_path / "performance.md"
    docs.write_text(f"# Performance\n\nbefore\n\n{START}\nold table\n{END}\n\nafter\n")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--methods", ",".join(methods), "--json", str(out_json),
         "--docs", str(docs)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads(out_json.read_text())
    assert report["run"]["lengths"] == list(LENGTHS)
    assert report["run"]["methods"] == methods
    for key in ("cpu", "cores", "ram_gib", "device", "versions"):
        assert key in report["machine"]
    assert report["machine"]["versions"]["torch"] and report["machine"]["versions"]["transformers"]

    cells = {(c["method"], c["tokens"]): c for c in report["cells"]}
    assert set(cells) == {(m, t) for m in methods for t in LENGTHS}
    for (method, tokens), cell in cells.items():
        if cell["status"] != "ok":
            assert isinstance(cell.get("note"), str) and cell["note"], (method, tokens, cell)
            continue
        assert cell["tokens"] == tokens
        for key in ("time_s", "peak_bytes", "increase_bytes"):
            assert _number(cell[key]) and cell[key] >= 0, (method, tokens, key, cell.get(key))
        assert cell["peak_bytes"] > 0
        assert len(cell["times_s"]) == cell["repeats"] == 1
        if method == "sdpa":
            assert "mass" not in cell
        else:  # the statistics: (layers, heads), agreeing with the reference method of the length
            assert len(cell["mass"]) == report["run"]["shape"]["layers"]
            assert len(cell["mass"][0]) == report["run"]["shape"]["heads"]
            assert cell["agrees"] is True, (method, tokens, cell.get("max_abs_diff"))
    assert all(cells[("sdpa", t)]["status"] == "ok" and cells[("headscope", t)]["status"] == "ok" for t in LENGTHS)

    text = docs.read_text()
    assert text.startswith("# Performance\n\nbefore\n") and text.rstrip().endswith("after")
    assert text.count(START) == 1 and text.count(END) == 1 and "old table" not in text
    table = text[text.index(START):text.index(END)]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| tokens")]
    assert len(rows) == len(methods) * len(LENGTHS)
    for row in rows:
        assert len(row.strip("|").split("|")) == 9, row
    assert "| tokens | method | time (s) |" in table and "Machine:" in table
    assert "| tokens | method |" in done.stdout  # the table is printed too


def test_whole_suite_smoke_run_writes_targets_growth_retrieval_and_importance(tmp_path):
    """``benchmarks/suite.py --smoke``: the three benchmarks on tiny random models, one summary block with every
    target (measured or marked not measured), growth exponents, the retrieval rows and the importance line."""
    docs = tmp_path / "performance.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "suite.py"), "--smoke", "--methods", "sdpa,eager,headscope",
         "--out", str(tmp_path), "--docs", str(docs)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads((tmp_path / "suite-cpu.json").read_text())
    targets = {row["target"]: row for row in report["targets"]}
    assert len(targets) == 8 and all(row["met"] in (True, False, None) for row in targets.values())
    assert targets["retrieval scoring within 1.3x of greedy generation"]["met"] is not None
    assert any(name.startswith("batched ablation >= 2.5x") for name in targets)
    for method in ("sdpa", "eager", "headscope"):  # two smoke lengths: a time exponent each
        assert _number(report["growth"][method]["time_s"])
    rows = report["retrieval"]["rows"]
    assert len(rows) == 2 and all(row["same_argmax_as_retrieval_head"] == 1.0 for row in rows)
    assert all(row["same_tokens"] for row in rows)
    importance = report["importance"]
    assert importance["heads"] == 8 and importance["max_abs_difference"] < 1e-5
    assert all(_number(importance[key]) and importance[key] > 0 for key in (
        "ablation_loop_s", "ablation_batched_s", "gradient_s", "forward_backward_s"))

    text = docs.read_text()
    block = text[text.index("<!-- suite:cpu:start -->"):text.index("<!-- suite:cpu:end -->")]
    assert "| target | measured | met |" in block and "Machine:" in block and "Retrieval_Head loop" in block
    assert "<!-- capture-benchmark:start -->" in text  # the capture table, written by the same run
