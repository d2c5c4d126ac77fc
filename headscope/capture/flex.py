"""Entropy in the model's own attention call on CPU: one FlexAttention call gives the output, the row log-sum-exp
L_t and E_p[k].

The kernel path's entropy, L_t - scale * q_t . E_p[k], needs E_p[k]: the kernel's output with the keys as values.
PyTorch's CPU flash kernel wants the values as wide as the keys, so that takes a second call, as costly as the
model's own. FlexAttention takes any value width, so one call can weigh the values and the keys together,
[v_s | k_s], but on CPU it returns no log-sum-exp. One more key gives it back: a key at index T, seen by every
query, whose logit is the query's logit on its own key, c_t = x_tt, and whose value is the indicator e (zero
elsewhere). In that call each real key has probability p_ts (1 - d_t) and the extra key d_t = e^c_t / (e^c_t +
e^L_t), so

    output = O'_t[v] / (1 - d_t),   E_p[k] = O'_t[k] / (1 - d_t),   L_t = c_t + log(1 - d_t) - log d_t.

Since L_t >= x_tt, d_t <= 1/2: 1 - d_t keeps its float32 precision, and log d_t is as precise as d_t (relative
float32 error, down to 1e-30). A query whose own key is below 1e-30 of its row's mass is the one case this form
cannot serve (``None``: the caller makes the two calls instead).

This is for self-attention over its own tokens in float32 without a mask (causal, or every key seen), from
``FUSED_FROM`` keys on: FlexAttention compiles once per sequence length (a few seconds, with a C++ compiler),
which pays only on long sequences. The model's attention output then comes from FlexAttention instead of SDPA's
flash kernel: the same to float32 rounding.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

# Keys from which "auto" fuses entropy into the model's attention call (CPU, float32, no mask).
FUSED_FROM = 4096
# The least probability of a query's own key the one-call form serves: far above float32's smallest normal
# (1.2e-38), so that log d_t keeps the float32 precision of d_t.
LEAST_OWN = 1e-30
# Sequence lengths compiled per process before refusing (each compiles its own kernel).
MOST_LENGTHS = 64


class FlexRefused(RuntimeError):
    """FlexAttention could not compile or run the call (no C++ compiler, an unsupported shape)."""


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, own: torch.Tensor, block_mask,
            scale: float) -> torch.Tensor:
    extra = key.shape[2] - 1

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(kv_idx == extra, own[b, h, q_idx], score)

    return flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, enable_gqa=True,
                          scale=scale)


@functools.cache
def _compiled():
    return torch.compile(_attend, dynamic=False, fullgraph=True)


@functools.lru_cache(maxsize=4)
def _causal_mask(n: int):
    """Causal over the n real keys, and the extra key at index n seen by every query."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx == n)

    return create_block_mask(mask_mod, None, None, n, n + 1, device="cpu")


def _first_line(error: BaseException) -> str:
    """The innermost cause of a compiler's error, in one line."""
    while error.__cause__ is not None or getattr(error, "inner_exception", None) is not None:
        error = getattr(error, "inner_exception", None) or error.__cause__
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {first}"


def entropy_call(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(output (B, H, T, Dv), L (B, H, T), E_p[k] (B, H, T, D)) of self-attention over its own T tokens, float32,
    from one FlexAttention call; None where a query's own key is too unlikely for this form (see the module).

    ``key`` and ``value`` may have fewer heads than ``query`` (grouped-query attention). Raises ``FlexRefused``
    when FlexAttention cannot compile or run the call."""
    batch, heads, n, head_dim = query.shape
    kv_heads, value_dim = key.shape[1], value.shape[-1]
    grouped = query.view(batch, kv_heads, heads // kv_heads, n, head_dim)
    own = (scale * torch.linalg.vecdot(grouped, key[:, :, None])).reshape(batch, heads, n)
    keys = torch.cat([key, key.new_zeros(batch, kv_heads, 1, head_dim)], dim=2)
    values = key.new_zeros(batch, kv_heads, n + 1, value_dim + head_dim + 1)
    values[:, :, :n, :value_dim] = value
    values[:, :, :n, value_dim:-1] = key
    values[:, :, n, -1] = 1.0
    try:
        with torch._dynamo.config.patch(recompile_limit=MOST_LENGTHS, fail_on_recompile_limit_hit=True), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # (PyTorch's compiler imports its own deprecated parts)
            weighed = _compiled()(query, keys, values, own, _causal_mask(n) if causal else None, scale)
    except Exception as error:  # compilation fails in many ways: each is reported, none is hidden
        raise FlexRefused(_first_line(error)) from error
    extra = weighed[..., -1]
    if not bool((extra >= LEAST_OWN).all()):
        return None
    rest = 1.0 - extra
    output = weighed[..., :value_dim] / rest[..., None]
    expected_key = weighed[..., value_dim:-1] / rest[..., None]
    lse = own + torch.log(rest) - torch.log(extra)
    return output, lse, expected_key
