"""A capture does not change the model: same outputs inside, same model after, also after an error."""

from __future__ import annotations

import copy

import pytest
import tiny_models as tm
import torch
from torch import nn
from transformers import PreTrainedModel

from headscope.capture.engine import IMPLEMENTATION, Scope
from headscope.capture.gates import Gates
from headscope.capture.reducers import Entropy, FullMaps, KeyMass, LastRow, MeanDistance
from headscope.errors import HeadscopeError, MemoryBudgetError

ARCHS = list(tm.FACTORIES)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with tm.one_thread():
        yield


def _cases() -> list[tuple[str, int, str | None]]:
    cases = []
    for name in ARCHS:
        paddings = tm.get(name).paddings
        cases.extend([(name, 2, padding) for padding in paddings] or [(name, 2, None)])
    return cases


CASES = _cases()


def _case_id(case) -> str:
    return f"{case[0]}-b{case[1]}" + (f"-{case[2]}" if case[2] else "")


def _main_output(outputs) -> torch.Tensor:
    return outputs.logits if getattr(outputs, "logits", None) is not None else outputs.last_hidden_state


def _real_tokens(name: str, inputs: dict, output: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the output rows of real tokens (padding rows are free to differ)."""
    key = "decoder_attention_mask" if tm.get(name).kind == "seq2seq" else "attention_mask"
    mask = inputs.get(key)
    if mask is not None:
        return mask.bool()
    return torch.ones(output.shape[:2], dtype=torch.bool)


def _configs(model: nn.Module) -> list:
    """Every config object reachable from the model: sub-models' configs and their sub-configs."""
    found: dict[int, object] = {}
    pending = [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while pending:
        config = pending.pop()
        if id(config) not in found:
            found[id(config)] = config
            pending.extend(getattr(config, key) for key in config.sub_configs if getattr(config, key) is not None)
    return list(found.values())


def _implementations(model: nn.Module) -> list[tuple[int, str | None]]:
    return [(id(config), config._attn_implementation) for config in _configs(model)]


def _hooks(model: nn.Module) -> set[tuple[str, str, int, str]]:
    """Every forward hook and pre-hook: (module, kind, handle id, defining module of the function).

    transformers installs hooks of its own, once, on the modules whose outputs it records (LLaVA's vision
    tower): those are not headscope's and stay.
    """
    found = set()
    for name, module in model.named_modules():
        for kind, hooks in (("forward", module._forward_hooks), ("pre", module._forward_pre_hooks)):
            for handle, hook in hooks.items():
                found.add((name, kind, handle, getattr(hook, "__module__", "?")))
    return found


def _headscope_hooks(model: nn.Module) -> set:
    return {hook for hook in _hooks(model) if hook[3].startswith("headscope")}


def _all_reducers():
    return [KeyMass(), KeyMass(positions=(0, 1)), Entropy(), MeanDistance(), LastRow()]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("chunk", (1, None), ids=("chunk1", "auto"))
def test_outputs_with_reducers_equal_outputs_without_on_real_tokens(case, chunk):
    name, batch, padding = case
    tiny = tm.get(name)
    inputs = tiny.inputs(batch, padding)
    with torch.no_grad():
        plain = _main_output(tiny.model(**inputs))
        with Scope(tiny.model).capture(*_all_reducers(), chunk_size=chunk):
            captured = _main_output(tiny.model(**inputs))
    real = _real_tokens(name, inputs, plain)
    torch.testing.assert_close(captured[real], plain[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ARCHS)
def test_empty_capture_leaves_outputs_bit_for_bit(name):
    tiny = tm.get(name)
    inputs = tiny.inputs(2, tiny.paddings[0] if tiny.paddings else None)
    with torch.no_grad():
        plain = _main_output(tiny.model(**inputs))
        with Scope(tiny.model).capture():
            assert all(impl != IMPLEMENTATION for _, impl in _implementations(tiny.model))
            captured = _main_output(tiny.model(**inputs))
    assert torch.equal(captured, plain)


@pytest.mark.parametrize("case", [("llama", 2, "left"), ("gemma3", 1, None), ("whisper", 1, None)], ids=_case_id)
def test_generate_inside_a_capture_makes_the_same_tokens(case):
    name, batch, padding = case
    tiny = tm.get(name)
    inputs = tiny.inputs(batch, padding)
    if name == "whisper":
        inputs = {"input_features": inputs["input_features"]}
    with torch.no_grad():
        plain = tiny.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        with Scope(tiny.model).capture(*_all_reducers(), chunk_size=2):
            captured = tiny.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(captured, plain)


@pytest.mark.parametrize("name", ARCHS)
def test_reducers_switch_every_config_to_headscope_and_back(name):
    model = tm.get(name).model
    before = _implementations(model)
    assert all(impl != IMPLEMENTATION for _, impl in before)
    with Scope(model).capture(KeyMass()):
        assert all(impl == IMPLEMENTATION for _, impl in _implementations(model))
    assert _implementations(model) == before


class Boom(RuntimeError):
    pass


def _explode(*_):
    raise Boom("raised inside the forward pass")


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("where", ["in-body", "in-forward"])
def test_model_is_unchanged_after_an_exception_inside_a_capture(name, where):
    tiny = tm.get(name)
    model = tiny.model
    fresh = copy.deepcopy(model)
    inputs = tiny.inputs(2, tiny.paddings[0] if tiny.paddings else None)
    with torch.no_grad():
        model(**inputs)  # transformers installs its own recording hooks on first use, if any
    implementations = _implementations(model)
    hooks = _hooks(model)
    assert not _headscope_hooks(model)
    scope = Scope(model)
    gates = [Gates(stack=stack, scale=torch.ones(s.layers, s.heads), read="mean") for stack, s in scope.stacks.items()]
    reducers = [KeyMass(), LastRow(callback=_explode if where == "in-forward" else None)]
    with pytest.raises(Boom), torch.no_grad(), scope.capture(*reducers, gates=gates, chunk_size=3):
        assert _headscope_hooks(model)  # the gates and the call counter are in place while it is open
        model(**inputs)
        raise Boom("raised in the body of the capture")
    assert _implementations(model) == implementations
    assert _hooks(model) == hooks
    assert not _headscope_hooks(model)
    if name != "llava":  # no hook at all on models whose outputs transformers does not record with hooks
        assert hooks == set()
    with torch.no_grad():
        assert torch.equal(_main_output(model(**inputs)), _main_output(fresh(**inputs)))
    with torch.no_grad(), scope.capture(KeyMass()):  # and a new capture can be opened
        model(**inputs)


def test_capture_inside_a_capture_raises_and_leaves_the_outer_one_working():
    tiny = tm.get("llama")
    scope = Scope(tiny.model)
    inputs = tiny.inputs(1)
    outer = KeyMass()
    with torch.no_grad(), scope.capture(outer):
        with pytest.raises(HeadscopeError, match="already active"), scope.capture(Entropy()):
            pass
        other = tm.get("gpt2")
        with pytest.raises(HeadscopeError, match="already active"), Scope(other.model).capture():
            pass
        assert all(config._attn_implementation != IMPLEMENTATION for config in _configs(other.model))
        tiny.model(**inputs)
    alone = KeyMass()
    with torch.no_grad(), scope.capture(alone):
        tiny.model(**inputs)
    assert outer.result()["self"].shape == (2, 4)
    assert (outer.result()["self"] == alone.result()["self"]).all()  # the outer capture kept recording
    assert all(config._attn_implementation != IMPLEMENTATION for config in _configs(tiny.model))


@pytest.mark.parametrize("name", ["llama", "whisper"])
def test_full_maps_over_budget_raise_before_storing_anything(name):
    tiny = tm.get(name)
    scope = Scope(tiny.model)
    stack = tiny.self_stack
    inputs = tiny.inputs(2)
    maps = FullMaps([(stack, 0, 0), (stack, 1, 1)], budget_bytes=64)
    fresh = copy.deepcopy(tiny.model)
    with torch.no_grad():
        tiny.model(**inputs)
    hooks = _hooks(tiny.model)
    with pytest.raises(MemoryBudgetError, match="budget"), torch.no_grad(), scope.capture(maps):
        tiny.model(**inputs)
    assert maps.result() == {}
    assert _hooks(tiny.model) == hooks
    assert not _headscope_hooks(tiny.model)
    with torch.no_grad():
        assert torch.equal(_main_output(tiny.model(**inputs)), _main_output(fresh(**inputs)))
    roomy = FullMaps([(stack, 0, 0), (stack, 1, 1)], budget_bytes=2**20)
    with torch.no_grad(), scope.capture(roomy):
        tiny.model(**inputs)
    assert len(roomy.result()) == 2


def test_forward_in_another_thread_is_captured() -> None:
    """A streamer runs ``generate`` in a worker thread: the capture opened in the main thread sees it."""
    import threading

    tiny = tm.get("llama")
    inputs = tiny.inputs(1, None)
    in_thread, in_main = KeyMass(), KeyMass()
    scope = Scope(tiny.model)
    with torch.no_grad():
        with scope.capture(in_thread):
            worker = threading.Thread(target=lambda: tiny.model(**inputs))
            worker.start()
            worker.join()
        with scope.capture(in_main):
            tiny.model(**inputs)
    assert set(in_thread.result()) == {"self"}
    torch.testing.assert_close(torch.from_numpy(in_thread.result()["self"]), torch.from_numpy(in_main.result()["self"]))


@pytest.mark.parametrize("name", ["t5", "whisper"])
def test_cross_attention_reducer_alone_skips_padded_decoder_queries(name: str) -> None:
    """Cross-attention queries are the decoder's: a reducer of the cross stack alone still knows which are
    padding, and equals the same reducer run beside one on every stack."""
    tiny = tm.get(name)
    inputs = tiny.inputs(2, "right")
    assert not bool(inputs["decoder_attention_mask"].all())
    alone, beside = KeyMass(stacks=["cross"]), KeyMass()
    scope = Scope(tiny.model)
    with torch.no_grad():
        with scope.capture(alone):
            tiny.model(**inputs)
        with scope.capture(beside):
            tiny.model(**inputs)
    # The decoder's own attention runs through SDPA in one capture and eager-exact in the other: float tolerance.
    torch.testing.assert_close(torch.from_numpy(alone.result()["cross"]), torch.from_numpy(beside.result()["cross"]),
                               rtol=0, atol=1e-5)
