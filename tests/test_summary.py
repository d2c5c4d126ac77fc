"""The ``summary`` analysis: first-token mass and entropy per head, checked against eager attention.

The ``slow`` tests run the command line end to end on the packaged SmolLM2 (the default model) and Whisper.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
import reference as ref
import torch
from cli_runner import run_cli

from headscope.models import zoo
from headscope.probes.text import DATA_DIR, prose
from headscope.results import Results
from headscope.runner import RunOptions, analyze


def eager_summary(folder: Path, context: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``first_token_mass`` and ``entropy``, each (layers, heads), from transformers' eager attention: of the
    float32 model and of its float64 twin, on the same tokens.

    Written without headscope: the model and tokenizer load through transformers, the shipped prose is cut
    to the model's context, and each statistic is a plain mean over queries, in float64.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.set_attn_implementation("eager")
    ids = AutoTokenizer.from_pretrained(folder)(prose(), return_tensors="pt")["input_ids"][:, :context]
    inputs = {"input_ids": ids}
    return _statistics(model, inputs), _statistics(ref.float64_twin(model), ref.float64_inputs(inputs))


def _statistics(model: torch.nn.Module, inputs: dict) -> dict[str, np.ndarray]:
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    mass, entropy = [], []
    for layer in attentions:  # (1, heads, T, T)
        probs = layer[0].double()
        mass.append(probs[:, 1:, 0].mean(dim=1).numpy())  # queries after the first token, on the first token
        entropy.append((-torch.special.xlogy(probs, probs).sum(-1)).mean(dim=1).numpy())
    return {"first_token_mass": np.stack(mass), "entropy": np.stack(entropy)}


def test_summary_maps_equal_eager_attention(tmp_path: Path, tiny_llama_dir: Path) -> None:
    results = analyze(RunOptions(model=str(tiny_llama_dir), analyses=["summary"], out=tmp_path, figures=()))
    summary = results["summary"]
    want, exact = eager_summary(tiny_llama_dir, context=64)
    mass, entropy = want["first_token_mass"], want["entropy"]

    assert summary.status == "ok"
    assert summary.summary["tokens"] == 64
    for metric in ("first_token_mass", "entropy"):
        ref.assert_matches_eager(summary.map(metric, "self").values, want[metric], exact[metric], err_msg=metric)
    # heads differ clearly, so a map with heads or layers swapped could not pass the comparison
    assert np.ptp(mass) > 0.05 and np.ptp(entropy) > 0.1


# --- end to end on the packaged models ---------------------------------------------------------------------


def needs(alias: str) -> pytest.MarkDecorator:
    """Skip unless the packaged model ``alias`` is installed (the ``models`` extra)."""
    return pytest.mark.skipif(not zoo.PACKAGED[alias].installed(), reason=f"run `{zoo.PACKAGED[alias].install}`")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> Path:
    """``headscope analyze --out OUT --figures html,png -q``: the default packaged model, SmolLM2-135M."""
    out = tmp_path_factory.mktemp("default-run")
    started = time.perf_counter()
    code = run_cli("analyze", "--out", str(out), "--figures", "html,png", "-q")
    print(f"\nheadscope analyze (default model, html+png): {time.perf_counter() - started:.1f} s")
    assert code == 0
    return out


@pytest.mark.slow
@needs("smollm2-135m")
def test_default_model_run_writes_results_and_figures(default_run: Path) -> None:
    results = Results.load(default_run / "results.json")

    assert list(results) == ["patterns", "sinks"]  # each forward pass once: summary runs by name
    assert results.provenance["model"]["type"] == "packaged"
    assert results.provenance["model"]["alias"] == "smollm2-135m"
    assert all(result.status == "ok" for result in results.values())
    figures = results.provenance["figures"]
    assert figures["formats"] == ["html", "png"] and figures["failed"] == [] and figures["written"] > 0
    for name, metric in (("sinks", "sink_mass"), ("patterns", "entropy")):
        values = results[name].map(metric, "self").values
        assert values.shape == (30, 9) and np.isfinite(values).all()
        png = default_run / "figures" / f"{name}-{metric}-self.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (default_run / "figures" / f"{name}-{metric}-self.html").is_file()


@pytest.mark.slow
@needs("smollm2-135m")
def test_smollm2_middle_layers_attend_to_the_first_token(default_run: Path) -> None:
    mass = Results.load(default_run / "results.json")["sinks"].map("sink_mass", "self").values
    middle = float(mass[10:26].mean())
    print(f"\nsmollm2-135m mean first-token mass, layers 10-25: {middle:.3f} (layers 0-1: {mass[:2].mean():.3f})")

    assert middle > 0.3


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


@pytest.mark.slow
@needs("whisper-tiny.en")
def test_whisper_run_captures_three_stacks_and_transcribes_the_clip(tmp_path: Path) -> None:
    started = time.perf_counter()
    code = run_cli("analyze", "whisper-tiny.en", "-a", "summary", "--out", str(tmp_path), "--figures", "none", "-q")
    print(f"\nheadscope analyze whisper-tiny.en: {time.perf_counter() - started:.1f} s")

    assert code == 0
    summary = Results.load(tmp_path / "results.json")["summary"]
    assert summary.status == "ok"
    assert {stack for _, stack in summary.maps} == {"encoder", "decoder", "cross"}
    assert all(head_map.values.shape == (4, 6) for head_map in summary.maps.values())
    print(f"transcript: {summary.summary['output']!r}")
    assert _words(summary.summary["output"]) == _words((DATA_DIR / "speech.txt").read_text(encoding="utf-8"))
