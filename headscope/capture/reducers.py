"""Reducers: per-head statistics that stream through query chunks of attention.

The capture engine computes attention one chunk of queries at a time and hands each chunk's
probabilities to every active reducer, then drops them. A reducer keeps running sums per (layer, head) of
each attention stack, merges with another of its kind by addition (over inputs, batches or processes) and
reports with :meth:`Reducer.result`.

Shapes: B batch, H query heads, C queries in the chunk, K keys visible to the chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from headscope.capture.adapters import Site, Stack
from headscope.errors import MemoryBudgetError


@dataclass
class _Queries:
    """What a chunk and a kernel call share: which queries and keys of the call they cover, and where.

    Attributes:
        site: the attention module (stack, layer, heads).
        query_index: (C,) index of each query among the call's queries.
        query_position: (C,) position of each query on the key axis (self-attention), or None (cross).
        query_valid: (B, C) bool, False for padding queries.
        key_valid: (B, K) bool, False for padding keys.
        key_start: (B,) index of each example's first real token on the call's key axis (negative when a
            sliding-window cache has dropped it).
        call: index of the model call within the capture (0 for a prefill, then one per decode step).
        queries: total queries in this call (the chunk holds some of them).
        keys: total keys in this call.
    """

    site: Site
    query_index: torch.Tensor
    query_position: torch.Tensor | None
    query_valid: torch.Tensor
    key_valid: torch.Tensor
    key_start: torch.Tensor
    call: int
    queries: int
    keys: int

    def relative_keys(self) -> torch.Tensor:
        """(B, K) key index relative to each example's first real token."""
        return torch.arange(self.key_valid.shape[-1], device=self.key_valid.device)[None, :] - self.key_start[:, None]


@dataclass
class Chunk(_Queries):
    """One chunk of attention probabilities and what the reducers need to read it (the chunked path).

    Attributes as in :class:`_Queries` (``key_valid`` cut to the keys the chunk sees), and:
        probs: (B, H, C, K) float32 attention probabilities; masked keys hold 0.
        logits: (B, H, C, K) float32 scores after masking, shifted so each row's maximum is 0, or None;
            ``probs = softmax(logits)``. Provided only when some reducer sets ``needs_logits``.
    """

    probs: torch.Tensor
    logits: torch.Tensor | None


@dataclass
class KernelCall(_Queries):
    """One call of attention as a fused kernel computes it (the kernel path): no probabilities, but each query
    row's log-sum-exp L_t, from which expectations and point values of the probabilities follow exactly:
    A[t, s] = exp(x_ts - L_t) for any key s, and sum_s A[t, s] x_ts = E_p[x] from one more kernel call.

    Attributes as in :class:`_Queries` (the call is one chunk of all its queries), and:
        lse: (B, H, Q) float32 natural log-sum-exp of each query row's logits x (masked keys left out).
        causal: whether no query sees a key after its own position (known only when a reducer asks for it
            through ``needs_causal``; else False).
        logits_at: index (B, Q or 1, n) of keys -> (B, H, Q, n) float32 logits and their visibility (bool).
        expectations: what the reducers' ``expects`` name, computed before any reducer reads the call:
            "logit" E_p[x] (B, H, Q), "position" E_p[key index] (B, H, Q), "received" (sum over valid queries t
            of A[t, s], how many valid queries see key s), each (B, H, K); all float64.
        lse_over: keys (B, H or 1, Q, K) bool -> the (B, H, Q) float32 log-sum-exp of each query row over those of
            the keys it sees (one more fused kernel call, a bias of Q x K), and (B, H, Q) whether it sees any of
            them; the row's mass on them is exp(lse_over - lse).
    """

    lse: torch.Tensor
    causal: bool
    logits_at: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    expectations: dict[str, object]
    lse_over: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None

    def expected(self, what: str):
        """The expectation ``what`` (see ``expectations``); a reducer that reads one names it in ``expects``."""
        if what not in self.expectations:
            raise KeyError(f"a reducer read the expectation {what!r} without naming it in its expects")
        return self.expectations[what]

    def received(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(received, seen) per key, (B, H, K) float64 each: see ``expectations``."""
        return self.expected("received")

    def probs_at(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, Q, n) probabilities of the keys ``index`` (B, Q or 1, n), 0 where hidden; and their visibility."""
        logits, visible = self.logits_at(index)
        return torch.where(visible, (logits - self.lse[..., None]).exp(), 0.0), visible

    def mass_on(self, in_set: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, Q) mass of each query on the keys of ``in_set`` (B, K) bool, and whether it sees any of them:
        O(Q |S| d), never Q x K."""
        columns = in_set.any(dim=0).nonzero()[:, 0]
        batch = in_set.shape[0]
        probs, visible = self.probs_at(columns[None, None, :].expand(batch, 1, -1))
        member = in_set[:, columns][:, None, None, :]
        return (probs * member).sum(dim=-1), (visible & member).any(dim=-1)

    def at_offset(self, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, Q) probability of key t - ``offset`` for each query t, 0 where it is outside the keys or
        hidden; and (B, Q) whether it lies inside the key axis. Self-attention only: O(Q d)."""
        keys = self.query_position - offset
        inside = (keys >= 0) & (keys < self.keys)
        batch = self.lse.shape[0]
        probs, _ = self.probs_at(keys.clamp(0, self.keys - 1)[None, :, None].expand(batch, -1, 1))
        return probs[..., 0] * inside[None, None, :], inside[None, :].expand(batch, -1)

    def entropy(self) -> torch.Tensor:
        """(B, H, Q) entropy in nats, L_t - E_p[x]; 0 at rows that see no key."""
        return (self.lse.double() - self.expected("logit")).float()


class Reducer:
    """Base class: a statistic per (layer, head) per stack, as ``sums / counts`` (reducers that keep records
    instead derive from :class:`Recorder`).

    Subclasses implement :meth:`update` (add one chunk's contribution through :meth:`add`). ``stacks``
    limits the reducer to some attention stacks (all by default).
    """

    name = "reducer"
    needs_logits = False  # whether update() reads Chunk.logits (the engine then keeps them for it)
    # Whether update_kernel() computes the statistic from a KernelCall (the kernel path); else the engine takes the
    # chunked path for any call this reducer reads. ``needs_causal``: update_kernel() needs KernelCall.causal.
    kernel = False
    needs_causal = False
    # The expectations update_kernel() reads through KernelCall.expected ("logit", "position"): the engine runs
    # their kernel calls before any reducer reads the call.
    expects: tuple[str, ...] = ()

    def __init__(self, stacks: Iterable[str] | None = None) -> None:
        self.stacks = set(stacks) if stacks is not None else None
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, Stack] = {}

    def bind(self, stacks: dict[str, Stack]) -> None:
        """Called by the scope before a capture with the model's stacks."""
        self._shapes = {name: s for name, s in stacks.items() if self.wants(name)}

    def wants(self, stack: str) -> bool:
        return self.stacks is None or stack in self.stacks

    def update(self, chunk: Chunk) -> None:
        raise NotImplementedError

    def kernel_ready(self, causal: bool, cross: bool = False) -> bool:
        """Whether :meth:`update_kernel` can read a call: ``causal``, no query sees a key after its own position;
        ``cross``, a cross-attention call (which reducers that need causality leave alone)."""
        return self.kernel and (causal or cross or not self.needs_causal)

    def update_kernel(self, call: KernelCall) -> None:
        """Add one call's contribution read from the kernel's row log-sum-exp (reducers with ``kernel``)."""
        raise NotImplementedError

    def add(self, site: Site, per_head: torch.Tensor, count: torch.Tensor | float) -> None:
        """Add (H,) sums and a count (per head or shared) to ``site``'s layer, on the chunk's device: what a
        subclass's :meth:`update` calls with each chunk's contribution. :meth:`result` is then ``sums / counts``,
        and :meth:`merge` and :meth:`all_reduce` add them across inputs and processes."""
        if site.stack not in self.sums:
            stack = self._shapes[site.stack]
            dtype = torch.float32 if per_head.device.type == "mps" else torch.float64
            self.sums[site.stack] = torch.zeros(stack.layers, stack.heads, dtype=dtype, device=per_head.device)
            self.counts[site.stack] = torch.zeros_like(self.sums[site.stack])
        sums, counts = self.sums[site.stack], self.counts[site.stack]
        sums[site.layer, : site.heads] += per_head.detach().to(sums)
        counts[site.layer, : site.heads] += count.detach().to(counts) if isinstance(count, torch.Tensor) else count

    def merge(self, other: Reducer) -> Reducer:
        """Add ``other``'s sums and counts into this reducer (same kind and parameters)."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        for stack, sums in other.sums.items():
            if stack in self.sums:
                self.sums[stack] += sums.to(self.sums[stack])
                self.counts[stack] += other.counts[stack].to(self.counts[stack])
            else:
                self.sums[stack] = sums.clone()
                self.counts[stack] = other.counts[stack].clone()
        return self

    def all_reduce(self) -> None:
        """Sum this reducer across ``torch.distributed`` processes, in place."""
        import torch.distributed as dist

        for stack in sorted(self.sums):
            dist.all_reduce(self.sums[stack])
            dist.all_reduce(self.counts[stack])

    def result(self) -> dict[str, np.ndarray]:
        """Per stack, the (layers, heads) mean ``sums / counts``; NaN where nothing was counted."""
        out = {}
        for stack, sums in self.sums.items():
            sums, counts = sums.double().cpu(), self.counts[stack].double().cpu()
            out[stack] = torch.where(counts > 0, sums / counts.clamp_min(1e-300), torch.nan).numpy()
        return out


class Recorder(Reducer):
    """Base of reducers that keep records (per call, site and head) rather than sums: :class:`ArgmaxKey`,
    :class:`LastRow`, :class:`FullMaps`. Records are not added: :meth:`merge` and :meth:`all_reduce` refuse, and
    ``torch.distributed`` runs gather them (:func:`headscope.distributed.gather_objects`) instead."""

    def add(self, site: Site, per_head: torch.Tensor, count: torch.Tensor | float) -> None:
        raise TypeError(f"{type(self).__name__} keeps records, not sums")

    def merge(self, other: Reducer) -> Reducer:
        raise TypeError(f"{type(self).__name__} keeps records, not sums: gather them instead of merging")

    def all_reduce(self) -> None:
        raise TypeError(f"{type(self).__name__} keeps records, not sums: gather it with gather_objects")

    def result(self) -> dict:
        raise NotImplementedError


def _valid_queries(chunk: Chunk) -> torch.Tensor:
    """(B, C) float: 1 for the queries that count."""
    return chunk.query_valid.to(chunk.probs.dtype)


def _own(chunk: Chunk | KernelCall, in_set: torch.Tensor) -> torch.Tensor:
    """(B, C) bool: the query is itself in S (self-attention)."""
    own = chunk.query_position.clamp_max(in_set.shape[1] - 1)[None, :].expand(in_set.shape[0], -1)
    return in_set.gather(1, own)


class KeyMass(Reducer):
    """Mean attention mass on a set of keys S: mean over valid queries t of sum_{s in S} A[l, h, t, s].

    S is given either as ``positions`` relative to each example's first real token (default: the first
    token, ``(0,)``) or as ``key_mask``, a (B, keys) bool tensor on the absolute key axis of the call.
    With ``exclude_own`` (self-attention only), queries that are themselves in S are left out: a token
    that can only see S would otherwise count as attending to it.
    """

    name = "key_mass"
    kernel = True

    def __init__(
        self,
        positions: Sequence[int] = (0,),
        key_mask: torch.Tensor | None = None,
        exclude_own: bool = True,
        stacks: Iterable[str] | None = None,
    ) -> None:
        super().__init__(stacks)
        self.positions = tuple(positions)
        self.key_mask = key_mask
        self.exclude_own = exclude_own

    def _mass(self, chunk: Chunk, in_set: torch.Tensor) -> torch.Tensor:
        """(B, H, C) mass of each query on S: a gather of a few columns, or a product with the key mask."""
        if self.key_mask is None and chunk.probs.shape[0] == 1:
            columns = in_set[0].nonzero()[:, 0]
            return chunk.probs[..., columns].sum(dim=-1)
        return torch.einsum("bhck,bk->bhc", chunk.probs, in_set.to(chunk.probs.dtype))

    def _in_set(self, chunk: Chunk | KernelCall) -> torch.Tensor:
        """(B, K) bool: keys of the chunk that are in S."""
        keys = chunk.key_valid.shape[-1]
        if self.key_mask is not None:
            return self.key_mask[:, :keys].to(chunk.key_valid.device)
        relative = chunk.relative_keys()
        in_set = torch.zeros_like(relative, dtype=torch.bool)
        for position in self.positions:
            in_set |= relative == position
        return in_set & chunk.key_valid

    def update(self, chunk: Chunk) -> None:
        in_set = self._in_set(chunk)
        self._add_mass(chunk, in_set, self._mass(chunk, in_set))

    def update_kernel(self, call: KernelCall) -> None:
        in_set = self._in_set(call)
        self._add_mass(call, in_set, call.mass_on(in_set)[0])

    def _add_mass(self, chunk: Chunk | KernelCall, in_set: torch.Tensor, mass: torch.Tensor) -> None:
        weight = chunk.query_valid.to(mass.dtype)
        if self.exclude_own and chunk.query_position is not None:
            weight = weight * (~_own(chunk, in_set)).to(weight.dtype)
        self.add(chunk.site, torch.einsum("bhc,bc->h", mass, weight), weight.sum())


class Entropy(Reducer):
    """Mean attention entropy in nats: mean over valid queries of -sum_s A[t, s] log A[t, s].

    Computed as ``logsumexp(x) - sum_s A[t, s] x[t, s]`` from the chunk's logits x (no log per element),
    when the engine provides them (rows that sum below 1, with a learned sink, take the direct formula).
    """

    name = "entropy"
    needs_logits = True
    kernel = True
    expects = ("logit",)

    def update_kernel(self, call: KernelCall) -> None:
        weight = call.query_valid.to(torch.float32)
        self.add(call.site, torch.einsum("bhc,bc->h", call.entropy(), weight), weight.sum())

    def update(self, chunk: Chunk) -> None:
        if chunk.logits is not None:
            # The logits x come shifted so each row's max is 0: then logsumexp(x) = -log(max p), and
            # sum_s A x stays small, keeping the float32 precision that large logits would lose.
            entropy = -chunk.probs.amax(dim=-1).log() - torch.linalg.vecdot(chunk.probs, chunk.logits)
        else:
            entropy = -torch.special.xlogy(chunk.probs, chunk.probs).sum(-1)
        weight = _valid_queries(chunk)
        self.add(chunk.site, torch.einsum("bhc,bc->h", entropy, weight), weight.sum())


class MeanDistance(Reducer):
    """Mean attention distance: mean over valid queries t of sum_s A[t, s] |pos(t) - pos(s)| (self-attention)."""

    name = "mean_distance"
    kernel = True
    expects = ("position",)
    needs_causal = True  # then |pos(t) - pos(s)| = pos(t) - s over the keys t sees: pos(t) - E_p[s]

    def update_kernel(self, call: KernelCall) -> None:
        if call.query_position is None:
            return
        per_query = call.query_position.double()[None, None, :] - call.expected("position")
        weight = call.query_valid.double()
        self.add(call.site, torch.einsum("bhc,bc->h", per_query, weight), weight.sum())

    def update(self, chunk: Chunk) -> None:
        if chunk.query_position is None:
            return
        keys = torch.arange(chunk.probs.shape[-1], device=chunk.probs.device, dtype=chunk.probs.dtype)
        distance = (chunk.query_position.to(keys.dtype)[:, None] - keys[None, :]).abs()
        per_query = torch.einsum("bhck,ck->bhc", chunk.probs, distance)
        weight = _valid_queries(chunk)
        self.add(chunk.site, torch.einsum("bhc,bc->h", per_query, weight), weight.sum())


class OffsetMass(Reducer):
    """Mean attention at a fixed offset back: mean over counted queries t of A[l, h, t, t - offset].

    ``offset`` 1 is the previous token; on [BOS] + r + r probes, ``len(r) - 1`` is the induction offset
    and ``len(r)`` the duplicate-token one. ``query_mask`` (B, queries of the call) selects the queries that
    count (e.g. the second copy of r); queries whose key t - offset is padding or before the sequence are
    left out. Self-attention only.
    """

    name = "offset_mass"
    kernel = True

    def __init__(self, offset: int, query_mask: torch.Tensor | None = None, stacks: Iterable[str] | None = None):
        super().__init__(stacks)
        self.offset = offset
        self.query_mask = query_mask

    def update(self, chunk: Chunk) -> None:
        if chunk.query_position is None:
            return
        keys = chunk.query_position - self.offset  # (C,)
        inside = (keys >= 0) & (keys < chunk.probs.shape[-1])
        clamped = keys.clamp(0, chunk.probs.shape[-1] - 1)
        batch, heads = chunk.probs.shape[:2]
        index = clamped[None, None, :, None].expand(batch, heads, -1, 1)
        mass = chunk.probs.gather(-1, index)[..., 0]  # (B, H, C)
        weight = _valid_queries(chunk) * inside[None, :].to(mass.dtype)
        weight = weight * chunk.key_valid.gather(1, clamped[None, :].expand(batch, -1)).to(mass.dtype)
        if self.query_mask is not None:
            weight = weight * self.query_mask.to(chunk.probs.device)[:, chunk.query_index].to(mass.dtype)
        self.add(chunk.site, torch.einsum("bhc,bc->h", mass, weight), weight.sum())

    def update_kernel(self, call: KernelCall) -> None:
        if call.query_position is None:
            return
        mass, inside = call.at_offset(self.offset)
        keys = (call.query_position - self.offset).clamp(0, call.keys - 1)
        weight = call.query_valid.to(mass.dtype) * inside.to(mass.dtype)
        weight = weight * call.key_valid.gather(1, keys[None, :].expand(weight.shape[0], -1)).to(mass.dtype)
        if self.query_mask is not None:
            weight = weight * self.query_mask.to(mass.device)[:, call.query_index].to(mass.dtype)
        self.add(call.site, torch.einsum("bhc,bc->h", mass, weight), weight.sum())


class ArgmaxKey(Recorder):
    """Per query, the key each head attends to most and its probability.

    Keeps, per call and site, ``(B, H, queries)`` argmax indices and probabilities (O(T) per head, never
    T x T). ``last_only`` keeps only the last query of each call, as decoding needs.
    """

    name = "argmax_key"

    def __init__(self, last_only: bool = False, stacks: Iterable[str] | None = None) -> None:
        super().__init__(stacks)
        self.last_only = last_only
        self.records: dict[tuple[int, str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, chunk: Chunk) -> None:
        probs = chunk.probs
        if self.last_only:
            if int(chunk.query_index[-1]) != chunk.queries - 1:
                return
            probs = probs[:, :, -1:]
        value, index = probs.max(dim=-1)
        key = (chunk.call, chunk.site.stack, chunk.site.layer)
        if key in self.records:
            old_index, old_value = self.records[key]
            index, value = torch.cat([old_index, index.cpu()], -1), torch.cat([old_value, value.cpu()], -1)
        self.records[key] = (index.cpu(), value.cpu())

    def result(self) -> dict[tuple[int, str, int], tuple[torch.Tensor, torch.Tensor]]:
        """``{(call, stack, layer): (argmax index (B, H, Q), probability (B, H, Q))}``."""
        return dict(self.records)


class LastRow(Recorder):
    """The last query's attention row per head and call: (B, H, keys), e.g. the current decode step.

    With ``callback(site, call, row)`` each row is handed over at once and nothing is kept.
    """

    name = "last_row"

    def __init__(
        self,
        callback: Callable[[Site, int, torch.Tensor], None] | None = None,
        stacks: Iterable[str] | None = None,
    ) -> None:
        super().__init__(stacks)
        self.callback = callback
        self.rows: dict[tuple[int, str, int], torch.Tensor] = {}

    def update(self, chunk: Chunk) -> None:
        if int(chunk.query_index[-1]) != chunk.queries - 1:
            return
        row = chunk.probs[:, :, -1]
        if self.callback is not None:
            self.callback(chunk.site, chunk.call, row)
        else:
            self.rows[(chunk.call, chunk.site.stack, chunk.site.layer)] = row.cpu()

    def result(self) -> dict[tuple[int, str, int], torch.Tensor]:
        """``{(call, stack, layer): (B, H, keys)}``."""
        return dict(self.rows)


class FullMaps(Recorder):
    """Full (B, queries, keys) attention maps for the named heads only, within a memory budget.

    ``heads`` lists ``(stack, layer, head)``. The request is refused, before anything is stored, when the
    maps of one call would exceed ``budget_bytes``.
    """

    name = "full_maps"

    def __init__(self, heads: Iterable[tuple[str, int, int]], budget_bytes: int = 512 * 2**20) -> None:
        self.heads = sorted(set(heads))
        super().__init__({stack for stack, _, _ in self.heads})
        self.budget_bytes = budget_bytes
        self.maps: dict[tuple[int, str, int, int], torch.Tensor] = {}

    def update(self, chunk: Chunk) -> None:
        site = chunk.site
        wanted = [h for stack, layer, h in self.heads if stack == site.stack and layer == site.layer]
        if not wanted:
            return
        batch = chunk.probs.shape[0]
        needed = batch * chunk.queries * chunk.keys * 4 * len(self.heads)
        if needed > self.budget_bytes:
            raise MemoryBudgetError(
                f"full attention maps for {len(self.heads)} heads at {chunk.queries} x {chunk.keys} tokens "
                f"(batch {batch}) need {needed / 2**20:.0f} MiB, over the budget of "
                f"{self.budget_bytes / 2**20:.0f} MiB: name fewer heads, use shorter inputs, or raise budget_bytes"
            )
        keys = chunk.probs.shape[-1]
        for head in wanted:
            index = (chunk.call, site.stack, site.layer, head)
            if index not in self.maps:
                self.maps[index] = torch.zeros(batch, chunk.queries, chunk.keys)
            rows = chunk.query_index.cpu()
            self.maps[index][:, rows, :keys] = chunk.probs[:, head].detach().cpu()

    def result(self) -> dict[tuple[int, str, int, int], torch.Tensor]:
        """``{(call, stack, layer, head): (B, queries, keys)}``."""
        return dict(self.maps)


# Masked logits hold float32's lowest value (shifted by at most the row's maximum): anything below half of it
# is a key the query may not attend to.
