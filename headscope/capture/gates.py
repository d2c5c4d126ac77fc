"""Per-head gates on the output projection: read, scale, zero or replace each head's output z.

A forward pre-hook on each attention module's output projection sees its input as
(batch, tokens, heads * head_dim), views it as (batch, tokens, heads, head_dim) and applies, in order:
read (before any change), replace (where ``replace_mask`` is set), patch (where ``patch_mask`` is set) and
scale. This is the per-head handle ``head_mask`` used to be (removed in transformers v5).

Patching takes z from another run: read a run's z with ``read="all"`` (:meth:`Gates.z`), then hand it to a second
run as ``patch`` with a ``patch_mask`` saying which heads (per example row, optionally per position) take it, as
activation patching does (Vig et al. 2020; Meng et al. 2022; Wang et al. 2023).

``uniform`` acts one step earlier, inside headscope's attention function: the chosen heads attend uniformly
over the keys they may see, so their z is the mean of the visible values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from headscope.capture.adapters import Site
from headscope.errors import HeadscopeError


@dataclass
class Gates:
    """What to do with the head outputs z of one attention stack.

    Attributes:
        stack: the attention stack the gates act on.
        scale: multiplies z per head, (layers, heads) or per example (batch, layers, heads). Set
            ``requires_grad`` on it and gradients flow to the gate: dL/dgate = sum over tokens of z . dL/dz.
        replace: values z is replaced by, (layers, heads, head_dim), where ``replace_mask`` is True.
        replace_mask: (layers, heads) or per example (batch, layers, heads) bool.
        read: "mean" keeps the per-head sum of z over tokens (see :meth:`mean`); "all" keeps z itself per
            layer and call in ``z_``, (batch, tokens, heads, head_dim).
        patch: per layer, the z another run computed, (batch or 1, tokens, heads, head_dim) (a batch of 1 serves
            every row): where ``patch_mask`` is set, z takes its value. :meth:`z` gives a run's z in this form.
        patch_mask: where z takes ``patch``'s value: (layers, heads), per example (batch, layers, heads), or per
            example and position (batch, layers, heads, tokens) bool. A layer whose mask is all False needs no
            entry in ``patch``.
        uniform: (layers, heads) or per example (batch, layers, heads) bool: these heads attend uniformly
            over their visible keys (every real key in cross-attention; keys up to the query under a causal
            mask). Needs a model that dispatches attention through transformers' ``AttentionInterface``.
    """

    stack: str = "self"
    scale: torch.Tensor | None = None
    replace: torch.Tensor | None = None
    replace_mask: torch.Tensor | None = None
    read: Literal["mean", "all"] | None = None
    patch: dict[int, torch.Tensor] | None = None
    patch_mask: torch.Tensor | None = None
    uniform: torch.Tensor | None = None
    z_sum_: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    z_count_: dict[int, int] = field(default_factory=dict, repr=False)
    z_: dict[int, list[torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def zero(cls, heads: list[tuple[int, int]], layers: int, n_heads: int, stack: str = "self") -> Gates:
        """Gates that zero the listed (layer, head) pairs and leave the others alone."""
        scale = torch.ones(layers, n_heads)
        for layer, head in heads:
            scale[layer, head] = 0.0
        return cls(stack=stack, scale=scale)

    def mean(self) -> torch.Tensor:
        """(layers, heads, head_dim) mean of z over every token read so far (``read="mean"``)."""
        layers = sorted(self.z_sum_)
        device = self.z_sum_[layers[0]].device  # layers spread over devices (a device map) meet on the first's
        return torch.stack([self.z_sum_[layer].to(device) / self.z_count_[layer] for layer in layers])

    def z(self) -> dict[int, torch.Tensor]:
        """Per layer, the z of the last call read (``read="all"``), (batch, tokens, heads, head_dim): what
        ``patch`` takes."""
        if not self.z_:
            raise HeadscopeError("no head outputs were read: give Gates(read=\"all\") to a capture and run the model")
        return {layer: calls[-1] for layer, calls in self.z_.items()}

    def apply(self, site: Site, z: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        """Apply the gates of ``site``'s layer to z (batch, tokens, heads, head_dim); returns the new z."""
        if self.read == "mean":
            kept = z.detach().float()
            if token_mask is not None:
                kept = kept * token_mask[:, :, None, None].to(kept)
                count = int(token_mask.sum())
            else:
                count = z.shape[0] * z.shape[1]
            total = kept.sum(dim=(0, 1))
            self.z_sum_[site.layer] = self.z_sum_.get(site.layer, 0) + total
            self.z_count_[site.layer] = self.z_count_.get(site.layer, 0) + count
        elif self.read == "all":
            self.z_.setdefault(site.layer, []).append(z.detach())
        if self.replace is not None and self.replace_mask is not None:
            mask = per_example(self.replace_mask, site.layer, z.shape[0], z.device)
            value = self.replace[site.layer].to(z)[None, None]
            z = torch.where(mask[:, None, :, None], value, z)
        if self.patch_mask is not None:
            z = self._patched(site, z)
        if self.scale is not None:
            z = z * per_example(self.scale, site.layer, z.shape[0], z.device)[:, None, :, None].to(z.dtype)
        return z

    def _patched(self, site: Site, z: torch.Tensor) -> torch.Tensor:
        """z (batch, tokens, heads, head_dim) with ``patch``'s values where ``patch_mask`` is set at this layer."""
        rows = patch_rows(self.patch_mask, site.layer, z.shape[0], z.shape[1], z.device)
        if not bool(rows.any()):
            return z
        source = (self.patch or {}).get(site.layer)
        if source is None:
            raise HeadscopeError(f"patch_mask patches {site.stack} layer {site.layer}, but patch holds no z for it")
        if source.shape[1:] != z.shape[1:] or source.shape[0] not in (1, z.shape[0]):
            raise HeadscopeError(f"the patch's z of {site.stack} layer {site.layer} has shape {tuple(source.shape)}, "
                                 f"this run's {tuple(z.shape)} (batch, tokens, heads, head_dim): patch between runs "
                                 "of the same token length (a patch of batch 1 serves every row)")
        return torch.where(rows.transpose(1, 2)[..., None], source.to(device=z.device, dtype=z.dtype), z)

    def uniform_rows(self, site: Site, batch: int, device: torch.device) -> torch.Tensor | None:
        """(batch, heads) bool: the heads of ``site``'s layer that attend uniformly; None when there are none."""
        if self.uniform is None:
            return None
        rows = per_example(self.uniform, site.layer, batch, device).bool()
        return rows if bool(rows.any()) else None


def patch_rows(table: torch.Tensor, layer: int, batch: int, tokens: int, device: torch.device) -> torch.Tensor:
    """(batch, heads, tokens) bool rows of a (layers, heads), (batch, layers, heads) or (batch, layers, heads,
    tokens) patch mask, on ``device``; a call of batch 1 under per-example rows takes their common value, as in
    :func:`per_example`."""
    if table.ndim < 4:
        rows = per_example(table, layer, batch, device).bool()
        return rows[:, :, None].expand(-1, -1, tokens)
    if table.shape[-1] != tokens:
        raise HeadscopeError(f"the patch mask covers {table.shape[-1]} positions; this run has {tokens} tokens")
    rows = table[:, layer]
    if batch == 1 and rows.shape[0] > 1:
        if not bool((rows == rows[:1]).all()):
            raise ValueError(f"per-example patch rows differ at layer {layer}, which runs once for the whole batch")
        rows = rows[:1]
    return rows.to(device).bool().expand(batch, -1, -1)


def per_example(table: torch.Tensor, layer: int, batch: int, device: torch.device) -> torch.Tensor:
    """(batch, heads) rows of a (layers, heads) or (batch, layers, heads) table, on ``device``.

    A call of batch 1 under per-example rows (the shared prefix of batched ablations, before the batch is
    expanded) takes the rows' common value; they must agree there.
    """
    rows = table[layer][None] if table.ndim == 2 else table[:, layer]
    if batch == 1 and rows.shape[0] > 1:
        if not bool((rows == rows[:1]).all()):
            raise ValueError(f"per-example gate rows differ at layer {layer}, which runs once for the whole batch")
        rows = rows[:1]
    return rows.to(device).expand(batch, -1)
