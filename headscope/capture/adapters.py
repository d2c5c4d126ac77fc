"""Architecture adapters: where a model's attention modules, heads and output projections are.

An adapter is data, derived from the loaded model: every attention module (a module whose class name
contains ``Attention`` and that owns a query projection), grouped into *stacks* by its path with the layer
number wildcarded, the head counts, and the output projection whose input holds the per-head outputs z.
Rows in the small tables below name the few per-architecture spellings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from headscope.errors import UnsupportedModelError

# Names of the query projection that mark a module as an attention module.
QUERY_PROJECTIONS = ("q_proj", "query", "q", "c_attn", "qkv_proj", "qkv", "Wqkv", "q_attn", "query_key_value")
# Names of the output projection, first on the attention module itself, then on its parent's `output`.
OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "c_proj", "dense", "o", "proj", "wo")
HEAD_DIM_ATTRIBUTES = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim")
# Path fragments that name a stack: checked in order, first match wins.
STACK_RULES: tuple[tuple[str, str], ...] = (
    ("encoder_attn", "cross"),
    ("crossattention", "cross"),
    ("cross_attn", "cross"),
    ("encdecattention", "cross"),
    ("vision", "vision"),
    ("visual", "vision"),
    ("image", "vision"),
)
STACK_ORDER = ("self", "encoder", "decoder", "cross", "vision")
# Config attributes naming the placeholder token a vision-language model replaces by image features.
IMAGE_TOKEN_ATTRIBUTES = ("image_token_id", "image_token_index")


@dataclass
class Site:
    """One attention module: where it is and what its heads are.

    ``heads`` query heads share ``kv_heads`` key/value heads (grouped-query attention when fewer).
    """

    stack: str
    layer: int
    path: str
    module: nn.Module = field(repr=False)
    out_proj: nn.Module = field(repr=False)
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def kv_head_of(self) -> list[int]:
        """The key/value head each query head reads."""
        group = self.heads // self.kv_heads
        return [h // group for h in range(self.heads)]


@dataclass(frozen=True)
class Stack:
    """An attention stack: ``layers`` x ``heads`` query heads (``kv_heads`` key/value heads)."""

    name: str
    layers: int
    heads: int
    kv_heads: int
    kind: str  # "self" or "cross"

    def as_dict(self) -> dict:
        return {"name": self.name, "layers": self.layers, "heads": self.heads, "kv_heads": self.kv_heads,
                "kind": self.kind}


@dataclass
class Adapter:
    """All attention sites of a model, grouped into stacks."""

    sites: list[Site]
    routes_through_interface: bool
    image_token_id: int | None = None  # vision-language models: the token whose positions hold image features

    def stacks(self) -> dict[str, Stack]:
        out: dict[str, Stack] = {}
        for name in sorted({s.stack for s in self.sites}, key=_stack_rank):
            members = [s for s in self.sites if s.stack == name]
            out[name] = Stack(
                name=name,
                layers=max(s.layer for s in members) + 1,
                heads=max(s.heads for s in members),
                kv_heads=max(s.kv_heads for s in members),
                kind="cross" if name == "cross" else "self",
            )
        return out

    def by_module(self) -> dict[int, Site]:
        return {id(s.module): s for s in self.sites}

    def image_positions(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """(batch, tokens) bool: where ``input_ids`` holds image tokens; None for a model without them."""
        return None if self.image_token_id is None else input_ids == self.image_token_id


def _stack_rank(name: str) -> tuple[int, str]:
    base = name.split(":")[0]
    return (STACK_ORDER.index(base) if base in STACK_ORDER else len(STACK_ORDER), name)


def adapt(model: nn.Module) -> Adapter:
    """Find every attention site of ``model``; one clear error when there is none."""
    found = [(name, module) for name, module in model.named_modules() if _is_attention(module)]
    if not found:
        raise UnsupportedModelError(
            f"headscope found no attention modules in {type(model).__name__}: this architecture is not "
            "supported (no module named *Attention* with a query projection)"
        )
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    groups: dict[str, list[tuple[int, str, nn.Module]]] = {}
    for name, module in found:
        template, layer = _template(name)
        groups.setdefault(template, []).append((layer, name, module))
    names = _name_stacks(list(groups), encoder_decoder)
    parents = dict(model.named_modules())
    sites = []
    for template, members in groups.items():
        for layer, path, module in members:
            out_proj = _output_projection(path, module, parents)
            head_dim = _head_dim(module, out_proj)
            heads = _in_width(out_proj) // head_dim
            groups_per_kv = getattr(module, "num_key_value_groups", 1) or 1
            sites.append(Site(stack=names[template], layer=layer, path=path, module=module, out_proj=out_proj,
                              heads=heads, kv_heads=heads // groups_per_kv, head_dim=head_dim))
    return Adapter(sites=sites, routes_through_interface=_routes_through_interface(model),
                   image_token_id=_image_token_id(model))


def _is_attention(module: nn.Module) -> bool:
    if "Attention" not in type(module).__name__:
        return False
    return any(isinstance(getattr(module, q, None), nn.Module) for q in QUERY_PROJECTIONS)


def _template(path: str) -> tuple[str, int]:
    """``model.layers.3.self_attn`` -> (``model.layers.*.self_attn``, 3): the first number is the layer."""
    match = re.search(r"(^|\.)(\d+)(\.|$)", path)
    if match is None:
        return path, 0
    start, end = match.span(2)
    return path[:start] + "*" + path[end:], int(match.group(2))


def _name_stacks(templates: list[str], encoder_decoder: bool) -> dict[str, str]:
    names: dict[str, str] = {}
    for template in templates:
        lowered = template.lower()
        name = next((stack for fragment, stack in STACK_RULES if fragment in lowered), None)
        if name is None and encoder_decoder:
            name = "decoder" if "decoder" in lowered else "encoder"
        names[template] = name or "self"
    taken: dict[str, int] = {}
    for template in templates:  # two groups under one name get numbered: "self", "self:1"
        base = names[template]
        count = taken.get(base, 0)
        taken[base] = count + 1
        if count:
            names[template] = f"{base}:{count}"
    return names


def _output_projection(path: str, module: nn.Module, modules: dict[str, nn.Module]) -> nn.Module:
    for attribute in OUTPUT_PROJECTIONS:
        candidate = getattr(module, attribute, None)
        if isinstance(candidate, nn.Module):
            return candidate
    parent = modules.get(path.rpartition(".")[0])
    output = getattr(parent, "output", None)
    dense = getattr(output, "dense", None)
    if isinstance(dense, nn.Module):
        return dense
    raise UnsupportedModelError(
        f"headscope cannot find the output projection of {type(module).__name__} at '{path}': "
        "this architecture needs a row in headscope.capture.adapters.OUTPUT_PROJECTIONS"
    )


def _head_dim(module: nn.Module, out_proj: nn.Module) -> int:
    for attribute in HEAD_DIM_ATTRIBUTES:
        value = getattr(module, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    config = getattr(module, "config", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(module, "num_heads", None)
    if heads:
        return _in_width(out_proj) // heads
    raise UnsupportedModelError(f"headscope cannot tell the head size of {type(module).__name__}")


def _in_width(module: nn.Module) -> int:
    """Input width of the output projection: ``nn.Linear`` or GPT-2's ``Conv1D`` (weight (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return weight.shape[0]
    raise UnsupportedModelError(f"headscope cannot read the input width of {type(module).__name__}")


def _image_token_id(model: nn.Module) -> int | None:
    """The image placeholder token of a vision-language model (LLaVA, Idefics3, Qwen2-VL), from its config."""
    config = getattr(model, "config", None)
    if getattr(config, "vision_config", None) is None:
        return None
    for attribute in IMAGE_TOKEN_ATTRIBUTES:
        value = getattr(config, attribute, None)
        if isinstance(value, int):
            return value
    return None


def _routes_through_interface(model: nn.Module) -> bool:
    """Whether every sub-model dispatches attention through transformers' ``AttentionInterface``."""
    from transformers import PreTrainedModel

    checks = [m._can_set_attn_implementation() for m in model.modules() if isinstance(m, PreTrainedModel)]
    return bool(checks) and all(checks)
