"""Published findings, reproduced on the packaged models: the regression suite behind ``docs/published.md``.

Each :class:`Finding` names a paper's result, the protocol headscope follows (the paper's parameters, scaled only
where this machine forces it, and then saying how), the paper's model and number, and a ``measure`` function
that runs the protocol through headscope's own analyses and returns a :class:`Reproduction`: the table of the
paper's and headscope's numbers, and the claims checked against them. ``headscope reproduce`` runs them and
writes the page; ``tests/test_published.py`` runs each one and fails when a claim's outcome changes (a claim the
small models do not reproduce is recorded as such, with its numbers, and must stay so until someone looks).
"""

from __future__ import annotations

import html
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import torch

from headscope.errors import HeadscopeError
from headscope.probes.repeated import added_frame
from headscope.results import write_atomically

START = "<!-- published:start -->"
END = "<!-- published:end -->"


@dataclass(frozen=True)
class Row:
    """One line of a finding's table: a quantity as the paper measured it and as headscope measures it."""

    quantity: str
    paper_model: str
    paper: str
    model: str
    measured: str


@dataclass(frozen=True)
class Claim:
    """What the paper found, as checked here: ``holds`` is the outcome; ``expected`` what the suite pins (False
    for a finding these small models do not reproduce, with ``why``)."""

    text: str
    holds: bool
    measured: str
    expected: bool = True
    why: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "holds", bool(self.holds))  # a NumPy bool from the measurement, as Python's

    @property
    def as_expected(self) -> bool:
        return self.holds == self.expected


@dataclass
class Reproduction:
    finding: Finding
    rows: list[Row]
    claims: list[Claim]
    seconds: float = 0.0
    error: str | None = None  # why the finding could not be measured

    @property
    def as_expected(self) -> bool:
        return self.error is None and all(claim.as_expected for claim in self.claims)

    def to_json(self) -> dict:
        """The reproduction as ``headscope reproduce --json`` writes it."""
        finding_ = self.finding
        return {"name": finding_.name, "title": finding_.title, "source": finding_.source,
                "protocol": finding_.protocol, "command": command(finding_.name), "seconds": round(self.seconds, 1),
                "as_expected": self.as_expected, "error": self.error,
                "rows": [asdict(row) for row in self.rows],
                "claims": [{**asdict(claim), "as_expected": claim.as_expected} for claim in self.claims]}


@dataclass(frozen=True)
class Finding:
    name: str
    title: str
    source: str
    protocol: str
    measure: Callable[[], tuple[list[Row], list[Claim]]] = field(repr=False)

    def reproduce(self) -> Reproduction:
        started = time.perf_counter()
        rows, claims = self.measure()
        return Reproduction(self, rows, claims, time.perf_counter() - started)

    def attempt(self) -> Reproduction:
        """:meth:`reproduce`, an exception kept as the reproduction's ``error`` (one line) so that the others run."""
        started = time.perf_counter()
        try:
            return self.reproduce()
        except Exception as error:  # any failure of one finding is reported, and the others still run
            return Reproduction(self, [], [], time.perf_counter() - started, f"{type(error).__name__}: {error}")


FINDINGS: dict[str, Finding] = {}


def finding(name: str, title: str, source: str, protocol: str):
    def register(measure: Callable[[], tuple[list[Row], list[Claim]]]):
        FINDINGS[name] = Finding(name, title, source, protocol, measure)
        return measure

    return register


def chosen(names: Sequence[str] = ()) -> list[Finding]:
    """The findings named (all when none is), in the page's order; one error names an unknown one."""
    unknown = [n for n in names if n not in FINDINGS]
    if unknown:
        raise HeadscopeError(f"no published finding named {', '.join(unknown)}: choose from {', '.join(FINDINGS)}")
    return [FINDINGS[n] for n in (names or FINDINGS)]


@cache
def _loaded(alias: str):
    import headscope

    return headscope.load(alias)


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}g}"


# --- Sun et al. 2024: massive activations -------------------------------------------------------------------------


@finding(
    "massive-activations",
    "Massive activations on the first token, in the middle layers",
    "Sun et al. 2024, \"Massive Activations in Large Language Models\" (Fig. 1-2, Table 1)",
    "One forward pass of the first 256 tokens of the shipped prose (the `sinks` analysis' `massive_activations` "
    "table, `max_tokens=256`): per layer's residual output, an activation is massive when |x| > 100 and |x| > 1000 x "
    "the layer's median |x| (the paper's thresholds).",
)
def _massive_activations() -> tuple[list[Row], list[Claim]]:
    import headscope

    rows, claims = [], []
    for alias in ("smollm2-135m", "gemma3-270m"):
        loaded = _loaded(alias)
        table = headscope.run("sinks", loaded, max_tokens=256).tables["massive_activations"]
        layers = int(table.layer.max()) + 1
        massive = table[table.massive]
        first = massive[massive.position == 0]
        top = first.loc[first.value.abs().idxmax()] if len(first) else table.loc[table.value.abs().idxmax()]
        massive_layers = sorted(set(first.layer))
        middle = [layer for layer in massive_layers if layers / 6 <= layer < 5 * layers / 6]
        # per middle layer, the tokens and dimensions holding its massive activations: few of each where the paper
        # finds them (the table keeps a layer's 16 largest, enough to count past 2)
        few = [layer for layer in middle if _few(massive[massive.layer == layer])]
        in_few = massive[massive.layer.isin(few)]
        dims, tokens = sorted(set(in_few.dimension)), sorted(set(in_few.position))
        labels = {int(r.position): r.token for r in in_few.itertuples()}
        spread = massive[massive.layer.isin(set(middle) - set(few))].groupby("layer").position.nunique()
        elsewhere = "".join(f"; layer {layer}: {count} tokens" for layer, count in spread.items())
        rows += [
            Row("largest massive activation on the first token", "LLaMA2-7B", "about 2,600, on the first token, "
                "dims 1415 and 2533", alias, f"{top.value:,.0f} (x{top.ratio:,.0f} the layer's median), layer "
                f"{top.layer}, position 0 {top.token!r}, dim {top.dimension}"),
            Row("layers with a massive activation on the first token", "LLaMA2-7B", "from layer 2 to the last few",
                alias, f"{len(massive_layers)} of {layers}: {_span(massive_layers)}"),
            Row("tokens and dimensions holding massive activations (middle layers)", "LLaMA2-7B",
                "the first token and the first '.' or newline; dims 1415, 2533", alias,
                f"{len(few)} of {len(middle)} middle layers: tokens {', '.join(f'{p} {labels[p]!r}' for p in tokens)}"
                f"; dims {', '.join(map(str, dims))}{elsewhere}"),
        ]
        claims += [
            Claim(f"{alias}: the first token carries an activation above 100 and 1000x the layer's median",
                  len(first) > 0, f"{top.value:,.0f}, x{top.ratio:,.0f}"),
            Claim(f"{alias}: the first token's massive activations fill the middle layers (at least half of the "
                  "middle two thirds)", len(middle) >= (2 * layers / 3) / 2, f"{len(middle)} middle layers"),
            Claim(f"{alias}: in at least 3 in 4 of those middle layers they sit on at most 2 tokens, the first among "
                  "them, and in at most 2 dimensions", len(few) >= 0.75 * len(middle) > 0,
                  f"{len(few)} of {len(middle)} layers; {len(tokens)} token(s), {len(dims)} dimension(s) there"),
        ]
    return rows, claims


def _few(layer_rows) -> bool:
    """Whether one layer's massive activations sit on at most 2 tokens, the first among them, in at most 2 dims."""
    tokens = set(layer_rows.position)
    return 0 in tokens and len(tokens) <= 2 and 0 < layer_rows.dimension.nunique() <= 2


def _span(layers: list[int]) -> str:
    if not layers:
        return "none"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"layers {layers[0]}-{layers[-1]}"
    return "layers " + ", ".join(map(str, layers))


# --- Olsson et al. 2022: induction heads --------------------------------------------------------------------------


INDUCTION_HEADS = 5  # heads ablated: the top ones by induction score, and as many random ones
RANDOM_DRAWS = 3
COPY_SAMPLES = 20  # fresh sequences the copying loss is measured on


@finding(
    "induction-heads",
    "Induction heads appear after the first layer, and in-context copying needs them",
    "Olsson et al. 2022, \"In-context Learning and Induction Heads\" (Sec. 2, the repeated-random-tokens test)",
    "The `patterns` analysis' induction score on [BOS] + r + r with r 50 random tokens (10 sequences); then the "
    f"loss on the second copy of r (20 fresh sequences, seed 1) with the top {INDUCTION_HEADS} induction heads "
    f"zero-ablated against {RANDOM_DRAWS} draws of {INDUCTION_HEADS} random heads.",
)
def _induction_heads() -> tuple[list[Row], list[Claim]]:
    import headscope
    from headscope.capture.engine import Scope
    from headscope.capture.gates import Gates
    from headscope.probes import repeated

    loaded = _loaded("smollm2-135m")
    model, tokenizer, _ = loaded
    score = headscope.run("patterns", loaded).map("induction").values
    layers, heads = score.shape
    top_flat = np.argsort(-np.nan_to_num(score.ravel(), nan=-1.0), kind="stable")[:INDUCTION_HEADS]
    generator = np.random.default_rng(0)
    others = np.setdiff1d(np.arange(layers * heads), top_flat)
    sets = [top_flat] + [generator.choice(others, INDUCTION_HEADS, replace=False) for _ in range(RANDOM_DRAWS)]
    probe = repeated.build(tokenizer, samples=COPY_SAMPLES, seed=1)
    scope = Scope(model)
    losses = [_copy_loss(model, scope, probe)]
    for flat in sets:
        gates = Gates.zero([divmod(int(i), heads) for i in flat], layers, heads)
        losses.append(_copy_loss(model, scope, probe, gates))
    clean, top, random = losses[0], losses[1], losses[2:]
    first_layer, later = float(np.nanmax(score[0])), float(np.nanmax(score[1:]))
    names = ", ".join(f"{i // heads}.{i % heads}" for i in top_flat)
    rows = [
        Row("strongest induction score in layer 0 / in later layers", "small attention-only and large models",
            "none in layer 0 (needs two layers: a previous-token head composes with it)", "smollm2-135m",
            f"{first_layer:.3f} / {later:.3f}"),
        Row("loss (nats) on the second copy: clean / top heads ablated / random heads ablated",
            "small transformers", "copying collapses without induction heads", "smollm2-135m",
            f"{clean:.3f} / {top:.3f} ({names}) / {', '.join(f'{r:.3f}' for r in random)}"),
    ]
    claims = [
        Claim("no induction head in layer 0 (score < 0.1) while later layers hold strong ones (> 0.3)",
              first_layer < 0.1 and later > 0.3, f"{first_layer:.3f} vs {later:.3f}"),
        Claim(f"ablating the top {INDUCTION_HEADS} induction heads raises the second copy's loss by over 1 nat, and "
              "by at least 3x what any random draw of as many heads does",
              top - clean > 1.0 and top - clean > 3 * max(max(random) - clean, 0.01),
              f"+{top - clean:.3f} vs +{max(random) - clean:.3f} at most"),
    ]
    return rows, claims


def _copy_loss(model, scope, probe, gates=None) -> float:
    """Mean next-token loss over the second copy of r (its first token excepted: nothing predicts it)."""
    targets = probe.second_copy()[:, 1:].clone()
    targets[:, probe.prefix + probe.length - 1] = False
    with torch.no_grad(), scope.capture(gates=[gates] if gates is not None else []):
        logits = model(input_ids=probe.input_ids.to(model.device), use_cache=False).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), probe.input_ids[:, 1:].to(model.device),
                                            reduction="none").cpu()
    return float(nll[targets].mean())


# --- Wang et al. 2023: the indirect-object circuit -------------------------------------------------------------


IOI_PAIRS = 4  # pairs of the IOI probe set (the analysis' default is 8; 4 keep the suite's time)
IOI_PATTERNS = {"length": 20, "samples": 4, "clusters": 2}  # `patterns` scaled down: its scores only are read
TOP = 10  # heads compared: patching's top by |effect| and each `patterns` kind's top by score
IOI_KINDS = ("duplicate_token", "induction", "previous_token")


@finding(
    "ioi-heads",
    "The heads that patching finds on indirect-object identification sit late; duplicate-token and induction heads "
    "sit earlier",
    "Wang et al. 2023, \"Interpretability in the Wild: a Circuit for Indirect Object Identification in GPT-2 small\" "
    "(Sec. 3; Fig. 2)",
    "The `patching` analysis (denoising, logit difference at the last token, every head at every position) on "
    f"{IOI_PAIRS} pairs of headscope's IOI probe set (seed 0, one per template; the analysis' default is 8, cut to "
    f"{IOI_PAIRS} for the suite's time; Wang et al. average thousands of prompts): a clean prompt \"When Mary and "
    "John went to the park, John gave a book to\" and its corruption, the other name repeated; attribution patching "
    "and direct logit attribution on the same pairs. Then `patterns` at small settings (r of "
    f"{IOI_PATTERNS['length']} random tokens, {IOI_PATTERNS['samples']} sequences; its prose features on 128 "
    f"tokens, unused here), whose top {TOP} duplicate-token, induction and previous-token heads are set against "
    f"patching's top {TOP} by |patch effect|. A layer's depth is layer / (L - 1).",
)
def _ioi_heads() -> tuple[list[Row], list[Claim]]:
    import headscope

    loaded = _loaded("smollm2-135m")
    patched = headscope.run("patching", loaded, prompts=IOI_PAIRS, top_k=0, layer_positions=False, progress=False)
    kinds = headscope.run("patterns", loaded, max_tokens=128, progress=False, **IOI_PATTERNS)
    deepest = patched.map("patch_effect").values.shape[0] - 1
    top = patched.top_heads("patch_effect", k=TOP)
    top_layers = [layer for layer, _, _ in top]
    top_depth = float(np.median(top_layers)) / deepest
    kind_depth, shared = {}, {}
    for kind in IOI_KINDS:
        found = {(layer, head) for layer, head, _ in kinds.top_heads(kind, k=TOP)}
        kind_depth[kind] = float(np.median([layer for layer, _ in found])) / deepest
        shared[kind] = [f"{layer}.{head}" for layer, head, _ in top if (layer, head) in found]
    overlap = sorted({name for names in shared.values() for name in names})
    summary = patched.summary
    per_layer = [(r, layer) for layer, r in enumerate(summary["attribution_pearson_per_layer"]) if r is not None]
    (low, low_layer), (high, _) = min(per_layer), max(per_layer)
    dla = summary["dla"]
    names = ", ".join(f"{layer}.{head} = {value:.3f} ({layer / deepest:.2f})" for layer, head, value in top[:5])
    rows = [
        Row("logit difference logit(IO) - logit(S), clean / corrupted prompts", "GPT-2 small",
            "3.56 on clean IOI prompts", "smollm2-135m",
            f"{summary['clean_metric']:.2f} / {summary['corrupted_metric']:.2f} ({summary['pairs']} pairs)"),
        Row("top heads by patch effect: layer.head = share of the logit difference restored (depth)", "GPT-2 small",
            "name movers 9.6, 9.9, 10.0; negative name movers 10.7, 11.10; S-inhibition heads in layers 7-8 (of 12)",
            "smollm2-135m", f"{names}; the top {TOP} in layers {min(top_layers)}-{max(top_layers)} of {deepest + 1}"),
        Row(f"median depth of the top {TOP}: patching / duplicate-token / induction / previous-token",
            "GPT-2 small", "name movers 0.8-0.9, S-inhibition 0.6-0.7; duplicate-token 0.0-0.3 (0.1, 3.0), induction "
            "0.45-0.55 (5.5, 6.9), previous-token 0.2-0.35 (2.2, 4.11)", "smollm2-135m",
            " / ".join(f"{d:.2f}" for d in (top_depth, *kind_depth.values()))),
        Row(f"of patching's top {TOP}, also in the top {TOP} of duplicate-token / induction / previous-token",
            "GPT-2 small", "none: the name movers and S-inhibition heads are classes of their own", "smollm2-135m",
            " / ".join(str(len(shared[kind])) for kind in IOI_KINDS) + f" ({', '.join(overlap) or 'none'})"),
        Row("Pearson r of attribution patching with patching: all heads (per layer, lowest to highest)",
            "GPT-2 small", "not in Wang et al.; attribution patching approximates patching on IOI (Syed et al. "
            "2023)", "smollm2-135m", f"{summary['attribution_pearson']:.3f} ({low:.2f} in layer {low_layer} to "
            f"{high:.2f})"),
        Row("direct logit attribution on the clean prompts: heads + the rest = total; the logit difference",
            "GPT-2 small", "exact by linearity at frozen final-norm scale (Elhage et al. 2021)", "smollm2-135m",
            f"{dla['heads']:.3f} + {dla['total'] - dla['heads']:.3f} = {dla['total']:.6f}; {dla['logit_diff']:.6f}"),
    ]
    claims = [
        Claim(f"the heads patching ranks top sit in the later half of the network (median depth of the top {TOP} "
              ">= 0.5)", top_depth >= 0.5, f"{top_depth:.2f}"),
        Claim("duplicate-token heads sit earlier than the heads patching ranks top (median depth)",
              kind_depth["duplicate_token"] < top_depth, f"{kind_depth['duplicate_token']:.2f} vs {top_depth:.2f}"),
        Claim("induction heads sit earlier than the heads patching ranks top (median depth)",
              kind_depth["induction"] < top_depth, f"{kind_depth['induction']:.2f} vs {top_depth:.2f}"),
        Claim("attribution patching tracks activation patching (Pearson r > 0.7 over all heads)",
              summary["attribution_pearson"] > 0.7, f"{summary['attribution_pearson']:.3f}"),
        Claim("direct logit attribution sums to the logit difference (within 1e-4 of it)",
              abs(dla["total"] - dla["logit_diff"]) < 1e-4 * max(1.0, abs(dla["logit_diff"])),
              f"{dla['total']:.6f} vs {dla['logit_diff']:.6f} (apart by {abs(dla['total'] - dla['logit_diff']):.1g})"),
    ]
    return rows, claims


# --- Gu et al. 2024: when attention sinks emerge -----------------------------------------------------------------


GU_MODELS = ("smollm2-135m", "gemma3-270m")


@finding(
    "gu-sink-rates",
    "A sink on natural text and on random tokens, none on a repeated token",
    "Gu et al. 2024, \"When Attention Sink Emerges in Language Models: An Empirical View\" (Table 1, Prop. 4)",
    "The `sinks` analysis under `protocol=gu`, the paper's: 100 sequences of 64 tokens of each input kind "
    "(natural text: paragraphs of the shipped texts; random tokens drawn uniformly from the ordinary vocabulary; "
    "one such token repeated), one prefill each; a head is a sink head on a sequence when its mean attention on "
    "the first token, over the queries that see it, exceeds eps = 0.3; the sink rate is the share of sink heads, "
    "averaged over the sequences.",
)
def _gu_sink_rates() -> tuple[list[Row], list[Claim]]:
    import headscope

    rows, claims = [], []
    for alias in GU_MODELS:
        loaded = _loaded(alias)
        rates = headscope.run("sinks", loaded, protocol="gu").summary["gu_sink_rates_self"]
        natural, random, repeated = rates["natural"], rates["random"], rates["repeated"]
        rows.append(Row("sink rate (%, eps 0.3): natural / random / repeated tokens, as the model reads a text",
                        "GPT2-XL; Mistral-7B; LLaMA2-7B", "77.0 / 70.3 / 62.3; 97.5 / 75.2 / 0.0; 92.5 / 90.1 / 0.0",
                        alias, f"{natural:.1f} / {random:.1f} / {repeated:.1f}"))
        claims.append(Claim(f"{alias}: a sink on natural text and on random tokens (sink rate above 50% on both)",
                            natural > 50 and random > 50, f"{natural:.1f}% and {random:.1f}%"))
        prefix = added_frame(loaded.processor)[0]
        bare = repeated
        if prefix:  # the same token ids with nothing before them: identical tokens, as the Proposition assumes
            alone = headscope.run("sinks", loaded, protocol="gu", gu_inputs=("random", "repeated"),
                                  gu_prefix=False).summary["gu_sink_rates_self"]
            bare = alone["repeated"]
            first = "".join(loaded.processor.convert_ids_to_tokens(prefix))
            rows.append(Row(f"sink rate (%): random / repeated tokens without the tokenizer's {first}",
                            "LLaMA2-7B, Mistral-7B", "0.0 on a repeated token", alias,
                            f"{alone['random']:.1f} / {bare:.1f} (with {first}, the repeated token sinks at "
                            f"{repeated:.1f}%: {first} alone differs from the rest and takes the sink)"))
        claims.append(Claim(f"{alias} (rotary positions): no sink on one token repeated, nothing before it (sink rate "
                            "under 1%)", bare < 1, f"{bare:.1f}%"))
    return rows, claims


# --- Xiao et al. 2024: StreamingLLM -------------------------------------------------------------------------------


STREAMING = {"policies": ("window", "sinks+window"), "windows": (256,), "sinks": (1, 4), "tokens": 2048,
             "score_from": 512}


@finding(
    "streaming-sinks",
    "Window attention collapses once the first tokens leave the window; a few sink tokens restore it",
    "Xiao et al. 2024, \"Efficient Streaming Language Models with Attention Sinks\" (StreamingLLM, Table 1)",
    "The `eviction` analysis: the first 2,048 tokens of the shipped haystack essays in one forward pass, each "
    "query seeing only the keys a KV cache would keep (full; a window of 256; 1 or 4 sink tokens + the window), "
    "perplexity on the tokens from 512 on, where the first tokens have long left the window (the paper: a "
    "window of 1,020-1,024 on 20k tokens of PG19; scaled to SmolLM2's 2k context and 2 cores).",
)
def _streaming_sinks() -> tuple[list[Row], list[Claim]]:
    import headscope

    table = headscope.run("eviction", _loaded("smollm2-135m"), **STREAMING).tables["policies"]
    perplexity = dict(zip(table.label, table.perplexity, strict=True))
    lost = dict(zip(table.label, table.lost_mass, strict=True))
    full, window = perplexity["full"], perplexity["window 256"]
    one, four = perplexity["1 sink + window 256"], perplexity["4 sinks + window 256"]
    rows = [
        Row("perplexity: full / window / 1 sink + window / 4 sinks + window", "Llama-2-13B",
            "5.40 with 4 sinks + a window of 1,020; 5,158 with the window alone", "smollm2-135m",
            f"{full:.2f} / {window:.2f} / {one:.2f} / {four:.2f} (window 256, {int(table.tokens_scored[0])} tokens "
            "scored)"),
        Row("attention mass the policy evicts, under full attention (mean over heads and scored queries)",
            "Llama-2-7B", "most heads put most of their attention on the first tokens (Fig. 2)", "smollm2-135m",
            f"window {lost['window 256']:.2f}; 1 sink + window {lost['1 sink + window 256']:.2f}; "
            f"4 sinks + window {lost['4 sinks + window 256']:.2f}"),
    ]
    recovered = (window - four) / (window - full) if window > full else float("nan")
    claims = [
        Claim("window attention alone collapses: perplexity at least 1.5x the full one", window >= 1.5 * full,
              f"{window:.2f} vs {full:.2f} (x{window / full:.2f})"),
        Claim("keeping the first tokens restores it: 1 and 4 sinks + window are within 25% of full attention and "
              "recover at least 75% of what the window alone loses", max(one, four) <= 1.25 * full
              and recovered >= 0.75, f"{one:.2f} and {four:.2f} vs {full:.2f}; {recovered:.0%} recovered"),
        Claim("the sinks are where the evicted attention was: keeping them leaves at most half the mass the window "
              "alone evicts", lost["4 sinks + window 256"] <= lost["window 256"] / 2,
              f"{lost['4 sinks + window 256']:.2f} vs {lost['window 256']:.2f}"),
    ]
    return rows, claims


# --- Wu et al. 2024: retrieval heads -----------------------------------------------------------------------------


RETRIEVAL = {"lengths": (512, 1024), "depths": 2, "needles": 2, "verify": True, "top_k": 10, "random_seeds": 3}


@finding(
    "retrieval-heads",
    "Few retrieval heads, and masking them breaks needle retrieval",
    "Wu et al. 2024, \"Retrieval Head Mechanistically Explains Long-Context Factuality\" (Sec. 3, Fig. 7)",
    "The `retrieval` analysis (copy-paste score over needle-in-a-haystack tests whose answer the model recalls, "
    "threshold 0.1) on the shipped haystack at 512 and 1,024 tokens, 2 depths, 2 needles (the paper: up to "
    "50k tokens and 20 depths; scaled to the test suite's time on 2 cores); then each test decoded with the top "
    "10 heads masked and with 3 draws of 10 random heads masked.",
)
def _retrieval_heads() -> tuple[list[Row], list[Claim]]:
    import headscope

    summary = headscope.run("retrieval", _loaded("smollm2-135m"), **RETRIEVAL).summary
    share, verify = summary["retrieval_heads_share"], summary["verify"]
    clean, top, random = verify["accuracy_clean"], verify["accuracy_top_k_masked"], verify["accuracy_random_masked"]
    rows = [
        Row("share of heads scoring above 0.1", "Llama-2-7B and others", "under 5%", "smollm2-135m",
            f"{share:.1%} ({summary['retrieval_heads_count']} heads: {', '.join(summary['retrieval_heads'][:5])} ...)"),
        Row("needle accuracy: clean / top 10 masked / 10 random masked", "Llama-2-7B-80K", "falls with the top heads "
            "masked, barely with random ones", "smollm2-135m",
            f"{clean:.2f} / {top:.2f} / {random:.2f} ({summary['tests']} tests)"),
    ]
    claims = [
        Claim("under 5% of the heads are retrieval heads (score above 0.1)", 0 < share < 0.05, f"{share:.1%}"),
        Claim("masking the top 10 retrieval heads breaks retrieval (accuracy at most half the clean one) while "
              "masking 10 random heads keeps most of it (at least 60% of the clean accuracy)",
              top <= clean / 2 and random >= 0.6 * clean, f"{top:.2f} vs {random:.2f} (clean {clean:.2f})"),
    ]
    return rows, claims


# --- Michel et al. 2019 / Clark et al. 2019: an encoder's heads -------------------------------------------------


@finding(
    "encoder-heads",
    "An encoder's heads: many can be pruned, and the middle layers attend to a special token",
    "Michel et al. 2019, \"Are Sixteen Heads Really Better than One?\" (Fig. 3-4); Clark et al. 2019, \"What Does "
    "BERT Look At?\" (Fig. 2)",
    "MiniLM-L6 (BERT family, 6 x 12). Pruning: the `importance` analysis' gradient-importance pruning curve (the "
    "model's own output as the objective, 10% of the heads per step), the largest share pruned before the "
    "objective worsens by 0.05 (its `prunable_fraction`). Attention to special tokens: mean attention on [CLS] and "
    "on [SEP] per layer over the shipped prose's paragraphs, one [CLS] ... [SEP] input each (Clark et al. use "
    "1,000 Wikipedia segments of 128 tokens).",
)
def _encoder_heads() -> tuple[list[Row], list[Claim]]:
    import headscope
    from headscope.capture.engine import Scope
    from headscope.capture.reducers import KeyMass
    from headscope.probes import text as probe_text

    loaded = _loaded("minilm-l6")
    model, tokenizer, _ = loaded
    prunable = float(headscope.run("importance", loaded, ablations="zero").summary["prunable_fraction"])
    paragraphs = [p for p in probe_text.prose().split("\n\n") if p.strip()]
    inputs = tokenizer(paragraphs, return_tensors="pt", padding=True, truncation=True, max_length=128)
    sep = inputs["input_ids"] == tokenizer.sep_token_id
    on_cls, on_sep = KeyMass(positions=(0,), exclude_own=False), KeyMass(key_mask=sep, exclude_own=False)
    with torch.no_grad(), Scope(model).capture(on_cls, on_sep):
        model(**inputs)
    stack = next(iter(on_cls.result()))
    cls_layers, sep_layers = on_cls.result()[stack].mean(1), on_sep.result()[stack].mean(1)
    layers = len(sep_layers)
    rows = [
        Row("share of heads prunable at small cost", "BERT-base (MNLI)", "about 40% at under 1 point of accuracy "
            "(Michel Fig. 4)", "minilm-l6", f"{prunable:.0%} (objective within 0.05)"),
        Row("mean attention on [SEP] per layer", "BERT-base", "over 50% in layers 6-10 of 12, little in the first and "
            "last", "minilm-l6", ", ".join(f"L{i} {v:.2f}" for i, v in enumerate(sep_layers))),
        Row("mean attention on [CLS] per layer", "BERT-base", "high in the early layers", "minilm-l6",
            ", ".join(f"L{i} {v:.2f}" for i, v in enumerate(cls_layers))),
    ]
    special = np.maximum(cls_layers, sep_layers)
    top = int(np.argmax(special))
    claims = [
        Claim("a large share of the heads (at least 20%) can be pruned at small cost", prunable >= 0.2,
              f"{prunable:.0%}", expected=False,
              why="MiniLM ships no task head, so the objective is the preservation of its output, a stricter "
                  "criterion than the task accuracy Michel et al. prune against"),
        Claim("attention on a special token ([CLS] or [SEP]) peaks in a middle layer (neither the first nor the "
              "last) above 0.3, and the first and last layers put less on it", 0 < top < layers - 1
              and special[top] > 0.3 and special[0] < special[top] and special[-1] < special[top],
              f"peak L{top} {special[top]:.2f} on [{'CLS' if cls_layers[top] >= sep_layers[top] else 'SEP'}]; "
              f"L0 {special[0]:.2f}, L{layers - 1} {special[-1]:.2f}"),
        Claim("that special token is [SEP], as in BERT-base", sep_layers[top] > cls_layers[top],
              f"[SEP] {sep_layers[top]:.2f} vs [CLS] {cls_layers[top]:.2f} in L{top}", expected=False,
              why="MiniLM-L6 is distilled from a larger model's last-layer self-attention and tuned for sentence "
                  "embeddings read at [CLS]; its middle layers put their special-token attention on [CLS] instead"),
    ]
    return rows, claims


# --- Whisper's alignment heads ------------------------------------------------------------------------------------


PAUSE_POSITIONS = 8  # encoder positions (20 ms each) of silence inside the clip that separate two phrases


@finding(
    "whisper-alignment-heads",
    "Whisper's alignment heads track the timing of the words",
    "Radford et al. 2022, Whisper (the alignment heads OpenAI ships per model for word timestamps); Papi et al. "
    "2025, \"Cross-Attention is Half Explanation in Speech-to-Text Models\"",
    "The shipped clip (three phrases of synthetic speech, separated by pauses), decoded greedily; each word "
    "token's cross-attention peak must fall inside the span of its own phrase (the phrases are the clip's "
    "speech between pauses of 160 ms or more, the tokens' phrase is counted from the punctuation decoded "
    "before them). Per head, the share of word tokens placed in their phrase: the alignment heads' mean "
    "against the median head. Papi et al.'s ordering from the `saliency` analysis' Pearson agreement of "
    "cross-attention with gradient saliency, of the input and of the encoder output, mean over the output tokens "
    "(tiny.en only: on base the analysis takes minutes here; no deletion curves).",
)
def _whisper_alignment_heads() -> tuple[list[Row], list[Claim]]:
    from headscope.analyses import saliency
    from headscope.capture.engine import Scope
    from headscope.models import zoo
    from headscope.probes import audio

    rows, claims = [], []
    for alias in [a for a in ("whisper-tiny.en", "whisper-base") if zoo.packaged(a).installed()]:
        loaded = _loaded(alias)
        model, processor, _ = loaded
        tokenizer = processor.tokenizer
        source = saliency.audio_source(loaded, None, "floor")
        target = saliency.decode(model, source, 64, tokenizer)
        scope = Scope(model)
        attention = saliency.cross_attention(model, scope, source, target)  # (L, H, tokens, positions)
        heads = saliency.alignment_heads(model)
        waveform, rate, _ = audio.load_speech()
        spans = _phrases(audio.frame_reasons(waveform, rate, source.positions))
        phrase = _phrase_of_tokens(target.labels)
        # as OpenAI's word timestamps read them: each frame standardised over the tokens
        scaled = (attention - attention.mean(2, keepdims=True)) / (attention.std(2, keepdims=True) + 1e-12)
        placed = _placed(scaled, spans, phrase)  # (L, H) share of word tokens inside their phrase
        median = float(np.median(placed))
        together = np.mean([scaled[layer, head] for layer, head in heads], axis=0)[None, None]
        aligned = float(_placed(together, spans, phrase)[0, 0])
        mean_aligned = float(np.mean([placed[layer, head] for layer, head in heads]))
        rows.append(Row("share of word tokens whose cross-attention peak lies in their phrase: the alignment heads "
                        "together / each (mean) / the median head / the best head", "Whisper (OpenAI's list)",
                        "alignment heads chosen for word timing", alias, f"{aligned:.2f} / {mean_aligned:.2f} / "
                        f"{median:.2f} / {placed.max():.2f} "
                        f"({len(heads)} heads; {len(spans)} phrases, {int((phrase >= 0).sum())} word tokens)"))
        claims.append(Claim(f"{alias}: the alignment heads together place at least 80% of the words in their phrase, "
                            "above the median head", len(spans) == 3 and aligned >= 0.8 and aligned > median,
                            f"{aligned:.2f} vs {median:.2f}"))
        claims.append(Claim(f"{alias}: each alignment head on its own does better than the median head",
                            mean_aligned > median, f"{mean_aligned:.2f} vs {median:.2f}"))
    rows_, claims_ = _papi_ordering()
    return rows + rows_, claims + claims_


def _papi_ordering() -> tuple[list[Row], list[Claim]]:
    """Papi et al.'s ordering on tiny.en, from the `saliency` analysis' Pearson agreement (mean over tokens)."""
    import headscope

    summary = headscope.run("saliency", _loaded("whisper-tiny.en"), deletion_fractions=()).summary
    inputs, encoder = summary["pearson_saliency"], summary["pearson_encoder_saliency"]

    def shown(values: dict[str, float]) -> str:
        return f"{values['all_layers']:.2f} / {values['alignment_heads']:.2f} / {values['per_head_median']:.2f}"

    rows = [Row("Pearson agreement of cross-attention with saliency: all layers / alignment heads / median head; "
                "input saliency, then encoder-output saliency", "their own speech-to-text models (SPES saliency)",
                "aggregated heads best (about 0.58, max pooling); encoder outputs 52-75% of the saliency captured",
                "whisper-tiny.en", f"input {shown(inputs)}; encoder output {shown(encoder)}")]
    claims = [
        Claim("whisper-tiny.en: cross-attention agrees better with the saliency of the encoder output than with that "
              "of the input (all layers, and the median head)", encoder["all_layers"] > inputs["all_layers"]
              and encoder["per_head_median"] > inputs["per_head_median"],
              f"{encoder['all_layers']:.2f} vs {inputs['all_layers']:.2f}; median head "
              f"{encoder['per_head_median']:.2f} vs {inputs['per_head_median']:.2f}"),
        Claim("whisper-tiny.en: attention aggregated over all layers agrees better than the median head, on both "
              "saliencies", inputs["all_layers"] > inputs["per_head_median"]
              and encoder["all_layers"] > encoder["per_head_median"],
              f"{inputs['all_layers']:.2f} vs {inputs['per_head_median']:.2f}; {encoder['all_layers']:.2f} vs "
              f"{encoder['per_head_median']:.2f}"),
    ]
    return rows, claims


def _phrases(reasons: list[str]) -> list[tuple[int, int]]:
    """(first, last + 1) encoder positions of each stretch of speech between pauses of PAUSE_POSITIONS or more."""
    spans, start, quiet = [], None, 0
    for position, reason in enumerate([*reasons, "padding"]):
        if reason == "":
            if start is None:
                start = position
            quiet = 0
            end = position + 1
        elif start is not None:
            quiet += 1
            if quiet >= PAUSE_POSITIONS or reason == "padding":
                spans.append((start, end))
                start, quiet = None, 0
    return spans


def _phrase_of_tokens(labels: list[str]) -> np.ndarray:
    """Per explained token, the index of its phrase (punctuation decoded so far); -1 for punctuation itself."""
    phrase, out = 0, []
    for label in labels:
        word = label.strip()
        if word and all(ch in ",.;:!?" for ch in word):
            out.append(-1)
            phrase += 1
        else:
            out.append(phrase)
    return np.array(out)


def _placed(attention: np.ndarray, spans: list[tuple[int, int]], phrase: np.ndarray) -> np.ndarray:
    words = np.flatnonzero((phrase >= 0) & (phrase < len(spans)))
    peak = attention[:, :, words].argmax(-1)  # (L, H, words)
    low = np.array([spans[phrase[w]][0] for w in words])
    high = np.array([spans[phrase[w]][1] for w in words])
    return ((peak >= low) & (peak < high)).mean(-1)


# --- the page -----------------------------------------------------------------------------------------------------


def command(name: str) -> str:
    return f"headscope reproduce {name}"


def render(reproductions: list[Reproduction], when: str) -> str:
    """The marked block of ``docs/published.md``: a table per finding, then its claims. Measured text (token
    strings among it) is escaped for the HTML the page becomes."""
    lines = [f"Generated {when} by `headscope reproduce --docs docs/published.md` (2 CPU cores, float32).", ""]
    for one in reproductions:
        finding_ = one.finding
        lines += [f"### {finding_.title}", "", f"**Source:** {_text(finding_.source)}.  ",
                  f"**Protocol:** {_text(finding_.protocol)}  ",
                  f"**Reproduce:** `{command(finding_.name)}` ({one.seconds:.0f} s here).", ""]
        if one.rows:
            lines += ["| quantity | paper's model | paper | headscope's model | headscope |", "|---|---|---|---|---|"]
            lines += [f"| {_cell(r.quantity)} | {_cell(r.paper_model)} | {_cell(r.paper)} | {_cell(r.model)} | "
                      f"{_cell(r.measured, measured=True)} |" for r in one.rows]
            lines.append("")
        if one.error is not None:
            lines.append(f"- **could not be measured**: {_measured(one.error)}.")
        for claim in one.claims:
            verdict = "reproduces" if claim.holds else "does not reproduce"
            note = f" ({_text(claim.why)})" if claim.why else ""
            lines.append(f"- **{verdict}**: {_text(claim.text)}: {_measured(claim.measured)}{note}.")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _text(text: str) -> str:
    """Written text on one line, HTML-escaped (its backticks stay code)."""
    return html.escape(re.sub(r"\s+", " ", text), quote=False)


def _measured(text: str) -> str:
    """Measured text on one line, HTML-escaped, with every character Markdown would read escaped too (token strings
    are among it)."""
    return re.sub(r"([*_`\\\[\]])", r"\\\1", _text(text))


def _cell(text: str, measured: bool = False) -> str:
    return (_measured(text) if measured else _text(text)).replace("|", "\\|")


def check_page(path: Path) -> str:
    """The text of the page ``path``; one error when it is missing or has no marked block."""
    if not path.is_file():
        raise HeadscopeError(f"no page {path} to write the findings into")
    text = path.read_text(encoding="utf-8")
    if START not in text or END not in text.split(START, 1)[1]:
        raise HeadscopeError(f"{path} has no {START} ... {END} block to write the findings into")
    return text


def write_docs(path: Path, block: str) -> None:
    """Replace the marked block of ``path`` (atomically), or fail naming the missing markers."""
    text = check_page(path)
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    write_atomically(path, f"{head}{START}\n{block}{END}{tail}".encode())
