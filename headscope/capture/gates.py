"""Per-head gates on the output projection: read, scale, zero or replace each head's output z.

A forward pre-hook on each attention module's output projection sees its input as
(batch, tokens, heads * head_dim), views it as (batch, tokens, heads, head_dim) and applies, in order:
read (before any change), replace (where ``replace_mask`` is set) and scale. This is the per-head handle
``head_mask`` used to be (removed in transformers v5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from headscope.capture.adapters import Site


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
    """

    stack: str = "self"
    scale: torch.Tensor | None = None
    replace: torch.Tensor | None = None
    replace_mask: torch.Tensor | None = None
    read: Literal["mean", "all"] | None = None
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
        return torch.stack([self.z_sum_[layer] / self.z_count_[layer] for layer in layers])

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
            mask = _per_example(self.replace_mask, site.layer, z)
            value = self.replace[site.layer].to(z)[None, None]
            z = torch.where(mask[:, None, :, None], value, z)
        if self.scale is not None:
            z = z * _per_example(self.scale, site.layer, z)[:, None, :, None].to(z.dtype)
        return z


def _per_example(table: torch.Tensor, layer: int, z: torch.Tensor) -> torch.Tensor:
    """(batch, heads) rows of a (layers, heads) or (batch, layers, heads) table, on z's device."""
    rows = table[layer][None] if table.ndim == 2 else table[:, layer]
    return rows.to(z.device).expand(z.shape[0], -1)
