"""The architecture sweep: every text model type transformers registers, built tiny, captured, checked.

For each model type with a causal LM (``decoder``), a seq2seq LM (``seq2seq``) or a base model that reads
``input_ids`` (``encoder``), the sweep builds a tiny model from the type's default config (2 layers, 64 wide,
4 heads, a 128-token vocabulary), redraws its projections so that attention is peaked, and runs it on batch 2,
unpadded and with the second example padded (left for decoders, right otherwise). Inside one headscope capture
``KeyMass(positions=(0,))`` and ``Entropy()`` must equal the same statistics of eager ``output_attentions=True``
(``tests/reference.py``: to within a few times eager float32's own error against a float64 twin), and the
model's output inside the capture must equal its output outside it (to the float32 error of that output).

Each model type ends in one :class:`Outcome`:

- ``exact``: every stack's statistics equal eager's, and the output is unchanged;
- ``refused``: headscope says in one line (an :class:`~headscope.errors.HeadscopeError`) that it cannot capture
  the architecture exactly, and why;
- ``unbuildable``: transformers itself cannot build the tiny model or run its eager forward with attention maps
  (a missing optional package, a config that needs a checkpoint);
- ``mismatch``, ``changed``, ``crash``: a silent wrong number, an output the capture changed, an error that is not
  headscope's one-line refusal. Each of these is a bug, as is
- ``unverified``: headscope captures a model whose eager attention gives no maps to check the capture against
  (it must refuse it instead).

``python tests/architectures.py [MODEL_TYPE ...] [--workers=N]`` prints the outcomes; ``--write`` regenerates
``docs/architectures.md`` from a full sweep.
"""

# ruff: noqa: E402 - the imports below need the sys.path line before them (this file also runs as a script)
from __future__ import annotations

import contextlib
import inspect
import io
import sys
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import reference as ref

from headscope.capture.engine import Scope
from headscope.capture.reducers import Entropy, FullMaps, KeyMass
from headscope.errors import HeadscopeError

VOCAB = 128
SEQ, DECODER_SEQ, SHORT, NEW_TOKENS = 11, 7, 3, 2
WIDTH, HEADS, KV_HEADS, HEAD_DIM, LAYERS, FFN = 64, 4, 2, 16, 2, 128
WEIGHT_STD = 0.15
STATUSES = ("exact", "refused", "unbuildable", "mismatch", "changed", "crash", "unverified")
BUGS = ("mismatch", "changed", "crash", "unverified")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"

# Config attributes the sweep shrinks, by what they count (each config names them its own way).
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
               "num_decoder_layers", "num_encoder_layers", "text_num_layers")
_WIDTH_KEYS = ("hidden_size", "d_model", "n_embd", "dim", "embed_dim", "embedding_size", "d_embed", "emb_dim")
_HEAD_KEYS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
              "decoder_attention_heads", "num_decoder_attention_heads")
_KV_KEYS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num")
_HEAD_DIM_KEYS = ("head_dim", "d_kv", "attention_head_dim", "kv_channels")
# Multi-head latent attention's ranks and split head sizes, and mixture-of-experts sizes.
_SMALL = {"q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 16,
          "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
          "num_experts_per_tok": 2, "moe_topk": 2, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
          "n_shared_experts": 1, "num_shared_experts": 1, "num_experts_per_token": 2,
          # hybrids: a state-space layer then an attention layer
          "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1,
          "rotary_dim": HEAD_DIM // 2, "mamba_n_heads": 4, "mamba_d_head": 32, "mamba_d_state": 16, "mamba_dt_rank": 8,
          "mamba_chunk_size": 16}
# Multimodal rotary embeddings whose sections the modeling code assumes for a 128-wide head unless the config says.
_MROPE = {"qwen2_vl_text", "qwen2_5_vl_text", "glm4v_text", "glm4v_moe_text", "glm_image_text", "glm_ocr_text"}
# Sizes a default config leaves unset (a checkpoint's config sets them).
_UNSET = {"num_experts_per_tok": 2, "n_group": 1, "topk_group": 1}
_FFN_KEYS = ("intermediate_size", "ffn_dim", "d_ff", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim", "d_inner",
             "ffn_hidden_size", "moe_intermediate_size", "shared_expert_intermediate_size")


@dataclass
class Outcome:
    """What headscope does with one model type."""

    model_type: str
    kind: str
    model_class: str
    status: str
    detail: str = ""
    stacks: str = ""
    path: str = ""  # "interface" (headscope's attention function) or "fallback" (eager maps, read by hooks)

    def line(self) -> str:
        return f"{self.model_type:28} {self.kind:8} {self.status:11} {self.stacks:32} {self.detail}"


def model_types() -> list[tuple[str, str, str]]:
    """(model type, kind, model class name) for every text model type: its seq2seq LM, else its causal LM, else
    its base model when that reads ``input_ids``."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto import modeling_auto as auto

    found: dict[str, tuple[str, str]] = {}
    for model_type, names in auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.items():
        if getattr(CONFIG_MAPPING[model_type], "is_encoder_decoder", False) or _encoder_decoder(model_type):
            found.setdefault(model_type, ("seq2seq", _first(names)))
    for model_type, names in (*auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items(),
                              *auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.items()):
        found.setdefault(model_type, ("decoder", _first(names)))
    for model_type, names in auto.MODEL_MAPPING_NAMES.items():  # text encoders: one config, reading input_ids
        if model_type not in found and not CONFIG_MAPPING[model_type].sub_configs and _reads_input_ids(_first(names)):
            found[model_type] = ("encoder", _first(names))
    return sorted((model_type, kind, name) for model_type, (kind, name) in found.items())


def _encoder_decoder(model_type: str) -> bool:
    from transformers import CONFIG_MAPPING

    try:
        return bool(CONFIG_MAPPING[model_type]().is_encoder_decoder)
    except Exception:
        return True


def _first(names: str | tuple[str, ...]) -> str:
    return names if isinstance(names, str) else names[0]


def _reads_input_ids(class_name: str) -> bool:
    import transformers

    try:
        cls = getattr(transformers, class_name)
        return getattr(cls, "main_input_name", "input_ids") == "input_ids" and \
            "input_ids" in inspect.signature(cls.forward).parameters
    except Exception:
        return False


# --- building ------------------------------------------------------------------------------------------------


def tiny_config(model_type: str, grouped: bool = True):
    """The type's default config shrunk to the sweep's size (nested sub-configs too); with ``grouped``, fewer
    key/value heads than query heads where the config has both."""
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    values = _shrunk(config_class().to_dict(), grouped)
    return config_class.from_dict(values)


def _shrunk(values: dict, grouped: bool = True) -> dict:
    values = dict(values)
    layers = next((values[k] for k in _LAYER_KEYS if isinstance(values.get(k), int)), None)
    for key, value in list(values.items()):
        if isinstance(value, dict) and value and all(str(k).isdigit() for k in value):  # per-layer settings
            values[key] = {k: v for k, v in value.items() if int(k) < LAYERS}
        elif isinstance(value, dict):  # sub-configs, rope parameters
            values[key] = _shrunk(value, grouped)
        elif value is None and key in _UNSET:
            values[key] = _UNSET[key]
        elif value is None and key in ("head_dim", "num_key_value_heads"):  # derived at init, unless given as None
            values[key] = HEAD_DIM if key == "head_dim" else KV_HEADS if grouped else HEADS
        elif isinstance(value, bool) or not isinstance(value, int | list):
            continue
        elif key in _LAYER_KEYS:
            values[key] = min(value, LAYERS)
        elif isinstance(value, list) and layers and len(value) == layers and key not in ("architectures",):
            values[key] = _per_layer(value)
        elif key == "mrope_section" and isinstance(value, list):  # rotary sections add up to half a head
            values[key] = _sections(value, HEAD_DIM // 2)
        elif key in _WIDTH_KEYS:
            values[key] = WIDTH
        elif key in _HEAD_KEYS:
            values[key] = HEADS
        elif key in _KV_KEYS:  # multi-head latent attention has as many key heads as query heads
            grouped_here = grouped and "kv_lora_rank" not in values
            values[key] = (min(value, KV_HEADS) if grouped_here else HEADS) if value else value
        elif key in _SMALL:
            values[key] = min(value, _SMALL[key]) if value else value
        elif key in _HEAD_DIM_KEYS:
            values[key] = (values.get("qk_rope_head_dim") and _SMALL["qk_rope_head_dim"]) or HEAD_DIM
        elif key in _FFN_KEYS:
            values[key] = FFN
        elif key == "vocab_size":
            values[key] = VOCAB
        elif key.endswith("token_id") or key.endswith("token_index"):
            values[key] = _small_token(value)
        elif key in ("max_position_embeddings", "n_positions", "n_ctx"):
            values[key] = max(min(value, 128), 32) if value > 0 else value
    if values.get("model_type") in _MROPE and isinstance(values.get("rope_parameters"), dict):
        sections = _sections([16, 24, 24], HEAD_DIM // 2)
        values["rope_parameters"] = {**values["rope_parameters"], "mrope_section": sections}
    if "qk_head_dim" in values:  # derived, but stored
        values["qk_head_dim"] = values["qk_nope_head_dim"] + values["qk_rope_head_dim"]
    return values


def _per_layer(value: list) -> list:
    """A per-layer list (layer types, windows) for the sweep's layers: each kind of layer once, in order (a hybrid
    model keeps an attention layer), repeated when there are fewer kinds than layers."""
    kinds = list(dict.fromkeys(map(repr, value)))
    chosen = [next(v for v in value if repr(v) == kind) for kind in kinds[:LAYERS]]
    return (chosen * LAYERS)[:LAYERS]


def _sections(value: list[int], total: int) -> list[int]:
    sizes = [max(1, round(v * total / sum(value))) for v in value]
    sizes[-1] += total - sum(sizes)
    return sizes


def _small_token(value):
    if isinstance(value, list):
        return [_small_token(v) for v in value]
    return value if value < VOCAB else VOCAB - 1 - value % 8


def build(model_type: str, class_name: str) -> nn.Module:
    """The tiny model, float32, eval mode, its projections and embeddings redrawn from N(0, WEIGHT_STD^2)."""
    import transformers

    cls = getattr(transformers, class_name)
    try:
        config = tiny_config(model_type)
    except Exception:
        config = tiny_config(model_type, grouped=False)
    torch.manual_seed(0)
    try:
        model = cls._from_config(config)
    except AttributeError:  # a text-only class named for a multimodal type: it takes the text config
        model = cls._from_config(config.get_text_config())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if parameter.ndim == 2 and name.endswith("weight"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * WEIGHT_STD)
    return model.eval().float()


def inputs(kind: str, model: nn.Module, padded: bool) -> dict:
    """Batch 2; with ``padded``, the second example's first (decoders) or last ``SHORT`` tokens are padding."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB - 8, (2, SEQ), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        if kind == "decoder":
            mask[1, :SHORT] = 0
        else:
            mask[1, -SHORT:] = 0
    pad = getattr(model.config, "pad_token_id", None)
    ids = ids.masked_fill(mask == 0, pad if isinstance(pad, int) and pad < VOCAB else 0)
    out = {"input_ids": ids, "attention_mask": mask}
    if kind == "seq2seq":
        out["decoder_input_ids"] = torch.randint(3, VOCAB - 8, (2, DECODER_SEQ), generator=generator)
    return out


# --- checking ------------------------------------------------------------------------------------------------


def check(model_type: str, kind: str, class_name: str) -> Outcome:
    """Build, capture and compare one model type (one thread, warnings and transformers' logs silenced)."""
    try:
        with _quiet():
            return _check(Outcome(model_type, kind, class_name, "exact"))
    except Exception as error:
        return Outcome(model_type, kind, class_name, "crash", f"in the sweep: {_one_line(error, with_place=True)}")


def _check(outcome: Outcome) -> Outcome:
    model_type, kind, class_name = outcome.model_type, outcome.kind, outcome.model_class
    with _quiet():
        try:
            model = build(model_type, class_name)
            cases = {"unpadded": inputs(kind, model, False), "padded": inputs(kind, model, True)}
            plain = {case: _run(model, given) for case, given in cases.items()}
        except Exception as error:
            return _with(outcome, "unbuildable", _one_line(error, with_place=True))
        try:  # eager attention maps and the float64 twin's outputs, to compare with
            eager = ref.eager_copy(model)
            references = {case: ref.forward_attention(eager, _reference_kind(kind), given)
                          for case, given in cases.items()}
            exact = {case: ref.in_float64_default(_run, ref.float64_twin(eager), ref.float64_inputs(given))
                     for case, given in cases.items()}
            unverifiable, note = "", ""
        except Exception as error:
            unverifiable, note = _one_line(error, with_place=True), ""
            try:  # a model that casts to float32 itself cannot run as a float64 twin: float32 eager alone
                references = {case: _float32_only(eager, kind, given) for case, given in cases.items()}
                exact = plain
                unverifiable, note = "", "no float64 twin (the model casts to float32 itself): eager float32's maps"
            except Exception:  # then eager gives no maps of the usual shape: headscope must refuse it
                pass
        try:
            scope = Scope(model)
        except HeadscopeError as error:
            return _with(outcome, "refused", _one_line(error))
        except Exception as error:
            return _with(outcome, "crash", _one_line(error, with_place=True))
        outcome.stacks = ", ".join(f"{s.name} {s.layers}x{s.heads}" for s in scope.stacks.values())
        outcome.path = "interface" if scope.adapter.routes_through_interface else "fallback"
        for case, given in cases.items():
            if unverifiable:
                try:
                    with torch.no_grad(), scope.capture(KeyMass(positions=(0,))):
                        _run(model, given)
                except HeadscopeError as error:
                    return _with(outcome, "refused", _one_line(error))
                except Exception as error:
                    return _with(outcome, "crash", f"{case}: {_one_line(error, with_place=True)}")
                return _with(outcome, "unverified", f"captured, but eager gives no maps to check: {unverifiable}")
            mass, entropy, scale = KeyMass(positions=(0,)), Entropy(), ref.LogitScale()
            try:
                with torch.no_grad(), scope.capture(mass, entropy, scale):
                    captured = _run(model, given)
            except HeadscopeError as error:
                return _with(outcome, "refused", _one_line(error))
            except Exception as error:
                return _with(outcome, "crash", f"{case}: {_one_line(error, with_place=True)}")
            changed = _changed(captured, plain[case], exact[case], given, kind)
            if changed:
                return _with(outcome, "changed", f"{case}: {changed}")
            if _sink_before_eager(model, references[case]):  # Granite's learned sink: eager's maps are before it
                wrong = _mismatch_renormalised(scope, model, given, references[case])
            else:
                wrong = _mismatch({"key_mass": mass.result(), "entropy": entropy.result()}, references[case], scope,
                                  scale)
            if wrong:
                return _with(outcome, "mismatch", f"{case}: {wrong}")
    outcome.detail = note
    if _sink_before_eager(model, references["unpadded"]):
        outcome.detail = "learned sink: headscope's maps are after it, eager's before; equal once renormalised"
    elif kind == "decoder":
        problem, status = _generate_check(model, scope, eager, cases["unpadded"])
        if problem:
            return _with(outcome, status, problem)
    return outcome


def _generation_attention(eager: nn.Module, given: dict, settings: dict,
                          sequences: torch.Tensor) -> dict[str, list[ref.Call]] | None:
    """Eager attention of every call ``generate`` makes, as ``generate`` itself records it (a model without a cache,
    such as MPT here, runs the whole sequence again each step), paired with the float64 twin's; None when the twin
    generates other tokens."""
    twin = ref.float64_twin(eager)
    recorded = [eager.generate(**given, **settings, output_attentions=True, return_dict_in_generate=True)]
    recorded.append(ref.in_float64_default(lambda: twin.generate(**ref.float64_inputs(given), **settings,
                                                                 output_attentions=True, return_dict_in_generate=True)))
    if any(not torch.equal(out.sequences, sequences) for out in recorded):
        return None
    prompt, batch = given["input_ids"].shape[1], sequences.shape[0]
    mask = torch.ones(batch, sequences.shape[1] + prompt, dtype=torch.long)  # all real (XLM appends a token)
    runs = []
    for out in recorded:
        calls = []
        for step, step_maps in enumerate(out.attentions):
            maps = [m for m in step_maps if m is not None and m.ndim == 4]
            # the queries of this call end at the last key (a sliding-window cache keeps fewer keys than that)
            end = max(prompt + step, max(m.shape[-1] for m in maps))
            calls.append(ref.make_call(maps, mask, mask, query_start=end - maps[0].shape[-2],
                                       key_positions=[torch.arange(end - m.shape[-1], end) for m in maps]))
        runs.append({"self": calls})
    return ref._paired(*runs)


def _generate_check(model: nn.Module, scope: Scope, eager: nn.Module, given: dict) -> tuple[str, str]:
    """A decoder's greedy ``generate`` of ``NEW_TOKENS`` (unpadded): the same tokens inside a capture as outside,
    and key mass and entropy over every call equal to eager attention's over the same calls, as eager ``generate``
    records them. A model that cannot generate, or record its attention while it does, is not checked here."""
    settings = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    try:
        with torch.no_grad():
            plain = model.generate(**given, **settings)
        reference = _generation_attention(eager, given, settings, plain)
    except Exception:  # transformers cannot generate with this tiny model, or record its attention
        return "", ""
    if reference is None:  # the float64 twin generates other tokens: nothing to compare with
        return "", ""
    mass, entropy, scale = KeyMass(positions=(0,)), Entropy(), ref.LogitScale()
    try:
        with torch.no_grad(), scope.capture(mass, entropy, scale):
            captured = model.generate(**given, **settings)
    except HeadscopeError as error:
        return _one_line(error), "refused"
    except Exception as error:
        return f"generate: {_one_line(error, with_place=True)}", "crash"
    if not torch.equal(captured, plain):
        return "generate: the capture changed the generated tokens", "changed"
    wrong = _mismatch({"key_mass": mass.result(), "entropy": entropy.result()}, reference, scope, scale)
    return (f"generate: {wrong}", "mismatch") if wrong else ("", "")


def _sink_before_eager(model: nn.Module, reference: dict[str, ref.Call]) -> bool:
    """Whether eager's rows sum to 1 although the model has a learned sink that takes a share (Granite applies
    its sink to the attention output instead: headscope reports the attention after the sink, as for GPT-OSS)."""
    if not any(isinstance(getattr(m, "sinks", None), nn.Parameter) for m in model.modules()):
        return False
    return all(
        torch.allclose(layer.probs.sum(-1)[layer.query_valid[:, None, :].expand_as(layer.probs[..., 0])],
                       torch.tensor(1.0, dtype=torch.float64)) for call in reference.values() for layer in call)


def _mismatch_renormalised(scope: Scope, model: nn.Module, given: dict, reference: dict[str, ref.Call]) -> str:
    """Why headscope's full maps, each row divided by its sum (the share the sink leaves), differ from eager's."""
    heads = [(stack, layer, head) for stack, call in reference.items() for layer in range(len(call))
             for head in range(call[layer].probs.shape[1])]
    maps = FullMaps(heads)
    with torch.no_grad(), scope.capture(maps):
        model(**given)
    got = maps.result()
    for stack, layer, head in heads:
        attention = reference[stack][layer]
        real = attention.query_valid
        row = got[(0, stack, layer, head)].double()
        renormalised = row / row.sum(-1, keepdim=True)
        try:
            ref.assert_matches_eager(renormalised[real], attention.probs[:, head][real],
                                     attention.exact[:, head][real])
        except AssertionError:
            worst = float((renormalised[real] - attention.probs[:, head][real]).abs().max())
            return f"renormalised map of {stack} layer {layer} head {head} off by {worst:.3g}"
    return ""


def _float32_only(eager: nn.Module, kind: str, given: dict) -> dict[str, ref.Call]:
    """Eager's maps with themselves as the exact values: the tolerance is then float32's resolution alone."""
    maps = ref._forward_attention(eager, _reference_kind(kind), given)
    return ref._paired(maps, maps)


def _reference_kind(kind: str) -> str:
    return "seq2seq" if kind == "seq2seq" else "decoder"


def _with(outcome: Outcome, status: str, detail: str) -> Outcome:
    outcome.status, outcome.detail = status, detail
    return outcome


def _run(model: nn.Module, given: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**given)
    main = getattr(out, "logits", None)
    if main is None:
        main = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return main.detach().double()


def _changed(captured: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor, given: dict, kind: str) -> str:
    """Why the output inside the capture is not the output outside it, at real tokens; "" when it is."""
    if captured.shape != plain.shape:
        return f"output shape {tuple(captured.shape)} != {tuple(plain.shape)}"
    real = given["attention_mask"].bool()
    if kind == "seq2seq" or captured.ndim < 2 or captured.shape[:2] != real.shape:  # not one row per input token
        real = torch.ones(captured.shape[:2] if captured.ndim >= 2 else captured.shape, dtype=torch.bool)
    got, want, truth = captured[real].numpy(), plain[real].numpy(), exact[real].numpy()
    tolerance = ref.float32_tolerance(want, truth)
    worst = float(np.abs(got - want).max())
    # both runs are float32 computations of one exact value: each within its error of it
    return "" if worst <= 2 * tolerance else f"output moved by {worst:.3g} (float32 error {tolerance / ref.SLACK:.2g})"


def _mismatch(got: dict[str, dict[str, np.ndarray]], reference: dict[str, ref.Call | list[ref.Call]],
              scope: Scope, scale: ref.LogitScale) -> str:
    """Why the captured statistics differ from eager's (per stack one call, or the calls of a generation); ""
    when they are equal. Layer by layer: layers may differ in their number of heads (a stack is as wide as its
    widest layer, the rest NaN). Where the kernel path computed a stack (``scale`` saw its log-sum-exp), the
    tolerance allows for the float32 error of logits that large (:func:`reference.kernel_entropy_floor`)."""
    statistics = {"key_mass": ref.key_mass, "entropy": ref.entropy}
    for name, per_stack in got.items():
        per_stack = _as_eager_lists(per_stack, set(reference), scope)
        if set(per_stack) != set(reference):
            return f"stacks {sorted(per_stack)} where eager has {sorted(reference)}"
        for stack, calls in reference.items():
            calls = calls if isinstance(calls[0], list) else [calls]
            value = per_stack[stack]
            if value.shape[0] > len(calls[0]):  # a hybrid model: headscope keeps the model's layer numbers, NaN
                held = ~np.isnan(value).all(axis=1)  # rows where a layer has no attention; eager lists attention
                if int(held.sum()) == len(calls[0]):  # layers alone
                    value = value[held]
            if value.shape[0] != len(calls[0]):
                return f"{stack}: {value.shape[0]} layers where eager has {len(calls[0])}"
            for layer in range(value.shape[0]):
                one = [[call[layer]] for call in calls]
                heads = one[0][0].probs.shape[1]
                row = value[layer:layer + 1]
                if row.shape[1] < heads or not np.isnan(row[:, heads:]).all():
                    return f"{stack} layer {layer}: {row.shape[1]} heads where eager has {heads}"
                try:
                    ref.assert_exact(row[:, :heads], statistics[name], one,
                                     floor=ref.kernel_entropy_floor(scale.scale(stack)))
                except AssertionError:
                    worst = float(np.nanmax(np.abs(row[:, :heads] - statistics[name](one))))
                    return f"{name} of {stack} layer {layer} off by {worst:.3g}"
    return ""


def _as_eager_lists(per_stack: dict[str, np.ndarray], eager: set[str], scope: Scope) -> dict[str, np.ndarray]:
    """headscope's self-attention stacks as eager lists them: a model whose eager output is one list of all its
    self-attention layers (CANINE: a character encoder, the deep encoder, a final character encoder) gets its
    stacks joined in the order the model runs them."""
    if set(per_stack) == eager or eager != {"self"} or not all(name.startswith("self") for name in per_stack):
        return per_stack
    order = {path: index for index, (path, _) in enumerate(scope.model.named_modules())}
    first = {stack: min(order[site.path] for site in scope.adapter.sites if site.stack == stack) for stack in per_stack}
    width = max(value.shape[1] for value in per_stack.values())
    rows = [np.pad(per_stack[stack], ((0, 0), (0, width - per_stack[stack].shape[1])), constant_values=np.nan)
            for stack in sorted(per_stack, key=first.get)]
    return {"self": np.concatenate(rows)}


def _one_line(error: BaseException, with_place: bool = False) -> str:
    text = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    if with_place:
        frame = traceback.extract_tb(error.__traceback__)[-1]
        text += f" ({Path(frame.filename).name}:{frame.lineno})"
    return text[:300]


@contextlib.contextmanager
def _quiet():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_num_threads(threads)
        hf_logging.set_verbosity(level)


def sweep(selected: list[str] | None = None, workers: int = 1) -> list[Outcome]:
    """Every model type's outcome, in name order; ``workers`` processes share the types."""
    rows = [row for row in model_types() if not selected or row[0] in selected]
    if workers <= 1:
        return [check(*row) for row in rows]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(check, *zip(*rows, strict=True), chunksize=4))


SUMMARY = {
    "exact": "every statistic of every stack equals eager attention's, and the output is unchanged",
    "refused": "headscope refuses the model in one line, saying why",
    "unbuildable": "the tiny model cannot be built from the default config at the sweep's sizes (the config's own "
                   "checks refuse them), or transformers cannot run it on text alone",
}


def render(outcomes: list[Outcome]) -> str:
    """``docs/architectures.md``: the sweep's counts and every model type's outcome."""
    import transformers

    counts = Counter(o.status for o in outcomes)
    lines = [
        "# Architectures",
        "",
        "<!-- generated by `python tests/architectures.py --write`; tests/test_architectures.py checks it -->",
        "",
        f"Every text model type that transformers {transformers.__version__} registers with a causal LM, a seq2seq "
        "LM or a base model reading `input_ids` is built tiny from its default config (2 layers, 64 wide, 4 heads, "
        "peaked random weights) and run on batch 2, unpadded and with one example padded. Inside one capture, "
        "`KeyMass(positions=(0,))` and `Entropy()` must equal the same statistics of eager "
        "`output_attentions=True` on every stack (to float32 precision, against a float64 twin), and the model's "
        "output must be what it is without the capture. The suite runs this sweep "
        "(`tests/test_architectures.py`) and fails on any other outcome than these three:",
        "",
        "| outcome | model types | meaning |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {status} | {counts[status]} | {SUMMARY[status]} |" for status in SUMMARY]
    paths = Counter(o.path for o in outcomes if o.status == "exact")
    lines += ["", f"Of the exact ones, {paths['interface']} go through headscope's attention function in transformers' "
              f"`AttentionInterface` (path `interface`: streamed, chunked); {paths['fallback']} do not route their "
              "attention through the interface and are captured from eager `output_attentions=True` (path "
              "`fallback`: exact too, but each layer's full map is materialised).", ""]
    for status in SUMMARY:
        chosen = [o for o in outcomes if o.status == status]
        lines += [f"## {status.capitalize()} ({len(chosen)})", ""]
        if status == "exact":
            lines += ["| model type | class | stacks | path | note |", "| --- | --- | --- | --- | --- |"]
            lines += [f"| {o.model_type} | `{o.model_class}` | {o.stacks} | {o.path} | {_cell(o.detail)} |"
                      for o in chosen]
        else:
            lines += ["| model type | class | why |", "| --- | --- | --- |"]
            lines += [f"| {o.model_type} | `{o.model_class}` | {_cell(o.detail)} |" for o in chosen]
        lines.append("")
    bugs = [o for o in outcomes if o.status in BUGS]
    if bugs:
        lines += [f"## Not yet right ({len(bugs)})", "", "| model type | outcome | detail |", "| --- | --- | --- |"]
        lines += [f"| {o.model_type} | {o.status} | {_cell(o.detail)} |" for o in bugs]
        lines.append("")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main(argv: list[str]) -> int:
    selected = [a for a in argv if not a.startswith("--")]
    start = next((a.split("=", 1)[1] for a in argv if a.startswith("--from=")), "")
    workers = int(next((a.split("=", 1)[1] for a in argv if a.startswith("--workers=")), "1"))
    outcomes = []
    if workers > 1:
        outcomes = sweep(selected or None, workers)
        print("\n".join(o.line() for o in outcomes if o.model_type >= start))
    for row in model_types() if workers <= 1 else []:
        if (selected and row[0] not in selected) or row[0] < start:
            continue
        outcome = check(*row)
        outcomes.append(outcome)
        print(outcome.line(), flush=True)
    counts = Counter(o.status for o in outcomes)
    print(", ".join(f"{counts[s]} {s}" for s in STATUSES))
    if "--write" in argv:
        if selected or start:
            print("--write needs the whole sweep (no model types, no --from)", file=sys.stderr)
            return 2
        DOCS.write_text(render(outcomes))
    return 1 if any(counts[s] for s in BUGS) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
