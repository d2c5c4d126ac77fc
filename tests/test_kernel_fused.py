"""Entropy in the model's own attention call (``headscope.capture.flex``): one FlexAttention call gives the output,
the row log-sum-exp and E_p[k], exact like the two kernel calls it replaces.

"auto" takes this form from ``flex.FUSED_FROM`` keys on (4096); the tests lower the threshold to 1, so that the
tiny models' few tokens take it. Each sequence length compiles once per process (seconds), so the tests keep to
a few architectures: causal (Llama, GPT-2), grouped-query (Qwen2), bidirectional (BERT) and an encoder-decoder,
whose cross-attention keeps the second call (Whisper).
"""

from __future__ import annotations

import functools

import pytest
import reference as ref
import tiny_models as tm
import torch

from headscope.capture import engine, flex
from headscope.capture.engine import FUSED, SECOND_CALL, Scope
from headscope.capture.reducers import Entropy, KeyMass

NAMES = ("llama", "gpt2", "qwen2", "bert", "whisper")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with tm.one_thread():
        yield


@pytest.fixture
def fused(monkeypatch):
    """Every call of at least one key may take the one-call form; a refusal seen before is forgotten."""
    monkeypatch.setattr(flex, "FUSED_FROM", 1)
    monkeypatch.setattr(engine, "_FLEX_REFUSED", [None])


def _main_output(outputs) -> torch.Tensor:
    return outputs.logits if getattr(outputs, "logits", None) is not None else outputs.last_hidden_state


@functools.cache
def _reference(name: str, batch: int = 1, padding: str | None = None):
    tiny = tm.get(name)
    return ref.forward_attention(ref.eager_copy(tiny.model), tiny.kind, tiny.inputs(batch, padding))


def _capture(name: str, batch: int = 1, padding: str | None = None):
    tiny = tm.get(name)
    reducers = {"entropy": Entropy(), "key_mass": KeyMass(), "logit_scale": ref.LogitScale()}
    scope = Scope(tiny.model)
    with torch.no_grad(), scope.capture(*reducers.values()):
        output = _main_output(tiny.model(**tiny.inputs(batch, padding)))
    return reducers, dict(scope.paths), output


def _assert_equal_eager(name: str, reducers: dict, batch: int = 1, padding: str | None = None) -> None:
    reference = _reference(name, batch, padding)
    scale = reducers["logit_scale"]
    for statistic, function in (("entropy", ref.entropy), ("key_mass", ref.key_mass)):
        got = reducers[statistic].result()
        assert set(got) == set(reference)
        for stack, call in reference.items():
            ref.assert_exact(got[stack], function, [call], err_msg=f"{statistic} {stack}",
                             floor=ref.kernel_entropy_floor(scale.scale(stack)))


@pytest.mark.parametrize("name", NAMES)
def test_entropy_and_key_mass_from_the_one_call_form_equal_eager(name, fused):
    reducers, paths, _ = _capture(name)
    cross = sum(stack.layers for key, stack in Scope(tm.get(name).model).stacks.items() if key == "cross")
    assert paths.get(f"kernel: {FUSED}", 0) > 0, paths
    assert paths.get("kernel", 0) == cross, paths  # cross-attention: keys of another sequence, a second call
    _assert_equal_eager(name, reducers)


@pytest.mark.parametrize("name", NAMES)
def test_model_outputs_under_the_one_call_form_equal_eager(name, fused):
    """The attention output comes from FlexAttention, not SDPA's flash kernel: the model's output is the same to
    float32 rounding, measured like every captured number against the float64 twin."""
    tiny = tm.get(name)
    inputs = tiny.inputs(1, None)
    _, paths, captured = _capture(name)
    assert f"kernel: {FUSED}" in paths
    with torch.no_grad():
        plain = _main_output(tiny.model(**inputs))
    exact = ref.in_float64_default(lambda: _main_output(ref.float64_twin(tiny.model)(**ref.float64_inputs(inputs))))
    ref.assert_matches_eager(captured, plain, exact)


def test_a_query_whose_own_key_is_too_unlikely_takes_the_second_call(fused, monkeypatch):
    monkeypatch.setattr(flex, "LEAST_OWN", 2.0)  # (no probability reaches it: every call is refused)
    reducers, paths, _ = _capture("llama")
    assert set(paths) == {f"kernel: {SECOND_CALL} (a query's own key has under 2e+00 of its attention)"}, paths
    _assert_equal_eager("llama", reducers)


def test_entropy_call_refuses_a_row_whose_own_key_underflows():
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 2, 16, 8, generator=generator) for _ in range(3))
    assert flex.entropy_call(query, key, value, True, 8**-0.5) is not None
    own = query[0, 0, 5]
    key[0, 0, 5] = -400 * 8**0.5 * own / own.dot(own)  # query 5's logit on its own key is -400: e^-400 underflows
    assert flex.entropy_call(query, key, value, True, 8**-0.5) is None


def test_a_refusal_of_flexattention_is_warned_once_and_served_by_the_second_call(fused, monkeypatch):
    def refuse():
        def call(*args):
            raise RuntimeError("no C++ compiler\nmore lines")
        return call

    monkeypatch.setattr(flex, "_compiled", refuse)
    with pytest.warns(UserWarning, match="FlexAttention refused entropy's one-call form") as warned:
        reducers, paths, _ = _capture("llama")
    assert len([w for w in warned if "FlexAttention" in str(w.message)]) == 1
    assert set(paths) == {f"kernel: {SECOND_CALL} (FlexAttention refused: RuntimeError: no C++ compiler)"}, paths
    _assert_equal_eager("llama", reducers)


def test_short_masked_or_differentiated_calls_keep_the_second_call(fused, monkeypatch):
    # padding: the call has a mask
    reducers, paths, _ = _capture("llama", 2, "left")
    assert set(paths) == {"kernel"}, paths
    _assert_equal_eager("llama", reducers, 2, "left")
    # gradients: compiled FlexAttention on CPU runs inference only
    tiny = tm.get("llama")
    scope = Scope(tiny.model)
    with scope.capture(Entropy()):
        tiny.model(**tiny.inputs(1, None)).logits.sum().backward()
    tiny.model.zero_grad(set_to_none=True)
    assert set(scope.paths) == {"kernel"}, scope.paths
    # under the threshold
    monkeypatch.setattr(flex, "FUSED_FROM", 10_000)
    _, paths, _ = _capture("llama")
    assert set(paths) == {"kernel"}, paths


def test_the_one_call_form_runs_under_inference_mode(fused):
    tiny = tm.get("llama")
    reducers, _, _ = _capture("llama")
    entropy, scope = Entropy(), Scope(tiny.model)
    with torch.inference_mode(), scope.capture(entropy):
        tiny.model(**tiny.inputs(1, None))
    assert set(scope.paths) == {f"kernel: {FUSED}"}, scope.paths
    for stack, values in reducers["entropy"].result().items():
        assert (entropy.result()[stack] == values).all(), stack
