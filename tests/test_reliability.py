"""Reliability: NaN or inf in attention or in a head's output is reported with its layer and head, never
averaged into a statistic; inside a run the analysis fails alone, the others' results are kept, exit code 1;
after any failure inside a capture the model's outputs are those of a fresh copy."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import tiny_models as tm
import torch
from cli_runner import run_cli
from conftest import save_tiny, tiny_llama

from headscope.capture.engine import Scope
from headscope.capture.gates import Gates
from headscope.capture.reducers import Entropy, KeyMass
from headscope.errors import NonFiniteError
from headscope.results import Results

HEAD_DIM = 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with tm.one_thread():
        yield


def _poisoned(model: torch.nn.Module, layer: int, head: int) -> torch.nn.Module:
    """A copy of a tiny Llama whose query projection of one head holds NaN."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.model.layers[layer].self_attn.q_proj.weight[head * HEAD_DIM:(head + 1) * HEAD_DIM] = float("nan")
    return model


@pytest.mark.parametrize("layer,head", [(0, 3), (1, 2)])
def test_nan_attention_is_reported_with_its_layer_and_head(layer: int, head: int) -> None:
    model = _poisoned(tm.get("llama").model, layer, head)
    inputs = tm.get("llama").inputs(1)
    expected = f"attention output of self layer {layer} head {head} is not finite"
    with pytest.raises(NonFiniteError, match=expected), torch.no_grad(), Scope(model).capture(KeyMass(), Entropy()):
        model(**inputs)


def test_a_nan_gate_is_reported_with_its_layer_and_head() -> None:
    model = tm.get("llama").model
    inputs = tm.get("llama").inputs(1)
    means = torch.zeros(2, 4, HEAD_DIM)
    means[1, 3] = float("inf")
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1, 3] = True
    gate = Gates(replace=means, replace_mask=mask)
    with pytest.raises(NonFiniteError, match="head output z of self layer 1 head 3 is not finite"), \
            torch.no_grad(), Scope(model).capture(gates=[gate]):
        model(**inputs)


@pytest.mark.parametrize("failure", ["nan", "interrupt"])
def test_hooks_never_leak_after_a_failure_inside_a_capture(failure: str) -> None:
    model = tm.get("llama").model
    fresh = copy.deepcopy(model)
    inputs = tm.get("llama").inputs(1)
    gate = Gates(scale=torch.full((2, 4), float("nan")) if failure == "nan" else torch.zeros(2, 4))

    def interrupt(_module, _args):
        raise KeyboardInterrupt

    handle = None if failure == "nan" else model.model.layers[1].register_forward_pre_hook(interrupt)
    with pytest.raises(NonFiniteError if failure == "nan" else KeyboardInterrupt), torch.no_grad(), \
            Scope(model).capture(KeyMass(), gates=[gate]):
        model(**inputs)
    if handle is not None:
        handle.remove()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, fresh(**inputs).logits)
    assert model.config._attn_implementation == fresh.config._attn_implementation


def test_a_run_on_a_nan_model_records_each_failure_and_exits_1(tmp_path: Path, tokenizer, capsys) -> None:
    folder = save_tiny(_poisoned(tiny_llama(len(tokenizer)), 1, 2), tmp_path / "poisoned")
    code = run_cli("analyze", str(folder), "--analyses", "summary,sinks", "--out", str(tmp_path / "out"),
                   "--figures", "none", "-q")

    assert code == 1
    results = Results.load(tmp_path / "out" / "results.json")
    for name in ("summary", "sinks"):
        assert results[name].status == "failed"
        assert "self layer 1 head 2 is not finite" in results[name].error
    err = capsys.readouterr().err
    assert "Traceback" not in err and "analysis sinks failed: NonFiniteError" in err
