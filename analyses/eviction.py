"""``eviction``: KV-cache eviction policies simulated through the attention interface, their perplexity and the
attention each head loses to them.

After Xiao et al. (2024), "Efficient Streaming Language Models with Attention Sinks" (StreamingLLM): window attention
collapses once the first tokens leave the window, and keeping a few of them ("attention sinks") restores it. And
after Xiao et al. (2025), "DuoAttention": retrieval heads keep their whole cache, streaming heads keep sinks and a
window. Policies (each query t sees key s when the policy keeps it, on top of the model's own mask):

- ``full``: every key (the baseline, always measured);
- ``window`` W: t - s < W, the query itself included;
- ``sinks+window`` (n, W): the window, and the first n tokens;
- ``per-head`` (n, W): ``retrieval_heads`` keep every key, the other heads use sinks + window.

A policy acts inside headscope's attention function (:class:`headscope.capture.eviction.Eviction` passed to
``Scope.capture``): the masked forward pass equals decoding token by token with a cache that evicts those keys, the
keys keeping their original positions. Measures, on a long text (default: the first ``tokens`` tokens of the shipped
haystack essays):

- ``perplexity`` = exp(mean over scored tokens of -log p(x_i | x_<i)) under each policy, the scored tokens being
  those at positions ``score_from`` and after (predicted by the queries at ``score_from - 1`` ... T - 2);
- per head, ``lost_mass_<policy>`` = mean over the scored queries t of sum_{s evicted for t} A[l, h, t, s] under
  full attention: the share of the head's attention that the policy takes away (reducer
  :class:`~headscope.capture.eviction.EvictedMass`; on the kernel path exp(L_E - L) from the log-sum-exp of the
  evicted keys).
"""

from __future__ import annotations

import inspect
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from headscope import plotting
from headscope.capture.adapters import Stack
from headscope.capture.eviction import EvictedMass, Eviction
from headscope.errors import HeadscopeError
from headscope.probes import needle as probe_needle
from headscope.probes import text as probe_text
from headscope.registry import Context, Parameters, register
from headscope.results import AnalysisResult, HeadMap, Results

STACK = "self"
Policy = Literal["window", "sinks+window", "per-head"]
POLICIES: tuple[Policy, ...] = ("window", "sinks+window", "per-head")
HEAD = re.compile(r"^\s*(\d+)\s*[.-]\s*(\d+)\s*$")  # "17.3" (headscope) or "17-3" (Retrieval_Head's keys)
NO_HEADS = "not run: no retrieval_heads given"
POLICY_COLOURS = {"full": 0, "window": 1, "sinks+window": 2, "per-head": 3}


@dataclass(frozen=True)
class Params(Parameters):
    """The parameters of ``eviction`` (``--set eviction.NAME=VALUE`` overrides them).

    Attributes:
        policies: the eviction policies to compare with full attention (always measured): ``window``,
            ``sinks+window``, ``per-head`` (DuoAttention: ``retrieval_heads`` full, the others sinks + window; left
            out when no retrieval heads are given).
        windows: the window sizes W (recent keys kept, the query's own included).
        sinks: the sink counts n of ``sinks+window`` and ``per-head`` (StreamingLLM keeps 4).
        score_from: the first token position whose prediction is scored (and whose query's lost mass counts).
        tokens: tokens of the text read (cut to the model's context).
        retrieval_heads: the heads that keep full attention in ``per-head``: ``layer.head`` items, or one file of
            retrieval scores (Retrieval_Head's ``{"l-h": [scores]}`` JSON, as ``retrieval`` exports it, or a
            headscope ``results.json`` holding a ``retrieval`` result), of which the ``top_k`` heads are taken.
        top_k: heads taken from a retrieval-score file.
        per_kv_head: keep whole key/value heads, as a real cache must (DuoAttention decides per KV head): a KV head
            keeps full attention when any of its query heads is a retrieval head, and so do all its query heads.
    """

    analysis = "eviction"
    policies: tuple[Policy, ...] = POLICIES
    windows: tuple[int, ...] = (256,)
    sinks: tuple[int, ...] = (1, 4)
    score_from: int = 512
    tokens: int = 2048
    retrieval_heads: tuple[str, ...] | None = None
    top_k: int = 10
    per_kv_head: bool = False

    def check(self) -> None:
        if not self.policies:
            raise HeadscopeError("eviction.policies names no policy: choose from " + ", ".join(POLICIES))
        if not self.windows or min(self.windows) < 1:
            raise HeadscopeError(f"eviction.windows must be window sizes of at least 1 key, got {list(self.windows)}")
        if not self.sinks or min(self.sinks) < 1:
            raise HeadscopeError(f"eviction.sinks must be sink counts of at least 1 (window-only is the 'window' "
                                 f"policy), got {list(self.sinks)}")
        if self.score_from < 1 or self.tokens < self.score_from + 1:
            raise HeadscopeError(f"eviction needs 1 <= score_from < tokens (a token to score), got score_from="
                                 f"{self.score_from}, tokens={self.tokens}")
        if self.top_k < 1:
            raise HeadscopeError(f"eviction.top_k must be at least 1, got {self.top_k}")
        if self.retrieval_heads is not None:
            _head_spec(self.retrieval_heads)  # refuses a malformed list or a missing file here


def _head_spec(spec: tuple[str, ...]) -> list[tuple[int, int]] | Path:
    """``spec`` read as (layer, head) pairs, or as the path of one retrieval-score file."""
    pairs = [HEAD.match(item) for item in spec]
    if spec and all(pairs):
        return [(int(m[1]), int(m[2])) for m in pairs]
    if len(spec) == 1 and not HEAD.match(spec[0]):
        path = Path(spec[0])
        if not path.is_file():
            raise HeadscopeError(f"eviction.retrieval_heads: no such file {path} (give layer.head items such as "
                                 "17.3,18.6, or a retrieval-score file)")
        return path
    raise HeadscopeError(f"eviction.retrieval_heads takes layer.head items (17.3,18.6) or one retrieval-score file, "
                         f"not {list(spec)!r}")


def retrieval_heads(spec: tuple[str, ...], top_k: int, stack: Stack) -> list[tuple[int, int]]:
    """The heads named by ``spec`` (see :class:`Params`), checked against ``stack``; from a file, its ``top_k``
    highest-scoring heads (mean score per head; NaN left out), highest first."""
    found = _head_spec(spec)
    if isinstance(found, Path):
        scores = _scores(found, stack)
        flat = np.nan_to_num(scores.ravel(), nan=-np.inf)
        order = [int(i) for i in np.argsort(-flat, kind="stable") if np.isfinite(flat[i])][:top_k]
        found = [(i // stack.heads, i % stack.heads) for i in order]
        if not found:
            raise HeadscopeError(f"eviction.retrieval_heads: {spec[0]} holds no finite retrieval score")
    for layer, head in found:
        if not (0 <= layer < stack.layers and 0 <= head < stack.heads):
            raise HeadscopeError(f"eviction.retrieval_heads: no head {layer}.{head} in stack {stack.name!r} "
                                 f"({stack.layers} layers of {stack.heads} heads)")
    return list(dict.fromkeys(found))


def _scores(path: Path, stack: Stack) -> np.ndarray:
    """(layers, heads) retrieval scores of a file: headscope's results.json or Retrieval_Head's ``{"l-h": [...]}``."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HeadscopeError(f"eviction.retrieval_heads: cannot read {path} as JSON ({type(error).__name__})") from None
    if isinstance(document, dict) and "schema" in document:
        results = Results.load(path)
        if "retrieval" not in results or ("retrieval_score", STACK) not in results["retrieval"].maps:
            raise HeadscopeError(f"eviction.retrieval_heads: {path} holds no retrieval result with a retrieval_score")
        values = results["retrieval"].map("retrieval_score", STACK).values
        if values.shape != (stack.layers, stack.heads):
            raise HeadscopeError(f"eviction.retrieval_heads: {path} scores {values.shape[0]} x {values.shape[1]} "
                                 f"heads; this model has {stack.layers} x {stack.heads}")
        return values
    if not isinstance(document, dict) or not all(HEAD.match(str(k)) and isinstance(v, list) for k, v in
                                                 document.items()):
        raise HeadscopeError(f"eviction.retrieval_heads: {path} is neither a headscope results.json nor "
                             'Retrieval_Head\'s {"layer-head": [scores]} file')
    scores = np.full((stack.layers, stack.heads), np.nan)
    for name, values in document.items():
        layer, head = (int(part) for part in HEAD.match(name).groups())
        if not (0 <= layer < stack.layers and 0 <= head < stack.heads):
            raise HeadscopeError(f"eviction.retrieval_heads: {path} scores head {layer}.{head}, which stack "
                                 f"{stack.name!r} does not have ({stack.layers} x {stack.heads})")
        scores[layer, head] = float(np.mean(values)) if values else np.nan
    return scores


@dataclass(frozen=True)
class _Policy:
    """One policy of the comparison: its kind, settings, metric name and the engine's object."""

    kind: str
    sinks: int
    window: int | None
    eviction: Eviction | None  # None: full attention

    @property
    def metric(self) -> str:
        if self.kind == "window":
            return f"lost_mass_window_{self.window}"
        prefix = "lost_mass_per_head" if self.kind == "per-head" else "lost_mass"
        return f"{prefix}_sinks_{self.sinks}_window_{self.window}"

    @property
    def label(self) -> str:
        return "full" if self.eviction is None else self.eviction.describe()


def plan(params: Params, stack: Stack, full_heads: torch.Tensor | None) -> list[_Policy]:
    """Full attention, then each asked policy for every window (and sink count)."""
    chosen = [_Policy("full", 0, None, None)]
    for window in dict.fromkeys(params.windows):
        if "window" in params.policies:
            chosen.append(_Policy("window", 0, window, Eviction(window=window, stack=stack.name)))
        for sinks in dict.fromkeys(params.sinks):
            if "sinks+window" in params.policies:
                chosen.append(_Policy("sinks+window", sinks, window, Eviction(window, sinks, stack=stack.name)))
            if "per-head" in params.policies and full_heads is not None:
                chosen.append(_Policy("per-head", sinks, window, Eviction(window, sinks, full_heads, stack.name)))
    return chosen


def full_head_table(heads: list[tuple[int, int]], stack: Stack, per_kv_head: bool) -> torch.Tensor:
    """(layers, heads) bool: the heads that keep full attention; with ``per_kv_head``, every query head of a
    key/value head that any listed head reads."""
    table = torch.zeros(stack.layers, stack.heads, dtype=torch.bool)
    group = stack.heads // stack.kv_heads
    for layer, head in heads:
        if per_kv_head:
            table[layer, head // group * group:(head // group + 1) * group] = True
        else:
            table[layer, head] = True
    return table


def _input(context: Context, params: Params, tokenizer) -> tuple[torch.Tensor, str, str | None]:
    """(1, T) token ids of the text read, where it comes from, and a note when it was cut to the context."""
    if context.input_path is not None:
        text, source = probe_text.read_text(context.input_path), "user file"
    elif context.text is not None:
        text, source = context.text, "user text"
    else:
        text = "\n\n".join(probe_needle.haystack_documents())
        source = "shipped haystack essays (probes/data/haystack), in file order"
    if not text.strip():
        raise HeadscopeError("the input text is empty: give some text with --text or --input")
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][:, : params.tokens]
    note = None
    for limit, why in ((context.max_tokens, "--max-tokens"), (context.loaded.info.max_tokens, "the model's context")):
        if limit is not None and ids.shape[1] > limit:
            note = f"cut to {limit} tokens by {why} (tokens={params.tokens})"
            ids = ids[:, :limit]
    if ids.shape[1] <= params.score_from:
        cut = f" after it was {note.split(' (')[0]}" if note else ""
        raise HeadscopeError(f"eviction scores tokens from position {params.score_from} on, and the text has "
                             f"{ids.shape[1]} tokens{cut}: give a longer text or lower eviction.score_from")
    return ids, source, note


def _nll(model: torch.nn.Module, ids: torch.Tensor, score_from: int) -> torch.Tensor:
    """(T - score_from,) float64 negative log-likelihood of each token from ``score_from`` on (one forward)."""
    kept = ids.shape[1] - score_from + 1
    extra = {"logits_to_keep": kept} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    logits = model(input_ids=ids, **extra).logits[0, -kept:-1].double()
    return -torch.log_softmax(logits, dim=-1).gather(-1, ids[0, score_from:, None])[:, 0]


def _figures(result: AnalysisResult) -> dict[str, go.Figure]:
    return figures(result)


@register("eviction", kinds=("decoder",), params=Params,
          description="KV-cache eviction simulated through the attention interface: perplexity under window, "
                      "sinks + window (StreamingLLM) and per-head (DuoAttention) policies, and per head the attention "
                      "mass each policy evicts",
          figures=_figures, default=False,
          cost="about 37 s on smollm2-135m at 2048 tokens (2 CPU cores)")
def run(context: Context) -> AnalysisResult:
    started = time.perf_counter()
    params = Params.read(context.params)
    loaded, scope = context.loaded, context.scope
    if STACK not in scope.stacks:
        raise HeadscopeError(f"eviction needs a '{STACK}' attention stack; this model has {list(scope.stacks)}")
    stack = scope.stacks[STACK]
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    ids, source, note = _input(context, params, tokenizer)
    heads = (retrieval_heads(params.retrieval_heads, params.top_k, stack)
             if params.retrieval_heads is not None else None)
    full_heads = None if heads is None else full_head_table(heads, stack, params.per_kv_head)
    policies = plan(params, stack, full_heads)
    model = loaded.model
    ids = ids.to(model.device)
    scored = torch.zeros(ids.shape, dtype=torch.bool, device=model.device)
    scored[:, params.score_from - 1: -1] = True  # the queries whose next-token prediction is scored
    lost = {p.metric: EvictedMass(p.eviction, query_mask=scored) for p in policies if p.eviction is not None}
    nll = {}
    with torch.no_grad():
        with scope.capture(*lost.values()):  # full attention: the model as it is, the lost mass read alongside
            nll["full"] = _nll(model, ids, params.score_from)
        for policy in policies[1:]:
            with scope.capture(eviction=policy.eviction):
                nll[policy.metric] = _nll(model, ids, params.score_from)

    result = AnalysisResult(name="eviction", params={**params.__dict__, "stack": STACK})
    rows = []
    for policy in policies:
        losses = nll["full" if policy.eviction is None else policy.metric]
        mean = float(losses.mean())
        if policy.eviction is not None:
            values = lost[policy.metric].result()[STACK]
            result.add_map(policy.metric, HeadMap(
                values, STACK, f"mean attention mass, under full attention, on the keys that {policy.label} evicts "
                               f"(queries from position {params.score_from - 1})", unit="share"))
        rows.append({"policy": policy.kind, "n_sink": policy.sinks, "window": policy.window,
                     "full_heads": 0 if policy.eviction is None or policy.eviction.full_heads is None
                     else int(policy.eviction.full_heads.sum()),
                     "label": policy.label, "metric": "" if policy.eviction is None else policy.metric,
                     "perplexity": math.exp(mean), "mean_nll": mean,
                     "tokens_scored": int(losses.numel()),
                     "lost_mass": 0.0 if policy.eviction is None else float(np.nanmean(values))})
    table = pd.DataFrame(rows).astype({"window": "Int64"})
    table["perplexity_ratio"] = table["perplexity"] / table["perplexity"].iloc[0]
    result.tables["policies"] = table
    result.summary = _summary(result, table, policies, params, source, ids.shape[1], heads, note)
    result.seconds = time.perf_counter() - started
    return result


def _summary(result: AnalysisResult, table: pd.DataFrame, policies: list[_Policy], params: Params, source: str,
             tokens: int, heads: list[tuple[int, int]] | None, note: str | None) -> dict[str, Any]:
    summary: dict[str, Any] = {"input": source, "tokens": tokens, "score_from": params.score_from,
                               "tokens_scored": int(table["tokens_scored"].iloc[0])}
    if note is not None:
        summary["input_note"] = note
    summary["perplexity"] = {row.label: round(row.perplexity, 4) for row in table.itertuples()}
    summary["lost_mass"] = {row.label: round(row.lost_mass, 4) for row in table.itertuples() if row.policy != "full"}
    streaming = [p for p in policies if p.kind == "sinks+window"] or [p for p in policies if p.eviction is not None]
    if streaming:
        main = streaming[-1]
        summary["main_metric"] = main.metric
        summary["top_lost_heads"] = [f"{layer}.{head}={value:.3f}" for layer, head, value
                                     in result.top_heads(main.metric, k=5)]
    if "per-head" in params.policies:
        summary["retrieval_heads"] = NO_HEADS if heads is None else [f"{layer}.{head}" for layer, head in heads]
    return summary


def figures(result: AnalysisResult) -> dict[str, go.Figure]:
    """``perplexity``: perplexity per policy (bars, log scale); ``lost_mass_by_layer``: per policy, the attention
    mass it evicts per layer (mean over heads, under full attention)."""
    table = result.tables["policies"]
    colours = [plotting.CATEGORICAL[POLICY_COLOURS.get(kind, 0) % len(plotting.CATEGORICAL)]
               for kind in table["policy"]]
    bars = go.Figure(go.Bar(x=table["label"], y=table["perplexity"], marker_color=colours,
                            text=[f"{value:.2f}" for value in table["perplexity"]], textposition="outside",
                            customdata=table["lost_mass"],
                            hovertemplate="%{x}<br>perplexity %{y:.3f}<br>mean lost mass %{customdata:.3f}"
                                          "<extra></extra>"))
    bars.update_layout(title=f"eviction: perplexity per policy (tokens from {result.params.get('score_from')}, "
                             f"{int(table['tokens_scored'].iloc[0])} scored)",
                       xaxis_title="policy", yaxis_title="perplexity (log scale)", yaxis_type="log",
                       template="simple_white")
    out = {"perplexity": bars}
    profile = go.Figure()
    for row in table[table["metric"] != ""].itertuples():
        values = result.map(row.metric, STACK).values
        profile.add_scatter(x=np.arange(values.shape[0]), y=np.nanmean(values, axis=1), mode="lines+markers",
                            name=row.label)
    if profile.data:
        profile.update_layout(title="eviction: attention mass each policy evicts, per layer (mean over heads, "
                                    "under full attention)", xaxis_title="layer", yaxis_title="lost mass (share)",
                              yaxis_range=[0, 1.02], template="simple_white")
        out["lost_mass_by_layer"] = profile
    return out

