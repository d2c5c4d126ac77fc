"""The capture engine is exact: every reducer equals the same statistic computed from eager attention.

For each tiny architecture (decoders, encoders, encoder-decoders with cross-attention, vision, LLaVA),
batch 1 and batch 2 with left or right padding, and chunk sizes 1, 3 and automatic, every statistic of
every stack equals the eager reference of ``tests/reference.py`` to its float32 tolerance (a small multiple of
eager float32's own error against the float64 twin). Greedy ``generate`` with a KV cache is checked step by step
against eager attention replayed with a cache.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import reference as ref
import tiny_models as tm
import torch

from headscope.capture.engine import Scope
from headscope.capture.reducers import ArgmaxKey, Entropy, FullMaps, KeyMass, LastRow, MeanDistance
from headscope.models.cache import cache_kwargs, output_cache


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with tm.one_thread():
        yield


def _input_cases() -> list[tuple[str, int, str | None]]:
    cases = []
    for name in tm.FACTORIES:
        cases.append((name, 1, None))
        paddings = tm.get(name).paddings
        cases.extend((name, 2, padding) for padding in paddings)
        if not paddings:
            cases.append((name, 2, None))
    return cases


CASES = _input_cases()
CHUNKS = (1, 3, None)
# How the statistics are computed: the chunked path with 1 or 3 queries per chunk or automatic chunks, or the
# kernel path (the fused kernel's row log-sum-exp), which "auto" takes where the call and the reducers allow it.
MODES = ("chunk1", "chunk3", "chunked", "kernel")
# The calls the kernel path leaves to the chunked path, and why: T5's position bias; and mean distance on
# attention that sees later keys (encoders, the vision tower), which has no kernel form.
POSITION_BIAS = {"t5"}
BIDIRECTIONAL = {"bert", "vit"}  # every stack sees later keys (Whisper's and LLaVA's decoders do not)


def _case_id(case: tuple[str, int, str | None]) -> str:
    name, batch, padding = case
    return f"{name}-b{batch}" + (f"-{padding}" if padding else "")


def _chunk_id(chunk: int | None) -> str:
    return "auto" if chunk is None else f"chunk{chunk}"


case_param = pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
chunk_param = pytest.mark.parametrize("chunk", CHUNKS, ids=[_chunk_id(c) for c in CHUNKS])
mode_param = pytest.mark.parametrize("mode", MODES)


@functools.cache
def _eager(name: str):
    return ref.eager_copy(tm.get(name).model)


@functools.cache
def _reference(case: tuple[str, int, str | None]) -> dict[str, ref.Call]:
    name, batch, padding = case
    tiny = tm.get(name)
    return ref.forward_attention(_eager(name), tiny.kind, tiny.inputs(batch, padding))


def _key_mask(case) -> torch.Tensor:
    """A fixed random set of keys of the main self-attention stack, (B, Tk) bool."""
    tiny = tm.get(case[0])
    keys = _reference(case)[tiny.self_stack][0].probs.shape[-1]
    return torch.rand(case[1], keys, generator=torch.Generator().manual_seed(3)) < 0.3


def _full_map_heads(name: str) -> list[tuple[str, int, int]]:
    """Two named heads: the main stack's first layer, and the last layer of another stack if any."""
    tiny = tm.get(name)
    stacks = Scope(tiny.model).stacks
    other = next((s for s in ("cross", "vision") if s in stacks), tiny.self_stack)
    last = stacks[other]
    return [(tiny.self_stack, 0, 1), (other, last.layers - 1, last.heads - 1)]


def _statistic_reducers(case: tuple[str, int, str | None]) -> dict[str, object]:
    """The reducers of per-head statistics (each has a kernel form), fresh."""
    return {
        "key_mass": KeyMass(),
        "key_mass_012": KeyMass(positions=(0, 1, 2)),
        "key_mass_mask": KeyMass(key_mask=_key_mask(case), stacks={tm.get(case[0]).self_stack}),
        "entropy": Entropy(),
    }


@functools.cache
def _captured(case: tuple[str, int, str | None], chunk: int | None) -> dict[str, object]:
    """Every reducer filled by one forward inside one capture."""
    name, batch, padding = case
    tiny = tm.get(name)
    reducers = {
        **_statistic_reducers(case),
        "mean_distance": MeanDistance(),
        "argmax": ArgmaxKey(),
        "last_row": LastRow(),
        "full_maps": FullMaps(_full_map_heads(name)),
    }
    with torch.no_grad(), Scope(tiny.model).capture(*reducers.values(), chunk_size=chunk, path="chunked"):
        tiny.model(**tiny.inputs(batch, padding))
    return reducers


@functools.cache
def _kernel_captured(case: tuple[str, int, str | None]) -> tuple[dict[str, object], dict[str, int]]:
    """The reducers that have a kernel form, filled by one forward on the automatic path; and the scope's paths."""
    name, batch, padding = case
    tiny = tm.get(name)
    reducers = {**_statistic_reducers(case), "logit_scale": ref.LogitScale()}
    distance = MeanDistance()  # (on its own: where it sends a call to the chunked path, the others stay)
    paths = []
    for capture in (reducers.values(), (distance,)):
        scope = Scope(tiny.model)
        with torch.no_grad(), scope.capture(*capture):
            tiny.model(**tiny.inputs(batch, padding))
        paths.append(dict(scope.paths))
    return {**reducers, "mean_distance": distance}, paths


def _statistics(case, mode: str) -> dict[str, object]:
    if mode == "kernel":
        return _kernel_captured(case)[0]
    return _captured(case, {"chunk1": 1, "chunk3": 3, "chunked": None}[mode])


def _assert_per_stack(got: dict[str, np.ndarray], statistic, reference: dict[str, object],
                      logit_scale: ref.LogitScale | None = None) -> None:
    """Each stack's result equals ``statistic`` of that stack's eager reference (a call, or a list of calls); on the
    kernel path, to the float32 error of its logits' magnitude too (``logit_scale``): exp(x - L) and L - E_p[x]
    take the difference of two float32 numbers as large as the logits."""
    assert set(got) == set(reference), f"stacks {sorted(got)} != {sorted(reference)}"
    for stack, calls in reference.items():
        assert np.isfinite(statistic(calls)).all(), stack
        floor = ref.kernel_entropy_floor(logit_scale.scale(stack)) if logit_scale is not None else 0.0
        ref.assert_exact(got[stack], statistic, calls, err_msg=f"stack {stack}", floor=floor)


def _calls(reference: dict[str, ref.Call], cross: bool = True) -> dict[str, list[ref.Call]]:
    """One forward's reference as the list of calls the statistics take (without cross-attention: ``cross``)."""
    return {stack: [call] for stack, call in reference.items() if cross or stack != "cross"}


# --- one forward pass ---------------------------------------------------------------------------------


@case_param
@mode_param
def test_key_mass_on_first_token_equals_eager(case, mode):
    statistics = _statistics(case, mode)
    _assert_per_stack(statistics["key_mass"].result(), ref.key_mass, _calls(_reference(case)),
                      statistics.get("logit_scale"))


@case_param
@mode_param
def test_key_mass_on_positions_0_1_2_equals_eager(case, mode):
    statistics = _statistics(case, mode)
    _assert_per_stack(statistics["key_mass_012"].result(), functools.partial(ref.key_mass, positions=(0, 1, 2)),
                      _calls(_reference(case)), statistics.get("logit_scale"))


@case_param
@mode_param
def test_key_mass_with_explicit_key_mask_equals_eager(case, mode):
    stack = tm.get(case[0]).self_stack
    statistics = _statistics(case, mode)
    _assert_per_stack(statistics["key_mass_mask"].result(), functools.partial(ref.key_mass, key_mask=_key_mask(case)),
                      {stack: [_reference(case)[stack]]}, statistics.get("logit_scale"))


@case_param
@mode_param
def test_entropy_equals_eager(case, mode):
    statistics = _statistics(case, mode)
    _assert_per_stack(statistics["entropy"].result(), ref.entropy, _calls(_reference(case)),
                      statistics.get("logit_scale"))


@case_param
@mode_param
def test_mean_distance_equals_eager_on_self_attention_stacks(case, mode):
    _assert_per_stack(_statistics(case, mode)["mean_distance"].result(), ref.mean_distance,
                      _calls(_reference(case), cross=False))


@case_param
@chunk_param
def test_argmax_key_is_the_eager_argmax(case, chunk):
    got = _captured(case, chunk)["argmax"].result()
    reference = _reference(case)
    assert {stack for _, stack, _ in got} == set(reference)
    for stack, call in reference.items():
        for layer, attention in enumerate(call):
            index, value = got[(0, stack, layer)]
            batch, heads, n_queries, _ = attention.probs.shape
            assert index.shape == value.shape == (batch, heads, n_queries)
            real = attention.query_valid[:, None, :].expand(batch, heads, n_queries)
            where = f"{stack} layer {layer}"
            # the engine's key is a maximum of the eager row (ties may go either way), with its probability
            ref.assert_exact(value[real], lambda a, real=real: a.probs.amax(-1)[real], attention, err_msg=where)
            ref.assert_exact(value[real], lambda a, index=index, real=real: a.probs.gather(
                -1, index[..., None].long())[..., 0][real], attention, err_msg=where)


@case_param
@chunk_param
def test_last_row_equals_eager_last_query(case, chunk):
    got = _captured(case, chunk)["last_row"].result()
    reference = _reference(case)
    assert {stack for _, stack, _ in got} == set(reference)
    for stack, call in reference.items():
        for layer, attention in enumerate(call):
            row = got[(0, stack, layer)]
            assert row.shape == attention.probs[:, :, -1, :].shape, f"{stack} layer {layer}"
            real = attention.query_valid[:, -1]  # a right-padded example's last query is padding
            ref.assert_exact(row[real], lambda a, real=real: a.probs[:, :, -1, :][real], attention,
                             err_msg=f"{stack} layer {layer}")


@case_param
@chunk_param
def test_full_maps_equal_eager_for_the_named_heads_only(case, chunk):
    name = case[0]
    got = _captured(case, chunk)["full_maps"].result()
    heads = _full_map_heads(name)
    assert set(got) == {(0, stack, layer, head) for stack, layer, head in heads}
    for stack, layer, head in heads:
        attention = _reference(case)[stack][layer]
        assert got[(0, stack, layer, head)].shape == attention.probs[:, head].shape
        real = attention.query_valid
        ref.assert_exact(got[(0, stack, layer, head)][real], lambda a, head=head, real=real: a.probs[:, head][real],
                         attention, err_msg=f"{stack} layer {layer} head {head}")


@case_param
def test_the_kernel_path_serves_every_call_it_can(case):
    """The kernel-mode tests above measure the kernel path: every call takes it but those it cannot serve."""
    statistics, distance = _kernel_captured(case)[1]
    name = case[0]
    if name in POSITION_BIAS:
        assert all("position bias" in path for path in statistics) and "kernel" not in statistics, statistics
        return
    assert set(statistics) == {"kernel"}, statistics
    assert ("kernel" in distance) == (name not in BIDIRECTIONAL), distance
    assert all(path == "kernel" or "MeanDistance of attention that sees later keys" in path for path in distance)


@pytest.mark.parametrize("name", ["llama", "gemma3", "t5"])
def test_automatic_chunks_under_a_small_budget_equal_eager(name):
    """A budget that fits two query rows: the automatic chunk size splits every call into many chunks."""
    case = (name, 2, tm.get(name).paddings[0])
    reference = _reference(case)
    keys = max(call[0].probs.shape[-1] for call in reference.values())
    budget = 2 * 2 * 4 * keys * 4 * 3  # two rows of (batch 2, 4 heads, keys) float32, three copies
    mass, entropy = KeyMass(), Entropy()
    tiny = tm.get(name)
    scope = Scope(tiny.model)
    with torch.no_grad(), scope.capture(mass, entropy, budget_bytes=budget, path="chunked"):
        tiny.model(**tiny.inputs(2, case[2]))
    _assert_per_stack(mass.result(), ref.key_mass, _calls(reference))
    _assert_per_stack(entropy.result(), ref.entropy, _calls(reference))


def test_t5_decoder_and_encoder_of_equal_length_keep_their_own_padding():
    """Encoder padding must not leak into the decoder's query validity (same shapes, one call)."""
    tiny = tm.get("t5")
    inputs = tiny.inputs(2, "right")
    inputs["decoder_input_ids"] = tm._tokens(2, tm.SEQ, 16)
    inputs["decoder_attention_mask"] = torch.ones(2, tm.SEQ, dtype=torch.long)
    reference = ref.forward_attention(_eager("t5"), "seq2seq", inputs)
    mass = KeyMass()
    with torch.no_grad(), Scope(tiny.model).capture(mass, chunk_size=3):
        tiny.model(**inputs)
    _assert_per_stack(mass.result(), ref.key_mass, _calls(reference))


def test_reference_statistics_differ_between_heads_and_paddings():
    """The comparisons above are discriminating: heads differ, and padding changes the statistics."""
    plain = ref.key_mass([_reference(("llama", 1, None))["self"]])
    assert np.ptp(plain) > 0.05
    left = ref.key_mass([_reference(("llama", 2, "left"))["self"]])
    right = ref.key_mass([_reference(("llama", 2, "right"))["self"]])
    assert np.abs(left - right).max() > 1e-3


# --- generate with a KV cache ---------------------------------------------------------------------------

GENERATE_CASES = [("llama", 1, None), ("llama", 2, "left"), ("gemma3", 1, None), ("gemma3", 2, "left"),
                  ("whisper", 1, None), ("whisper", 2, None)]
generate_param = pytest.mark.parametrize("case", GENERATE_CASES, ids=[_case_id(c) for c in GENERATE_CASES])
NEW_TOKENS = 4


def _generate_inputs(case) -> dict:
    name, batch, padding = case
    inputs = tm.get(name).inputs(batch, padding)
    if name == "whisper":  # the decoder starts from its start token
        inputs = {"input_features": inputs["input_features"]}
    return inputs


@functools.cache
def _generated(case, chunk: int | str | None):
    """Reducers filled during greedy generation, the generated sequences and the eager replay. ``chunk`` is the
    chunked path's chunk size, or "kernel": the reducers that have a kernel form, on the automatic path."""
    name = case[0]
    tiny = tm.get(name)
    inputs = _generate_inputs(case)
    reducers = {"key_mass": KeyMass(), "key_mass_012": KeyMass(positions=(0, 1, 2)), "entropy": Entropy(),
                "mean_distance": MeanDistance()}
    options = {"path": "auto"} if chunk == "kernel" else {"chunk_size": chunk, "path": "chunked"}
    if chunk == "kernel":
        reducers["logit_scale"] = ref.LogitScale()
    else:
        reducers.update(last_row=LastRow(), argmax=ArgmaxKey(last_only=True))
    scope = Scope(tiny.model)
    with torch.no_grad(), scope.capture(*reducers.values(), **options):
        out = tiny.model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                                  return_dict_in_generate=True)
    if chunk == "kernel":  # every decoder call on the kernel path (Whisper's encoder: mean distance needs rows)
        assert scope.paths["kernel"] > 0 and all("MeanDistance" in path for path in scope.paths if path != "kernel")
    sequences = out.sequences
    if name == "whisper":
        inputs = {**inputs, "decoder_input_ids": sequences[:, :1]}
    replay = ref.decoding_attention(_eager(name), tiny.kind, inputs, sequences)
    return reducers, sequences, replay


@generate_param
@pytest.mark.parametrize("chunk", (3, None), ids=_chunk_id)
def test_last_row_of_each_decode_step_equals_eager_with_cache(case, chunk):
    reducers, _, replay = _generated(case, chunk)
    rows = reducers["last_row"].result()
    for stack, calls in replay.items():
        # the prompt, then one call per new token but the last; the encoder runs once
        assert len(calls) == (1 if stack == "encoder" else NEW_TOKENS)
        for call_index, call in enumerate(calls):
            for layer, attention in enumerate(call):
                where = f"{stack} call {call_index} layer {layer}"
                row = rows[(call_index, stack, layer)]
                ref.assert_exact(row, lambda a: a.probs[:, :, -1], attention, err_msg=where)


@generate_param
@pytest.mark.parametrize("chunk", (3, None, "kernel"), ids=lambda c: c if c == "kernel" else _chunk_id(c))
def test_statistics_accumulated_over_generate_equal_eager_with_cache(case, chunk):
    reducers, _, replay = _generated(case, chunk)
    checks = {
        "key_mass": ref.key_mass,
        "key_mass_012": functools.partial(ref.key_mass, positions=(0, 1, 2)),
        "entropy": ref.entropy,
    }
    for label, statistic in checks.items():
        _assert_per_stack(reducers[label].result(), statistic, replay,
                          reducers.get("logit_scale") if label == "entropy" else None)
    _assert_per_stack(reducers["mean_distance"].result(), ref.mean_distance,
                      {stack: calls for stack, calls in replay.items() if stack != "cross"})


@generate_param
def test_argmax_of_the_last_query_per_step_is_the_eager_argmax(case):
    reducers, _, replay = _generated(case, 3)
    got = reducers["argmax"].result()
    for stack, calls in replay.items():
        for call_index, call in enumerate(calls):
            for layer, attention in enumerate(call):
                index, value = got[(call_index, stack, layer)]
                assert index.shape == (*attention.probs.shape[:2], 1)
                ref.assert_exact(value[..., 0], lambda a: a.probs[:, :, -1].amax(-1), attention)
                ref.assert_exact(value[..., 0], lambda a, index=index: a.probs[:, :, -1].gather(
                    -1, index.long())[..., 0], attention)


@pytest.mark.parametrize("case", [("gemma3", 1, None), ("gemma3", 2, "left")], ids=_case_id)
def test_sliding_window_decode_steps_see_only_the_window(case):
    """Gemma3's sliding layers decode against a cache of the last ``window`` keys: the first token has
    left it, so its mass there is 0 while the full-attention layer still sees it."""
    _, sequences, replay = _generated(case, 3)
    window = tm.get("gemma3").extra["sliding_window"]
    decode_steps = replay["self"][1:]
    assert all(step[0].probs.shape[-1] == window and step[1].probs.shape[-1] > window for step in decode_steps)
    mass = ref.key_mass(decode_steps)
    assert np.all(mass[[0, 2]] == 0) and np.all(mass[1] > 0)
    assert sequences.shape[1] == tm.SEQ + NEW_TOKENS


@pytest.mark.parametrize("path", ["auto", "chunked"])
@pytest.mark.parametrize("case", [("gemma3", 1, None), ("gemma3", 2, "left")], ids=_case_id)
def test_a_capture_that_begins_after_the_prefill_places_the_sliding_window_keys(case, path):
    """Decode steps captured without their prefill: the sliding layers' caches have dropped the first tokens,
    and the cache's length with the attention mask places the keys that are left (mass on the first three
    tokens is 0 there once they have left the window, and equals eager attention's in every layer)."""
    _, sequences, replay = _generated(case, 3)
    tiny = tm.get(case[0])
    inputs = _generate_inputs(case)
    prompt = inputs["input_ids"].shape[1]
    full_mask = torch.cat([inputs["attention_mask"], torch.ones(case[1], sequences.shape[1] - prompt,
                                                                dtype=inputs["attention_mask"].dtype)], 1)
    mass, first = KeyMass(positions=(0, 1, 2)), KeyMass()
    with torch.no_grad():
        out = tiny.model(**inputs, use_cache=True)  # the prefill, before the capture
        cache = output_cache(out)
        with Scope(tiny.model).capture(mass, first, path=path):
            for position in range(prompt, sequences.shape[1] - 1):
                out = tiny.model(input_ids=sequences[:, position:position + 1],
                                 attention_mask=full_mask[:, :position + 1], use_cache=True,
                                 **cache_kwargs(tiny.model, cache))
                cache = output_cache(out)
    decode_steps = {"self": replay["self"][1:]}
    _assert_per_stack(mass.result(), functools.partial(ref.key_mass, positions=(0, 1, 2)), decode_steps)
    _assert_per_stack(first.result(), ref.key_mass, decode_steps)
    assert np.all(first.result()["self"][[0, 2]] == 0) and np.all(first.result()["self"][1] > 0)
