#!/usr/bin/env python
"""Benchmark: per-head attention statistics of one sequence, headscope against the alternatives.

For every (method, length) cell a fresh Python process loads the model, runs one short warm-up forward
(16 tokens, not timed), then times ``--repeats`` forwards of exactly T tokens of the shipped prose and
measures the process's peak memory during each. The statistic is what headscope's analyses start from:
the mean attention mass on the first token and the mean attention entropy, per (layer, head).

Methods:
    sdpa       the plain forward pass of the model as loaded (SDPA attention): the floor, no statistics.
    eager      ``attn_implementation="eager"`` with ``output_attentions=True``; statistics reduced from the
               returned (layers x heads x T x T) maps.
    nnsight    nnsight 0.8 tracing the eager model; each layer's attention probabilities (the second output
               of its ``self_attn``) are reduced inside the trace, so full maps are not all kept.
               Runs in ``benchmarks/.peers-venv`` (``benchmarks/setup_peers.sh``), never in the project's venv.
    transformerlens
               TransformerLens 4.3's ``TransformerBridge.boot_transformers`` on the model's folder (the raw weights,
               eager attention forced), each layer's ``hook_pattern`` reduced inside its hook under
               ``run_with_hooks``. Runs in ``benchmarks/.tl-venv`` (its own: TransformerLens pins what nnsight and
               inseq conflict with).
    headscope  ``Scope(model).capture(KeyMass(), Entropy())`` around one forward: the kernel path (the fused
               attention kernel and its row log-sum-exp; entropy takes one more kernel call, or, from
               ``headscope.capture.flex.FUSED_FROM`` tokens on CPU, comes from the model's own attention call).
    headscope-chunked
               the same statistics on the chunked path (``path="chunked"``): query chunks of eager-exact
               probabilities.
    headscope-sinks
               the sinks analysis's statistics on the kernel path: mass on the first token and the sink score
               (``KeyMass(positions=(0,))``, ``SinkMass(positions=(0,), exclude_own=False)``); no entropy.

Memory: on CPU the peak resident set of the worker process during the forward (``ru_maxrss``, whose
high-water mark is reset through ``/proc/self/clear_refs`` just before each timed forward, so neither
loading nor an earlier repeat counts) and its increase over the resident set just before the forward; on
CUDA ``torch.cuda.max_memory_allocated`` and its increase over ``memory_allocated`` before the forward.
Cells that would plainly not fit are skipped from an up-front estimate; a worker killed (out of memory)
or past ``--timeout`` is reported as such. The statistics of eager, nnsight and headscope are compared
cell by cell (max abs difference against eager where it ran, else nnsight); a difference over 1e-4
fails the run.

    python benchmarks/capture.py                                   # the full suite (long: see docs)
    python benchmarks/capture.py --lengths 512,2048 --methods sdpa,headscope --repeats 3
    python benchmarks/capture.py --smoke                           # tiny random Llama, seconds
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import functools
import gc
import json
import math
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
PEERS_PYTHON = BENCH / ".peers-venv" / "bin" / "python"
TL_PYTHON = BENCH / ".tl-venv" / "bin" / "python"
DOCS = ROOT / "docs" / "performance.md"
RESULTS = BENCH / "results"

METHODS = ("sdpa", "eager", "nnsight", "transformerlens", "headscope", "headscope-chunked", "headscope-sinks")
STAT_METHODS = ("eager", "nnsight", "transformerlens", "headscope", "headscope-chunked", "headscope-sinks")
DEFAULT_LENGTHS = (512, 2048, 4096, 8192, 16384)
SMOKE_LENGTHS = (32, 64)
SMOKE_MODEL = "tiny-llama"
WARMUP_TOKENS = 16
TOLERANCE = 1e-4
FIT_FRACTION = 0.9  # a cell runs when its estimate is within this fraction of the memory available
MARK_START = "<!-- capture-benchmark:start -->"
MARK_END = "<!-- capture-benchmark:end -->"
GIB = 2**30

# The smoke model: a tiny Llama with redrawn (large) weights so attention differs from head to head.
TINY_CONFIG = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
TINY_WEIGHT_STD = 0.25


# --------------------------------------------------------------------------------------------------
# The worker: one (method, length) cell in a fresh process.
# --------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset this process's resident high-water mark (ru_maxrss, VmHWM) to its current RSS (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _load(spec: dict[str, Any]):
    """(model, input ids (1, T) on the device, warm-up ids (1, 16)) for the spec's model and length."""
    import torch

    device = spec["device"]
    if spec["model"] == SMOKE_MODEL:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**TINY_CONFIG))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _, parameter in sorted(model.named_parameters()):
                if parameter.ndim >= 2:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * TINY_WEIGHT_STD)
        model = model.float().eval().to(device)
        text_ids = _prose_bytes(spec["tokens"], TINY_CONFIG["vocab_size"])
    else:
        import headscope

        model, tokenizer, _ = headscope.load(spec["model"], device=device)
        text_ids = _prose_tokens(tokenizer, spec["tokens"])
    ids = torch.tensor([text_ids], device=device)
    return model, ids, ids[:, :WARMUP_TOKENS]


def _prose_text() -> str:
    from headscope.probes.text import prose

    return prose()


def _prose_tokens(tokenizer, tokens: int) -> list[int]:
    """Exactly ``tokens`` token ids of the shipped prose, repeated as often as needed."""
    text = _prose_text()
    once = len(tokenizer(text, verbose=False)["input_ids"])
    copies = math.ceil(tokens / max(once, 1)) + 1
    ids = tokenizer("\n\n".join([text] * copies), verbose=False)["input_ids"]
    if len(ids) < tokens:
        raise RuntimeError(f"could not make {tokens} tokens of prose (got {len(ids)})")
    return list(ids[:tokens])


def _prose_bytes(tokens: int, vocab: int) -> list[int]:
    """The smoke model has no tokenizer: the prose's UTF-8 bytes (mod the vocabulary), repeated."""
    data = _prose_text().encode("utf-8")
    return [data[i % len(data)] % vocab for i in range(tokens)]


def _reduce_maps(maps) -> tuple[Any, Any]:
    """First-token mass and entropy per (layer, head) from full maps, each (1, H, T, T)."""
    import torch

    masses, entropies = [], []
    for probs in maps:
        _reduce_pattern(probs, masses, entropies)
    return torch.stack(masses), torch.stack(entropies)


def _reduce_pattern(probs, masses: list, entropies: list) -> None:
    """Append one layer's first-token mass and entropy per head, from its (1, H, T, T) probabilities."""
    import torch

    probs = probs[0].float()
    masses.append(probs[:, 1:, 0].double().mean(-1))
    entropies.append(-torch.special.xlogy(probs, probs).sum(-1).double().mean(-1))


def _bridge(model, spec: dict[str, Any]):
    """TransformerLens's bridge over the same weights, booted from a folder (no hub)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    from headscope.models import zoo

    if spec["model"] == SMOKE_MODEL:  # the tiny model gets a folder of its own and SmolLM2's tokenizer
        folder = tempfile.mkdtemp(prefix="headscope-bench-tiny-")
        model.save_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(zoo.materialise("smollm2-135m"))
    else:
        folder = zoo.materialise(spec["model"]) if spec["model"] in zoo.PACKAGED else spec["model"]
        tokenizer = None
    return TransformerBridge.boot_transformers(str(folder), device=spec["device"], tokenizer=tokenizer)


def _runner(method: str, model, spec: dict[str, Any]):
    """A callable ``run(ids) -> (mass, entropy) | None`` for the method; the model is prepared here."""
    import torch

    if method == "sdpa":
        def run(ids):
            model(input_ids=ids)
            return None

        return run
    if method == "eager":
        model.set_attn_implementation("eager")

        def run(ids):
            outputs = model(input_ids=ids, output_attentions=True)
            return _reduce_maps(outputs.attentions)

        return run
    if method == "nnsight":
        import nnsight

        model.set_attn_implementation("eager")
        traced = nnsight.NNsight(model)
        layers = list(traced.model.layers)

        def run(ids):
            with traced.trace(input_ids=ids):
                masses = nnsight.save([])
                entropies = nnsight.save([])
                for layer in layers:  # (1, H, T, T): this layer's probabilities only
                    _reduce_pattern(layer.self_attn.output[1], masses, entropies)
            return torch.stack(masses), torch.stack(entropies)

        return run
    if method in ("headscope", "headscope-chunked"):
        from headscope.capture.engine import Scope
        from headscope.capture.reducers import Entropy, KeyMass

        scope = Scope(model)
        path = "chunked" if method == "headscope-chunked" else "auto"

        def run(ids):
            mass, entropy = KeyMass(positions=(0,)), Entropy()
            with scope.capture(mass, entropy, path=path):
                model(input_ids=ids)
            return torch.from_numpy(mass.result()["self"]), torch.from_numpy(entropy.result()["self"])

        run.scope = scope
        return run
    if method == "headscope-sinks":
        from headscope.analyses.sink_reducers import SinkMass
        from headscope.capture.engine import Scope
        from headscope.capture.reducers import KeyMass

        scope = Scope(model)

        def run(ids):
            mass, score = KeyMass(positions=(0,)), SinkMass(positions=(0,), exclude_own=False)
            with scope.capture(mass, score):
                model(input_ids=ids)
            return torch.from_numpy(mass.result()["self"]), None

        run.scope = scope
        return run
    if method == "transformerlens":
        bridge = _bridge(model, spec)

        def run(ids):
            masses, entropies = [], []
            bridge.run_with_hooks(ids, fwd_hooks=[(lambda name: name.endswith("attn.hook_pattern"),
                                                   lambda probs, hook: _reduce_pattern(probs, masses, entropies))])
            return torch.stack(masses), torch.stack(entropies)

        return run
    raise ValueError(f"unknown method {method!r}")


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one cell and return its measurements (called in a fresh process)."""
    import torch
    import transformers

    torch.set_num_threads(spec["threads"])
    device = spec["device"]
    cuda = device.startswith("cuda")
    model, ids, warmup_ids = _load(spec)
    run = _runner(spec["method"], model, spec)
    if spec["method"] == "transformerlens":  # the bridge loaded its own copy of the weights
        del model
        gc.collect()

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    with torch.no_grad():
        run(warmup_ids)
        sync()
        times, peaks, increases, befores = [], [], [], []
        stats = None
        peak_reset = True
        for _ in range(spec["repeats"]):
            stats = None
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            else:
                peak_reset = _reset_peak() and peak_reset
                before = _rss_bytes()
            start = time.perf_counter()
            stats = run(ids)
            sync()
            times.append(time.perf_counter() - start)
            peak = torch.cuda.max_memory_allocated(device) if cuda else _maxrss_bytes()
            peaks.append(peak)
            befores.append(before)
            increases.append(max(0, peak - before))  # RSS counters are batched: never below 0
    result: dict[str, Any] = {
        "times_s": times,
        "time_s": min(times),  # the least disturbed of the repeats
        "peak_bytes": max(peaks),
        # The first timed forward's: after it, memory the allocator keeps for reuse counts as "before".
        "increase_bytes": increases[0],
        "increases_bytes": increases,
        "before_bytes": statistics.median(befores),
        "peaks_bytes": peaks,
        "memory": "cuda max_memory_allocated" if cuda else "ru_maxrss",
        "peak_reset": peak_reset if not cuda else True,
        "process_maxrss_bytes": _maxrss_bytes(),
        "tokens": int(ids.shape[1]),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "threads": torch.get_num_threads(),
    }
    if spec["method"] == "nnsight":
        import nnsight

        result["versions"]["nnsight"] = nnsight.__version__
    if spec["method"] == "transformerlens":
        result["versions"]["transformer_lens"] = metadata.version("transformer-lens")
    if stats is not None:
        mass, entropy = stats
        result["mass"] = mass.double().cpu().tolist()
        if entropy is not None:
            result["entropy"] = entropy.double().cpu().tolist()
    if getattr(run, "scope", None) is not None:  # which attention path each call took (calls per path)
        result["paths"] = dict(run.scope.paths)
    return result


# --------------------------------------------------------------------------------------------------
# The driver: cells, estimates, subprocesses, comparison, table.
# --------------------------------------------------------------------------------------------------


def _meminfo() -> dict[str, int]:
    info = {}
    with contextlib.suppress(OSError), open("/proc/meminfo") as handle:
        for line in handle:
            name, _, rest = line.partition(":")
            info[name] = int(rest.split()[0]) * 1024
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _available_bytes(device: str) -> int:
    if device.startswith("cuda"):  # asked in a child process, so that this one holds no CUDA context
        code = f"import torch; print(torch.cuda.mem_get_info(torch.device({device!r}))[0])"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
        return int(done.stdout.strip()) if done.returncode == 0 and done.stdout.strip().isdigit() else 0
    info = _meminfo()
    return info.get("MemAvailable", info.get("MemFree", 0))


def _model_shape(model: str) -> dict[str, Any]:
    """Layers, heads, vocabulary, hidden and MLP sizes and weight bytes, read without loading the model."""
    if model == SMOKE_MODEL:
        config = dict(TINY_CONFIG)
        weights = None
    else:
        from headscope.models import zoo

        # A packaged model is converted once into the cache here, before any worker runs.
        folder = zoo.materialise(model) if model in zoo.PACKAGED else Path(model).expanduser()
        if (Path(folder) / "config.json").is_file():
            config = json.loads((Path(folder) / "config.json").read_text())
            config = config.get("text_config", config)
            weights = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) or None
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model).get_text_config(decoder=True).to_dict()
            weights = None
    shape = {
        "layers": config["num_hidden_layers"],
        "heads": config["num_attention_heads"],
        "vocab": config["vocab_size"],
        "hidden": config["hidden_size"],
        "intermediate": config.get("intermediate_size", 4 * config["hidden_size"]),
        "max_tokens": config.get("max_position_embeddings"),
    }
    if weights is None:
        layer = 4 * shape["hidden"] ** 2 + 3 * shape["hidden"] * shape["intermediate"]
        weights = 4 * (shape["layers"] * layer + 2 * shape["vocab"] * shape["hidden"])
    shape["weight_bytes"] = weights
    return shape


def estimate_bytes(method: str, tokens: int, shape: dict[str, Any], cuda: bool) -> int:
    """A rough upper estimate of the worker's peak memory for one forward of ``tokens`` (fp32, batch 1)."""
    t = tokens
    one_map = shape["heads"] * t * t * 4  # one layer's (heads, T, T) fp32 probabilities
    base = (
        shape["weight_bytes"]
        + t * shape["vocab"] * 4  # logits for every position
        + t * (8 * shape["hidden"] + 3 * shape["intermediate"]) * 4  # activations of one layer
        + (0 if cuda else int(0.6 * GIB))  # interpreter, torch, transformers
    )
    if method == "sdpa":
        return base + t * t
    if method == "eager":  # every layer's map kept, plus scores / softmax copies and the float mask
        return base + shape["layers"] * one_map + 3 * one_map + t * t * 4
    if method == "nnsight":  # one layer's map at a time, plus scores, softmax and the reduction's copy
        return base + 4 * one_map + t * t * 4
    if method == "transformerlens":  # as nnsight, plus the hooked scores and pattern the bridge keeps alive
        return base + 6 * one_map + t * t * 4
    if method == "headscope-chunked":  # query chunks within the engine's budget (256 MiB by default)
        return base + int(0.5 * GIB) + t * t
    if method in ("headscope", "headscope-sinks"):  # the kernel, O(T d) terms, and the float32 keys' copy
        return base + int(0.1 * GIB) + t * t
    raise ValueError(method)


def _python_for(method: str) -> Path | None:
    if method == "nnsight":
        return PEERS_PYTHON if PEERS_PYTHON.exists() else None
    if method == "transformerlens":
        return TL_PYTHON if TL_PYTHON.exists() else None
    return Path(sys.executable)


@functools.cache
def _has_cuda(python: Path) -> bool:
    code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([str(python), "-c", code], capture_output=True, check=False).returncode == 0


def _tail(text: str, lines: int = 6) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return " / ".join(line.strip() for line in kept)[-600:]


def run_cell(spec: dict[str, Any], python: Path, timeout: float) -> dict[str, Any]:
    """Run one cell in a fresh process; its measurements, or why there are none."""
    env = dict(os.environ)
    threads = str(spec["threads"])
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with tempfile.TemporaryDirectory(prefix="headscope-bench-") as folder:
        out = Path(folder) / "result.json"
        command = [str(python), str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--worker-out", str(out)]
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                   cwd=str(ROOT), start_new_session=True)
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return {"status": "timeout", "note": f"timed out after {timeout:.0f} s"}
        wall = time.perf_counter() - started
        if process.returncode == 0 and out.is_file():
            result = json.loads(out.read_text())
            result.update(status="ok", process_wall_s=wall)
            return result
    code = process.returncode
    if code in (-signal.SIGKILL, 128 + signal.SIGKILL, 137):
        note = "killed by SIGKILL (out of memory?)"
    elif code < 0:
        note = f"killed by signal {signal.Signals(-code).name}"
    elif any(sign in stderr for sign in ("out of memory", "can't allocate memory", "MemoryError")):
        note = f"out of memory: {_tail(stderr, 1)}"
    else:
        note = f"failed (exit {code}): {_tail(stderr)}"
    status = "oom" if "out of memory" in note else "failed"
    return {"status": status, "note": note}


def compare(cells: list[dict[str, Any]]) -> list[str]:
    """Each statistic method's max abs difference from the reference of its length (eager, else nnsight).

    Sets ``reference``, ``max_abs_diff`` and ``agrees`` on the cells that computed statistics; returns one
    printable line per compared cell.
    """
    import numpy as np

    lines = []
    for tokens in sorted({c["tokens"] for c in cells}):
        ran = {c["method"]: c for c in cells if c["tokens"] == tokens and c.get("mass") is not None}
        reference = next((m for m in STAT_METHODS if m in ran), None)
        others = [m for m in ran if m != reference]
        for method in others:
            cell, ref = ran[method], ran[reference]
            diffs = {k: float(np.max(np.abs(np.asarray(cell[k]) - np.asarray(ref[k]))))
                     for k in ("mass", "entropy") if k in cell and k in ref}
            cell.update(reference=reference, max_abs_diff=diffs, agrees=max(diffs.values()) <= TOLERANCE)
            verdict = "ok" if cell["agrees"] else f"MISMATCH (> {TOLERANCE:g})"
            measured = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
            lines.append(f"  {method:>9} @ {tokens:>5} tokens vs {reference}: max abs diff {measured}: {verdict}")
        if reference is not None:
            ran[reference].update(reference=reference, max_abs_diff=None,
                                  agrees=all(ran[m]["agrees"] for m in others) if others else None)
    return lines


def _gb(value: float | None) -> str:
    return "–" if value is None else f"{value / GIB:.2f}"


def _ratio(value: float | None, floor: float | None) -> str:
    if value is None or not floor:
        return "–"
    return f"{value / floor:.2f}x"


def machine_info(device: str, cells: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [c for c in cells if c.get("status") == "ok"]
    versions = dict(ok[0]["versions"]) if ok else {
        "torch": _version("torch"), "transformers": _version("transformers")}
    for method, package in (("nnsight", "nnsight"), ("transformerlens", "transformer_lens")):
        version = next((c["versions"].get(package) for c in ok if c["method"] == method), None)
        if version:
            versions[package] = version
    versions["headscope"] = _version("headscope")
    info = _meminfo()
    return {
        "cpu": _cpu_model(),
        "cores": _cores(),
        "ram_gib": round(info.get("MemTotal", 0) / GIB, 1),
        "device": device,
        "device_name": ok[0]["device_name"] if ok else device,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def render(report: dict[str, Any]) -> str:
    """The markdown block: machine, run parameters, the table, and the agreement check."""
    machine, run = report["machine"], report["run"]
    lines = [
        f"Measured {run['date']} with `{run['command']}`.",
        "",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB RAM; "
        f"device `{machine['device']}` ({machine['device_name']}); {run['threads']} torch threads; "
        f"load average {run['load_average']} at the start.",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v) + ".",
        f"- Model `{run['model']}` ({run['shape']['layers']} layers x {run['shape']['heads']} heads), float32, "
        f"batch 1; the fastest of {run['repeats_note']}; warm-up forward of {WARMUP_TOKENS} tokens excluded.",
        f"- Memory: {'peak `torch.cuda.max_memory_allocated`' if run['cuda'] else 'peak RSS of the process'} "
        "during the forward (\"peak\") and its increase over the value just before it (\"added\").",
        "",
        "| tokens | method | time (s) | time vs sdpa | peak (GB) | peak vs sdpa | added (GB) | "
        "max abs diff | note |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    cells = report["cells"]
    for tokens in run["lengths"]:
        floor = next((c for c in cells if c["tokens"] == tokens and c["method"] == "sdpa" and c["status"] == "ok"),
                     None)
        for method in run["methods"]:
            cell = next((c for c in cells if c["tokens"] == tokens and c["method"] == method),
                        {"status": "not run", "note": "not run"})  # a merged run may lack a cell
            if cell["status"] != "ok":
                note = cell["note"].replace("|", "\\|").replace("\n", " ")
                lines.append(f"| {tokens} | {method} | – | – | – | – | – | – | {note} |")
                continue
            diff = cell.get("max_abs_diff")
            if diff is not None:
                diff_text = f"{max(diff.values()):.1e} vs {cell['reference']}"
            else:
                diff_text = "reference" if cell.get("agrees") is not None else "–"
            notes = []
            if cell.get("agrees") is False:
                notes.append(f"**MISMATCH** (> {TOLERANCE:g})")
            if not cell.get("peak_reset", True):
                notes.append("peak includes loading")
            lines.append(
                f"| {tokens} | {method} | {cell['time_s']:.3f} | "
                f"{_ratio(cell['time_s'], floor and floor['time_s'])} | {_gb(cell['peak_bytes'])} | "
                f"{_ratio(cell['peak_bytes'], floor and floor['peak_bytes'])} | {_gb(cell['increase_bytes'])} | "
                f"{diff_text} | {'; '.join(notes)} |"
            )
    lines += ["", *growth_lines(cells, run["methods"], run["lengths"])]
    return "\n".join(lines) + "\n"


def growth(cells: list[dict[str, Any]], method: str, key: str = "time_s", lengths: list[int] | None = None,
           ) -> float | None:
    """The exponent k of ``key`` ~ tokens^k: the least-squares slope of log ``key`` on log tokens over the cells of
    ``method`` that ran (of ``lengths`` only, when given); None with fewer than two."""
    points = [(math.log(c["tokens"]), math.log(c[key])) for c in cells
              if c["method"] == method and c.get("status") == "ok" and c.get(key)
              and (lengths is None or c["tokens"] in lengths)]
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else None


def growth_lines(cells: list[dict[str, Any]], methods: list[str], lengths: list[int]) -> list[str]:
    """One line of growth exponents, over all lengths and over the longest three."""
    longest = sorted(lengths)[-3:]
    parts = []
    for method in methods:
        overall, tail = growth(cells, method, lengths=lengths), growth(cells, method, lengths=longest)
        if overall is not None:
            parts.append(f"{method} {overall:.2f}" + (f" ({tail:.2f} over {', '.join(map(str, longest))})"
                                                      if tail is not None and len(lengths) > 3 else ""))
    return [f"Growth exponent k of time ~ T^k (least squares over the lengths): {'; '.join(parts)}."] if parts else []


def write_docs(path: Path, block: str, start: str = MARK_START, end: str = MARK_END) -> None:
    """Put ``block`` between the markers ``start`` and ``end`` of ``path``, replacing what a previous run put there
    (appended with its markers where they are missing)."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Performance\n"
    fenced = f"{start}\n{block}{end}"
    if start in text and end in text:
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        text = head + fenced + tail
    else:
        text = text.rstrip("\n") + "\n\n" + fenced + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _csv(value: str, kind=str) -> list:
    return [kind(part.strip()) for part in value.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=lambda v: _csv(v, int), help="token counts (default 512,2048,4096,8192)")
    parser.add_argument("--methods", type=_csv, help=f"methods to run (default all: {','.join(METHODS)})")
    parser.add_argument("--repeats", type=int, help="timed forwards per cell (default 3; the fastest counts)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--model", default="smollm2-135m", help="packaged alias or model folder")
    parser.add_argument("--threads", type=int, default=_cores(), help="torch threads (default: the cores)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per cell before it is killed")
    parser.add_argument("--smoke", action="store_true",
                        help=f"tiny random Llama, lengths {SMOKE_LENGTHS}, 1 repeat, methods installed")
    parser.add_argument("--json", type=Path, help="where to write the raw numbers "
                        "(default benchmarks/results/capture-<device>.json; a temp file with --smoke)")
    parser.add_argument("--docs", type=Path, help="markdown file whose marked block gets the table "
                        "(default docs/performance.md; a temp file with --smoke unless --write-docs)")
    parser.add_argument("--write-docs", action="store_true", help="with --smoke, still write docs/performance.md")
    parser.add_argument("--jobs", type=int, help="cells run at once (default 1; with --smoke, the cores): more than "
                        "one disturbs the timings, so only for checking that the suite works")
    parser.add_argument("--merge", action="store_true", help="keep the other cells of the JSON an earlier run "
                        "wrote (its methods and lengths), replacing only this run's, and render them all")
    parser.add_argument("--dry-run", action="store_true", help="print the cells, estimates and skips; run nothing")
    parser.add_argument("--no-estimate", action="store_true", help="run every cell, even one estimated not to fit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.model = SMOKE_MODEL if args.model == "smollm2-135m" else args.model
        args.lengths = args.lengths or list(SMOKE_LENGTHS)
        args.repeats = args.repeats or 1
        args.jobs = args.jobs or _cores()
        args.threads = max(1, args.threads // args.jobs)
    args.jobs = args.jobs or 1
    args.lengths = args.lengths or list(DEFAULT_LENGTHS)
    args.methods = args.methods or [m for m in METHODS if not args.smoke or _python_for(m) is not None]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s) {sorted(unknown)}: choose from {','.join(METHODS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = worker(json.loads(args.worker))
        args.worker_out.write_text(json.dumps(result))
        return 0

    cuda = args.device.startswith("cuda")
    device_tag = args.device.replace(":", "")
    if args.smoke:
        scratch = Path(tempfile.mkdtemp(prefix="headscope-bench-smoke-"))
        json_path = args.json or scratch / f"capture-{device_tag}.json"
        docs_path = args.docs or (DOCS if args.write_docs else scratch / "performance.md")
    else:
        json_path = args.json or RESULTS / f"capture-{device_tag}.json"
        docs_path = args.docs or DOCS

    shape = _model_shape(args.model)
    if shape["max_tokens"] and max(args.lengths) > shape["max_tokens"]:
        print(f"note: {args.model} was trained for {shape['max_tokens']} positions", file=sys.stderr)
    load_average = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"capture benchmark: {args.model} on {args.device}, lengths {args.lengths}, methods {args.methods}, "
          f"{args.threads} threads (load average {load_average})", flush=True)

    cells: list[dict[str, Any]] = []
    jobs = max(1, args.jobs)
    for tokens in args.lengths:
        repeats = args.repeats or 3
        pending = []
        for method in args.methods:
            cell: dict[str, Any] = {"method": method, "tokens": tokens, "repeats": repeats}
            estimate = estimate_bytes(method, tokens, shape, cuda)
            available = _available_bytes(args.device) // jobs  # concurrent cells share the memory
            cell.update(estimate_bytes=estimate, available_bytes=available)
            python = _python_for(method)
            if python is None:
                cell.update(status="skipped",
                            note=f"skipped: {method} not installed (run benchmarks/setup_peers.sh)")
            elif cuda and not _has_cuda(python):
                cell.update(status="skipped", note=f"skipped: the torch of {python} has no CUDA")
            elif estimate > FIT_FRACTION * available and not args.no_estimate:
                cell.update(status="skipped",
                            note=f"skipped: needs ~{estimate / GIB:.0f} GB ({available / GIB:.0f} GB available)")
            elif args.dry_run:
                cell.update(status="planned", note=f"would run: needs ~{estimate / GIB:.1f} GB")
            else:
                spec = {"method": method, "tokens": tokens, "repeats": repeats, "device": args.device,
                        "model": args.model, "threads": args.threads}
                pending.append((cell, spec, python))
            cells.append(cell)
        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(run_cell, spec, python, args.timeout): cell for cell, spec, python in pending}
            for future in concurrent.futures.as_completed(futures):
                futures[future].update(future.result())
        for cell in cells[-len(args.methods):]:
            _print_cell(cell)
        for line in compare([c for c in cells if c["tokens"] == tokens]):
            print(line, flush=True)

    if args.dry_run:
        return 0
    command = "python benchmarks/capture.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.merge and json_path.is_file():  # keep the earlier run's other cells; this run's replace its own
        earlier = json.loads(json_path.read_text())
        ran = {(c["method"], c["tokens"]) for c in cells}
        cells = [c for c in earlier["cells"] if (c["method"], c["tokens"]) not in ran] + cells
        args.methods = [m for m in METHODS if m in set(args.methods) | set(earlier["run"]["methods"])]
        args.lengths = sorted(set(args.lengths) | set(earlier["run"]["lengths"]))
        command = f"{earlier['run']['command']}` and `{command}"
    compare(cells)
    report = {
        "machine": machine_info(args.device, cells),
        "run": {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command,
            "model": args.model, "shape": shape, "lengths": args.lengths, "methods": args.methods,
            "threads": args.threads, "device": args.device, "cuda": cuda, "load_average": load_average,
            "repeats_note": f"{args.repeats} run(s)" if args.repeats else "3 runs",
            "tolerance": TOLERANCE, "warmup_tokens": WARMUP_TOKENS,
        },
        "cells": cells,
    }
    block = render(report)
    print()
    print(block)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    write_docs(docs_path, block)
    print(f"raw numbers: {json_path}\ntable: {docs_path}")
    mismatched = [f"{c['method']}@{c['tokens']}" for c in cells if c.get("agrees") is False]
    if mismatched:
        print(f"ERROR: statistics disagree beyond {TOLERANCE:g}: {', '.join(mismatched)}", file=sys.stderr)
        return 1
    return 0


def _print_cell(cell: dict[str, Any]) -> None:
    head = f"  {cell['method']:>9} @ {cell['tokens']:>5} tokens: "
    if cell["status"] != "ok":
        print(head + cell["note"], flush=True)
        return
    print(head + f"{cell['time_s']:.3f} s, peak {_gb(cell['peak_bytes'])} GB "
          f"(+{_gb(cell['increase_bytes'])} GB)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
