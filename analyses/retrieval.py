"""``retrieval``: retrieval heads, found by copy-paste events while the model reads a needle out of a haystack.

After Wu et al. (2024), "Retrieval Head Mechanistically Explains Long-Context Factuality". Each test hides a
needle sentence at depth d of a haystack of about n tokens (``headscope.probes.needle``) and decodes the
answer greedily (at most ``max_new_tokens``, stopping at a newline once the answer has begun, or at the
end-of-sequence token). At decode step t, with w_t the token being generated and k_t(l, h) the key that
head (l, h)'s current query row attends to most (argmax):

- copy-paste event: k_t(l, h) lies in the needle's span [a, b) and the prompt's token at k_t(l, h) is w_t;
- per-test score: s(l, h) = (number of events) / (b - a);
- a test counts when the ROUGE-1 recall of the needle's answer in the output exceeds ``recall`` (0.5);
- ``retrieval_score`` = mean of s(l, h) over the counted tests; retrieval heads score above ``threshold``
  (0.1).

Only the current query row of each head is read per step (the capture engine's ``LastRow`` reducer, one
(heads, keys) row per layer handed over and dropped): the prompt is prefilled outside the capture at full
speed (SDPA, no attention kept) except its last token, whose row predicts the first answer token, so every
generated token is scored. Memory stays flat as the haystack grows.

Causal check (``verify``): needle accuracy with the ``top_k`` retrieval heads zeroed (per-head gates, scale
0, prefill and decoding) against ``top_k`` random heads (from the others) zeroed, ``random_seeds`` draws,
all conditions of one prompt decoded as rows of one batch. ``export_json`` writes Retrieval_Head's
``{"l-h": [per-test scores]}`` file.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from headscope import distributed, progress
from headscope.capture.engine import Scope
from headscope.capture.gates import Gates
from headscope.capture.reducers import LastRow
from headscope.errors import HeadscopeError
from headscope.models.cache import cache_kwargs, output_cache
from headscope.probes import needle as probe_needle
from headscope.registry import Context, Parameters, register
from headscope.results import AnalysisResult, HeadMap

STACK = "self"
DESCRIPTION = ("mean over counted needle tests of the copy-paste events per needle token: the head's argmax key "
               "lies in the needle and holds the token being generated (Wu et al. 2024)")
WORD = re.compile(r"[a-z0-9]+")
EXPORT_NAME = "retrieval_heads.json"  # Retrieval_Head's {"l-h": [scores]} format


@dataclass(frozen=True)
class Params(Parameters):
    """The parameters of ``retrieval`` (``--set retrieval.NAME=VALUE`` overrides them).

    Attributes:
        lengths: prompt lengths in tokens (the paper: up to 50k; a list, or comma-separated text).
        depths: needle depths: a count of evenly spaced depths from 0 to 1, or a list of fractions.
        needles: how many needles of the file to use, drawn with the seed (all when more than the file holds).
        needles_file: a JSONL file of needles (fields needle, question, prefix, answer); default: the shipped one.
        haystack: a UTF-8 text file to use as the haystack (``--input`` works too); default: the shipped essays.
        prompt: ``"continuation"`` (the prompt ends with the needle's prefix) or ``"question"``.
        chat_template: wrap the prompt in the tokenizer's chat template when it has one.
        max_new_tokens: the longest answer decoded (the paper: 50).
        recall: the ROUGE-1 recall of the answer a test's output must exceed to count.
        threshold: retrieval heads score above it (the paper: 0.1).
        verify: run the causal check.
        top_k: heads masked in the causal check.
        random_seeds: random head sets masked in the causal check.
        seed: draws the needles, the order of the haystack's documents and the random heads.
    """

    analysis = "retrieval"
    lengths: tuple[int, ...] = (256, 512, 1024)
    depths: int | tuple[float, ...] = 5
    needles: int = 3
    needles_file: str | None = None
    haystack: str | None = None
    prompt: probe_needle.Prompt = "continuation"
    chat_template: bool = True
    max_new_tokens: int = 50
    recall: float = 0.5
    threshold: float = 0.1
    verify: bool = False
    top_k: int = 10
    random_seeds: int = 3
    seed: int = 0

    def check(self) -> None:
        params = self
        if not params.lengths or min(params.lengths) < 2:
            raise HeadscopeError(f"retrieval.lengths must be at least 2 tokens each, got {list(params.lengths)}")
        if params.max_new_tokens < 1 or params.top_k < 1 or params.random_seeds < 1 or params.needles < 1:
            raise HeadscopeError("retrieval needs needles, max_new_tokens, top_k and random_seeds of at least 1")
        if not 0 <= params.recall < 1 or params.threshold < 0:
            raise HeadscopeError("retrieval.recall must lie in [0, 1) and retrieval.threshold must be 0 or more")
        probe_needle.depth_grid(params.depths)  # refuses a bad grid here


def _figures(result: AnalysisResult) -> dict[str, go.Figure]:
    return figures(result)


def _exports(result: AnalysisResult, folder: Path) -> list[Path]:
    return [export_json(result, folder / EXPORT_NAME)]


@register("retrieval", kinds=("decoder",), params=Params, main_metric="retrieval_score",
          description="retrieval heads: copy-paste scores while decoding needles out of haystacks (Wu et al. 2024), "
                      "needle accuracy by length and depth, causal check by masking heads",
          figures=_figures, exports=_exports, default=False,
          cost="about 1 min 30 s on smollm2-135m (2 CPU cores)")  # minutes of decoding: run it by name
def run(context: Context) -> AnalysisResult:
    started = time.perf_counter()
    params = Params.read(context.params, context.seed)
    loaded, scope = context.loaded, context.scope
    if STACK not in scope.stacks:
        raise HeadscopeError(f"retrieval needs a '{STACK}' attention stack; this model has {list(scope.stacks)}")
    tokenizer = getattr(loaded.processor, "tokenizer", loaded.processor)
    haystack_path, source = _haystack_source(context, params)
    documents = ([context.text] if context.text is not None and haystack_path is None
                 else probe_needle.haystack_documents(haystack_path))
    needles = probe_needle.read_needles(params.needles_file)
    context_tokens = loaded.info.max_tokens
    if context_tokens and max(params.lengths) > context_tokens:
        raise HeadscopeError(f"length {max(params.lengths)} exceeds the model's context of {context_tokens} tokens: "
                             f"set retrieval.lengths")
    chosen = probe_needle.choose_needles(needles, params.needles, params.seed)
    depths = probe_needle.depth_grid(params.depths)
    tests = probe_needle.build(tokenizer, params.lengths, depths, [(i, needles[i]) for i in chosen], documents,
                               params.seed, params.prompt, params.chat_template)

    model = loaded.model
    layers, heads = scope.stacks[STACK].layers, scope.stacks[STACK].heads
    mine = []
    share = distributed.split(list(enumerate(tests)))  # under torchrun, a share of the tests each
    for number, test in progress.steps(share, "retrieval: needle tests"):
        generation = greedy(model, scope, tokenizer, torch.tensor([test.input_ids]), params.max_new_tokens,
                            score=True)
        output = generation.texts[0]
        recall = rouge1_recall(test.needle.answer, output)
        found = copy_paste_scores(generation.positions, generation.tokens[0], test.input_ids, test.span)
        row = {"test": number, "length": test.length, "prompt_tokens": len(test.input_ids), "depth": test.depth,
               "needle_depth": round(test.actual_depth, 4), "needle": test.needle_index,
               "needle_start": test.span[0], "needle_stop": test.span[1], "output": output, "recall": recall,
               "passed": recall > params.recall, "generated_tokens": len(generation.tokens[0])}
        mine.append((number, generation.seconds, found, row))
    rows, scores, timing = [], np.zeros((len(tests), layers, heads)), Counter()
    for number, seconds, found, row in sorted(distributed.gathered(mine), key=lambda one: one[0]):
        scores[number] = found
        timing.update(seconds)
        rows.append(row)
    table = pd.DataFrame(rows)
    passed = table["passed"].to_numpy(bool)
    score = scores[passed].mean(axis=0) if passed.any() else np.full((layers, heads), np.nan)

    result = AnalysisResult(name="retrieval", params={**params.__dict__, "stack": STACK, "haystack_source": source})
    result.add_map("retrieval_score", HeadMap(score, STACK, DESCRIPTION))
    result.tables["tests"] = table
    result.tables["accuracy"] = accuracy_table(table)
    events = np.argwhere(scores > 0)
    result.tables["head_scores"] = pd.DataFrame({
        "test": events[:, 0], "layer": events[:, 1], "head": events[:, 2],
        "score": scores[tuple(events.T)]}).astype({"test": "int64", "layer": "int64", "head": "int64"})
    if params.verify:
        if passed.any():
            verify_rows = causal_check(model, scope, tokenizer, tests, score, params)
            result.tables["verify"] = verify_rows
            result.tables["verify_accuracy"] = verify_accuracy(table, verify_rows)
        else:
            result.summary["verify_skipped"] = "no test passed the gate, so there are no retrieval heads to mask"
    result.summary["chat_template_used"] = params.chat_template and bool(getattr(tokenizer, "chat_template", None))
    result.summary = {**_summary(result, table, score, params, source, documents, timing), **result.summary}
    result.seconds = time.perf_counter() - started
    return result


def _haystack_source(context: Context, params: Params) -> tuple[str | None, str]:
    if params.haystack is not None and (context.input_path is not None or context.text is not None):
        raise HeadscopeError("give the haystack once: either --input/--text or retrieval.haystack")
    path = params.haystack if params.haystack is not None else context.input_path
    if path is not None:
        return path, f"user file ({Path(path).name})"
    if context.text is not None:
        return None, "user text"
    return None, "shipped essays (probes/data/haystack)"


# --- decoding ------------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """What :func:`greedy` decoded.

    Attributes:
        tokens: per row, the generated ids, up to and including the one that stopped the row.
        texts: per row, the answer: the first non-blank line of the decoded tokens, stripped.
        positions: (steps, layers, heads) absolute position of each head's argmax key at each step (row 0),
            when scored; steps beyond row 0's stop are not kept.
        seconds: ``{"prefill": ..., "decode": ...}`` wall time.
    """

    tokens: list[list[int]]
    texts: list[str]
    positions: np.ndarray | None
    seconds: dict[str, float]


class _ArgmaxRows:
    """A ``LastRow`` callback: each decode step's argmax key per head, as an absolute position.

    At a decode step the current query is the last key of the row ((heads, keys), batch row 0), and a cache
    hands attention the latest keys in order (a sliding-window cache drops only the oldest), so the key at
    index i of a row of K keys lies K - 1 - i positions before the query.
    """

    def __init__(self, layers: int, heads: int) -> None:
        self.query = 0
        self.step = np.full((layers, heads), -1, dtype=np.int64)

    def __call__(self, site, call: int, row: torch.Tensor) -> None:
        if site.stack != STACK:
            return
        index = row[0].argmax(dim=-1).cpu().numpy()
        self.step[site.layer, : site.heads] = self.query - (row.shape[-1] - 1 - index)


def greedy(model: torch.nn.Module, scope: Scope, tokenizer, input_ids: torch.Tensor, max_new_tokens: int,
           gates: Sequence[Gates] = (), score: bool = False) -> Generation:
    """Greedy decoding of ``input_ids`` (batch, tokens) with a KV cache, each row stopped on its own.

    A row stops at an end-of-sequence token, or at a newline once its answer has begun (leading newlines
    are decoded past), or after ``max_new_tokens``. ``gates`` act on the prefill and every step. With
    ``score``, the prompt less its last token is prefilled outside any reducer (SDPA, nothing kept) and each
    step, the last prompt token's included, runs inside a capture whose ``LastRow`` reducer records each
    head's argmax key (row 0).
    """
    device = model.device
    input_ids = input_ids.to(device)
    batch, prompt = input_ids.shape
    if prompt < 2:
        raise HeadscopeError("a needle prompt needs at least 2 tokens")
    stops = _eos_ids(model, tokenizer)
    stack = scope.stacks[STACK]
    rows = _ArgmaxRows(stack.layers, stack.heads) if score else None
    reducers = (LastRow(callback=rows, stacks=[STACK]),) if score else ()
    tokens: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    positions = []
    seconds = {"prefill": 0.0, "decode": 0.0}
    with torch.no_grad():
        clock = time.perf_counter()
        with scope.capture(gates=gates):
            cache = output_cache(model(input_ids=input_ids[:, :-1], use_cache=True, logits_to_keep=1))
        seconds["prefill"] = time.perf_counter() - clock
        clock = time.perf_counter()
        current = input_ids[:, -1:]
        with scope.capture(*reducers, gates=gates):
            for step in range(max_new_tokens):
                if rows is not None:
                    rows.query = prompt - 1 + step
                logits = model(input_ids=current, use_cache=True, **cache_kwargs(model, cache)).logits[:, -1]
                current = logits.argmax(dim=-1, keepdim=True)
                if rows is not None and not done[0]:
                    positions.append(rows.step.copy())
                for b, token in enumerate(current[:, 0].tolist()):
                    if not done[b]:
                        tokens[b].append(token)
                        done[b] = token in stops or "\n" in tokenizer.decode(tokens[b]).lstrip()
                if all(done):
                    break
        seconds["decode"] = time.perf_counter() - clock
    texts = [_answer(tokenizer.decode(row, skip_special_tokens=True)) for row in tokens]
    return Generation(tokens, texts, np.stack(positions) if score else None, seconds)


def _eos_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _answer(text: str) -> str:
    return text.lstrip().split("\n", 1)[0].strip()


# --- scoring -------------------------------------------------------------------------------------------------


def copy_paste_scores(positions: np.ndarray, generated: Sequence[int], prompt_ids: Sequence[int],
                      span: tuple[int, int]) -> np.ndarray:
    """(layers, heads) per-test retrieval score of Wu et al. (2024).

    ``positions`` (steps, layers, heads): the absolute position of each head's argmax key at each decode
    step; ``generated`` (steps,): the token generated at each step; ``span`` = [a, b): the needle's tokens in
    ``prompt_ids``. s(l, h) = 1/(b - a) x #{t : a <= positions[t, l, h] < b and prompt_ids[positions[t, l, h]]
    == generated[t]}.
    """
    start, stop = span
    positions = np.asarray(positions)
    generated = np.asarray(generated)[: len(positions)]
    prompt = np.asarray(prompt_ids)
    inside = (positions >= start) & (positions < stop)
    copied = prompt[np.clip(positions, 0, len(prompt) - 1)] == generated[:, None, None]
    return (inside & copied).sum(axis=0) / (stop - start)


def rouge1_recall(reference: str, candidate: str) -> float:
    """ROUGE-1 recall of ``reference`` in ``candidate``: the share of the reference's words (with their counts)
    that the candidate holds, words being lower-cased runs of ``[a-z0-9]`` (the ``rouge_score`` package's
    default tokenizer, without its optional Porter stemmer). 0 for a reference without words."""
    words = Counter(WORD.findall(reference.lower()))
    found = Counter(WORD.findall(candidate.lower()))
    total = sum(words.values())
    return sum(min(count, found[word]) for word, count in words.items()) / total if total else 0.0


def accuracy_table(tests: pd.DataFrame) -> pd.DataFrame:
    """Needle accuracy per (length, depth): tests, passed, accuracy (passed / tests), mean recall."""
    grouped = tests.groupby(["length", "depth"], sort=True)
    table = grouped.agg(tests=("passed", "size"), passed=("passed", "sum"), mean_recall=("recall", "mean"))
    table["accuracy"] = table["passed"] / table["tests"]
    return table.reset_index()[["length", "depth", "tests", "passed", "accuracy", "mean_recall"]]


# --- causal check ----------------------------------------------------------------------------------------------


def causal_check(model: torch.nn.Module, scope: Scope, tokenizer, tests: list[probe_needle.NeedleTest],
                 score: np.ndarray, params: Params) -> pd.DataFrame:
    """Each test decoded with the ``top_k`` highest-scoring heads zeroed and with ``random_seeds`` sets of
    ``top_k`` random heads (drawn from the other heads) zeroed: one batch per test, a gate row per condition.

    Columns: test, length, depth, needle, condition (``top_k`` or ``random``), draw (0 for top_k, else the
    random draw), heads (``layer.head`` list), output, recall, passed.
    """
    layers, heads = score.shape
    total = layers * heads
    if params.top_k >= total:
        raise HeadscopeError(f"top_k must be below the model's {total} heads, got {params.top_k}")
    flat = np.nan_to_num(score.ravel(), nan=-np.inf)
    top = np.argsort(-flat, kind="stable")[: params.top_k]
    others = np.setdiff1d(np.arange(total), top)
    generator = np.random.default_rng(params.seed)
    sets = [("top_k", 0, top)] + [("random", draw + 1, np.sort(generator.choice(others, params.top_k, replace=False)))
                                  for draw in range(params.random_seeds)]
    scale = torch.ones(len(sets), total)
    for row, (_, _, chosen) in enumerate(sets):
        scale[row, torch.as_tensor(chosen)] = 0.0
    gates = [Gates(stack=STACK, scale=scale.view(len(sets), layers, heads))]
    names = [" ".join(f"{i // heads}.{i % heads}" for i in chosen) for _, _, chosen in sets]
    rows = []
    for number, test in enumerate(tests):
        batch = torch.tensor([test.input_ids]).expand(len(sets), -1)
        generation = greedy(model, scope, tokenizer, batch, params.max_new_tokens, gates=gates)
        for (condition, draw, _), heads_masked, output in zip(sets, names, generation.texts, strict=True):
            recall = rouge1_recall(test.needle.answer, output)
            rows.append({"test": number, "length": test.length, "depth": test.depth, "needle": test.needle_index,
                         "condition": condition, "draw": draw, "heads": heads_masked, "output": output,
                         "recall": recall, "passed": recall > params.recall})
    return pd.DataFrame(rows)


def verify_accuracy(tests: pd.DataFrame, verify: pd.DataFrame) -> pd.DataFrame:
    """Needle accuracy per length and overall (length ``"all"``) for the clean run, the top-k masked run and
    each random draw. Columns: condition, draw, length, tests, accuracy."""
    clean = tests.assign(condition="clean", draw=0)[["condition", "draw", "length", "passed"]]
    both = pd.concat([clean, verify[["condition", "draw", "length", "passed"]]], ignore_index=True)
    per_length = both.groupby(["condition", "draw", "length"], sort=False)["passed"].agg(["size", "mean"])
    overall = both.groupby(["condition", "draw"], sort=False)["passed"].agg(["size", "mean"])
    overall = overall.assign(length="all").set_index("length", append=True)
    table = pd.concat([per_length.reset_index().astype({"length": str}), overall.reset_index()], ignore_index=True)
    return table.rename(columns={"size": "tests", "mean": "accuracy"})[["condition", "draw", "length", "tests",
                                                                           "accuracy"]]


# --- summary, export, figures ----------------------------------------------------------------------------------


def _summary(result: AnalysisResult, table: pd.DataFrame, score: np.ndarray, params: Params, source: str,
             documents: list[str], timing: Counter) -> dict[str, Any]:
    over = [(layer, head, value) for layer, head, value in result.top_heads("retrieval_score", k=score.size)
            if value > params.threshold]
    by_length = table.groupby("length")["passed"]
    summary: dict[str, Any] = {
        "haystack": source,
        "haystack_sha256": hashlib.sha256("\n\n".join(documents).encode()).hexdigest(),
        "tests": len(table),
        "tests_passed": int(table["passed"].sum()),
        "passed_per_length": {str(length): int(n) for length, n in by_length.sum().items()},
        "accuracy_per_length": {str(length): float(a) for length, a in by_length.mean().items()},
        "accuracy": float(table["passed"].mean()),
        "retrieval_heads": [f"{layer}.{head}={value:.3g}" for layer, head, value in over],
        "retrieval_heads_count": len(over),
        "retrieval_heads_share": len(over) / score.size,
        "top_retrieval_score": [f"{layer}.{head}={value:.3g}" for layer, head, value
                                in result.top_heads("retrieval_score", k=5)],
        "prefill_seconds": round(timing["prefill"], 3),
        "decode_seconds": round(timing["decode"], 3),
        "generated_tokens": int(table["generated_tokens"].sum()),
    }
    if not table["passed"].any():
        summary["note"] = "no test passed the gate: retrieval_score is undefined (NaN)"
    if "verify_accuracy" in result.tables:
        overall = result.tables["verify_accuracy"].query("length == 'all'")
        random = overall[overall["condition"] == "random"]["accuracy"]
        summary["verify"] = {
            "top_k": params.top_k,
            "heads_masked": result.tables["verify"].query("condition == 'top_k'")["heads"].iloc[0],
            "accuracy_clean": float(table["passed"].mean()),
            "accuracy_top_k_masked": float(overall[overall["condition"] == "top_k"]["accuracy"].iloc[0]),
            "accuracy_random_masked": float(random.mean()),
            "accuracy_random_masked_per_draw": [float(a) for a in random],
        }
    return summary


def export_json(result: AnalysisResult, path: str | Path) -> Path:
    """Save the per-test scores of the counted tests in Retrieval_Head's format, ``{"l-h": [scores]}`` (one
    entry per head, the scores in test order; the reference code's score per head is their mean); returns
    the path."""
    path = Path(path)
    layers, heads = result.map("retrieval_score", STACK).values.shape
    counted = result.tables["tests"].query("passed")["test"].tolist()
    scores = np.zeros((len(counted), layers, heads))
    where = {test: i for i, test in enumerate(counted)}
    for row in result.tables["head_scores"].itertuples():
        if row.test in where:
            scores[where[row.test], row.layer, row.head] = row.score
    document = {f"{layer}-{head}": scores[:, layer, head].tolist() for layer in range(layers) for head in range(heads)}
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def figures(result: AnalysisResult) -> dict[str, go.Figure]:
    """``needle_accuracy``: the classic needle-in-a-haystack picture, accuracy per length (x) and depth (y);
    ``verify`` (with the causal check): accuracy per length, clean vs top-k heads masked vs random heads."""
    accuracy = result.tables["accuracy"]
    grid = accuracy.pivot(index="depth", columns="length", values="accuracy")
    recall = accuracy.pivot(index="depth", columns="length", values="mean_recall")
    out = {"needle_accuracy": go.Figure(go.Heatmap(
        z=grid.to_numpy(), x=[str(c) for c in grid.columns], y=[f"{d:.0%}" for d in grid.index],
        customdata=recall.to_numpy(), zmin=0, zmax=1, colorscale="RdYlGn", colorbar={"title": "accuracy"},
        texttemplate="%{z:.2f}",
        hovertemplate="length %{x}<br>depth %{y}<br>accuracy %{z:.2f}<br>mean recall %{customdata:.2f}"
                      "<extra></extra>"))}
    out["needle_accuracy"].update_layout(title="retrieval: needle accuracy by prompt length and depth",
                                         xaxis_title="prompt length (tokens)", yaxis_title="needle depth",
                                         yaxis_autorange="reversed", template="simple_white", width=720, height=480)
    if "verify_accuracy" in result.tables:
        table = result.tables["verify_accuracy"]
        figure = go.Figure()
        k = result.params.get("top_k")
        for condition, name in (("clean", "no head masked"), ("top_k", f"top {k} retrieval heads masked"),
                                ("random", f"{k} random heads masked (mean over draws)")):
            rows = table[table["condition"] == condition].groupby("length", sort=False)["accuracy"]
            mean, spread = rows.mean(), rows.std(ddof=0).fillna(0.0)
            figure.add_trace(go.Bar(x=list(mean.index), y=mean.to_numpy(), name=name, texttemplate="%{y:.2f}",
                                    textposition="outside",
                                    error_y={"type": "data", "array": spread.to_numpy(),
                                             "visible": condition == "random"}))
        figure.update_layout(title="retrieval: causal check", xaxis_title="prompt length (tokens)",
                             yaxis_title="needle accuracy", yaxis_range=[0, 1.15], barmode="group",
                             template="simple_white", width=720, height=480)
        out["verify"] = figure
    return out
