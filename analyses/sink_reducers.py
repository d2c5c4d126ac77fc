"""The reducers of the ``sinks`` analysis: sink mass over the queries that can see the sink (and Gu et al.'s sink
score per example), the mass a learned sink logit withholds, the attention each key position receives, and entropy
over content keys only.

They stream like every :class:`~headscope.capture.reducers.Reducer` (sums per head, merged by addition); they
live here, beside the analysis that defines them, rather than in the capture engine's core.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from headscope.capture.adapters import Site
from headscope.capture.reducers import Chunk, KernelCall, KeyMass, Reducer


def _real_queries(chunk: Chunk) -> torch.Tensor:
    """(B, C) float: 1 for the queries that count."""
    return chunk.query_valid.to(chunk.probs.dtype)


_MASKED = torch.finfo(torch.float32).min / 2


def _visible(probs: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
    """(B, H, C, K) bool: the keys each query may attend to, read from a chunk's masked logits.

    Without logits (a learned sink logit, or the eager fallback) a key counts as visible when its probability
    is nonzero: a visible key whose probability underflows float32 (a logit more than ~103 below the row's
    maximum) is then taken as hidden.
    """
    if logits is not None:
        return logits > _MASKED
    return probs > 0


class SinkMass(KeyMass):
    """Attention mass on a sink set S, over the queries that can see S.

    sink_mass[l, h] = mean over valid queries t that can see some key of S (and, with ``exclude_own``, are
    not in S themselves) of sum_{s in S} A[l, h, t, s]. Unlike :class:`KeyMass`, a query that cannot see S
    (past a sliding window) is left out rather than counted as 0. S is given as in :class:`KeyMass`.

    With ``positions=(k,)`` and ``exclude_own=False`` this is the sink score of Gu et al. (2024), "When
    Attention Sink Emerges in Language Models": alpha[l, h, k] = 1/(T - k) sum_{t >= k} A[l, h, t, k].
    """

    name = "sink_mass"
    needs_logits = True

    def update(self, chunk: Chunk) -> None:
        in_set = self._in_set(chunk)
        self._add_seen(chunk, in_set, self._mass(chunk, in_set), self._sees(chunk, in_set))

    def update_kernel(self, call: KernelCall) -> None:
        in_set = self._in_set(call)
        self._add_seen(call, in_set, *call.mass_on(in_set))

    def _add_seen(self, chunk: Chunk | KernelCall, in_set: torch.Tensor, mass: torch.Tensor,
                  sees: torch.Tensor) -> None:
        weight = sees.to(mass.dtype) * chunk.query_valid.to(mass.dtype)[:, None, :]
        if self.exclude_own and chunk.query_position is not None:
            own = in_set.gather(1, chunk.query_position.clamp_max(in_set.shape[1] - 1)[None, :]
                                .expand(in_set.shape[0], -1))
            weight = weight * (~own).to(weight.dtype)[:, None, :]
        self.add(chunk.site, (mass * weight).sum(dim=(0, 2)), weight.sum(dim=(0, 2)))

    @staticmethod
    def _sees(chunk: Chunk, in_set: torch.Tensor) -> torch.Tensor:
        """(B, H, C) bool: the query can see at least one key of S."""
        if chunk.probs.shape[0] == 1:
            columns = in_set[0].nonzero()[:, 0]
            logits = None if chunk.logits is None else chunk.logits[..., columns]
            return _visible(chunk.probs[..., columns], logits).any(dim=-1)
        return (_visible(chunk.probs, chunk.logits) & in_set[:, None, None, :]).any(dim=-1)


class SinkScores(SinkMass):
    """Gu et al.'s sink score for each example of the batch: alpha[b, l, h] = 1/|Q_b| sum_{t in Q_b} A[l, h, t, 0],
    Q_b the valid queries of example b that can see its first token (t = 0 included).

    The same sums as ``SinkMass(positions=(0,), exclude_own=False)``, kept per example instead of added over the
    batch: the sink rate takes its indicator alpha > eps per input. :meth:`result` gives, per stack, an
    (examples, layers, heads) array; :meth:`merge` adds another capture of the same batch (decoding steps).
    """

    name = "sink_scores"

    def __init__(self, stacks: Iterable[str] | None = None) -> None:
        super().__init__(positions=(0,), exclude_own=False, stacks=stacks)

    def _add_seen(self, chunk: Chunk | KernelCall, in_set: torch.Tensor, mass: torch.Tensor,
                  sees: torch.Tensor) -> None:
        weight = sees.to(mass.dtype) * chunk.query_valid.to(mass.dtype)[:, None, :]
        self.add(chunk.site, (mass * weight).sum(dim=2), weight.sum(dim=2))

    def add(self, site: Site, per_head: torch.Tensor, count: torch.Tensor | float) -> None:
        """Add (examples, H) sums and counts to ``site``'s layer."""
        if site.stack not in self.sums:
            stack = self._shapes[site.stack]
            dtype = torch.float32 if per_head.device.type == "mps" else torch.float64
            self.sums[site.stack] = torch.zeros(per_head.shape[0], stack.layers, stack.heads, dtype=dtype,
                                                device=per_head.device)
            self.counts[site.stack] = torch.zeros_like(self.sums[site.stack])
        self.sums[site.stack][:, site.layer, : site.heads] += per_head.detach().to(self.sums[site.stack])
        self.counts[site.stack][:, site.layer, : site.heads] += count.detach().to(self.counts[site.stack])


class ResidualMass(Reducer):
    """Attention a row withholds: mean over valid queries t of 1 - sum_s A[l, h, t, s].

    Zero up to float rounding, except in models with a learned sink logit per head (GPT-OSS's ``s_aux``)
    that takes part in the softmax and is then dropped, so rows sum below 1.
    """

    name = "residual_mass"
    kernel = True  # the kernel path serves only calls without a learned sink: rows sum to 1, the residual is 0

    def update_kernel(self, call: KernelCall) -> None:
        weight = call.query_valid.double()
        self.add(call.site, torch.zeros(call.lse.shape[1], dtype=torch.float64, device=weight.device), weight.sum())

    def update(self, chunk: Chunk) -> None:
        residual = 1.0 - chunk.probs.sum(dim=-1, dtype=torch.float64)  # (B, H, C)
        weight = chunk.query_valid.to(residual.dtype)
        self.add(chunk.site, torch.einsum("bhc,bc->h", residual, weight), weight.sum())


class KeyReceived(Reducer):
    """Attention each key position receives, averaged over heads and over the queries that can see it.

    received[l, b, s] = sum_h sum_{t in Q} A[l, h, t, s] / sum_h |Q|, with Q the valid queries of example b
    whose head h can see key s, other than s itself in self-attention (a token's attention to itself says
    nothing about sinks). Positions are relative to each example's first real token, and a decode step adds
    to the positions it sees. O(T) per layer: (B, positions) sums and counts per (stack, layer), never T x T.
    """

    name = "key_received"
    needs_logits = True
    kernel = True
    expects = ("received",)  # column sums, from a kernel call with queries and keys exchanged

    def __init__(self, stacks: Iterable[str] | None = None) -> None:
        super().__init__(stacks)
        self.sums: dict[tuple[str, int], torch.Tensor] = {}
        self.counts: dict[tuple[str, int], torch.Tensor] = {}

    def update(self, chunk: Chunk) -> None:
        probs = chunk.probs
        batch, heads = probs.shape[:2]
        valid = _real_queries(chunk)
        received = torch.einsum("bhck,bc->bk", probs, valid)  # hidden keys hold probability 0
        seen = torch.einsum("bhck,bc->bk", _visible(probs, chunk.logits).to(probs.dtype), valid)
        if chunk.query_position is not None:  # leave out each query's attention to itself
            own = chunk.query_position.clamp_max(probs.shape[-1] - 1)
            own_probs = probs.gather(-1, own[None, None, :, None].expand(batch, heads, -1, 1))[..., 0]
            index = own[None, :].expand(batch, -1)
            received.scatter_add_(1, index, -(own_probs.sum(dim=1) * valid))
            seen.scatter_add_(1, index, -heads * valid)
        self._accumulate(chunk, received, seen)

    def update_kernel(self, call: KernelCall) -> None:
        received, seen = call.received()
        received, seen = received.sum(dim=1), seen.sum(dim=1)  # (B, K), over heads
        if call.query_position is not None:  # leave out each query's attention to itself
            heads = call.lse.shape[1]
            own_probs, inside = call.at_offset(0)
            valid = call.query_valid.double() * inside.double()
            index = call.query_position.clamp_max(call.keys - 1)[None, :].expand(received.shape[0], -1)
            received.scatter_add_(1, index, -(own_probs.double().sum(dim=1) * valid))
            seen.scatter_add_(1, index, -heads * valid)
        self._accumulate(call, received, seen)

    def _accumulate(self, chunk: Chunk | KernelCall, received: torch.Tensor, seen: torch.Tensor) -> None:
        relative = chunk.relative_keys()
        keep = (chunk.key_valid & (relative >= 0)).to(torch.float64)
        index = relative.clamp_min(0)
        size = int(relative.max()) + 1
        key = (chunk.site.stack, chunk.site.layer)
        for store, values in ((self.sums, received), (self.counts, seen)):
            store[key] = _widened(store.get(key), received.shape[0], size, received.device)
            store[key].scatter_add_(1, index, values.double() * keep)

    def merge(self, other: Reducer) -> Reducer:
        """Add ``other``'s sums and counts (same batch size; the position axis widens as needed)."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        for key, sums in other.sums.items():
            for store, values in ((self.sums, sums), (self.counts, other.counts[key])):
                store[key] = _widened(store.get(key), values.shape[0], values.shape[1], values.device)
                store[key][:, : values.shape[1]] += values.to(store[key])
        return self

    def example(self, index: int) -> KeyReceived:
        """The sums of example ``index`` alone, as a reducer of a batch of one."""
        one = KeyReceived(self.stacks)
        one._shapes = self._shapes
        one.sums = {key: sums[index: index + 1].clone() for key, sums in self.sums.items()}
        one.counts = {key: counts[index: index + 1].clone() for key, counts in self.counts.items()}
        return one

    def result(self) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
        """``{(stack, layer): (received (B, positions), queries (B, positions))}``: the mean attention each
        position receives (NaN where no query counted) and the number of queries that counted."""
        out = {}
        for key, sums in self.sums.items():
            counts = self.counts[key].double().cpu()
            heads = self._shapes[key[0]].heads
            mean = torch.where(counts > 0, sums.double().cpu() / counts.clamp_min(1e-300), torch.nan)
            out[key] = (mean.numpy(), (counts / heads).round().numpy())
        return out


def _widened(tensor: torch.Tensor | None, batch: int, size: int, device: torch.device) -> torch.Tensor:
    """``tensor`` (B, P) padded with zeros to at least ``size`` columns; a new zero tensor when None."""
    dtype = torch.float32 if device.type == "mps" else torch.float64
    if tensor is None:
        return torch.zeros(batch, size, dtype=dtype, device=device)
    if tensor.shape[1] >= size:
        return tensor
    return torch.nn.functional.pad(tensor, (0, size - tensor.shape[1]))


def renormalised(probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Attention renormalised over a key subset: a~[t, s] = A[t, s] / sum_{s' kept} A[t, s'] for kept s, else 0.

    ``probs`` (B, H, C, K), ``keep`` (B, K) bool; rows with no mass on the kept keys are NaN.
    """
    kept = probs * keep[:, None, None, :].to(probs.dtype)
    return kept / kept.sum(dim=-1, keepdim=True)


class FilteredEntropy(Reducer):
    """Entropy of attention renormalised over the keys not excluded, in nats.

    mean over valid queries t of -sum_{s not in N} a~[t, s] log a~[t, s], with a~ from :func:`renormalised`;
    ``exclude`` (B, keys) bool marks N on the absolute key axis (for cross-attention, the non-content source
    tokens of the NLLB-200 sink study: end of sequence, language tags, punctuation, special tokens). Queries
    with no mass outside N are left out.
    """

    name = "filtered_entropy"

    def __init__(self, exclude: torch.Tensor, stacks: Iterable[str] | None = None) -> None:
        super().__init__(stacks)
        self.exclude = exclude

    def update(self, chunk: Chunk) -> None:
        keys = chunk.probs.shape[-1]
        keep = ~self.exclude[:, :keys].to(chunk.probs.device) & chunk.key_valid
        filtered = renormalised(chunk.probs.double(), keep)
        defined = filtered.isfinite().all(dim=-1)  # (B, H, C)
        entropy = -torch.special.xlogy(filtered, filtered).sum(dim=-1).nan_to_num(0.0)
        weight = defined.double() * chunk.query_valid.double()[:, None, :]
        self.add(chunk.site, (entropy * weight).sum(dim=(0, 2)), weight.sum(dim=(0, 2)))
