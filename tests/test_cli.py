"""The ``headscope`` command line: one-line errors with exit code 2, results and figures on success.

Most cases run in-process through :func:`headscope.cli.main` with ``sys.argv`` patched; one runs the
installed console script in a subprocess to prove the same holds for a real process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from headscope import registry
from headscope.cli import main
from headscope.models import zoo
from headscope.probes.text import prose
from headscope.results import AnalysisResult, Results


@dataclass
class Run:
    code: int
    out: str
    err: str

    def error_line(self) -> str:
        """The one line a refused command prints; fails unless the refusal has the expected shape."""
        lines = self.err.splitlines()
        assert self.code == 2, (self.code, self.err)
        assert len(lines) == 1 and lines[0].startswith("headscope: error: ") and lines[0].strip() != (
            "headscope: error:"), self.err
        assert "Traceback" not in self.err + self.out
        return lines[0]


def headscope(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> Run:
    """Run ``headscope *args`` in-process; its exit code and what it printed."""
    monkeypatch.setattr(sys, "argv", ["headscope", *args])
    capsys.readouterr()
    code = 0
    try:
        main()
    except SystemExit as done:
        code = 0 if done.code is None else done.code
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err)


def files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture
def throwaway_analyses() -> Iterator[Callable[..., None]]:
    """Register analyses for one test; they are removed from the registry afterwards."""
    registry.list_analyses()  # the built-in ones first
    added: list[str] = []

    def add(name: str, kinds: tuple[str, ...], run, figures=None) -> None:
        registry.register(name, kinds=kinds, description="a test's throwaway analysis", figures=figures)(run)
        added.append(name)

    yield add
    for name in added:
        registry._REGISTRY.pop(name, None)


# --- bad input: exit 2, one line, nothing written -------------------------------------------------------------


def _mamba_dir(tmp: Path, llama: Path) -> Path:
    """A known architecture with no attention at all (Mamba), saved with a tokenizer."""
    from transformers import MambaConfig, MambaForCausalLM

    folder = tmp / "mamba"
    config = MambaConfig(vocab_size=384, hidden_size=16, state_size=4, num_hidden_layers=2)
    MambaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama / name, folder / name)
    return folder


def _folder(tmp: Path, files: dict[str, str]) -> Path:
    folder = tmp / "model"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def _pickle_only(tmp: Path, llama: Path) -> Path:
    from safetensors.torch import load_file

    folder = tmp / "pickled"
    shutil.copytree(llama, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(llama / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


def _no_tokenizer(tmp: Path, llama: Path) -> Path:
    folder = tmp / "no-tokenizer"
    shutil.copytree(llama, folder, ignore=shutil.ignore_patterns("tokenizer*"))
    return folder


def _file(tmp: Path, name: str, text: str) -> str:
    (tmp / name).write_text(text)
    return str(tmp / name)


LONG_TEXT = "the harbour town woke slowly " * 40  # far more than the tiny llama's 64 tokens

# (id, args given (tmp, tiny llama folder) -> CLI args without --out, a fragment the error line must hold)
BAD_INPUTS: list[tuple[str, Callable[[Path, Path], list[str]], str]] = [
    ("unknown-alias", lambda t, m: ["smollm9"], "unknown model 'smollm9': not a packaged alias"),
    ("missing-path", lambda t, m: [str(t / "nowhere")], "no such model folder"),
    ("hub-id-offline", lambda t, m: ["nobody/nothing-here"], "cannot load 'nobody/nothing-here'"),
    ("not-a-model-folder", lambda t, m: [str(_folder(t, {"README.md": "hi"}))], "it has no config.json"),
    ("unreadable-config", lambda t, m: [str(_folder(t, {"config.json": "{oops"}))], "cannot read the config.json"),
    ("unknown-model-type", lambda t, m: [str(_folder(t, {"config.json": '{"model_type": "frobnicator"}'}))],
     "is not a transformers model: The checkpoint you are trying to load has model type `frobnicator`"),
    ("no-attention-modules", lambda t, m: [str(_mamba_dir(t, m))], "found no attention modules in MambaForCausalLM"),
    ("no-tokenizer", lambda t, m: [str(_no_tokenizer(t, m))], "cannot load a tokenizer from"),
    ("pickle-only", lambda t, m: [str(_pickle_only(t, m))], "only pickle weights"),
    ("corrupt-gguf", lambda t, m: [_file(t, "broken.gguf", "GGUF not really")], "cannot load GGUF file"),
    ("empty-text", lambda t, m: [str(m), "--text", "  "], "the input text is empty"),
    ("empty-input-file", lambda t, m: [str(m), "--input", _file(t, "empty.txt", "\n")], "the input text is empty"),
    ("missing-input-file", lambda t, m: [str(m), "--input", str(t / "absent.txt")], "no such input file"),
    ("text-longer-than-context", lambda t, m: [str(m), "--text", LONG_TEXT],
     "longer than the model's context of 64: shorten it, or pass --max-tokens 64"),
    ("max-tokens-zero", lambda t, m: [str(m), "--max-tokens", "0"], "--max-tokens must be at least 1"),
    ("unknown-analysis", lambda t, m: [str(m), "--analyses", "summary,nope"], "unknown analysis 'nope'"),
    ("unknown-dtype", lambda t, m: [str(m), "--dtype", "float64"], "unknown dtype 'float64'"),
    ("unknown-device", lambda t, m: [str(m), "--device", "tpu"], "unknown device 'tpu'"),
    ("unknown-option", lambda t, m: [str(m), "--bogus"], "No such option: --bogus"),
    ("text-and-input", lambda t, m: [str(m), "--text", "hi", "--input", _file(t, "in.txt", "hi")],
     "either --text or --input, not both"),
    ("unknown-figure-format", lambda t, m: [str(m), "--figures", "html,gif"], "unknown figure format 'gif'"),
    ("malformed-set", lambda t, m: [str(m), "--set", "sinks:protocol"], "--set takes ANALYSIS.NAME=VALUE"),
    ("set-for-an-analysis-not-run", lambda t, m: [str(m), "--analyses", "summary", "--set", "sinks.protocol=gu"],
     "--set names analysis 'sinks', which is not being run"),
]


@pytest.mark.parametrize(("make_args", "fragment"), [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    make_args, fragment: str, tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))  # a GGUF conversion would land here
    out = tmp_path / "out"
    run = headscope(monkeypatch, capsys, "analyze", *make_args(tmp_path, tiny_llama_dir), "--out", str(out), "-q")

    assert fragment in run.error_line()
    assert files_in(out) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_exits_2(tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    run = headscope(monkeypatch, capsys, "analyze", str(tiny_llama_dir), "--device", "cuda", "--out", str(out))

    assert "no CUDA GPU is available" in run.error_line()
    assert files_in(out) == []


def test_unwritable_output_folder_exits_2(tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file.txt").write_text("a file, not a folder")
    run = headscope(monkeypatch, capsys, "analyze", str(tiny_llama_dir), "--out", str(tmp_path / "file.txt" / "out"))

    assert "cannot write to output folder" in run.error_line()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_analysis_that_does_not_fit_the_model_exits_2(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
    throwaway_analyses,
) -> None:
    throwaway_analyses("pictures-only", ("vision-language",), lambda context: AnalysisResult("pictures-only"))
    out = tmp_path / "out"
    run = headscope(monkeypatch, capsys, "analyze", str(tiny_llama_dir), "-a", "pictures-only", "--out", str(out))

    assert "analysis 'pictures-only' does not fit a decoder model (it fits vision-language)" in run.error_line()
    assert files_in(out) == []


def test_bad_input_in_a_real_process_prints_one_line(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("headscope")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HEADSCOPE_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([str(script), "analyze", "smollm9", "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, env=env, timeout=120)

    assert Run(done.returncode, done.stdout, done.stderr).error_line().startswith(
        "headscope: error: unknown model 'smollm9'")
    assert files_in(tmp_path / "out") == []


# --- success -------------------------------------------------------------------------------------------------


def test_analyze_writes_summary_maps_and_provenance(tmp_path: Path, tiny_llama_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    import transformers

    out = tmp_path / "out"
    run = headscope(monkeypatch, capsys, "analyze", str(tiny_llama_dir), "-a", "summary", "--out", str(out),
                    "--figures", "none", "--seed", "7", "-q")

    assert run.code == 0, run.err
    assert "Traceback" not in run.err
    results = Results.load(out / "results.json")
    summary = results["summary"]
    assert summary.status == "ok" and summary.error is None
    assert set(summary.maps) == {("first_token_mass", "self"), ("entropy", "self")}
    mass, entropy = summary.map("first_token_mass", "self").values, summary.map("entropy", "self").values
    assert mass.shape == entropy.shape == (2, 4)
    assert np.all((mass >= 0) & (mass <= 1)) and np.all(entropy >= 0)
    assert summary.summary["tokens"] == 64  # the shipped prose, cut to the model's context
    provenance = results.provenance
    assert provenance["model"] == {"type": "local", "path": str(tiny_llama_dir.resolve())}
    assert (provenance["dtype"], provenance["device"], provenance["seed"]) == ("float32", "cpu", 7)
    assert provenance["input_sha256"] == "sha256:" + hashlib.sha256(prose().encode()).hexdigest()
    assert provenance["libraries"]["torch"] == torch.__version__
    assert provenance["libraries"]["transformers"] == transformers.__version__
    assert provenance["stacks"]["self"] == {"name": "self", "layers": 2, "heads": 4, "kv_heads": 2, "kind": "self"}
    assert not (out / "figures").exists() or files_in(out / "figures") == []


def test_max_tokens_truncates_text_longer_than_the_context(tmp_path: Path, tiny_llama_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    run = headscope(monkeypatch, capsys, "analyze", str(tiny_llama_dir), "-a", "summary", "--text", LONG_TEXT,
                    "--max-tokens", "16", "--out", str(out), "--figures", "none", "-q")

    assert run.code == 0, run.err
    results = Results.load(out / "results.json")
    assert results["summary"].summary["tokens"] == 16
    assert results["summary"].summary["input"] == "user text"
    assert results.provenance["max_tokens"] == 16
    assert results.provenance["input_sha256"] == "sha256:" + hashlib.sha256(LONG_TEXT.encode()).hexdigest()


def test_html_figures_are_one_file_per_map(tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    run = headscope(monkeypatch, capsys, "analyze", str(tiny_llama_dir), "--analyses", "summary", "--out", str(out),
                    "--figures", "html", "-q")

    assert run.code == 0, run.err
    pages = sorted(p.name for p in (out / "figures").glob("*.html"))
    assert pages == ["summary-entropy-self.html", "summary-first_token_mass-self.html"]
    assert not list((out / "figures").glob("*.png"))
    page = (out / "figures" / "summary-entropy-self.html").read_text()
    assert "plotly" in page and "summary: entropy (self)" in page


def test_models_lists_the_packaged_aliases(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    run = headscope(monkeypatch, capsys, "models")

    assert run.code == 0, run.err
    for alias in ("smollm2-135m", "gemma3-270m", "minilm-l6", "whisper-tiny.en", "whisper-base"):
        assert alias in run.out
    assert "smollm2-135m (default)" in run.out


def test_one_failing_analysis_exits_1_and_keeps_the_others(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
    throwaway_analyses,
) -> None:
    def explode(context):
        raise RuntimeError("deliberate failure in a test analysis")

    throwaway_analyses("explodes", ("decoder",), explode)
    out = tmp_path / "out"
    run = headscope(monkeypatch, capsys, "analyze", str(tiny_llama_dir), "-a", "explodes,summary", "--out", str(out),
                    "--figures", "html", "-q")

    assert run.code == 1
    assert "analysis explodes failed: RuntimeError: deliberate failure in a test analysis" in run.err
    assert "Traceback" not in run.err
    document = json.loads((out / "results.json").read_text())
    assert document["analyses"]["explodes"]["status"] == "failed"
    assert document["analyses"]["explodes"]["error"] == "RuntimeError: deliberate failure in a test analysis"
    assert document["analyses"]["summary"]["status"] == "ok"
    assert len(list((out / "figures").glob("summary-*.html"))) == 2
    report = (out / "report.html").read_text(encoding="utf-8")
    assert '<p class="error">RuntimeError: deliberate failure in a test analysis</p>' in report


def test_set_passes_parameters_to_the_analysis(tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    run = headscope(monkeypatch, capsys, "analyze", str(tiny_llama_dir), "--analyses", "patterns", "--set",
                    "patterns.length=8", "--set", "patterns.samples=3", "--out", str(tmp_path), "--figures", "none",
                    "-q")

    assert run.code == 0, run.err
    params = Results.load(tmp_path / "results.json")["patterns"].params
    assert (params["length"], params["samples"]) == (8, 3)


def test_failing_figures_keep_the_results_and_the_heatmaps(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
    throwaway_analyses,
) -> None:
    from headscope.analyses import summary as summary_analysis

    def broken_figures(result):
        raise ValueError("deliberate figure failure")

    throwaway_analyses("drawn", ("decoder",), lambda context: replace(summary_analysis.run(context), name="drawn"),
                       figures=broken_figures)
    out = tmp_path / "out"
    run = headscope(monkeypatch, capsys, "analyze", str(tiny_llama_dir), "-a", "drawn", "--out", str(out),
                    "--figures", "html", "-q")

    assert run.code == 0, run.err
    assert "figures of drawn failed: ValueError: deliberate figure failure" in run.err
    assert Results.load(out / "results.json")["drawn"].status == "ok"
    assert len(list((out / "figures").glob("drawn-*.html"))) == 2
    assert (out / "report.html").exists()


def test_static_figures_that_cannot_be_made_are_counted_named_and_recorded(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-browser"))
    out = tmp_path / "out"
    run = headscope(monkeypatch, capsys, "analyze", str(tiny_llama_dir), "-a", "summary", "--out", str(out),
                    "--figures", "html,png", "-q")

    assert run.code == 0, run.err
    reason = (f"static PNG export needs Chrome or Chromium for kaleido, and BROWSER_PATH='{tmp_path / 'no-browser'}' "
              "is not one: install Debian's `chromium` package (the set-up script does when run as root) or set "
              "BROWSER_PATH to a browser")
    note = f"2 of 4 figure files not written (summary-first_token_mass-self.png, summary-entropy-self.png): {reason}"
    assert f"note: {note}" in run.err.splitlines()
    figures = Results.load(out / "results.json").provenance["figures"]
    assert figures["formats"] == ["html", "png"] and figures["written"] == 2
    assert figures["failed"] == [{"analysis": "summary", "file": f"figures/summary-{name}-self.png", "reason": reason}
                                 for name in ("first_token_mass", "entropy")]
    assert note in Results.load(out / "results.json").provenance["notes"]
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "plotly.min.js", "summary-entropy-self.html", "summary-first_token_mass-self.html"]


def test_costly_and_repeating_analyses_run_only_when_named() -> None:
    # a default run does each forward pass once: summary's two maps are sinks' sink_mass and patterns' entropy
    assert [analysis.name for analysis in registry.select(None, "decoder")] == ["patterns", "sinks"]
    assert [analysis.name for analysis in registry.select(None, "encoder-decoder")] == ["sinks"]
    assert [analysis.name for analysis in registry.select(["summary"], "decoder")] == ["summary"]
    assert [analysis.name for analysis in registry.select(["importance"], "decoder")] == ["importance"]
