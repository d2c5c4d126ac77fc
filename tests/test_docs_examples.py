"""Every Python example in ``docs/`` runs as written, on the packaged models, and what it shows is checked.

A page's examples run in order in one namespace, in an empty working folder, as a reader would paste them. An
example the suite cannot run says why in a ``<!-- not run: REASON -->`` line just above it. Models the suite
does not have (a 7B LLaVA on a GPU, ``./my-llava``) are replaced by a tiny random model of the same
architecture, named in ``STAND_INS``: the example's code still runs, only its numbers are not the paper's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tiny_vlms
from cli_runner import run_cli

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
BLOCK = re.compile(r"(?:^<!-- not run: (?P<reason>.*?) -->\n)?^```python\n(?P<code>.*?)^```", re.S | re.M)
EXECUTED_ELSEWHERE = {  # pages whose example another test runs, in the setting it needs
    "extending.md": "test_front_door.py::test_an_analysis_of_another_package_shows_up_in_the_cli",
    "published.md": "test_published.py::test_the_finding_reproduces_as_recorded (the example's call, per finding)",
}


def examples(page: Path) -> list[str]:
    """The code of ``page``'s Python examples that are to run, in page order."""
    found = []
    for match in BLOCK.finditer(page.read_text()):
        if match["reason"] is None:
            found.append(match["code"])
        else:
            assert match["reason"].strip(), f"{page.name}: a 'not run' example must say why"
    return found


def test_every_page_with_examples_is_run_here_or_elsewhere() -> None:
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if examples(p)}
    assert pages == set(CHECKS) | set(EXECUTED_ELSEWHERE), pages ^ (set(CHECKS) | set(EXECUTED_ELSEWHERE))


# --- what each page's examples show ---------------------------------------------------------------------------


def _descending(top: list[tuple[int, int, float]]) -> list[float]:
    values = [value for *_, value in top]
    assert values == sorted(values, reverse=True), top
    return values


def check_importance(ns: dict, folder: Path, printed: str) -> None:
    result, task = ns["result"], ns["task"]
    zero = result.map("ablation_zero")
    assert zero.values.shape == (30, 9) and np.isfinite(zero.values).all()
    top = result.top_heads("ablation_zero", k=5)
    assert [value for *_, value in top] == sorted(zero.values.ravel(), key=abs, reverse=True)[:5]  # signed: magnitude
    assert -1 <= result.summary.spearman_gradient_per_token_vs_ablation_zero <= 1
    assert np.load(folder / "head_importance.npy").shape == (30, 9)
    ablated = np.isfinite(task.map("ablation_zero").values).any(axis=1).nonzero()[0]
    assert ablated.tolist() == [0, 29]  # layers=[0, 29]
    lowered = task.top_heads("ablation_zero", k=3, notable="low")
    assert [v for *_, v in lowered] == sorted(v for *_, v in lowered) and lowered[0][2] < 0
    assert "task metric" in task.summary.objective


def check_patterns(ns: dict, folder: Path, printed: str) -> None:
    result = ns["result"]
    values = _descending(result.top_heads("induction", k=5))
    assert values[0] > 0.3, values  # SmolLM2 has induction heads; a random-token copy would score ~0
    np.testing.assert_array_equal(np.asarray(result.plot("induction").data[0].z, dtype=float),
                                  result.map("induction").values)


def check_retrieval(ns: dict, folder: Path, printed: str) -> None:
    result = ns["result"]
    assert set(result.summary.accuracy_per_length) == {"256", "512"}
    assert len(result.tables["tests"]) == 2 * 3  # lengths x depths x needles
    assert isinstance(result.summary.verify, dict) and result.summary.verify
    exported = json.loads((folder / "retrieval_heads.json").read_text())
    assert len(exported) == 30 * 9 and all(f"{layer}-{head}" in exported for layer, head, _ in result.top_heads())


def check_saliency(ns: dict, folder: Path, printed: str) -> None:
    result = ns["result"]
    aggregates = result.tables["aggregates"]
    assert len(aggregates) > 0 and {"method"} <= set(aggregates.columns)
    top = result.top_heads("pearson_saliency")
    assert len(top) == 5 and all(-1 <= value <= 1 for *_, value in top)
    assert result.plot("overlay").data


def check_sinks(ns: dict, folder: Path, printed: str) -> None:
    result = ns["result"]  # the last example: the vision-language model
    assert {"visual_sinks", "image_centric_heads"} <= set(result.tables)
    text = ns["_first"]
    assert 50 < text.summary.sink_rate_self <= 100  # percent: most of SmolLM2's heads are sinks on token 0
    assert _descending(text.top_heads("sink_score"))[0] > 0.95  # 18.8 = 0.984 on the 100 natural paragraphs
    assert text.summary.gu_sink_rates_self["repeated"] < 10 < text.summary.gu_sink_rates_self["random"]


def check_eviction(ns: dict, folder: Path, printed: str) -> None:
    result = ns["_first"]
    table = result.tables["policies"]
    assert table["label"].tolist() == ["full", "window 256", "1 sink + window 256", "4 sinks + window 256"]
    perplexity = dict(zip(table["label"], table["perplexity"], strict=True))
    assert perplexity["full"] < perplexity["4 sinks + window 256"] < perplexity["window 256"]  # sinks restore it
    assert result.summary.main_metric == "lost_mass_sinks_4_window_256"
    _descending(result.top_heads())
    lost = ns["lost"].result()["self"]  # the Scope example: 4 sinks + window 256 on 1024 tokens
    assert lost.shape == (30, 9) and ((lost >= 0) & (lost <= 1 + 1e-6)).all() and lost.max() > 0.1
    assert float(ns["evicted"]) > float(ns["full"])


def check_vhd(ns: dict, folder: Path, printed: str) -> None:
    result = ns["result"]
    assert result.map("vhd").values.shape[0] == 2 and len(result.tables["generations"]) == 3
    assert 1 <= len(ns["tokens"]) <= 64 and isinstance(ns["loaded"].processor.decode(ns["tokens"]), str)
    assert float(ns["gates"].scale.max()) in (1.0, 2.0)  # alpha on the chosen heads, 1 elsewhere


def check_concepts(ns: dict, folder: Path, printed: str) -> None:
    mass = ns["mass"].result()["self"]
    assert mass.shape == (30, 9) and ((mass >= 0) & (mass <= 1 + 1e-6)).all()
    assert ns["entropy"].result()["self"].shape == (30, 9)


def check_results_format(ns: dict, folder: Path, printed: str) -> None:
    loaded = ns["sinks"]
    assert list(ns["Results"].load(folder / "out" / "results.json")) == ["summary", "sinks"]
    assert loaded.map("sink_score", "decoder").values.shape == (4, 6)
    assert ns["summary"].metrics() == ["first_token_mass", "entropy"]
    np.testing.assert_array_equal(ns["values"], loaded.map("sink_score", "decoder").values)  # plain JSON agrees
    frame = next(code for code in examples(DOCS / "results-format.md") if code.startswith("frame = "))
    shown = [line[2:] for line in frame.splitlines() if line.startswith("# ")]
    assert printed.splitlines() == shown  # the table the page shows is the one it prints


def prepare_results_format(folder: Path) -> None:
    code = run_cli("analyze", "whisper-tiny.en", "--analyses", "summary,sinks", "--out", str(folder / "out"),
                   "--figures", "none", "-q")
    assert code == 0


CHECKS: dict[str, Callable[[dict, Path, str], None]] = {
    "analyses/eviction.md": check_eviction,
    "analyses/importance.md": check_importance,
    "analyses/patterns.md": check_patterns,
    "analyses/retrieval.md": check_retrieval,
    "analyses/sinks.md": check_sinks,
    "concepts.md": check_concepts,
    "analyses/saliency.md": check_saliency,
    "results-format.md": check_results_format,
    "analyses/vhd.md": check_vhd,
}
PREPARE: dict[str, Callable[[Path], None]] = {"results-format.md": prepare_results_format}


def tiny_llava(folder: Path) -> dict[str, str]:
    """A tiny random LLaVA for the docs' LLaVA models, and a picture for their ``photo.png``."""
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 40, 40)).save(folder / "photo.png")
    return {"path": repr(str(tiny_vlms.llava(folder / "tiny-llava")))}


STAND_INS: dict[str, tuple[str, ...]] = {  # per page, the text its examples name and the suite replaces
    "analyses/vhd.md": ('"llava-hf/llava-1.5-7b-hf", dtype="bfloat16", device="cuda"',),
    "analyses/sinks.md": ('"./my-llava"',),
}


@pytest.mark.slow
@pytest.mark.parametrize("page", list(CHECKS))
def test_the_examples_of_a_page_run_as_written(page: str, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    replace = dict.fromkeys(STAND_INS[page], tiny_llava(tmp_path)["path"]) if page in STAND_INS else {}
    if page in PREPARE:
        PREPARE[page](tmp_path)
    capsys.readouterr()
    namespace: dict = {}
    codes = examples(DOCS / page)
    assert all(any(text in code for code in codes) for text in replace), f"{page} no longer names {list(replace)}"
    for i, code in enumerate(codes):
        for text, instead in replace.items():
            code = code.replace(text, instead)
        exec(compile(code, f"{page} example {i + 1}", "exec"), namespace)
        if i == 0:
            namespace["_first"] = namespace.get("result")
    CHECKS[page](namespace, tmp_path, capsys.readouterr().out)
