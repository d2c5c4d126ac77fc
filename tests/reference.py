"""Reference attention statistics from eager ``output_attentions=True``, written plainly, and the float32
tolerance every exactness test compares with.

Nothing here reuses headscope's reducers: the attention maps come from transformers' own eager attention
(on a deep copy of the model switched to ``"eager"``) and every statistic is a loop over examples and
queries with explicit masks, in float64.

A stack's attention in one model call is a list of :class:`LayerAttention`, one per layer; a capture over
several calls (``generate``) is a list of those.

Tolerance. Each eager map is computed twice: by the float32 model (``probs``, what users run) and by a float64
twin of it on the same inputs (``exact``). A float32 result is compared with the exact value, to within
:data:`SLACK` times the float32 error that eager attention itself makes on that very computation,
``max |eager32 - eager64|`` over the values compared (:func:`float32_tolerance`). That error is what float32
precision costs here: it grows with the logits' magnitude (T5 does not scale them, sharpened weights make them
large), with the number of keys and with depth, and it changes with the thread count; a fixed number tuned on one
machine does not. Float32's resolution at the values' magnitude (``eps * max(1, |value|)``) is the floor.
"""

from __future__ import annotations

import copy
import dataclasses
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from headscope.capture.reducers import Reducer
from headscope.models.cache import cache_kwargs, output_cache


@dataclass
class LayerAttention:
    """The eager attention of one layer in one call and what each query and key is.

    Attributes:
        probs: (B, H, Tq, Tk) float64.
        query_valid: (B, Tq) bool, the query is a real token.
        key_valid: (B, Tk) bool, the key is a real token.
        query_pos: (Tq,) absolute position of each query in its sequence (self-attention), None for cross.
        key_pos: (Tk,) absolute position of each key (a sliding-window cache holds only the latest keys).
        first: (B,) absolute position of each example's first real key.
        exact: (B, H, Tq, Tk) float64, the same map from the float64 twin of the model (None until paired).
    """

    probs: torch.Tensor
    query_valid: torch.Tensor
    key_valid: torch.Tensor
    query_pos: torch.Tensor | None
    key_pos: torch.Tensor
    first: torch.Tensor
    exact: torch.Tensor | None = None


Call = list[LayerAttention]


def eager_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that runs transformers' eager attention everywhere (a model whose attention predates
    transformers' interface, such as Falcon, reads the implementation from its configs at each call)."""
    from transformers import PreTrainedModel

    eager = copy.deepcopy(model)
    if eager._can_set_attn_implementation():
        eager.set_attn_implementation("eager")
    else:
        for module in eager.modules():
            if isinstance(module, PreTrainedModel):
                module.config._attn_implementation_internal = "eager"
    return eager


# --- float32 tolerance ------------------------------------------------------------------------------------------

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
SLACK = 4.0
"""headscope's float32 result may differ from the exact value by this many times eager float32's own error: both
round the same operations in another order (query chunks, a fused kernel's log-sum-exp), so their errors are of one
size, and a factor covers one being a few times the other at the worst element."""

_TWINS: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def float64_twin(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` (made once per model): the same weights, exactly, and the same attention.

    Many eager attentions take their softmax in float32, where float64's mask value becomes -inf: a padding query,
    whose row is all masked, then gets NaN probabilities, and its NaN value vector would reach real queries as
    0 * NaN. Every module's outputs have NaN set to 0 in the twin, so a padding position stays harmless, as it is in
    float32; real rows never hold NaN, and the statistics skip padding queries.

    Mixture-of-experts layers run transformers' ``"eager"`` experts (a loop over experts, the same sums) in the twin:
    torch's ``grouped_mm`` has no float64 kernel."""
    if model not in _TWINS:
        twin = copy.deepcopy(model).double()
        if getattr(getattr(twin, "config", None), "_experts_implementation", None) == "grouped_mm":
            twin.set_experts_implementation("eager")
        for module in twin.modules():
            module.register_forward_hook(_nan_to_zero)
        _TWINS[model] = twin
    return _TWINS[model]


def _nan_to_zero(module: nn.Module, args: Any, output: Any) -> Any:
    if torch.is_tensor(output) and output.is_floating_point():
        return output.nan_to_num(nan=0.0)
    if isinstance(output, tuple) and not hasattr(output, "keys"):
        return tuple(_nan_to_zero(module, args, item) for item in output)
    return output


def in_float64_default(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` with float64 as torch's default dtype: tensors the model makes on the fly (XGLM's clamp
    value, made with ``torch.full``) then match the twin's float64 weights."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return function(*args)
    finally:
        torch.set_default_dtype(before)


def float64_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` with floating tensors (pixels, audio features, embeddings) in float64, the rest as they are."""
    return {name: value.double() if torch.is_tensor(value) and value.is_floating_point() else value
            for name, value in inputs.items()}


def float32_tolerance(want: Any, exact: Any, floor: float = 0.0) -> float:
    """The absolute tolerance for a float32 result whose exact value is ``exact``: :data:`SLACK` times the largest
    of eager float32's own error on the same computation (``max |want - exact|``, ``want`` being eager float32's
    result), ``floor`` and float32's resolution at the values' magnitude."""
    want, exact = _numpy(want), _numpy(exact)
    finite = np.isfinite(exact) & np.isfinite(want)
    if not finite.any():
        return 0.0
    error = float(np.abs(want[finite] - exact[finite]).max())
    resolution = FLOAT32_EPS * max(1.0, float(np.abs(exact[finite]).max()))
    return SLACK * max(error, floor, resolution)


def assert_matches_eager(got: Any, want: Any, exact: Any, err_msg: str = "", floor: float = 0.0) -> None:
    """``got`` (headscope, float32) equals eager attention: the exact value ``exact`` (the float64 twin's), to
    :func:`float32_tolerance` of eager float32's own result ``want``; NaN where the reference has NaN."""
    got, want, exact = _numpy(got), _numpy(want), _numpy(exact)
    assert got.shape == exact.shape == want.shape, (got.shape, exact.shape, want.shape, err_msg)
    np.testing.assert_allclose(got, exact, rtol=0, atol=float32_tolerance(want, exact, floor), err_msg=err_msg)


def assert_exact(got: Any, statistic: Callable[..., Any], *args: Any, err_msg: str = "", floor: float = 0.0,
                 **kwargs: Any) -> None:
    """``got`` equals ``statistic(*args, **kwargs)`` of eager attention (``args`` holding :class:`LayerAttention`
    references, alone or in lists and dicts), to the float32 tolerance of that statistic: it is computed on the
    float32 maps and on the exact ones (:func:`in_float64`).

    A statistic that averages many probabilities can land, by cancellation, much nearer the exact value in eager
    float32 than its worst term: the floor of the tolerance is then the maps' own largest float32 error (a mean of
    shares is never further off than its worst share), so that a summation in another order (headscope's chunks,
    another CPU's kernels) is not held to eager's lucky cancellation. ``floor`` raises it further, for a
    computation whose own float32 error is known to be larger (:func:`kernel_entropy_floor`)."""
    shares = _map_error([args, kwargs]) if _shares(statistic) else 0.0
    assert_matches_eager(got, statistic(*args, **kwargs), statistic(*in_float64(args), **in_float64(kwargs)),
                         err_msg=err_msg, floor=max(floor, shares))


class LogitScale(Reducer):
    """The largest |L_t| (row log-sum-exp) over valid queries per stack and layer, as the kernel path sees it:
    the magnitude of the logits, which sets the float32 error of the kernel path's entropy."""

    kernel = True

    def __init__(self) -> None:
        super().__init__()
        self.largest: dict[str, float] = {}

    def update(self, chunk) -> None:  # (the chunked path: its entropy does not depend on it)
        pass

    def update_kernel(self, call) -> None:
        largest = float(torch.where(call.query_valid[:, None, :], call.lse.abs(), 0).max())
        self.largest[call.site.stack] = max(largest, self.largest.get(call.site.stack, 0.0))

    def scale(self, stack: str) -> float:
        """The largest |L_t| of ``stack`` (and of the stacks named after it, "self:..."); 0 if none was seen."""
        return max((v for name, v in self.largest.items() if name.split(":")[0] == stack.split(":")[0]),
                   default=0.0)


def kernel_entropy_floor(scale: float) -> float:
    """The float32 error of the kernel path's entropy L_t - E_p[x] at logits of magnitude ``scale``: L_t is held
    in float32 (resolution eps |L_t|), and E_p[x] = scale q . E_p[k] rounds like a logit of the same magnitude."""
    return 2 * FLOAT32_EPS * scale


def _shares(statistic: Callable[..., Any]) -> bool:
    """Whether ``statistic`` is a mean of attention shares (its error is at most its worst share's)."""
    return getattr(statistic, "__name__", "") in ("key_mass", "sink_mass", "received")


def _map_error(value: Any) -> float:
    """The largest ``|probs - exact|`` of the :class:`LayerAttention` maps in ``value`` (lists, tuples, dicts)."""
    if isinstance(value, LayerAttention):
        if value.exact is None:
            return 0.0
        difference = (value.probs - value.exact).abs()
        finite = torch.isfinite(difference)
        return float(difference[finite].max()) if finite.any() else 0.0
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return max((_map_error(item) for item in value), default=0.0)
    return 0.0


def in_float64(reference: Any) -> Any:
    """``reference`` (a :class:`LayerAttention`, or lists, tuples and dicts holding them) with every map replaced
    by its float64 twin's; anything else as it is."""
    if isinstance(reference, LayerAttention):
        assert reference.exact is not None, "a reference without its float64 twin: build it with forward_attention"
        return dataclasses.replace(reference, probs=reference.exact)
    if isinstance(reference, list | tuple):
        return type(reference)(in_float64(item) for item in reference)
    if isinstance(reference, dict):
        return {key: in_float64(value) for key, value in reference.items()}
    return reference


def _numpy(value: Any) -> np.ndarray:
    if torch.is_tensor(value):
        return value.detach().double().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def _paired(float32: Any, float64: Any) -> Any:
    """The references of the float32 run with the float64 run's maps as their ``exact`` (same structure)."""
    if isinstance(float32, LayerAttention):
        assert float32.probs.shape == float64.probs.shape
        return dataclasses.replace(float32, exact=float64.probs)
    if isinstance(float32, list):
        assert len(float32) == len(float64)
        return [_paired(a, b) for a, b in zip(float32, float64, strict=True)]
    assert set(float32) == set(float64)
    return {key: _paired(value, float64[key]) for key, value in float32.items()}


def _first_real(mask: torch.Tensor) -> torch.Tensor:
    firsts = []
    for row in mask.bool():
        firsts.append(int(torch.nonzero(row)[0, 0]))
    return torch.tensor(firsts)


def make_call(maps, query_mask, key_mask, cross: bool = False, query_start: int = 0,
              key_positions: list[torch.Tensor] | None = None) -> Call:
    """Wrap eager maps (one (B, H, Tq, Tk) tensor per layer) of a stack with the masks of its tokens.

    ``query_mask`` (B, Tq_total) and ``key_mask`` (B, Tk_total) are the 0/1 masks over whole sequences;
    the call's queries are positions ``query_start ...``; its keys are positions ``key_positions[layer]``
    (default ``0 ... Tk - 1``).
    """
    call = []
    for layer, probs in enumerate(maps):
        _, _, n_queries, n_keys = probs.shape
        key_pos = torch.arange(n_keys) if key_positions is None else key_positions[layer]
        query_pos = torch.arange(query_start, query_start + n_queries)
        call.append(LayerAttention(
            probs=probs.detach().double(),
            query_valid=query_mask[:, query_pos].bool(),
            key_valid=key_mask[:, key_pos].bool(),
            query_pos=None if cross else query_pos,
            key_pos=key_pos,
            first=_first_real(key_mask),
        ))
    return call


def forward_attention(eager: nn.Module, kind: str, inputs: dict) -> dict[str, Call]:
    """One eager forward with ``output_attentions=True``; per stack, its attention and token masks, each map
    paired with its float64 twin's."""
    return _paired(_forward_attention(eager, kind, inputs),
                   in_float64_default(_forward_attention, float64_twin(eager), kind, float64_inputs(inputs)))


def _forward_attention(eager: nn.Module, kind: str, inputs: dict) -> dict[str, Call]:
    with torch.no_grad():
        out = eager(**inputs, output_attentions=True)
    if kind in ("decoder", "encoder", "vision", "vlm"):
        first_input = inputs.get("input_ids", inputs.get("pixel_values"))
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones(first_input.shape[0], out.attentions[0].shape[-1], dtype=torch.long)
        # a hybrid model lists its attention layers alone (or None for the others)
        maps = [m for m in out.attentions if m is not None and m.shape[-2] == mask.shape[1]]
        stacks = {"self": make_call(maps, mask, mask)}
        if kind == "vlm":
            with torch.no_grad():
                vision = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True)
            ones = torch.ones(vision.attentions[0].shape[0], vision.attentions[0].shape[-1], dtype=torch.long)
            stacks["vision"] = make_call(vision.attentions, ones, ones)
        return stacks
    encoder_tokens = out.encoder_attentions[0].shape[-1]
    batch = out.encoder_attentions[0].shape[0]
    encoder_mask = inputs.get("attention_mask")
    if encoder_mask is None:
        encoder_mask = torch.ones(batch, encoder_tokens, dtype=torch.long)
    decoder_mask = inputs.get("decoder_attention_mask")
    if decoder_mask is None:
        decoder_mask = torch.ones(batch, out.decoder_attentions[0].shape[-1], dtype=torch.long)
    return {
        "encoder": make_call(out.encoder_attentions, encoder_mask, encoder_mask),
        "decoder": make_call(out.decoder_attentions, decoder_mask, decoder_mask),
        "cross": make_call(out.cross_attentions, decoder_mask, encoder_mask, cross=True),
    }


def decoding_attention(eager: nn.Module, kind: str, inputs: dict, sequences: torch.Tensor) -> dict[str, list[Call]]:
    """Eager attention of greedy decoding replayed step by step with a KV cache.

    ``sequences`` is what ``generate`` returned (prompt and new tokens for a decoder-only model, decoder
    tokens for an encoder-decoder). The prompt is one call, then each new token but the last is one call
    of one query, as ``generate`` does. Each map is paired with its float64 twin's.
    """
    return _paired(_decoding_attention(eager, kind, inputs, sequences),
                   in_float64_default(_decoding_attention, float64_twin(eager), kind, float64_inputs(inputs),
                                      sequences))


def _decoding_attention(eager: nn.Module, kind: str, inputs: dict, sequences: torch.Tensor) -> dict[str, list[Call]]:
    with torch.no_grad():
        if kind == "decoder":
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            prompt = ids.shape[1]
            full_mask = torch.cat([mask, torch.ones(ids.shape[0], sequences.shape[1] - prompt,
                                                    dtype=mask.dtype)], 1)
            out = eager(**inputs, output_attentions=True, use_cache=True)
            calls = [make_call(out.attentions, full_mask, full_mask)]
            cache = output_cache(out)
            for position in range(prompt, sequences.shape[1] - 1):
                out = eager(input_ids=sequences[:, position:position + 1],
                            attention_mask=full_mask[:, :position + 1], use_cache=True, output_attentions=True,
                            **cache_kwargs(eager, cache))
                cache = output_cache(out)
                calls.append(make_call(out.attentions, full_mask, full_mask, query_start=position,
                                       key_positions=_cached_key_positions(out.attentions, position)))
            return {"self": calls}
        # encoder-decoder: the encoder runs once, the decoder one token at a time after its prompt
        start = inputs["decoder_input_ids"].shape[1]
        prefix = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
        out = eager(**prefix, decoder_input_ids=sequences[:, :start], output_attentions=True, use_cache=True)
        batch = sequences.shape[0]
        encoder_mask = torch.ones(batch, out.encoder_attentions[0].shape[-1], dtype=torch.long)
        decoder_mask = torch.ones(batch, sequences.shape[1], dtype=torch.long)
        stacks = {
            "encoder": [make_call(out.encoder_attentions, encoder_mask, encoder_mask)],
            "decoder": [make_call(out.decoder_attentions, decoder_mask, decoder_mask)],
            "cross": [make_call(out.cross_attentions, decoder_mask, encoder_mask, cross=True)],
        }
        encoder_outputs = (out.encoder_last_hidden_state,)
        cache = output_cache(out)
        for position in range(start, sequences.shape[1] - 1):
            out = eager(encoder_outputs=encoder_outputs, decoder_input_ids=sequences[:, position:position + 1],
                        use_cache=True, output_attentions=True, **cache_kwargs(eager, cache))
            cache = output_cache(out)
            stacks["decoder"].append(make_call(out.decoder_attentions, decoder_mask, decoder_mask,
                                               query_start=position))
            stacks["cross"].append(make_call(out.cross_attentions, decoder_mask, encoder_mask, cross=True,
                                             query_start=position))
        return stacks


def _cached_key_positions(maps, position: int) -> list[torch.Tensor]:
    """Absolute positions of the keys of a one-query decode step: a sliding-window layer's cache holds
    only the latest keys, ending at the query itself."""
    return [torch.arange(position + 1 - m.shape[-1], position + 1) for m in maps]


# --- statistics -------------------------------------------------------------------------------------


def _empty(calls: list[Call]) -> tuple[np.ndarray, np.ndarray]:
    layers, heads = len(calls[0]), calls[0][0].probs.shape[1]
    return np.zeros((layers, heads)), np.zeros((layers, heads))


def _in_set(layer: LayerAttention, b: int, absolute: int, positions, key_mask) -> bool:
    """Whether the key at absolute position ``absolute`` of example ``b`` is in the set S."""
    if key_mask is not None:
        return bool(key_mask[b, absolute])
    where = torch.nonzero(layer.key_pos == absolute)
    if len(where) == 0 or not bool(layer.key_valid[b, int(where[0, 0])]):
        return False
    return absolute - int(layer.first[b]) in positions


def key_mass(calls: list[Call], positions=(0,), key_mask: torch.Tensor | None = None,
             exclude_own: bool = True) -> np.ndarray:
    """Mean over real queries of the attention on S: the keys at ``positions`` after each example's
    first real token, or where ``key_mask`` (B, absolute positions) is True. Queries in S are skipped
    (self-attention, ``exclude_own``)."""
    sums, counts = _empty(calls)
    for call in calls:
        for layer_index, layer in enumerate(call):
            batch, _, n_queries, n_keys = layer.probs.shape
            for b in range(batch):
                in_set = torch.tensor([_in_set(layer, b, int(layer.key_pos[k]), positions, key_mask)
                                       for k in range(n_keys)], dtype=torch.float64)
                for t in range(n_queries):
                    if not layer.query_valid[b, t]:
                        continue
                    if exclude_own and layer.query_pos is not None and _in_set(
                            layer, b, int(layer.query_pos[t]), positions, key_mask):
                        continue
                    sums[layer_index] += (layer.probs[b, :, t, :] * in_set).sum(-1).numpy()
                    counts[layer_index] += 1
    return sums / counts


def _mean_over_real_queries(calls: list[Call], row_value) -> np.ndarray:
    """Mean over every real query of ``row_value(layer, b, t)``, an (H,) tensor, per layer."""
    sums, counts = _empty(calls)
    for call in calls:
        for index, layer in enumerate(call):
            for b in range(layer.probs.shape[0]):
                for t in range(layer.probs.shape[2]):
                    if layer.query_valid[b, t]:
                        sums[index] += row_value(layer, b, t).numpy()
                        counts[index] += 1
    return sums / counts


def _entropy(p: torch.Tensor) -> torch.Tensor:
    logs = torch.where(p > 0, p.clamp_min(1e-300).log(), torch.zeros_like(p))
    return -(p * logs).sum(-1)


def entropy(calls: list[Call]) -> np.ndarray:
    """Mean over real queries of -sum_k p log p (nats)."""
    return _mean_over_real_queries(calls, lambda layer, b, t: _entropy(layer.probs[b, :, t, :]))


def mean_distance(calls: list[Call]) -> np.ndarray:
    """Mean over real queries of sum_k p |pos(query) - pos(key)| (self-attention only)."""
    return _mean_over_real_queries(calls, lambda layer, b, t: (
        layer.probs[b, :, t, :] * (layer.query_pos[t] - layer.key_pos).abs().double()).sum(-1))


# --- sinks ------------------------------------------------------------------------------------------------


def sees(layer: LayerAttention, b: int, t: int, k: int, causal: bool, window: int | None) -> bool:
    """Whether query ``t`` of example ``b`` may attend to key ``k`` (indices on the call's axes): a real key,
    not in the future of a causal stack, within a sliding window of ``window`` positions."""
    if not bool(layer.key_valid[b, k]):
        return False
    if layer.query_pos is None:  # cross-attention sees every real source token
        return True
    query, key = int(layer.query_pos[t]), int(layer.key_pos[k])
    if causal and key > query:
        return False
    return window is None or query - key < window


def sink_mass(calls: list[Call], positions=(0,), exclude_own: bool = True, causal: bool = True,
              windows: list[int | None] | None = None) -> np.ndarray:
    """Mean over real queries that can see a key of S (and, with ``exclude_own``, are not in S) of the
    attention on S; S = ``positions`` after each example's first real token. ``windows[layer]`` is the
    layer's sliding window (None: full attention)."""
    sums, counts = _empty(calls)
    for call in calls:
        for index, layer in enumerate(call):
            window = windows[index] if windows else None
            batch, _, n_queries, n_keys = layer.probs.shape
            for b in range(batch):
                in_s = [k for k in range(n_keys) if bool(layer.key_valid[b, k])
                        and int(layer.key_pos[k]) - int(layer.first[b]) in positions]
                for t in range(n_queries):
                    if not layer.query_valid[b, t]:
                        continue
                    if exclude_own and layer.query_pos is not None and \
                            int(layer.query_pos[t]) - int(layer.first[b]) in positions:
                        continue
                    if not any(sees(layer, b, t, k, causal, window) for k in in_s):
                        continue
                    sums[index] += layer.probs[b, :, t, in_s].sum(-1).numpy()
                    counts[index] += 1
    return sums / counts


def residual_mass(calls: list[Call]) -> np.ndarray:
    """Mean over real queries of 1 - sum_k p."""
    return _mean_over_real_queries(calls, lambda layer, b, t: 1 - layer.probs[b, :, t, :].sum(-1))


def received(calls: list[Call], causal: bool = True,
             windows: list[int | None] | None = None) -> dict[int, np.ndarray]:
    """Per layer, (B, positions): the attention each key position (after the example's first real token)
    receives, averaged over heads and over the real queries that can see it, itself left out; NaN where
    no query counts."""
    layers = len(calls[0])
    sums: dict[int, dict[tuple[int, int], float]] = {i: {} for i in range(layers)}
    counts: dict[int, dict[tuple[int, int], float]] = {i: {} for i in range(layers)}
    for call in calls:
        for index, layer in enumerate(call):
            window = windows[index] if windows else None
            batch, heads, n_queries, n_keys = layer.probs.shape
            for b in range(batch):
                for k in range(n_keys):
                    position = int(layer.key_pos[k]) - int(layer.first[b])
                    if position < 0 or not bool(layer.key_valid[b, k]):
                        continue
                    for t in range(n_queries):
                        own = layer.query_pos is not None and int(layer.query_pos[t]) == int(layer.key_pos[k])
                        if not layer.query_valid[b, t] or own or not sees(layer, b, t, k, causal, window):
                            continue
                        key = (b, position)
                        sums[index][key] = sums[index].get(key, 0.0) + float(layer.probs[b, :, t, k].sum())
                        counts[index][key] = counts[index].get(key, 0.0) + heads
    out = {}
    for index in range(layers):
        batch = calls[0][index].probs.shape[0]
        width = max((p for _, p in counts[index]), default=-1) + 1
        table = np.full((batch, width), np.nan)
        for (b, position), count in counts[index].items():
            table[b, position] = sums[index][(b, position)] / count
        out[index] = table
    return out


def filtered_entropy(calls: list[Call], exclude: torch.Tensor) -> np.ndarray:
    """Mean over real queries of the entropy of the row renormalised over real keys outside ``exclude``
    (B, keys): p~ = p / sum of p over those keys."""

    def row_value(layer: LayerAttention, b: int, t: int) -> torch.Tensor:
        keep = layer.key_valid[b].bool() & ~exclude[b, : layer.probs.shape[-1]].bool()
        p = layer.probs[b, :, t, keep]
        return _entropy(p / p.sum(-1, keepdim=True))

    return _mean_over_real_queries(calls, row_value)
