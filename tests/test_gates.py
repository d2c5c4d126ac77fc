"""Per-head gates act on head outputs z exactly as the same operation done by hand on the output projection.

The hand computations here use forward pre-hooks written in the test on the output projection each
architecture names (Llama ``o_proj``, GPT-2's ``Conv1D`` ``c_proj``, BERT's ``output.dense`` on the parent
of the attention module, Whisper's cross-attention ``out_proj``), found by attribute path, not through
headscope's adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import tiny_models as tm
import torch
from torch import nn

from headscope.capture.engine import Scope
from headscope.capture.gates import Gates
from headscope.capture.reducers import Entropy, KeyMass

HEADS, HEAD_DIM = 4, 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with tm.one_thread():
        yield


# (architecture, stack gated, the output projection of layer l, spelled out per architecture)
PROJECTIONS: dict[str, tuple[str, str, Callable[[nn.Module, int], nn.Module]]] = {
    "llama": ("llama", "self", lambda m, layer: m.model.layers[layer].self_attn.o_proj),
    "gpt2": ("gpt2", "self", lambda m, layer: m.transformer.h[layer].attn.c_proj),
    "bert": ("bert", "self", lambda m, layer: m.encoder.layer[layer].attention.output.dense),
    "whisper-cross": ("whisper", "cross", lambda m, layer: m.model.decoder.layers[layer].encoder_attn.out_proj),
    "t5-cross": ("t5", "cross", lambda m, layer: m.decoder.block[layer].layer[1].EncDecAttention.o),
}
CASES = list(PROJECTIONS)


def _output(outputs) -> torch.Tensor:
    return outputs.logits if getattr(outputs, "logits", None) is not None else outputs.last_hidden_state


@contextlib.contextmanager
def _pre_hooks(model: nn.Module, case: str, edit: Callable[[int, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the input of every layer's output projection by ``edit(layer, x)``, x (B, T, heads * d)."""
    _, _, projection = PROJECTIONS[case]
    handles = []
    layer = 0
    try:
        while True:
            try:
                module = projection(model, layer)
            except (IndexError, AttributeError):
                break
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, layer=layer: (edit(layer, args[0]), *args[1:])))
            layer += 1
        assert layer == 2, "every tiny model has two layers in the gated stack"
        yield
    finally:
        for handle in handles:
            handle.remove()


def _head(head: int) -> slice:
    return slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)


def _run(model: nn.Module, inputs: dict, **capture) -> torch.Tensor:
    reducers = capture.pop("reducers", ())
    with torch.no_grad(), Scope(model).capture(*reducers, **capture):
        return _output(model(**inputs))


@pytest.mark.parametrize("name", list(tm.FACTORIES))
def test_unit_scale_on_every_stack_leaves_outputs_bit_for_bit(name):
    tiny = tm.get(name)
    inputs = tiny.inputs(2, tiny.paddings[0] if tiny.paddings else None)
    stacks = Scope(tiny.model).stacks
    gates = [Gates(stack=stack, scale=torch.ones(s.layers, s.heads)) for stack, s in stacks.items()]
    with torch.no_grad():
        plain = _output(tiny.model(**inputs))
    assert torch.equal(_run(tiny.model, inputs, gates=gates), plain)
    per_example = [Gates(stack=stack, scale=torch.ones(2, s.layers, s.heads), read="mean")
                   for stack, s in stacks.items()]
    assert torch.equal(_run(tiny.model, inputs, gates=per_example), plain)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_reducers", [False, True], ids=["gates-only", "with-reducers"])
def test_zeroing_a_head_equals_zeroing_its_slice_by_hand(case, with_reducers):
    name, stack, _ = PROJECTIONS[case]
    tiny = tm.get(name)
    inputs = tiny.inputs(2)
    layer, head = 1, 2

    def zero(at: int, x: torch.Tensor) -> torch.Tensor:
        if at != layer:
            return x
        x = x.clone()
        x[..., _head(head)] = 0
        return x

    with torch.no_grad(), _pre_hooks(tiny.model, case, zero):
        by_hand = _output(tiny.model(**inputs))
    reducers = (KeyMass(), Entropy()) if with_reducers else ()
    gated = _run(tiny.model, inputs, gates=[Gates.zero([(layer, head)], 2, HEADS, stack=stack)],
                 reducers=reducers, chunk_size=3)
    torch.testing.assert_close(gated, by_hand, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert (_output(tiny.model(**inputs)) - by_hand).abs().max() > 1e-3  # the ablation matters


@pytest.mark.parametrize("case", ["llama", "gpt2", "whisper-cross"])
def test_per_example_gate_rows_equal_each_example_run_alone_with_its_row(case):
    name, stack, _ = PROJECTIONS[case]
    tiny = tm.get(name)
    inputs = tiny.inputs(2)
    scale = torch.ones(2, 2, HEADS)
    scale[0, 1, 2] = 0.0
    scale[1, 0, 1] = 0.0
    scale[1, 1, 3] = 0.5
    batched = _run(tiny.model, inputs, gates=[Gates(stack=stack, scale=scale)])
    for example in range(2):
        alone = {key: value[example:example + 1] for key, value in inputs.items()}
        own = _run(tiny.model, alone, gates=[Gates(stack=stack, scale=scale[example])])
        torch.testing.assert_close(batched[example:example + 1], own, rtol=0, atol=1e-5)
        other = _run(tiny.model, alone, gates=[Gates(stack=stack, scale=scale[1 - example])])
        assert (batched[example:example + 1] - other).abs().max() > 1e-3  # the rows really differ


def _hand_means(model: nn.Module, case: str, inputs: dict, tokens: torch.Tensor | None) -> torch.Tensor:
    """(layers, heads, d) mean of the output projection's input over the tokens marked in ``tokens``."""
    sums, counts = {}, {}

    def read(layer: int, x: torch.Tensor) -> torch.Tensor:
        z = x.view(*x.shape[:2], HEADS, HEAD_DIM).double()
        keep = torch.ones(x.shape[:2], dtype=torch.bool) if tokens is None else tokens
        sums[layer] = z[keep].sum(0)
        counts[layer] = int(keep.sum())
        return x

    with torch.no_grad(), _pre_hooks(model, case, read):
        model(**inputs)
    return torch.stack([sums[layer] / counts[layer] for layer in sorted(sums)])


@pytest.mark.parametrize("case", ["llama", "gpt2", "bert", "whisper-cross"])
def test_replace_by_mean_equals_replacing_by_the_mean_by_hand(case):
    name, stack, _ = PROJECTIONS[case]
    tiny = tm.get(name)
    inputs = tiny.inputs(2)
    reader = Gates(stack=stack, read="mean")
    _run(tiny.model, inputs, gates=[reader])
    means = _hand_means(tiny.model, case, inputs, None)
    torch.testing.assert_close(reader.mean().double(), means, rtol=0, atol=1e-5)

    layer, head = 1, 1
    replace_mask = torch.zeros(2, HEADS, dtype=torch.bool)
    replace_mask[layer, head] = True
    gated = _run(tiny.model, inputs,
                 gates=[Gates(stack=stack, replace=reader.mean(), replace_mask=replace_mask)])

    def replace(at: int, x: torch.Tensor) -> torch.Tensor:
        if at != layer:
            return x
        x = x.clone()
        x[..., _head(head)] = means[layer, head].to(x.dtype)
        return x

    with torch.no_grad(), _pre_hooks(tiny.model, case, replace):
        by_hand = _output(tiny.model(**inputs))
    torch.testing.assert_close(gated, by_hand, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert (_output(tiny.model(**inputs)) - by_hand).abs().max() > 1e-3


@pytest.mark.parametrize("with_reducers", [True, False], ids=["with-reducers", "gates-alone"])
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_mean_read_skips_padding_tokens(name, with_reducers):
    """The engine reads the padding from the attention mask, with or without reducers: the mean is over real
    tokens only."""
    tiny = tm.get(name)
    inputs = tiny.inputs(2, tiny.paddings[-1])
    reader = Gates(read="mean")
    _run(tiny.model, inputs, gates=[reader], reducers=(KeyMass(),) if with_reducers else (), chunk_size=3)
    real = _hand_means(tiny.model, name, inputs, inputs["attention_mask"].bool())
    every = _hand_means(tiny.model, name, inputs, None)
    torch.testing.assert_close(reader.mean().double(), real, rtol=0, atol=1e-5)
    assert (real - every).abs().max() > 1e-3


def _loss_weights(output: torch.Tensor) -> torch.Tensor:
    return torch.randn(output.shape, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("per_example", [False, True], ids=["shared", "per-example"])
def test_gate_gradient_equals_sum_over_tokens_of_z_dot_dloss_dz(case, per_example):
    name, stack, _ = PROJECTIONS[case]
    tiny = tm.get(name)
    inputs = tiny.inputs(2)
    shape = (2, 2, HEADS) if per_example else (2, HEADS)
    scale = torch.ones(shape, requires_grad=True)
    with Scope(tiny.model).capture(gates=[Gates(stack=stack, scale=scale)]):
        output = _output(tiny.model(**inputs))
    weights = _loss_weights(output)
    (output * weights).sum().backward()

    z: dict[int, torch.Tensor] = {}

    def keep(layer: int, x: torch.Tensor) -> torch.Tensor:
        x.retain_grad()
        z[layer] = x
        return x

    with _pre_hooks(tiny.model, case, keep):
        output = _output(tiny.model(**inputs))
    (output * weights).sum().backward()
    by_hand = torch.zeros(2, 2, HEADS, dtype=torch.float64)
    for layer, x in z.items():
        product = (x * x.grad).view(*x.shape[:2], HEADS, HEAD_DIM).double()
        by_hand[:, layer] = product.sum(dim=(1, 3))  # sum over tokens and the head's dimensions
    want = by_hand if per_example else by_hand.sum(0)
    assert want.abs().max() > 1e-2
    torch.testing.assert_close(scale.grad.double(), want, rtol=1e-5, atol=1e-5)
    tiny.model.zero_grad(set_to_none=True)
