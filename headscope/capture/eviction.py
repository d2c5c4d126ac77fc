"""KV-cache eviction policies, simulated as a per-head restriction of the keys each query may see.

A policy says which keys a KV cache keeps for each query: the last ``window`` positions (the query itself included)
and the first ``sinks`` tokens of each example (StreamingLLM, Xiao et al. 2024, "Efficient Streaming Language Models
with Attention Sinks"); heads named in ``full_heads`` keep every key (DuoAttention's retrieval heads, Xiao et al.
2025). Passed to :meth:`headscope.Scope.capture` (``eviction=``), it acts inside headscope's attention function: the
keys it evicts are hidden from the query on every path (SDPA's mask, the fused kernel's bias, the chunked path's
logits), on top of the model's own mask (padding, causality, a sliding window of its own). A masked forward pass
equals decoding token by token with a cache that evicts those keys, the keys keeping their original positions.

:class:`EvictedMass` measures, under the attention the capture computes (full attention, when no policy is applied),
how much of each head's attention falls on the keys a policy would evict.

    policy = Eviction(window=256, sinks=4)
    with Scope(model).capture(eviction=policy):
        logits = model(**inputs).logits  # the model as a sinks + window cache would run it
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from headscope.capture.adapters import Stack
from headscope.capture.reducers import Chunk, KernelCall, Reducer
from headscope.errors import HeadscopeError


@dataclass(frozen=True, eq=False)
class Eviction:
    """Which keys each query of one self-attention stack keeps.

    Query t keeps key s when t - s < ``window`` (keys after t are the model's own business: a causal mask hides
    them), or s is one of the first ``sinks`` real tokens of the example, or the head is in ``full_heads``.
    Positions count from each example's first real token, so padding moves nothing. Padding queries keep the model's
    own row (their outputs are never read, and a row with no key would not be finite).

    Attributes:
        window: recent keys kept, the query's own included; None keeps every key (full attention).
        sinks: the first tokens of each example kept whatever the window (StreamingLLM keeps 4).
        full_heads: (layers, heads) bool of the stack's query heads that keep every key (DuoAttention's retrieval
            heads): a tensor, an array or nested lists of bools or 0/1, kept as a CPU bool tensor; None: every head
            follows the policy.
        stack: the self-attention stack the policy acts on.
    """

    window: int | None = None
    sinks: int = 0
    full_heads: torch.Tensor | None = None
    stack: str = "self"

    def __post_init__(self) -> None:
        if self.window is not None and (not _is_count(self.window) or self.window < 1):
            raise HeadscopeError(f"an eviction window keeps at least 1 key (the query's own), a whole number; got "
                                 f"{self.window!r}")
        if not _is_count(self.sinks) or self.sinks < 0:
            raise HeadscopeError(f"an eviction policy keeps 0 or more sink tokens, a whole number; got {self.sinks!r}")
        if self.sinks and self.window is None:
            raise HeadscopeError("sink tokens need a window: without one every key is kept already")
        if self.full_heads is not None:
            object.__setattr__(self, "full_heads", _head_table(self.full_heads))

    def check(self, stacks: dict[str, Stack]) -> None:
        """One clear error when the policy does not fit the model's stacks."""
        if self.stack not in stacks:
            raise HeadscopeError(f"no attention stack named {self.stack!r} to evict from: this model has "
                                 f"{list(stacks)}")
        stack = stacks[self.stack]
        if stack.kind != "self":
            raise HeadscopeError(f"eviction acts on self-attention (a KV cache of the stack's own tokens); "
                                 f"{self.stack!r} is {stack.kind}-attention")
        if self.full_heads is not None and tuple(self.full_heads.shape) != (stack.layers, stack.heads):
            raise HeadscopeError(f"full_heads has shape {tuple(self.full_heads.shape)}; stack {self.stack!r} has "
                                 f"{stack.layers} layers of {stack.heads} heads")

    def kept(self, layer: int, query_position: torch.Tensor, n_keys: int, key_start: torch.Tensor,
             query_valid: torch.Tensor | None = None) -> torch.Tensor | None:
        """(B, H or 1, C, K) bool: the keys each query keeps; None when every head of ``layer`` keeps every key.

        ``query_position`` (C,): each query's index on the call's key axis; ``key_start`` (B,): each example's first
        real token on that axis (negative when a sliding-window cache has dropped it); ``query_valid`` (B, C):
        the real queries (padding queries keep every key). The head axis has H entries only when some heads of the
        layer keep every key.
        """
        device = query_position.device
        full = None if self.full_heads is None else self.full_heads[layer].to(device)
        if full is not None and bool(full.all()):
            return None
        keys = torch.arange(n_keys, device=device)
        if self.window is None:
            recent = torch.ones(query_position.shape[0], n_keys, dtype=torch.bool, device=device)
        else:
            recent = query_position[:, None] - keys[None, :] < self.window  # (C, K)
        relative = keys[None, :] - key_start.to(device)[:, None]  # (B, K)
        sink = (relative >= 0) & (relative < self.sinks)
        kept = (recent[None] | sink[:, None, :])[:, None]  # (B, 1, C, K)
        if query_valid is not None:
            kept = kept | ~query_valid.to(device)[:, None, :, None]
        if full is not None and bool(full.any()):
            kept = kept | full[None, :, None, None]
        return kept

    def describe(self) -> str:
        """The policy in words: ``full``, ``window 256``, ``4 sinks + window 256``, with the full heads' count."""
        if self.window is None:
            return "full"
        words = f"window {self.window}" if not self.sinks else \
            f"{self.sinks} sink{'s' if self.sinks > 1 else ''} + window {self.window}"
        if self.full_heads is not None and bool(self.full_heads.any()):
            count = int(self.full_heads.sum())
            words += f", {count} head{'s' if count > 1 else ''} full"
        return words


def _is_count(value: object) -> bool:
    """Whether ``value`` is a whole number (a Python or NumPy integer; not a bool, a float or text)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _head_table(table: object) -> torch.Tensor:
    """``full_heads`` as a (layers, heads) bool tensor on the CPU: from a tensor, an array or nested lists of bools
    or 0/1 (a table of scores is refused, not read as "every nonzero head")."""
    try:
        values = table.detach().cpu() if isinstance(table, torch.Tensor) else torch.as_tensor(np.asarray(table))
    except (TypeError, ValueError, RuntimeError):
        raise HeadscopeError(f"full_heads must be a (layers, heads) table of bools; got {type(table).__name__}") \
            from None
    if values.ndim != 2:
        raise HeadscopeError(f"full_heads must be a (layers, heads) table; got shape {tuple(values.shape)}")
    if values.dtype != torch.bool and not bool(((values == 0) | (values == 1)).all()):
        raise HeadscopeError("full_heads must hold bools (or 0 and 1), True for the heads that keep every key; got "
                             "other values (a table of scores? compare it with a threshold first)")
    return values.bool()


class EvictedMass(Reducer):
    """Attention mass on the keys an eviction policy would evict: mean over counted queries t of
    sum_{s evicted for t} A[l, h, t, s], under the attention the capture computes (full attention when the capture
    applies no policy: the share of each head's attention that the policy takes away).

    Counted queries: the real queries of ``policy.stack``, and where ``query_mask`` (B, queries of the call) is
    given, those it marks (the scored positions of a perplexity). On the kernel path the mass is exp(L_E - L), with
    L_E the log-sum-exp of the row over the evicted keys (one more fused kernel call) and L the row's own.
    """

    name = "evicted_mass"
    kernel = True

    def __init__(self, policy: Eviction, query_mask: torch.Tensor | None = None,
                 stacks: Iterable[str] | None = None) -> None:
        super().__init__((policy.stack,) if stacks is None else stacks)
        self.policy = policy
        self.query_mask = query_mask

    def bind(self, stacks: dict[str, Stack]) -> None:
        self.policy.check(stacks)
        super().bind(stacks)

    def _weight(self, part: Chunk | KernelCall, dtype: torch.dtype) -> torch.Tensor:
        weight = part.query_valid.to(dtype)
        if self.query_mask is not None:
            weight = weight * self.query_mask.to(weight.device)[:, part.query_index].to(dtype)
        return weight

    def update(self, chunk: Chunk) -> None:
        if chunk.query_position is None:
            return
        kept = self.policy.kept(chunk.site.layer, chunk.query_position, chunk.probs.shape[-1], chunk.key_start)
        weight = self._weight(chunk, chunk.probs.dtype)
        if kept is None:
            mass = torch.zeros(chunk.probs.shape[:3], dtype=chunk.probs.dtype, device=chunk.probs.device)
        else:
            mass = (chunk.probs * (~kept).to(chunk.probs.dtype)).sum(-1)
        self.add(chunk.site, torch.einsum("bhc,bc->h", mass, weight), weight.sum())

    def update_kernel(self, call: KernelCall) -> None:
        if call.query_position is None:
            return
        kept = self.policy.kept(call.site.layer, call.query_position, call.keys, call.key_start)
        weight = self._weight(call, torch.float32)
        if kept is None:
            mass = torch.zeros_like(call.lse)
        else:
            lse, any_seen = call.lse_over(~kept)
            mass = torch.where(any_seen, (lse - call.lse).exp(), 0.0)
        self.add(call.site, torch.einsum("bhc,bc->h", mass, weight), weight.sum())
