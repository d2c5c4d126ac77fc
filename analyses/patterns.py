"""``patterns``: induction, previous-token and duplicate-token heads, entropy, distance, and head types.

On the repeated-random-token probe ([BOS] + r + r, ``headscope.probes.repeated``), with L = len(r) and A the
attention of head (l, h), per head:

- ``induction`` = mean over queries t in the second copy of A[t, t - (L - 1)]: attention to the token that
  followed the current token's first occurrence (Olsson et al. 2022, "In-context learning and induction
  heads");
- ``duplicate_token`` = mean over queries t in the second copy of A[t, t - L]: attention to the current
  token's first occurrence;
- ``previous_token`` = mean over queries t >= 1 of A[t, t - 1].

On the prose probe (or the user's text), per head: ``entropy`` (mean over queries of -sum_s A log A, nats),
``mean_distance`` (mean over queries of sum_s A[t, s] |t - s|), and, for the taxonomy only, the mass on the
first token and a positional profile A[t, t - k] for k = 0..4 (encoders also k = -1, -2: the next tokens).

Head taxonomy: each head's features (the above) are standardised over heads and clustered with KMeans, the
number of clusters k chosen by silhouette among 2..``clusters``; the map ``cluster`` holds each head's label,
the table ``representatives`` the heads nearest each centroid, and ``features`` each head's features with
its 2-D PCA embedding (the ``clusters`` figure). The ``gallery`` figure shows the full attention pattern of
the top head of each kind on the first repeated sequence.

Decoders and encoders (BERT: the same offsets, bidirectional attention); encoder-decoders are not covered.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from headscope import distributed
from headscope.capture.reducers import Entropy, FullMaps, KeyMass, MeanDistance, OffsetMass
from headscope.errors import HeadscopeError
from headscope.probes import repeated as repeated_probe
from headscope.registry import Context, Parameters, register
from headscope.results import AnalysisResult, HeadMap

HeadKind = Literal["induction", "previous_token", "duplicate_token"]
KINDS: tuple[HeadKind, ...] = ("induction", "previous_token", "duplicate_token")
DESCRIPTIONS = {
    "induction": "mean attention from the second copy of r to t - (len(r) - 1), on [BOS] + r + r",
    "previous_token": "mean attention to the previous token (t - 1), on [BOS] + r + r",
    "duplicate_token": "mean attention from the second copy of r to the same token's first occurrence (t - len(r))",
    "entropy": "mean attention entropy in nats, on prose",
    "mean_distance": "mean attention distance sum_s A[t, s] |t - s| in tokens, on prose",
    "cluster": "head type: KMeans cluster of standardised pattern features (see the representatives table)",
}
UNITS = {"entropy": "nats", "mean_distance": "tokens", "induction": "share", "previous_token": "share",
         "duplicate_token": "share"}
DECODER_OFFSETS = (0, 1, 2, 3, 4)
ENCODER_OFFSETS = (-2, -1, 0, 1, 2, 3, 4)
MAX_CLUSTERS = 6
GALLERY_MIN_WEIGHT = 0.005  # the gallery table keeps attention weights at least this large
REPRESENTATIVES = 3
# What a cluster is called after the feature whose standardised centroid value is largest.
TYPE_NAMES = {
    "induction": "induction",
    "previous_token": "previous-token",
    "duplicate_token": "duplicate-token",
    "first_token_mass": "first-token (sink)",
    "entropy": "broad",
    "mean_distance": "long-range",
    "offset_0": "self (current token)",
    **{f"offset_{k}": f"local (t - {k})" for k in range(1, 5)},
    "offset_-1": "next-token",
    "offset_-2": "next-but-one",
}


@dataclass(frozen=True)
class Params(Parameters):
    """The parameters of ``patterns``.

    Attributes:
        length: tokens in each half of the repeated random-token probe.
        samples: repeated random-token sequences averaged.
        clusters: the most head types tried when clustering the heads.
        seed: the random tokens of the repeated probe and the clustering's initialisations (the run's ``--seed``
            unless set).
    """

    analysis = "patterns"
    length: int = repeated_probe.DEFAULT_LENGTH
    samples: int = repeated_probe.DEFAULT_SAMPLES
    clusters: int = MAX_CLUSTERS
    seed: int = 0

    def check(self) -> None:
        if self.length < 2 or self.samples < 1 or self.clusters < 1:
            raise HeadscopeError(f"patterns needs length >= 2, samples >= 1 and clusters >= 1; got length "
                                 f"{self.length}, samples {self.samples}, clusters {self.clusters}")


@register("patterns", kinds=("decoder", "encoder"), params=Params, main_metric="induction",
          description="induction, previous- and duplicate-token heads, entropy, distance, head types",
          figures=lambda result: figures(result), cost="about 4 s on smollm2-135m (2 CPU cores)")
def run(context: Context) -> AnalysisResult:
    started = time.perf_counter()
    params = Params.read(context.params, context.seed)
    model, processor, info = context.loaded
    tokenizer = getattr(processor, "tokenizer", processor)
    stack = _text_stack(context)
    vocab = getattr(model.config.get_text_config(), "vocab_size", None)
    probe = repeated_probe.build(tokenizer, params.length, params.samples, params.seed, info.max_tokens, vocab)
    causal = info.kind == "decoder"
    offsets = DECODER_OFFSETS if causal else ENCODER_OFFSETS

    scores = repeated_scores(context, probe, stack)
    prose = context.probe()
    prose_features = prose_scores(context, prose.inputs, stack, offsets)

    result = AnalysisResult(name="patterns", params={
        "length": probe.length, "samples": int(probe.input_ids.shape[0]), "clusters": params.clusters,
        "seed": params.seed, "stack": stack, "offsets": list(offsets), "gallery_min_weight": GALLERY_MIN_WEIGHT})
    for metric in (*KINDS, "entropy", "mean_distance"):
        values = scores[metric] if metric in scores else prose_features[metric]
        result.add_map(metric, HeadMap(values=values, stack=stack, description=DESCRIPTIONS[metric],
                                       unit=UNITS.get(metric, "")))

    taxonomy = _add_taxonomy(result, {**scores, **prose_features}, stack, params.seed, params.clusters)
    top = {kind: result.top_heads(kind, k=1, stack=stack)[0][:2] for kind in KINDS}
    gallery, tokens = gallery_maps(context, probe, stack, top)
    result.tables["gallery"] = gallery
    result.tables["gallery_tokens"] = pd.DataFrame({"position": range(len(tokens)), "token": tokens})

    summary: dict = {"repeated_probe": probe.digest(), "tokens": probe.tokens, "prose": prose.source,
                     "prose_tokens": len(prose.tokens), "k": taxonomy.k_}
    for kind in KINDS:
        summary[f"top_{kind}"] = [f"{layer}.{head}={value:.3f}"
                                  for layer, head, value in result.top_heads(kind, k=3, stack=stack)]
        summary[f"median_{kind}"] = float(np.nanmedian(scores[kind]))
    summary["clusters"] = {str(c): {"size": int((taxonomy.labels_ == c).sum()), "type": taxonomy.types_[c],
                                    "representatives": [f"{r.layer}.{r.head}" for r in taxonomy.representatives_
                                                        .itertuples() if r.cluster == c]}
                           for c in range(taxonomy.k_)}
    result.summary = summary
    result.seconds = time.perf_counter() - started
    return result


def _add_taxonomy(result: AnalysisResult, features: dict[str, np.ndarray], stack: str, seed: int,
                  clusters: int) -> Taxonomy:
    """Cluster the heads by ``features`` (each (layers, heads)); add the map ``cluster`` and the tables."""
    shape = features["induction"].shape
    taxonomy = cluster_heads(np.stack([f.ravel() for f in features.values()], axis=1), list(features), shape[1],
                             seed=seed, max_clusters=clusters)
    result.add_map("cluster", HeadMap(values=taxonomy.labels_.reshape(shape).astype(float), stack=stack,
                                      description=DESCRIPTIONS["cluster"], notable="label"))
    result.tables["features"] = _feature_table(features, taxonomy, shape)
    result.tables["representatives"] = taxonomy.representatives_
    result.tables["silhouette"] = pd.DataFrame({"k": list(taxonomy.silhouettes_),
                                                "silhouette": list(taxonomy.silhouettes_.values())})
    return taxonomy


def _text_stack(context: Context) -> str:
    stacks = [name for name, s in context.scope.stacks.items() if s.kind == "self"]
    if len(stacks) != 1:
        raise HeadscopeError(f"patterns needs one self-attention stack; this model has {stacks}")
    return stacks[0]


def _forward(context: Context, inputs: dict[str, torch.Tensor]) -> None:
    """One forward pass of the base model (no LM head: Gemma's 262k-token head costs more than attention)."""
    model = context.loaded.model
    inputs = {name: tensor.to(model.device) for name, tensor in inputs.items()}
    if context.loaded.info.kind == "decoder":
        inputs["use_cache"] = False
    with torch.no_grad():
        getattr(model, "base_model", model)(**inputs)


def repeated_scores(context: Context, probe: repeated_probe.Repeated, stack: str) -> dict[str, np.ndarray]:
    """``induction``, ``previous_token`` and ``duplicate_token``, each (layers, heads), on ``probe``."""
    # under torchrun each process reads its share of the samples (rows); the sums are added afterwards
    second, after_first = distributed.split(probe.second_copy()), distributed.split(probe.after_first())
    ids, mask = distributed.split(probe.input_ids), distributed.split(probe.attention_mask)
    reducers = {
        "induction": OffsetMass(probe.length - 1, query_mask=second, stacks=[stack]),
        "previous_token": OffsetMass(1, query_mask=after_first, stacks=[stack]),
        "duplicate_token": OffsetMass(probe.length, query_mask=second, stacks=[stack]),
    }
    with context.scope.capture(*reducers.values()):
        if len(ids):
            _forward(context, {"input_ids": ids, "attention_mask": mask})
    distributed.all_reduce_reducers(reducers.values())
    return {name: reducer.result()[stack] for name, reducer in reducers.items()}


def prose_scores(context: Context, inputs: dict[str, torch.Tensor], stack: str,
                 offsets: tuple[int, ...]) -> dict[str, np.ndarray]:
    """``first_token_mass``, ``entropy``, ``mean_distance`` and ``offset_<k>`` (the mass at t - k), on prose."""
    reducers = {"first_token_mass": KeyMass(positions=(0,), stacks=[stack]), "entropy": Entropy(stacks=[stack]),
                "mean_distance": MeanDistance(stacks=[stack])}
    reducers.update({f"offset_{k}": OffsetMass(k, stacks=[stack]) for k in offsets})
    with context.scope.capture(*reducers.values()):
        for one in distributed.split([inputs]):  # one input: rank 0 reads it, the others add zeros
            _forward(context, one)
    distributed.all_reduce_reducers(reducers.values())
    return {name: reducer.result()[stack] for name, reducer in reducers.items()}


def gallery_maps(context: Context, probe: repeated_probe.Repeated, stack: str,
                 heads: dict[str, tuple[int, int]]) -> tuple[pd.DataFrame, list[str]]:
    """The attention maps of ``heads`` (by kind) on the probe's first sequence, as rows (kind, layer, head,
    query, key, weight) with weight >= ``GALLERY_MIN_WEIGHT``; and that sequence's tokens, each decoded alone."""
    maps = FullMaps([(stack, layer, head) for layer, head in heads.values()])
    ids = probe.input_ids[:1]
    with context.scope.capture(maps):
        _forward(context, {"input_ids": ids, "attention_mask": probe.attention_mask[:1]})
    captured = {(layer, head): m[0] for (_, _, layer, head), m in maps.result().items()}
    rows = []
    for kind, (layer, head) in heads.items():
        weights = captured[(layer, head)].double()
        queries, keys = (weights >= GALLERY_MIN_WEIGHT).nonzero(as_tuple=True)
        for query, key in zip(queries.tolist(), keys.tolist(), strict=True):
            rows.append((kind, layer, head, query, key, round(float(weights[query, key]), 5)))
    table = pd.DataFrame(rows, columns=["kind", "layer", "head", "query", "key", "weight"])
    processor = context.loaded.processor
    tokenizer = getattr(processor, "tokenizer", processor)
    return table, [tokenizer.decode([token]) for token in ids[0].tolist()]


# --- head taxonomy --------------------------------------------------------------------------------------


@dataclass
class Taxonomy:
    """Head types from clustering standardised features (rows: heads, in layer-major order).

    Attributes:
        labels_: (heads,) int cluster of each head.
        k_: the number of clusters chosen.
        silhouettes_: silhouette score for each k tried.
        embedding_: (heads, 2) PCA projection of the standardised features.
        types_: per cluster, the name of its most distinctive feature (largest standardised centroid value).
        representatives_: table cluster, rank, layer, head, distance (to the centroid, standardised units).
    """

    labels_: np.ndarray
    k_: int
    silhouettes_: dict[int, float]
    embedding_: np.ndarray
    types_: list[str]
    representatives_: pd.DataFrame


def cluster_heads(features: np.ndarray, names: list[str], heads_per_layer: int, seed: int = 0,
                  max_clusters: int = MAX_CLUSTERS) -> Taxonomy:
    """Cluster heads by ``features`` (heads, features), named by ``names``, rows in layer-major order.

    Each column is standardised (zero mean, unit variance over heads; a constant column stays 0; a NaN, a
    head that does not exist or a feature the input was too short for, is set to the column mean, or 0);
    KMeans (10 initialisations, ``random_state=seed``)
    runs for k = 2..``max_clusters`` and the k with the best silhouette wins; clusters are numbered by
    decreasing size.
    """
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score

    measured = ~np.isnan(features)
    mean = np.where(measured, features, 0.0).sum(axis=0) / np.maximum(measured.sum(axis=0), 1)
    filled = np.where(measured, features, mean)
    spread = filled.std(axis=0)
    scaled = (filled - filled.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    n = len(scaled)
    silhouettes: dict[int, float] = {}
    best = (np.zeros(n, dtype=int), scaled.mean(axis=0, keepdims=True))
    for k in range(2, min(max_clusters, n - 1) + 1):
        model = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(scaled)
        if len(set(model.labels_)) < 2:
            continue
        silhouettes[k] = float(silhouette_score(scaled, model.labels_))
        if silhouettes[k] == max(silhouettes.values()):
            best = (model.labels_.astype(int), model.cluster_centers_)
    labels, centers = _largest_first(*best)
    components = min(2, n, scaled.shape[1])
    embedding = PCA(n_components=components, svd_solver="full").fit_transform(scaled) if n > 1 else np.zeros((n, 2))
    embedding = np.pad(embedding, ((0, 0), (0, 2 - embedding.shape[1])))
    rows = []
    for c, center in enumerate(centers):
        members = np.flatnonzero(labels == c)
        distance = np.linalg.norm(scaled[members] - center, axis=1)
        for rank, i in enumerate(members[np.argsort(distance, kind="stable")][:REPRESENTATIVES]):
            rows.append((c, rank, int(i // heads_per_layer), int(i % heads_per_layer),
                         float(np.linalg.norm(scaled[i] - center))))
    types = [TYPE_NAMES.get(names[int(np.argmax(center))], names[int(np.argmax(center))]) for center in centers]
    table = pd.DataFrame(rows, columns=["cluster", "rank", "layer", "head", "distance"])
    table["type"] = [types[c] for c in table["cluster"]]
    return Taxonomy(labels, len(centers), silhouettes, embedding, types, table)


def _largest_first(labels: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber clusters by decreasing size (ties by first member), so labels read the same across runs."""
    order = sorted(range(len(centers)), key=lambda c: (-int((labels == c).sum()), int(np.argmax(labels == c))))
    rank = np.empty(len(centers), dtype=int)
    rank[order] = np.arange(len(centers))
    return rank[labels], centers[order]


def _feature_table(features: dict[str, np.ndarray], taxonomy: Taxonomy, shape: tuple[int, int]) -> pd.DataFrame:
    layers, heads = shape
    table = pd.DataFrame({"layer": np.repeat(np.arange(layers), heads), "head": np.tile(np.arange(heads), layers),
                          "cluster": taxonomy.labels_, "pc1": taxonomy.embedding_[:, 0],
                          "pc2": taxonomy.embedding_[:, 1]})
    for name, values in features.items():
        table[name] = values.ravel()
    return table


# --- figures --------------------------------------------------------------------------------------------


def figures(result: AnalysisResult) -> dict[str, go.Figure]:
    """The ``clusters`` scatter (PCA of head features) and the ``gallery`` of top heads' patterns."""
    return {"clusters": clusters_figure(result), "gallery": gallery_figure(result)}


def clusters_figure(result: AnalysisResult) -> go.Figure:
    """Heads in the 2-D PCA embedding of their standardised features, coloured by cluster; hover shows
    layer.head, cluster type and scores."""
    table = result.tables["features"]
    types = dict(zip(result.tables["representatives"]["cluster"], result.tables["representatives"]["type"],
                     strict=False))
    figure = go.Figure()
    for cluster, members in table.groupby("cluster", sort=True):
        text = [f"head {int(r.layer)}.{int(r.head)}<br>cluster {cluster}: {html.escape(types.get(cluster, ''))}"
                f"<br>induction {r.induction:.3f}<br>previous-token {r.previous_token:.3f}"
                f"<br>duplicate-token {r.duplicate_token:.3f}<br>first-token mass {r.first_token_mass:.3f}"
                f"<br>entropy {r.entropy:.2f}<br>mean distance {r.mean_distance:.1f}"
                for r in members.itertuples()]
        figure.add_trace(go.Scatter(x=members["pc1"], y=members["pc2"], mode="markers", text=text,
                                    hovertemplate="%{text}<extra></extra>",
                                    name=f"{cluster}: {html.escape(types.get(cluster, ''))}"))
    figure.update_layout(title="patterns: head types (PCA of standardised features)", xaxis_title="PC 1",
                         yaxis_title="PC 2", template="simple_white", width=720, height=540)
    return figure


def gallery_figure(result: AnalysisResult) -> go.Figure:
    """Token x token attention of the top head of each kind on the first repeated sequence; axis labels are
    "position token" (unique, so repeated tokens keep their own rows), HTML-escaped."""
    table, tokens = result.tables["gallery"], list(result.tables["gallery_tokens"]["token"])
    labels = [f"{position} {html.escape(str(token), quote=False)}" for position, token in enumerate(tokens)]
    n = len(tokens)
    panels = [(kind, rows) for kind, rows in table.groupby("kind", sort=False)]
    titles = [f"{kind} head {int(rows['layer'].iloc[0])}.{int(rows['head'].iloc[0])}" for kind, rows in panels]
    figure = make_subplots(rows=1, cols=max(1, len(panels)), subplot_titles=titles or ["(no heads)"],
                           horizontal_spacing=0.08)
    for column, (_, rows) in enumerate(panels, start=1):
        z = np.zeros((n, n))
        z[rows["query"].to_numpy(int), rows["key"].to_numpy(int)] = rows["weight"].to_numpy(float)
        figure.add_trace(go.Heatmap(z=z, x=labels, y=labels, colorscale="Viridis", zmin=0, zmax=1,
                                    showscale=column == len(panels),
                                    hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.3f}<extra></extra>"),
                         1, column)
        figure.update_xaxes(title_text="key", type="category", tickfont={"size": 6}, row=1, col=column)
        figure.update_yaxes(title_text="query" if column == 1 else None, type="category", autorange="reversed",
                            tickfont={"size": 6}, row=1, col=column)
    figure.update_layout(title="patterns: top heads on the first repeated sequence", template="simple_white",
                         width=max(480, 420 * len(panels)), height=520)
    return figure
