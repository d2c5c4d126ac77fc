"""Architecture adapters: where a model's attention modules, heads and output projections are.

An adapter is data, derived from the loaded model: every attention module (a module whose class name
contains ``Attention`` and that owns a query projection), grouped into *stacks* by its path with the layer
number wildcarded, the head counts, and the output projection whose input holds the per-head outputs z.
Rows in the small tables below name the few per-architecture spellings.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from headscope.errors import UnsupportedModelError

# Names of the query projection that mark a module as an attention module.
# (``q_a_proj``: multi-head latent attention's compressed query, DeepSeek-V2/V3.)
QUERY_PROJECTIONS = ("q_proj", "query", "q", "c_attn", "qkv_proj", "qkv", "Wqkv", "q_attn", "query_key_value", "q_lin",
                     "Wq", "query_proj", "in_proj", "q_a_proj")
# Names of the output projection, first on the attention module itself, then on its parent's `output`.
OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "c_proj", "dense", "o", "proj", "wo", "Wo", "out_lin", "output_projection")
# Inside a gated output projection, the linear layer that takes the gated head outputs.
GATED_INNER = ("linear", "o_proj", "out_proj", "dense")
# The size of one head's output z (its value head: latent attention's query and key heads are wider).
HEAD_DIM_ATTRIBUTES = ("v_head_dim", "head_dim", "attention_head_size", "head_size", "key_value_proj_dim")
# Path fragments that name a stack: checked in order, first match wins.
STACK_RULES: tuple[tuple[str, str], ...] = (
    ("encoder_attn", "cross"),
    ("cross_attention", "cross"),
    ("crossattention", "cross"),
    ("cross_attn", "cross"),
    ("encdecattention", "cross"),
    ("audio", "audio"),
    ("vision", "vision"),
    ("visual", "vision"),
    ("image", "vision"),
)
# Path fragments of a multimodal model's language model: its stack keeps the plain name.
LANGUAGE_MODEL = ("language_model", "text_model")
STACK_ORDER = ("self", "encoder", "decoder", "cross", "vision", "audio")
# What an attention module's forward names when it dispatches through transformers' AttentionInterface.
INTERFACE_MARKERS = ("ALL_ATTENTION_FUNCTIONS", "attention_interface", "AttentionInterface")
# Model types whose layers share one attention module (ALBERT): the config attributes that give how many layers
# there are and how many groups of modules they cycle through; each use of a module is a layer of its own.
SHARED_LAYERS = {"albert": ("num_hidden_layers", "num_hidden_groups")}
# Model types headscope cannot capture exactly, and why: what the generic rules would get wrong.
REFUSED = {
    "canine": "its character encoders attend locally, in chunks, and transformers' eager attention returns the deep "
              "encoder's maps alone, so headscope can neither check nor split them",
    "prophetnet": "its decoder attends in n-gram streams (a main stream and predicting streams in one softmax), "
                  "whose maps are not one row per token",
    "xlm-prophetnet": "its decoder attends in n-gram streams (a main stream and predicting streams in one softmax), "
                      "whose maps are not one row per token",
    "t5gemma2": "its decoder attends to itself and to the encoder in one softmax (merged self- and cross-attention), "
                "which headscope's stacks cannot split",
}
# Config attributes naming the placeholder token a vision-language model replaces by image features.
IMAGE_TOKEN_ATTRIBUTES = ("image_token_id", "image_token_index")


@dataclass
class Site:
    """One attention module: where it is and what its heads are.

    ``heads`` query heads share ``kv_heads`` key/value heads (grouped-query attention when fewer). ``kind`` is
    ``"cross"`` for attention whose queries come from another stack (``queries_from``) than its keys, else
    ``"self"``. A module that several layers share (ALBERT) is one site per use: ``use`` counts its calls in
    one forward pass.
    """

    stack: str
    layer: int
    path: str
    module: nn.Module = field(repr=False)
    out_proj: nn.Module = field(repr=False)
    heads: int
    kv_heads: int
    head_dim: int
    kind: str = "self"
    queries_from: str | None = None
    use: int = 0
    uses: int = 1

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
                kind=members[0].kind,
            )
        return out

    def by_module(self) -> dict[int, list[Site]]:
        """Per attention module, its sites in the order of their use in a forward pass."""
        out: dict[int, list[Site]] = {}
        for site in sorted(self.sites, key=lambda s: s.use):
            out.setdefault(id(site.module), []).append(site)
        return out

    @property
    def shared(self) -> set[str]:
        """The stacks whose attention modules several layers share."""
        return {s.stack for s in self.sites if s.uses > 1}

    def image_positions(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """(batch, tokens) bool: where ``input_ids`` holds image tokens; None for a model without them."""
        return None if self.image_token_id is None else input_ids == self.image_token_id


def _stack_rank(name: str) -> tuple[int, str]:
    base = name.split(":")[0]
    return (STACK_ORDER.index(base) if base in STACK_ORDER else len(STACK_ORDER), name)


def adapt(model: nn.Module) -> Adapter:
    """Find every attention site of ``model``; one clear error when there is none."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in REFUSED:
        raise UnsupportedModelError(f"headscope cannot capture {model_type} exactly: {REFUSED[model_type]}")
    if any("BlockSparse" in type(m).__name__ for m in model.modules()):
        raise UnsupportedModelError(
            f"headscope cannot capture {model_type} with block-sparse attention exactly: it swaps its attention "
            "modules while it runs and attends to blocks, not tokens; load it with attention_type='original_full'")
    prefix = re.split(r"For[A-Z]|Model$", type(model).__name__)[0]
    found = [(name, module) for name, module in model.named_modules() if _is_attention(module, prefix)]
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
    uses = _uses(model, model_type)
    sites = []
    for template, members in groups.items():
        stack = names[template]
        kind = "cross" if stack.split(":")[0] == "cross" else "self"
        for layer, path, module in members:
            out_proj = _output_projection(path, module, parents)
            head_dim = _head_dim(module, out_proj)
            heads = _in_width(out_proj) // head_dim
            groups_per_kv = getattr(module, "num_key_value_groups", 1) or 1
            for use in range(uses):
                sites.append(Site(stack=stack, layer=layer * uses + use, path=path, module=module, out_proj=out_proj,
                                  heads=heads, kv_heads=heads // groups_per_kv, head_dim=head_dim, kind=kind,
                                  queries_from="decoder" if kind == "cross" and encoder_decoder else None,
                                  use=use, uses=uses))
    return Adapter(sites=sites, routes_through_interface=_routes_through_interface(model, sites),
                   image_token_id=_image_token_id(model))


def _uses(model: nn.Module, model_type: str | None) -> int:
    """How many layers use each attention module: 1, or for ALBERT-like sharing, layers / module groups."""
    if model_type not in SHARED_LAYERS:
        return 1
    layers, groups = (getattr(model.config, name) for name in SHARED_LAYERS[model_type])
    if layers % groups:
        raise UnsupportedModelError(f"headscope cannot place {model_type}'s {layers} layers on its {groups} groups of "
                                    "shared modules: the layers do not divide evenly")
    return layers // groups


# Class-name fragments of attention modules without a softmax over keys (linear attention, delta rules): a hybrid
# model's other layers, not attention sites.
NOT_SOFTMAX = ("LinearAttention", "DeltaAttention", "DeltaNet", "LightningAttention", "Retention")


def _is_attention(module: nn.Module, prefix: str = "") -> bool:
    """A softmax attention module: a class named *Attention* (after the model's own prefix, so that Kimi-Linear's
    ``KimiLinearAttention`` is not taken for linear attention) that owns a query projection."""
    name = type(module).__name__
    name = name[len(prefix):] if prefix and name.startswith(prefix) else name
    if "Attention" not in name or any(fragment in name for fragment in NOT_SOFTMAX):
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
    # two groups under one name get numbered, "self", "self:1", the language model's first
    for template in sorted(templates, key=lambda t: not any(part in t for part in LANGUAGE_MODEL)):
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
            return _ungated(candidate)
    parent = modules.get(path.rpartition(".")[0])
    output = getattr(parent, "output", None)
    dense = output if isinstance(output, nn.Linear) else getattr(output, "dense", None)
    if isinstance(dense, nn.Module):
        return dense
    raise UnsupportedModelError(
        f"headscope cannot find the output projection of {type(module).__name__} at '{path}': "
        "this architecture needs a row in headscope.capture.adapters.OUTPUT_PROJECTIONS"
    )


def _ungated(projection: nn.Module) -> nn.Module:
    """The linear layer of a gated output projection (Inkling 2, NeoMME: ``linear(z * sigmoid(gate_proj(x)))``), whose
    input holds the heads' gated outputs; a plain projection as it is."""
    if isinstance(projection, nn.Linear) or getattr(projection, "weight", None) is not None:
        return projection
    for name in GATED_INNER:
        inner = getattr(projection, name, None)
        if isinstance(inner, nn.Linear):
            return inner
    return projection


def _head_dim(module: nn.Module, out_proj: nn.Module) -> int:
    for attribute in HEAD_DIM_ATTRIBUTES:
        value = getattr(module, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    config = getattr(module, "config", None)
    heads = getattr(config, "num_attention_heads", None) or next(
        (value for name in ("num_heads", "n_head", "n_heads", "num_attention_heads")
         if isinstance(value := getattr(module, name, None), int) and value > 0), None)
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


def _routes_through_interface(model: nn.Module, sites: list[Site]) -> bool:
    """Whether every sub-model, and every attention module, dispatches attention through transformers'
    ``AttentionInterface`` (a model may mix modules that do with modules that compute attention themselves)."""
    from transformers import PreTrainedModel

    checks = [m._can_set_attn_implementation() for m in model.modules() if isinstance(m, PreTrainedModel)]
    return bool(checks) and all(checks) and all(_calls_interface(type(s.module)) for s in sites)


@functools.cache
def _calls_interface(cls: type) -> bool:
    """Whether an attention module's forward looks its attention function up in transformers' interface."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return True  # no source to read: the capture's own check (the interface was called) decides
    return any(marker in source for marker in INTERFACE_MARKERS)
