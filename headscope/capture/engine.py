"""The capture engine: exact per-head attention statistics that stream, and per-head gates.

headscope registers its own attention function in transformers' ``AttentionInterface`` (and the matching
``AttentionMaskInterface`` entry) and switches the model to it for the duration of a capture. Inside,
attention is computed as eager attention computes it, but one chunk of queries at a time; each chunk's
probabilities go to the active reducers and are dropped. With no reducer active the call goes to SDPA.
Gates are forward pre-hooks on each attention module's output projection. An eviction policy
(:class:`~headscope.capture.eviction.Eviction`) hides the keys it evicts from each query, on every path.

    scope = Scope(model)
    mass, entropy = KeyMass(), Entropy()
    with scope.capture(mass, entropy):
        model(**inputs)
    mass.result()["self"]  # (layers, heads)
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.utils.generic import TransformersKwargs

from headscope.capture import flex
from headscope.capture.adapters import Adapter, Site, adapt
from headscope.capture.eviction import Eviction
from headscope.capture.gates import Gates
from headscope.capture.reducers import Chunk, KernelCall, Reducer
from headscope.errors import HeadscopeError, NonFiniteError
from headscope.models.cache import NEW as NEW_CACHE
from headscope.models.cache import OLD as OLD_CACHE

IMPLEMENTATION = "headscope"
# The same attention with every causal mask built in full: for models whose own path is eager, whose masks are
# never left out (a decoder self-attention may then be marked non-causal and rely on its mask alone).
MASKED_IMPLEMENTATION = "headscope_masked"
DEFAULT_BUDGET_BYTES = 256 * 2**20
# On a CPU, chunks that stay near the caches run faster than large ones; an accelerator wants large ones.
CPU_CHUNK_BYTES = 16 * 2**20
# Per query row, the chunk holds about this many float32 copies of (heads x keys): logits, exp, probs.
_COPIES_PER_ROW = 3
_MIN_CHUNKS, _MIN_ROWS = 8, 64
# Arguments transformers' attention functions take that headscope's implements (the rest of the signature), and
# the ones that say nothing about the attention (bookkeeping, kernel hints): any other, when not None, is refused.
KNOWN_ARGUMENTS = frozenset({
    "scaling", "dropout", "is_causal", "position_bias", "softcap", "s_aux", "sliding_window",
    "cache_position", "use_cache", "layer_idx", "head_mask", "target_dtype", "return_dict", "deterministic",
    "input_ids",
    *TransformersKwargs.__annotations__,  # what every model passes along: flash-attention lengths, output flags
})
# An additive mask entry at or below this hides its key: exp of it is 0 in float32. Masks use the dtype's lowest
# value, -inf, or (older models, MarkupLM) -10000.
MASKED_BELOW = -5000.0
# Stacks over a tower's own tokens (patches, audio frames), which the text padding masks do not describe.
TOWERS = ("vision", "audio")

# How a capture may compute attention for its reducers: "auto" takes the kernel path wherever the call and the
# reducers allow it, "chunked" always takes the chunked path.
PATHS = ("auto", "chunked")
KERNEL, CHUNKED = "kernel", "chunked"
# How the kernel path serves entropy's E_p[k], where ``scope.paths`` names it: in the model's own attention call
# (headscope.capture.flex), or by a second kernel call where that form was refused.
FUSED = "entropy in the model's attention call (FlexAttention)"
SECOND_CALL = "entropy by a second kernel call"
# Why FlexAttention refused, once in this process: each try would compile again.
_FLEX_REFUSED: list[str | None] = [None]

logger = logging.getLogger(__name__)

# The active capture, process-wide: a forward run in another thread (a streamer's generate) is captured too.
_ACTIVE: list[_Session] = []


@dataclass
class _Validity:
    query_valid: torch.Tensor  # (B, Tq) bool
    key_valid: torch.Tensor  # (B, Tk) bool
    key_start: torch.Tensor  # (B,) long


@dataclass
class _Session:
    """What one ``Scope.capture`` is doing: its reducers, gates and per-call bookkeeping."""

    adapter: Adapter
    sites: dict[int, list[Site]]
    reducers: list[Reducer]
    gates: list[Gates]
    chunk_size: int | None
    budget_bytes: int
    path: str = "auto"
    eviction: Eviction | None = None
    call: int = 0
    # Calls of attention that fed reducers, per path taken: "kernel", or "chunked: <why>".
    paths: collections.Counter = field(default_factory=collections.Counter)
    # The masked implementation (a model whose own path is eager): no mask means no mask, never "causal".
    masked: bool = False
    validity_cache: dict[tuple, tuple[torch.Tensor | None, _Validity]] = field(default_factory=dict)
    query_valid: dict[str, torch.Tensor] = field(default_factory=dict)
    # Per self-attention site across calls: tokens of the sequence so far, and each example's first real
    # token (absolute), to place the keys of a sliding-window cache that has dropped its oldest keys.
    tokens_seen: dict[str, int] = field(default_factory=dict)
    first_token: dict[str, torch.Tensor] = field(default_factory=dict)
    seen_in_call: dict[str, int] = field(default_factory=dict)  # the call in which tokens_seen last advanced
    # The fallback: the padding masks the model was called with (``attention_mask``, ``decoder_attention_mask``).
    token_masks: dict[str, torch.Tensor | None] = field(default_factory=dict)
    # Calls of each shared attention module in this forward pass (ALBERT): the n-th call is its n-th site.
    uses_seen: dict[int, int] = field(default_factory=dict)
    # Calls of headscope's attention function so far, and the count when each attention module began its call.
    interface_calls: int = 0
    calls_before: dict[int, int] = field(default_factory=dict)
    # The current top-level call with a KV cache: (tokens of the sequence so far, tokens of this call, each
    # example's first real token (B,) or None); None without a cache.
    sequence: tuple[int, int, torch.Tensor | None] | None = None

    def site_of(self, module: nn.Module) -> Site | None:
        """The site this call of ``module`` is: for a module several layers share, the next of its uses."""
        sites = self.sites.get(id(module))
        if sites is None:
            return None
        if len(sites) == 1:
            return sites[0]
        use = self.uses_seen.get(id(module), 0)
        self.uses_seen[id(module)] = use + 1
        return sites[use % len(sites)]

    def reducers_for(self, stack: str) -> list[Reducer]:
        return [r for r in self.reducers if r.wants(stack)]

    def tracks_queries(self, stack: str) -> bool:
        """Whether a stack no reducer reads still needs its real-token queries: for gates that read z,
        and for the decoder, whose queries are the cross-attention's."""
        if any(g.stack == stack for g in self.gates):
            return True
        return any(s.queries_from == stack and bool(self.reducers_for(s.stack))
                   for s in self.adapter.sites if s.kind == "cross")

    def rows_per_chunk(self, batch: int, heads: int, keys: int, skips_keys: bool, device: torch.device) -> int:
        """Queries per chunk: the fixed ``chunk_size``, else what fits the budget; when later keys can be
        skipped (causal), at least ``_MIN_CHUNKS`` chunks so that little of the hidden triangle is computed."""
        if self.chunk_size is not None:
            return self.chunk_size
        budget = min(self.budget_bytes, CPU_CHUNK_BYTES) if device.type == "cpu" else self.budget_bytes
        rows = max(1, budget // (batch * heads * keys * 4 * _COPIES_PER_ROW))
        if skips_keys:
            rows = min(rows, max(_MIN_ROWS, -(-keys // _MIN_CHUNKS)))
        return rows

    def end_call(self) -> None:
        self.call += 1
        self.validity_cache.clear()
        self.uses_seen.clear()


class Scope:
    """A view of an unmodified, loaded model through which attention can be captured and heads gated.

    Args:
        model: a transformers model, as loaded.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.adapter = adapt(model)
        self.stacks = self.adapter.stacks()
        # Over all captures of this scope: attention calls that fed reducers, per path ("kernel", or
        # "chunked: <why>"); see :meth:`capture`.
        self.paths: collections.Counter = collections.Counter()

    @contextlib.contextmanager
    def capture(
        self,
        *reducers: Reducer,
        gates: Sequence[Gates] = (),
        chunk_size: int | None = None,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        path: str = "auto",
        eviction: Eviction | None = None,
    ) -> Iterator[Scope]:
        """Run forward passes or ``generate`` inside; reducers fill, gates act.

        Args:
            reducers: statistics to compute; each receives every chunk of attention of its stacks.
            gates: per-head gates on head outputs z.
            chunk_size: queries per chunk of the chunked path; by default chosen so a chunk stays within
                ``budget_bytes``.
            budget_bytes: memory a chunk's probabilities may take.
            path: "auto" computes each attention call on the kernel path (the fused attention kernel and its row
                log-sum-exp, no probabilities) when every reducer of the call can read it and the call has no
                feature the kernel lacks (soft-capping, learned sinks, position bias, uniform gates); else on the
                chunked path. "chunked" always takes the chunked path. ``scope.paths`` counts the calls per path
                taken, with the reason for each chunked one; the choice is also logged at DEBUG level.
            eviction: a KV-cache eviction policy for one self-attention stack: each query sees only the keys the
                policy keeps, on top of the model's own mask, on every path (SDPA's mask, the kernel's bias, the
                chunked path's logits). The model's output then changes, as a cache that evicts those keys would
                change it; reducers read the attention as evicted.

        Inside, the model's outputs are those it computes alone (to float rounding), unless ``eviction`` or gates
        change them. On exit, also on an exception, the model is as before: attention implementation restored and
        no hook left.
        """
        if _ACTIVE:
            raise HeadscopeError("a capture is already active: finish it before opening another")
        if path not in PATHS:
            raise HeadscopeError(f"path must be one of {', '.join(PATHS)}; got {path!r}")
        unknown = {g.stack for g in gates} - set(self.stacks)
        if unknown:
            raise HeadscopeError(f"no attention stack named {sorted(unknown)}: this model has {list(self.stacks)}")
        shared = {g.stack for g in gates} & self.adapter.shared
        if shared:
            raise HeadscopeError(f"gates on {sorted(shared)} are not supported: several layers share each of its "
                                 "attention modules (and output projections), so a gate cannot tell the layers apart")
        if any(g.uniform is not None for g in gates) and not self.adapter.routes_through_interface:
            raise HeadscopeError(f"uniform-attention gates need a model that dispatches attention through "
                                 f"transformers' AttentionInterface; {type(self.model).__name__} does not")
        if eviction is not None:
            if not self.adapter.routes_through_interface:
                raise HeadscopeError(f"eviction policies need a model that dispatches attention through "
                                     f"transformers' AttentionInterface; {type(self.model).__name__} does not")
            eviction.check(self.stacks)
        for reducer in reducers:
            reducer.bind(self.stacks)
        session = _Session(self.adapter, self.adapter.by_module(), list(reducers), list(gates), chunk_size,
                           budget_bytes, path, eviction)
        _ACTIVE.append(session)
        try:
            with contextlib.ExitStack() as stack:
                if reducers or eviction is not None or (gates and self.adapter.routes_through_interface):
                    stack.enter_context(self._attention_switched(session))
                stack.enter_context(self._gate_hooks(session))
                stack.enter_context(self._call_counter(session))
                yield self
        finally:
            _ACTIVE.clear()
            self.paths.update(session.paths)

    @contextlib.contextmanager
    def _attention_switched(self, session: _Session) -> Iterator[None]:
        if not self.adapter.routes_through_interface:
            with _eager_fallback(self.model, session):
                yield
            return
        _register()
        configs = _all_configs(self.model)
        saved = [(config, config._attn_implementation_internal) for config in configs]
        handles = []
        try:
            implementation = _implementation_for(self.model)
            session.masked = implementation == MASKED_IMPLEMENTATION
            self.model.set_attn_implementation(implementation)
            for sites in session.sites.values():
                module = sites[0].module
                handles.append(module.register_forward_pre_hook(
                    lambda m, args: session.calls_before.__setitem__(id(m), session.interface_calls)))
                handles.append(module.register_forward_hook(_interface_check(session, sites[0])))
            yield
        finally:
            for handle in handles:
                handle.remove()
            for config, implementation in saved:
                config._attn_implementation_internal = implementation

    @contextlib.contextmanager
    def _gate_hooks(self, session: _Session) -> Iterator[None]:
        handles = []
        try:
            for site in self.adapter.sites:
                site_gates = [g for g in session.gates if g.stack == site.stack]
                if site_gates:
                    handles.append(site.out_proj.register_forward_pre_hook(_gate_hook(session, site, site_gates)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def _call_counter(self, session: _Session) -> Iterator[None]:
        handles = [self.model.register_forward_hook(lambda *_: session.end_call()),
                   self.model.register_forward_pre_hook(_sequence_hook(self.model, session), with_kwargs=True)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _sequence_hook(model: nn.Module, session: _Session):
    """Records, per top-level call of a model with a KV cache, where the call's tokens lie in the sequence: the
    tokens before it (the cache's length) and each example's first real token (from the 2D attention mask). With
    them a sliding-window cache that has dropped its oldest keys is placed right even when the capture began after
    the prefill."""
    signature = inspect.signature(model.forward)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        session.sequence = None
        try:
            bound = signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = kwargs
        cache, tokens = bound.get(NEW_CACHE, bound.get(OLD_CACHE)), bound.get("input_ids")
        if tokens is None:
            tokens = bound.get("inputs_embeds")
        if cache is None or tokens is None or not hasattr(cache, "get_seq_length"):
            return
        before, new = int(cache.get_seq_length()), tokens.shape[1]
        mask = bound.get("attention_mask")
        first = None
        if mask is None:  # no padding: every example starts the sequence
            first = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        elif isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.shape[1] == before + new:
            first = (mask != 0).int().argmax(dim=1)
        session.sequence = (before + new, new, first)

    return hook


def _interface_check(session: _Session, site: Site):
    """A forward hook that refuses an attention module which ran without calling the attention interface: its
    attention would be missing from the statistics, silently."""
    def hook(module: nn.Module, args: tuple, output: object) -> None:
        if session.reducers_for(site.stack) and session.interface_calls == session.calls_before.get(id(module)):
            raise HeadscopeError(
                f"{type(module).__name__} at '{site.path}' computed its attention without transformers' "
                "AttentionInterface, so headscope saw none of it: this architecture is not supported")

    return hook


def _gate_hook(session: _Session, site: Site, site_gates: list[Gates]):
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        batch, tokens = x.shape[0], x.shape[1]
        z = x.view(batch, tokens, site.heads, -1)
        token_mask = session.query_valid.get(site.path)
        if token_mask is not None and token_mask.shape != (batch, tokens):
            token_mask = None
        for gate in site_gates:
            z = gate.apply(site, z, token_mask)
        if not bool(torch.isfinite(z).all()):
            raise NonFiniteError(_not_finite(site, z.transpose(1, 2), 0, "head output z"))
        return (z.reshape(x.shape), *args[1:])

    return hook


def _not_finite(site: Site, values: torch.Tensor, start: int, what: str) -> str:
    """Where (batch, heads, tokens, dim) ``values`` first hold NaN or inf, as one line."""
    return _not_finite_at(site, (~torch.isfinite(values)).any(-1), start, what)


def _not_finite_at(site: Site, bad: torch.Tensor, start: int, what: str) -> str:
    """The first True of (batch, heads, tokens) ``bad`` as the line :func:`_not_finite` writes."""
    example, head, token = (int(i) for i in bad.nonzero()[0])
    return (f"{what} of {site.stack} layer {site.layer} head {head} is not finite (NaN or inf) at example {example}, "
            f"token {start + token}: the model overflowed or its weights hold NaN (a float16 model may need "
            "--dtype float32)")


def _all_configs(model: nn.Module) -> list:
    """Every config the model and its sub-models use (each attention-implementation holder)."""
    seen: dict[int, object] = {}
    pending = [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while pending:
        config = pending.pop()
        if id(config) in seen:
            continue
        seen[id(config)] = config
        for key in getattr(config, "sub_configs", {}):
            sub = getattr(config, key, None)
            if sub is not None:
                pending.append(sub)
    return list(seen.values())


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if not _REGISTERED:
        AttentionInterface.register(IMPLEMENTATION, headscope_attention)
        AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
        AttentionInterface.register(MASKED_IMPLEMENTATION, headscope_attention)
        AttentionMaskInterface.register(MASKED_IMPLEMENTATION, _full_mask)
        _REGISTERED = True


def _full_mask(*args, **kwargs):
    """SDPA's mask, never left out as "causal": eager attention's pattern, as booleans."""
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _implementation_for(model: nn.Module) -> str:
    """``headscope`` where every sub-model supports SDPA (its masks may be left out for ``is_causal``, as SDPA's
    are); else the masked variant, whose masks are built as the model's own eager path builds them."""
    supports = [m._supports_sdpa for m in model.modules() if isinstance(m, PreTrainedModel)]
    return IMPLEMENTATION if supports and all(supports) else MASKED_IMPLEMENTATION


def headscope_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: eager-exact chunked attention feeding reducers, else SDPA.

    Shapes: query (B, H, Tq, D), key and value (B, H_kv, Tk, D); returns (B, Tq, H, D).
    """
    session = _ACTIVE[0] if _ACTIVE else None
    site = session.site_of(module) if session is not None else None
    if site is not None:
        session.interface_calls += 1
    unknown = sorted(name for name, value in kwargs.items() if value is not None and name not in KNOWN_ARGUMENTS)
    if unknown:
        raise HeadscopeError(
            f"{type(module).__name__} passes {', '.join(unknown)} to its attention function, which headscope's "
            "attention does not implement: capturing it would change the model's output (this architecture is not "
            "supported)")
    reducers = session.reducers_for(site.stack) if site is not None else []
    uniform = _uniform_rows(session, site, query) if site is not None else None
    needs_eager = kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or uniform is not None
    if not reducers and not needs_eager:
        policy = _policy_of(session, site)
        if policy is not None:
            return _evicted_sdpa(session, site, policy, module, query, key, value, attention_mask, **kwargs)
        if site is not None and session.tracks_queries(site.stack):  # padding, for gates and cross-attention
            n_keys = key.shape[2]
            mask = attention_mask[..., :n_keys] if attention_mask is not None else None
            _validity(session, site, mask, query.shape[0], query.shape[2], n_keys, False, query.device)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if reducers:
        why = _why_chunked(session, site, reducers, module, query, key, attention_mask, uniform, kwargs)
        if why is None:
            try:
                result, form = _kernel_attention(session, site, reducers, module, query, key, value,
                                                 attention_mask, **kwargs)
                _count_path(session, site, None, form)
                return result
            except _KernelRefused as refused:  # before any reducer read the call: the chunked path computes it
                why = f"the fused kernel refused the call ({refused})"
                if not any(why in path for path in session.paths):
                    warnings.warn(f"headscope: {site.stack} layer {site.layer}: {why}; the chunked path computes "
                                  "it instead (exact, slower)", stacklevel=2)
        _count_path(session, site, why)
    return _chunked_attention(session, site, reducers, module, query, key, value, attention_mask, uniform=uniform,
                              **kwargs)


def _policy_of(session: _Session | None, site: Site | None) -> Eviction | None:
    """The capture's eviction policy where it acts on ``site``'s stack; else None."""
    policy = session.eviction if session is not None else None
    return policy if policy is not None and site is not None and site.stack == policy.stack else None


def _evicting(session: _Session, site: Site, policy: Eviction, attention_mask: torch.Tensor | None,
              mask: torch.Tensor | None, causal: bool, validity: _Validity, n_queries: int,
              n_keys: int) -> tuple[torch.Tensor | None, bool]:
    """The call's mask (``mask``, cut from ``attention_mask``) with the keys ``policy`` evicts hidden too, and
    causality folded in: (mask (B, H or 1, Tq, Tk), causal False); ``(mask, causal)`` as they were where every head of
    the layer keeps every key. A float mask stays additive. Built once per model call for the layers that share
    it."""
    full = None if policy.full_heads is None else tuple(policy.full_heads[site.layer].tolist())
    entry = ("eviction", id(attention_mask), n_queries, n_keys, causal, full, tuple(validity.key_start.tolist()))
    cached = session.validity_cache.get(entry)
    if cached is not None and cached[0] is attention_mask:
        return cached[1]
    device = validity.key_start.device
    positions = torch.arange(n_queries, device=device) + n_keys - n_queries
    kept = policy.kept(site.layer, positions, n_keys, validity.key_start, validity.query_valid)
    if kept is None:
        evicted = (mask, causal)
    else:
        if causal:
            kept = kept & (torch.arange(n_keys, device=device)[None, :] <= positions[:, None])
        if mask is None:
            evicted = (kept, False)
        elif mask.dtype == torch.bool:
            evicted = (mask & kept, False)
        else:
            evicted = (mask.masked_fill(~kept, torch.finfo(mask.dtype).min), False)
    session.validity_cache[entry] = (attention_mask, evicted)
    return evicted


def _evicted_sdpa(session: _Session, site: Site, policy: Eviction, module: nn.Module, query: torch.Tensor,
                  key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                  **kwargs) -> tuple[torch.Tensor, None]:
    """SDPA under an eviction policy, no reducer reading: the model's mask with the evicted keys hidden too."""
    scaling, causal, key, value, mask = _call_rules(session, module, query, key, value, attention_mask,
                                                    kwargs.pop("scaling", None), kwargs.pop("is_causal", None))
    n_keys = key.shape[2]
    validity = _validity(session, site, mask, query.shape[0], query.shape[2], n_keys, False, query.device)
    mask, causal = _evicting(session, site, policy, attention_mask, mask, causal, validity, query.shape[2], n_keys)
    return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, is_causal=causal, **kwargs)


# Dtypes the fused kernels take (their log-sum-exp is float32 for all of them).
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _why_chunked(session: _Session, site: Site, reducers: list[Reducer], module: nn.Module, query: torch.Tensor,
                 key: torch.Tensor, attention_mask: torch.Tensor | None, uniform: torch.Tensor | None,
                 kwargs: dict) -> str | None:
    """Why this call takes the chunked path; None when the kernel path computes it exactly."""
    if session.path == CHUNKED:
        return "the chunked path was asked for"
    features = {"softcap": "soft-capped logits", "s_aux": "learned sink logits", "position_bias": "a position bias"}
    for name, feature in features.items():
        if kwargs.get(name) is not None:
            return f"{feature} (the fused kernels have none)"
    if uniform is not None:
        return "uniform-attention gates"
    if kwargs.get("dropout") and module.training:
        return "attention dropout in training mode"
    if query.device.type not in ("cpu", "cuda") or query.dtype not in _KERNEL_DTYPES:
        return f"no fused kernel with a log-sum-exp for {query.dtype} on {query.device.type}"
    mask = attention_mask[..., : key.shape[2]] if attention_mask is not None else None
    if mask is not None and mask.dtype != torch.bool and not _hides_only(session, mask):
        return "an additive mask that weighs visible keys (the kernel path needs one that only hides keys)"
    cross = site.kind == "cross"
    causal = (not cross and any(r.needs_causal for r in reducers)
              and _sees_no_later_key(session, module, query, mask, kwargs.get("is_causal")))
    for reducer in reducers:
        if not reducer.kernel_ready(causal, cross):
            if reducer.kernel:
                return f"{type(reducer).__name__} of attention that sees later keys needs whole rows"
            return f"{type(reducer).__name__} needs whole rows of probabilities"
    return None


def _count_path(session: _Session, site: Site, why: str | None, form: str | None = None) -> None:
    path = f"{CHUNKED}: {why}" if why is not None else KERNEL if form is None else f"{KERNEL}: {form}"
    if path not in session.paths:
        logger.debug("headscope capture: %s layer %d takes the %s path", site.stack, site.layer, path)
    session.paths[path] += 1


def _cached(session: _Session, key: tuple, compute):
    """``compute()`` once per model call for ``key``: a tensor (kept alive in the entry, so that its id is not
    reused meanwhile) and labels."""
    tensor, *labels = key
    entry = ("derived", id(tensor), *labels)
    cached = session.validity_cache.get(entry)
    if cached is None or cached[0] is not tensor:
        cached = (tensor, compute())
        session.validity_cache[entry] = cached
    return cached[1]


def _hides_only(session: _Session, mask: torch.Tensor) -> bool:
    """Whether an additive float mask only hides keys (each entry 0, or low enough that exp of it is 0)."""
    return _cached(session, (mask, "hides only"),
                   lambda: bool(((mask == 0) | (mask <= MASKED_BELOW)).all()))


def _sees_no_later_key(session: _Session, module: nn.Module, query: torch.Tensor, mask: torch.Tensor | None,
                       is_causal: bool | None) -> bool:
    """Whether no query of a self-attention call sees a key after its own position."""
    n_queries = query.shape[2]
    if mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        return bool(causal) or n_queries == 1
    allowed = mask if mask.dtype == torch.bool else mask > MASKED_BELOW

    def compute() -> bool:
        n_keys = mask.shape[-1]
        own = torch.arange(n_queries, device=mask.device)[:, None] + n_keys - n_queries
        later = torch.arange(n_keys, device=mask.device)[None, :] > own
        return not bool((allowed & later).any())

    return _cached(session, (mask, "causal"), compute)


class _KernelRefused(RuntimeError):
    """A fused kernel would not take a call (an accelerator's kernel and its shape or alignment rules)."""


def _fused(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None, causal: bool,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        return _fused_kernel(query, key, value, bias, causal, scale)
    except RuntimeError as error:
        if query.device.type == "cpu" or isinstance(error, torch.OutOfMemoryError):
            raise
        raise _KernelRefused(str(error).splitlines()[0][:200]) from error


def _fused_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None,
                  causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused attention kernel: output (B, H, Tq, D) and row log-sum-exp (B, H, Tq) float32.

    On CPU, PyTorch's flash kernel (the one SDPA runs there, so the output is SDPA's); on CUDA, the flash kernel
    for half precision without a mask, else the memory-efficient one. ``bias`` is an additive mask in the query's
    dtype (-inf hides a key); keys and values may have fewer heads than the queries (grouped-query attention).
    """
    if query.device.type == "cpu":
        head_dim, value_dim = query.shape[-1], value.shape[-1]
        if head_dim != value_dim:  # the kernel wants one head size: zeros widen the narrower, changing nothing
            width = max(head_dim, value_dim)
            query, key = (nn.functional.pad(t, (0, width - head_dim)) for t in (query, key))
            value = nn.functional.pad(value, (0, width - value_dim))
        output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, causal, attn_mask=bias, scale=scale)
        return output[..., :value_dim], lse
    group = query.shape[1] // key.shape[1]
    if group > 1:
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    if bias is None and query.dtype != torch.float32:
        out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, causal, False, scale=scale)
    else:
        if bias is not None:  # the memory-efficient kernel reads the bias in rows aligned to 16 elements
            keys = bias.shape[-1]
            aligned = bias.new_zeros(*bias.shape[:-1], -(-keys // 16) * 16)
            aligned[..., :keys] = bias
            bias = aligned[..., :keys].expand(query.shape[0], query.shape[1], query.shape[2], keys)
        out = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, 0.0, causal,
                                                                     scale=scale)
    return out[0], out[1][..., : query.shape[2]].float()


def _call_rules(session: _Session | None, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float | None,
                is_causal: bool | None) -> tuple[float, bool, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What both paths read from a call as SDPA (or eager) would: the scaling, whether the call is causal without a
    mask, the keys and values (cut to the queries for a prefill into a pre-allocated cache), and the mask cut to
    the keys."""
    n_queries, n_keys = query.shape[2], key.shape[2]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    # SDPA's rule where SDPA is the model's path; eager's (a causal mask is always built) where eager is
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and n_queries > 1 and attention_mask is None and not (session is not None and session.masked)
    if causal and n_keys > n_queries:  # SDPA's rule for a prefill into a pre-allocated cache
        key, value, n_keys = key[:, :, :n_queries], value[:, :, :n_queries], n_queries
    mask = attention_mask[..., :n_keys] if attention_mask is not None else None
    return scaling, causal, key, value, mask


def _kernel_attention(
    session: _Session,
    site: Site,
    reducers: list[Reducer],
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **_: object,
) -> tuple[tuple[torch.Tensor, None], str | None]:
    """Attention by the fused kernel, the reducers fed from its row log-sum-exp: no (queries x keys) matrix. Returns
    the call's result and the form of entropy's E_p[k] where it is not a second kernel call (None: it is, or no
    reducer needs it)."""
    batch, heads, n_queries, head_dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scaling, causal, key, value, mask = _call_rules(session, module, query, key, value, attention_mask, scaling,
                                                    is_causal)
    n_keys = key.shape[2]
    cross = site.kind == "cross"
    validity = _validity(session, site, mask, batch, n_queries, n_keys, cross, query.device)
    policy = _policy_of(session, site)
    if policy is not None:
        mask, causal = _evicting(session, site, policy, attention_mask, mask, causal, validity, n_queries, n_keys)
    allowed = None if mask is None else mask if mask.dtype == torch.bool else mask > MASKED_BELOW
    bias = None if mask is None else _cached(session, (mask, "bias", query.dtype), lambda: _bias(mask, query.dtype))
    wanted = set(what for r in reducers for what in r.expects)
    one_call, form = None, None
    if "logit" in wanted and _fuses_entropy(query, key, value, mask, cross or policy is not None):
        one_call, form = _entropy_in_one_call(query, key, value, causal, scaling)
    if one_call is not None:
        output, lse, expected_key = one_call
    else:
        output, lse = _fused(query, key, value, bias, causal, scaling)
    _check_finite(site, query, key, output)
    offset = n_keys - n_queries
    positions = None if cross else torch.arange(n_queries, device=query.device) + offset
    scaled = (query.float() * scaling).reshape(batch, kv_heads, group, n_queries, head_dim)

    def logits_at(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, n = index.shape[1], index.shape[2]
        if rows == 1:  # the same keys for every query
            chosen = key.gather(2, index[:, None, 0, :, None].expand(batch, kv_heads, n, head_dim)).float()
            grouped = scaled.reshape(batch, kv_heads, group * n_queries, head_dim)
            logits = torch.matmul(grouped, chosen.transpose(-1, -2))
        else:  # keys of their own per query (n of them)
            flat = index.reshape(batch, 1, rows * n, 1).expand(batch, kv_heads, rows * n, head_dim)
            chosen = key.gather(2, flat).float().view(batch, kv_heads, 1, rows, n, head_dim)
            logits = torch.linalg.vecdot(scaled[:, :, :, :, None], chosen)
        logits = logits.reshape(batch, heads, n_queries, n)
        full = index.expand(batch, n_queries, n)
        visible = torch.ones(batch, 1, n_queries, n, dtype=torch.bool, device=query.device)
        if allowed is not None:  # (a mask may broadcast over the batch or the queries)
            rows = allowed.expand(batch, allowed.shape[1], n_queries, allowed.shape[-1])
            visible = rows.gather(-1, full[:, None].expand(batch, allowed.shape[1], n_queries, n))
        if causal:
            visible = visible & (full <= positions[None, :, None])[:, None]
        visible = visible.expand(batch, heads, n_queries, n)
        return logits.masked_fill(~visible, float("-inf")), visible

    def lse_over(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sees = chosen if allowed is None else chosen & allowed
        if causal and positions is not None:
            sees = sees & (torch.arange(n_keys, device=query.device)[None, :] <= positions[:, None])
        sees = sees.expand(batch, sees.shape[1], n_queries, n_keys)
        hidden = torch.zeros(sees.shape, device=query.device).masked_fill_(~sees, float("-inf"))
        _, chosen_lse = _fused(query.float(), key.float(), key.float(), hidden, False, scaling)
        seen = sees.any(dim=-1).expand(batch, heads, n_queries)  # (the kernel's log-sum-exp of an empty row is 0)
        return torch.where(seen, chosen_lse, float("-inf")), seen

    expectations: dict[str, object] = {}
    if one_call is not None:
        expectations["logit"] = scaling * torch.linalg.vecdot(query.double(), expected_key.double())
    elif "logit" in wanted or (query.dtype != torch.float32 and query.device.type == "cpu"):
        # One float32 call with the keys as values: E_p[k] for entropy, and, for a half-precision model on CPU, the
        # row log-sum-exp in float32 (the CPU flash kernel's own is only good to ~5e-5 in bfloat16).
        expected_key, lse32 = _fused(query.float(), key.float(), key.float(), None if bias is None else bias.float(),
                                     causal, scaling)
        expectations["logit"] = scaling * torch.linalg.vecdot(query.double(), expected_key.double())
        lse = lse32  # (the same normaliser as E_p[k]'s)
    if "position" in wanted:
        expectations["position"] = _expected_position(query, key, bias, causal, scaling)
    if "received" in wanted:
        expectations["received"] = _received(query, key, lse, allowed, causal, validity.query_valid, scaling)
    call = KernelCall(site=site, lse=lse, query_index=torch.arange(n_queries, device=query.device),
                      query_position=positions, query_valid=validity.query_valid, key_valid=validity.key_valid,
                      key_start=validity.key_start, call=session.call, queries=n_queries, keys=n_keys,
                      causal=not cross and _sees_no_later_key(session, module, query, mask, is_causal)
                      if any(r.needs_causal for r in reducers) else False,
                      logits_at=logits_at, expectations=expectations, lse_over=lse_over)
    for reducer in reducers:
        reducer.update_kernel(call)
    return (output.transpose(1, 2).contiguous(), None), form


def _entropy_in_one_call(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool, scaling: float
                         ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, str]:
    """``flex.entropy_call``'s output, L and E_p[k] (None where it refuses), and the form ``scope.paths`` names."""
    if _FLEX_REFUSED[0] is None:
        try:
            one_call = flex.entropy_call(query, key, value, causal, scaling)
        except flex.FlexRefused as refused:
            _FLEX_REFUSED[0] = str(refused)
            warnings.warn(f"headscope: FlexAttention refused entropy's one-call form ({refused}); such calls take a "
                          "second kernel call instead (exact, slower)", stacklevel=5)
        else:
            if one_call is not None:
                return one_call, FUSED
            return None, f"{SECOND_CALL} (a query's own key has under {flex.LEAST_OWN:.0e} of its attention)"
    return None, f"{SECOND_CALL} (FlexAttention refused: {_FLEX_REFUSED[0]})"


def _fuses_entropy(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                   other_keys: bool) -> bool:
    """Whether entropy's E_p[k] comes from the model's own attention call (``flex``): self-attention over its own
    tokens (``other_keys``: cross-attention, or an eviction policy's), from ``flex.FUSED_FROM`` of them, float32 on
    CPU, no mask, nothing to differentiate."""
    n_queries, n_keys = query.shape[2], key.shape[2]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return (query.device.type == "cpu" and query.dtype == torch.float32
            and mask is None and not other_keys and not grad and n_queries == n_keys >= flex.FUSED_FROM)


def _check_finite(site: Site, query: torch.Tensor, key: torch.Tensor, output: torch.Tensor) -> None:
    """Refuse NaN or inf before it is averaged into a statistic. The CPU flash kernel turns a row of NaN logits
    into zeros, so the queries and keys are checked too: where eager attention's output would not be finite."""
    if bool(torch.isfinite(output).all()) and bool(torch.isfinite(query).all()) and bool(torch.isfinite(key).all()):
        return
    bad = ~torch.isfinite(output).all(-1) | ~torch.isfinite(query).all(-1)  # (B, H, Tq)
    keys_bad = ~torch.isfinite(key).all(-1).all(-1)  # (B, H_kv): each query of the group sees some key
    bad = bad | keys_bad.repeat_interleave(query.shape[1] // key.shape[1], dim=1)[..., None]
    raise NonFiniteError(_not_finite_at(site, bad, 0, "attention output"))


def _bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive form of a mask, as SDPA makes it: 0 where a key is seen, -inf where it is hidden."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.to(dtype)


def _received(query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, allowed: torch.Tensor | None, causal: bool,
              valid: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention each key receives from the valid queries, sum_t A[t, s] (B, H, K) float64, and how many valid
    queries see it (B, H, K), from one kernel call with queries and keys exchanged: the keys [k_s, 1] attend to the
    queries [scale q_t, -L_t], so that the call's log-sum-exp for key s is log sum_t exp(x_ts - L_t)."""
    batch, heads, n_queries, _ = query.shape
    n_keys = key.shape[2]
    queries = query.float() * scaling
    # A query that does not count gets a logit too low for exp (finite: no inf meets a zero inside the kernel).
    hidden = torch.finfo(torch.float32).min / 4
    shift = torch.where(valid[:, None, :], -lse, hidden)[..., None]
    augmented_queries = torch.cat([queries, shift], dim=-1)
    keys = key.float().repeat_interleave(heads // key.shape[1], dim=1)
    augmented_keys = torch.cat([keys, keys.new_ones(batch, heads, n_keys, 1)], dim=-1)
    values = torch.zeros_like(augmented_queries)
    bias, exchanged_causal = None, False
    if allowed is not None:
        sees = allowed.expand(batch, allowed.shape[1], n_queries, n_keys) & valid[:, None, :, None]
        seen = sees.sum(dim=2, dtype=torch.float64)  # (B, Hm, K)
        bias = torch.zeros(sees.transpose(-1, -2).shape, device=query.device).masked_fill_(
            ~sees.transpose(-1, -2), float("-inf"))
    elif causal:  # key s is seen by queries t >= s: causal once both axes are reversed
        augmented_queries, augmented_keys, values = (t.flip(2) for t in (augmented_queries, augmented_keys, values))
        exchanged_causal = True
        seen = valid.double().flip(-1).cumsum(-1).flip(-1)[:, None, :]
    else:  # every query sees every key
        seen = valid.double().sum(-1)[:, None, None].expand(batch, 1, n_keys)
    _, exchanged = _fused(augmented_keys, augmented_queries, values, bias, exchanged_causal, 1.0)
    if exchanged_causal:
        exchanged = exchanged.flip(-1)
    seen = seen.expand(batch, heads, n_keys)
    return torch.where(seen > 0, exchanged.double().exp(), 0.0), seen


def _expected_position(query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor | None, causal: bool,
                       scaling: float) -> torch.Tensor:
    """(B, H, Tq) float64 E_p[key index], from one more kernel call in float32 whose values are the key indices."""
    batch, kv_heads, n_keys, head_dim = key.shape
    index = torch.arange(n_keys, dtype=torch.float32, device=key.device)
    values = index[None, None, :, None].expand(batch, kv_heads, n_keys, head_dim).contiguous()
    bias32 = None if bias is None else bias.float()
    return _fused(query.float(), key.float(), values, bias32, causal, scaling)[0][..., 0].double()


def _uniform_rows(session: _Session, site: Site, query: torch.Tensor) -> torch.Tensor | None:
    """(B, H) bool: the heads the session's gates make attend uniformly in this call; None when none do."""
    rows = [gate.uniform_rows(site, query.shape[0], query.device) for gate in session.gates
            if gate.stack == site.stack]
    rows = [r for r in rows if r is not None]
    return functools.reduce(torch.logical_or, rows) if rows else None


def _chunked_attention(
    session: _Session | None,
    site: Site | None,
    reducers: list[Reducer],
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    uniform: torch.Tensor | None = None,
    **_: object,
) -> tuple[torch.Tensor, None]:
    batch, heads, n_queries, head_dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scaling, causal, key, value, mask = _call_rules(session, module, query, key, value, attention_mask, scaling,
                                                    is_causal)
    n_keys = key.shape[2]
    offset = n_keys - n_queries
    cross = site is not None and site.kind == "cross"
    policy = _policy_of(session, site)
    validity = (_validity(session, site, mask, batch, n_queries, n_keys, cross, query.device)
                if reducers or policy is not None else None)

    rows = (session.rows_per_chunk(batch, heads, n_keys, causal or mask is not None, query.device) if session
            else n_queries)
    # Scaling the queries instead of the scores saves a pass over (queries x keys); equal to float rounding.
    grouped_queries = (query * scaling).reshape(batch, kv_heads, group, n_queries, head_dim)
    output = query.new_empty(batch, kv_heads, group, n_queries, value.shape[-1])
    lowest = torch.finfo(torch.float32).min
    for start in range(0, n_queries, rows):
        stop = min(start + rows, n_queries)
        width = stop - start
        visible = _visible_keys(mask, start, stop, n_keys, offset, causal)
        q = grouped_queries[:, :, :, start:stop].reshape(batch, kv_heads, group * width, head_dim)
        scores = torch.matmul(q, key[:, :, :visible].transpose(-1, -2)).view(batch, heads, width, visible)
        if position_bias is not None:
            scores = scores + position_bias[:, :, start:stop, :visible]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores.float()
        if mask is not None:
            chunk_mask = mask[:, :, start:stop, :visible]
            if chunk_mask.dtype == torch.bool:
                scores.masked_fill_(~chunk_mask, lowest)
            else:
                scores = (scores + chunk_mask.float()).clamp_min_(lowest)
        elif causal and visible > start + offset + 1:
            # Only the chunk's last keys are hidden from some of its queries: query r sees up to key
            # start + offset + r, so mask the upper triangle of that (width x width) corner alone.
            corner = scores[..., start + offset + 1:]
            corner.masked_fill_(_upper_triangle(width, corner.shape[-1], scores.device), lowest)
        if policy is not None:  # the keys the policy evicts, on top of the model's own mask
            kept = policy.kept(site.layer, torch.arange(start, stop, device=scores.device) + offset, visible,
                               validity.key_start, validity.query_valid[:, start:stop])
            if kept is not None:
                scores.masked_fill_(~kept, lowest)
        seen = scores > lowest if uniform is not None else None
        shifted = s_aux is None and any(r.needs_logits for r in reducers)
        if shifted:  # each row's max at 0: the same softmax, and logits a reducer can sum in float32
            scores.sub_(scores.amax(dim=-1, keepdim=True))
        probs = _softmax(scores, s_aux)
        if seen is not None:  # gated heads attend uniformly over the keys they may see
            flat = seen.float() / seen.sum(-1, keepdim=True).clamp_min(1)
            probs = torch.where(uniform[:, :, None, None].to(probs.device), flat, probs)
        if reducers:
            chunk = Chunk(
                site=site,
                probs=probs,
                logits=scores if shifted else None,
                query_index=torch.arange(start, stop, device=probs.device),
                query_position=None if cross else torch.arange(start, stop, device=probs.device) + offset,
                query_valid=validity.query_valid[:, start:stop],
                key_valid=validity.key_valid[:, :visible],
                key_start=validity.key_start,
                call=session.call,
                queries=n_queries,
                keys=n_keys,
            )
            for reducer in reducers:
                reducer.update(chunk)
        weights = nn.functional.dropout(probs, p=dropout, training=module.training).to(value.dtype)
        out = torch.matmul(weights.view(batch, kv_heads, group * width, visible), value[:, :, :visible])
        out = out.view(batch, kv_heads, group, width, -1)
        if site is not None and not bool(torch.isfinite(out).all()):  # never averaged into a statistic
            raise NonFiniteError(_not_finite(site, out.flatten(1, 2), start, "attention output"))
        output[:, :, :, start:stop] = out
    return output.view(batch, heads, n_queries, -1).transpose(1, 2).contiguous(), None


@functools.cache
def _upper_triangle(rows: int, columns: int, device: torch.device) -> torch.Tensor:
    """(rows, columns) bool, True where column >= row."""
    return torch.ones(rows, columns, dtype=torch.bool, device=device).triu()


def _softmax(scores: torch.Tensor, s_aux: torch.Tensor | None) -> torch.Tensor:
    """Attention probabilities (B, H, C, K) float32, as eager attention computes them.

    With a learned sink logit per head (``s_aux``), the sink takes part in the softmax and is dropped
    afterwards, so rows sum below 1.
    """
    if s_aux is None:
        return torch.softmax(scores, dim=-1)
    sink = s_aux.float().reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    combined = torch.cat([scores, sink], dim=-1)
    combined = combined - combined.amax(dim=-1, keepdim=True)
    return torch.softmax(combined, dim=-1)[..., :-1]


def _visible_keys(
    mask: torch.Tensor | None, start: int, stop: int, n_keys: int, offset: int, causal: bool
) -> int:
    """How many leading keys any query of the chunk can see: later keys are skipped altogether."""
    if causal:
        return min(n_keys, stop + offset)
    if mask is None:
        return n_keys
    allowed = mask[:, :, start:stop]
    allowed = allowed if allowed.dtype == torch.bool else allowed > torch.finfo(allowed.dtype).min / 2
    seen = allowed.flatten(0, 2).any(dim=0)
    last = int(seen.nonzero().max()) + 1 if bool(seen.any()) else n_keys
    return max(last, 1)


def _validity(
    session: _Session,
    site: Site,
    mask: torch.Tensor | None,
    batch: int,
    n_queries: int,
    n_keys: int,
    cross: bool,
    device: torch.device,
) -> _Validity:
    """Which queries and keys are real tokens, read from the attention mask the model built.

    A key is valid when some query may attend to it; in self-attention a query is valid when it may
    attend to its own position (padding queries may not). Cross-attention queries take the validity of
    the decoder's self-attention in the same call.
    """
    # Keyed by the mask object itself (kept alive in the entry, so its id cannot be reused meanwhile).
    cache_key = (id(mask), batch, n_queries, n_keys, cross)
    cached = session.validity_cache.get(cache_key)
    if cached is not None and cached[0] is mask:
        validity = cached[1]
    else:
        if mask is None:
            key_valid = torch.ones(batch, n_keys, dtype=torch.bool, device=device)
            query_valid = torch.ones(batch, n_queries, dtype=torch.bool, device=device)
        else:
            allowed = mask if mask.dtype == torch.bool else mask > MASKED_BELOW
            allowed = allowed.any(dim=1).expand(batch, n_queries, n_keys)
            key_valid = allowed.any(dim=1)
            if cross:
                query_valid = torch.ones(batch, n_queries, dtype=torch.bool, device=device)
            else:
                own = (torch.arange(n_queries, device=device) + n_keys - n_queries).clamp(0, n_keys - 1)
                query_valid = allowed.gather(2, own[None, :, None].expand(batch, -1, 1))[..., 0]
        key_start = key_valid.int().argmax(dim=1)
        validity = _Validity(query_valid, key_valid, key_start)
        session.validity_cache[cache_key] = (mask, validity)
    if cross:
        decoder = session.query_valid.get("decoder")
        if decoder is not None and decoder.shape == (batch, n_queries):
            validity = _Validity(decoder, validity.key_valid, validity.key_start)
    else:
        session.query_valid[site.stack] = validity.query_valid
        validity = _placed_on_sequence(session, site, validity, n_queries, n_keys)
    session.query_valid[site.path] = validity.query_valid
    return validity


def _placed_on_sequence(session: _Session, site: Site, validity: _Validity, n_queries: int,
                        n_keys: int) -> _Validity:
    """Key positions relative to each example's first real token when the call's keys start later.

    A sliding-window cache (e.g. Gemma, Mistral) keeps only the latest keys: in a decode step its first
    key is not the sequence's first token. The call's first key is at ``seen - n_keys``, where ``seen``
    counts the tokens since the call without a cache (``n_keys == n_queries``) that began the sequence;
    ``key_start`` then becomes the first real token's index on the call's key axis (negative once it has
    been dropped). When the model's call carries its KV cache (a decode step; :func:`_sequence_hook`), the cache's
    length and the 2D attention mask say the same without that first call, as when the capture began after
    the prefill; else the keys are taken to start the sequence.
    """
    sequence = session.sequence
    tower = site.stack.split(":")[0] in TOWERS  # (an image or audio tower's tokens are not the call's)
    if sequence is not None and sequence[1] == n_queries and not tower:  # the call says where its tokens lie
        seen, _, first = sequence
        if first is not None and seen - n_keys > 0 and first.shape == validity.key_start.shape:
            return _Validity(validity.query_valid, validity.key_valid, first.to(validity.key_start) - (seen - n_keys))
        return validity
    if session.seen_in_call.get(site.path) == session.call:  # a module calling attention twice (DiffLlama)
        seen = session.tokens_seen[site.path]
    else:
        seen = n_queries if n_keys == n_queries else session.tokens_seen.get(site.path, 0) + n_queries
    session.tokens_seen[site.path] = seen
    session.seen_in_call[site.path] = session.call
    offset = seen - n_keys
    if offset <= 0:
        session.first_token[site.path] = validity.key_start
        return validity
    first = session.first_token.get(site.path)
    if first is None or first.shape != validity.key_start.shape:
        return validity
    return _Validity(validity.query_valid, validity.key_valid, first - offset)


@contextlib.contextmanager
def _eager_fallback(model: nn.Module, session: _Session) -> Iterator[None]:
    """For models outside the attention interface: eager ``output_attentions`` read by forward hooks.

    The model runs eager attention for the capture (a model on SDPA cannot return attention maps) and is
    switched back after; which tokens are padding comes from the masks the model is called with."""
    warnings.warn(
        f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface: "
        "headscope falls back to eager output_attentions=True, which materialises every layer's full "
        "(batch, heads, T, T) attention map (4 * heads * T^2 bytes per layer and example at fp32)",
        stacklevel=4,
    )
    configs = _all_configs(model)
    saved = [(c, c.output_attentions, c._attn_implementation_internal) for c in configs]
    handles = []
    try:
        if any(c._attn_implementation != "eager" for c in configs):
            _switch_to_eager(model, configs)
        for config in configs:
            config.output_attentions = True
        handles.append(model.register_forward_pre_hook(_token_mask_hook(model, session), with_kwargs=True))
        for sites in session.sites.values():
            handles.append(sites[0].module.register_forward_hook(_fallback_hook(session)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for config, value, implementation in saved:
            config.output_attentions = value
            config._attn_implementation_internal = implementation


def _switch_to_eager(model: nn.Module, configs: list) -> None:
    """Eager attention for the capture. A model that cannot switch through transformers (its attention classes
    predate the interface) reads the implementation from its config at each call, so the config is switched."""
    if model._can_set_attn_implementation():
        try:
            model.set_attn_implementation("eager")
        except (ValueError, ImportError) as error:
            raise HeadscopeError(f"headscope cannot capture {type(model).__name__}: it does not dispatch attention "
                                 f"through transformers' AttentionInterface and cannot switch to eager attention "
                                 f"({error})") from error
        return
    for config in configs:
        config._attn_implementation_internal = "eager"


def _token_mask_hook(model: nn.Module, session: _Session):
    """Records the padding masks of each top-level call: ``attention_mask`` (the encoder's, or a decoder-only
    model's) and ``decoder_attention_mask``, (batch, tokens) with 1 at real tokens."""
    signature = inspect.signature(model.forward)

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        try:
            bound = signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = kwargs
        session.token_masks = {"encoder": bound.get("attention_mask"), "decoder": bound.get("decoder_attention_mask")}

    return hook


def _fallback_validity(session: _Session, site: Site, batch: int, n_queries: int, n_keys: int,
                       device: torch.device) -> _Validity:
    """Which queries and keys of an eager map are real tokens, from the model's padding masks."""
    base = site.stack.split(":")[0]
    decoder = base == "decoder" or site.kind == "cross"
    tower = base in TOWERS  # an image or audio tower: its tokens are not the text masks'
    query_mask = None if tower else session.token_masks.get("decoder" if decoder else "encoder")
    key_mask = None if tower else session.token_masks.get("encoder" if site.kind == "cross" else
                                                            "decoder" if decoder else "encoder")

    def valid(mask: torch.Tensor | None, n: int, what: str) -> torch.Tensor:
        if mask is None or mask.ndim != 2 or bool((mask != 0).all()):
            return torch.ones(batch, n, dtype=torch.bool, device=device)
        if mask.shape[0] != batch or mask.shape[1] < n:
            raise HeadscopeError(
                f"headscope cannot place the padding of {site.stack} layer {site.layer} ({what}: {n} tokens, a mask "
                f"of {tuple(mask.shape)}): this model's eager fallback needs unpadded inputs, one example per call")
        return (mask[:, mask.shape[1] - n:] != 0).to(device) if what == "queries" else (mask[:, :n] != 0).to(device)

    keys = valid(key_mask, n_keys, "keys")
    if site.kind == "cross":
        queries = valid(query_mask, n_queries, "queries")
    else:  # a decode step's queries are the last of the sequence's tokens, its keys all of them
        queries = keys[:, n_keys - n_queries:] if n_keys >= n_queries else valid(query_mask, n_queries, "queries")
    validity = _Validity(queries, keys, keys.int().argmax(dim=1))
    if site.kind != "cross":
        session.query_valid[site.stack] = queries
    session.query_valid[site.path] = queries
    return validity


def _fallback_hook(session: _Session):
    def hook(module: nn.Module, args: tuple, output: object) -> None:
        site = session.site_of(module)
        outputs = output if isinstance(output, tuple | list) else (output,)
        maps = [o for o in outputs if isinstance(o, torch.Tensor) and o.ndim == 4 and o.shape[1] == site.heads]
        reducers = session.reducers_for(site.stack)
        if not reducers:
            return
        if not maps:
            raise HeadscopeError(f"{type(module).__name__} at '{site.path}' returned no attention map under eager "
                                 "output_attentions=True: headscope cannot capture this architecture")
        probs = maps[0].float()
        batch, _, n_queries, n_keys = probs.shape
        cross = site.kind == "cross"
        validity = _fallback_validity(session, site, batch, n_queries, n_keys, probs.device)
        chunk = Chunk(site=site, probs=probs, logits=None,
                      query_index=torch.arange(n_queries, device=probs.device),
                      query_position=None if cross else torch.arange(n_queries, device=probs.device)
                      + n_keys - n_queries,
                      query_valid=validity.query_valid, key_valid=validity.key_valid,
                      key_start=validity.key_start, call=session.call, queries=n_queries, keys=n_keys)
        for reducer in reducers:
            reducer.update(chunk)

    return hook
