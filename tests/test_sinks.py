"""The ``sinks`` analysis: every map equals a plain computation from eager attention, a planted sink head is
found and a planted uniform head is not, cross-attention filtering renormalises over content tokens, and the
command line runs it. The ``slow`` tests measure the packaged models and print their numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import reference as ref
import tiny_models as tm
import torch
from cli_runner import run_cli
from conftest import BOS, EOS, PAD, bpe_tokenizer, save_tiny

import headscope
from headscope.analyses import sinks
from headscope.analyses.sink_reducers import (
    FilteredEntropy,
    KeyReceived,
    ResidualMass,
    SinkMass,
    SinkScores,
    renormalised,
)
from headscope.capture.engine import Scope
from headscope.capture.reducers import Entropy, KeyMass
from headscope.models import zoo
from headscope.probes import decoding, sink_inputs
from headscope.probes import inputs as probe_inputs
from headscope.probes.audio import frame_reasons as audio_frames
from headscope.probes.audio import speech_input
from headscope.probes.repeated import candidate_ids
from headscope.probes.text import prose
from headscope.registry import Context
from headscope.results import Results
from headscope.runner import RunOptions, analyze

SINK_HEAD, UNIFORM_HEAD, MARK = 0, 1, 0  # planted heads of layer 0; MARK: the hidden dimension that flags position 0


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with tm.one_thread():
        yield


# --- reducers against eager attention ---------------------------------------------------------------------------


def tiny_gpt_oss() -> torch.nn.Module:
    """A tiny GPT-OSS: a learned sink logit per head (``sinks``), so attention rows sum below 1."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(9)
    config = GptOssConfig(vocab_size=tm.VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                          num_experts_per_tok=1, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                          max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                          pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    model = tm.sharpen(GptOssForCausalLM(config), 9)
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            layer.self_attn.sinks.copy_(torch.tensor([2.0, -1.0, 0.5, 3.0]) + index)
    return model


@functools.cache
def _model(name: str) -> tuple[torch.nn.Module, str]:
    if name == "gpt_oss":
        return tiny_gpt_oss(), "decoder"
    tiny = tm.get(name)
    return tiny.model, tiny.kind


def _windows(name: str, layers: int) -> list[int | None]:
    if name == "gemma3":
        return [4, None, 4]
    if name == "gpt_oss":
        return [4, None]
    return [None] * layers


CASES = [("llama", 2, "left", 3), ("gemma3", 2, "left", 3), ("gemma3", 1, None, None), ("bert", 2, "right", 3),
         ("t5", 2, "right", 3), ("gpt_oss", 2, "left", None)]


# The models whose every call the kernel path serves (T5 has a position bias, GPT-OSS learned sink logits).
KERNEL_MODELS = {"llama", "gemma3", "bert"}


@pytest.mark.parametrize("path", ["auto", "chunked"])
@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_sink_reducers_equal_eager_attention(case, path) -> None:
    name, batch, padding, chunk = case
    model, kind = _model(name)
    inputs = tm.get("llama" if name == "gpt_oss" else name).inputs(batch, padding)
    calls = ref.forward_attention(ref.eager_copy(model), kind, inputs)
    scope = Scope(model)
    mass, first_four, score = SinkMass(), SinkMass(positions=(0, 1, 2, 3)), SinkMass(exclude_own=False)
    residual, received, scale, scores = ResidualMass(), KeyReceived(), ref.LogitScale(), SinkScores()
    with torch.no_grad(), scope.capture(mass, first_four, score, residual, received, scale, scores, chunk_size=chunk,
                                        path=path):
        model(**inputs)
    if path == "auto":  # every call on the kernel path where the model allows it
        assert (set(scope.paths) == {"kernel"}) == (name in KERNEL_MODELS), scope.paths

    for stack, call in calls.items():
        causal = stack in ("self", "decoder") and kind != "encoder"
        windows = _windows(name, len(call))
        visible = {"causal": causal, "windows": windows, "floor": ref.kernel_entropy_floor(scale.scale(stack))}
        ref.assert_exact(mass.result()[stack], ref.sink_mass, [call], err_msg=f"{stack} mass", **visible)
        ref.assert_exact(first_four.result()[stack], ref.sink_mass, [call], positions=(0, 1, 2, 3),
                         err_msg=f"{stack} first_four", **visible)
        ref.assert_exact(score.result()[stack], ref.sink_mass, [call], exclude_own=False, err_msg=f"{stack} score",
                         **visible)
        ref.assert_exact(residual.result()[stack], ref.residual_mass, [call], err_msg=f"{stack} residual")
        for example in range(batch):  # Gu et al.'s score of each example alone
            ref.assert_exact(scores.result()[stack][example], ref.sink_mass, [_example(call, example)],
                             exclude_own=False, err_msg=f"{stack} score of example {example}", **visible)
        tables = ref.received([call], causal=causal, windows=windows)
        exact = ref.received(ref.in_float64([call]), causal=causal, windows=windows)
        for layer, table in tables.items():
            mine = received.result()[(stack, layer)][0]
            ref.assert_matches_eager(mine[:, : table.shape[1]], table, exact[layer], err_msg=f"{stack} {layer}",
                                     floor=visible["floor"])
    if name == "gpt_oss":  # the learned sink withholds mass: clearly nonzero, head by head
        assert residual.result()["self"].min() > 0.01
    if name == "gemma3":  # the sliding window hides the first token from later queries; they are left out
        every_query = KeyMass(exclude_own=False)
        with torch.no_grad(), scope.capture(every_query):
            model(**inputs)
        assert not np.allclose(score.result()["self"], every_query.result()["self"])


def _example(call: list[ref.LayerAttention], index: int) -> list[ref.LayerAttention]:
    """The eager attention of one example of a batched call."""
    one = slice(index, index + 1)
    return [dataclasses.replace(layer, probs=layer.probs[one], query_valid=layer.query_valid[one],
                                key_valid=layer.key_valid[one], first=layer.first[one],
                                exact=None if layer.exact is None else layer.exact[one]) for layer in call]


def test_sink_reducers_equal_eager_attention_while_decoding() -> None:
    """Greedy decoding with a sliding-window KV cache: each step's query counts, within its window."""
    model, _ = _model("gemma3")
    inputs = tm.get("gemma3").inputs(1, None)
    score, received = SinkMass(exclude_own=False), KeyReceived()
    with torch.no_grad(), Scope(model).capture(score, received):
        sequences = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    calls = ref.decoding_attention(ref.eager_copy(model), "decoder", inputs, sequences)["self"]

    ref.assert_exact(score.result()["self"], ref.sink_mass, calls, exclude_own=False, windows=[4, None, 4])
    exact = ref.received(ref.in_float64(calls), windows=[4, None, 4])
    for layer, table in ref.received(calls, windows=[4, None, 4]).items():
        ref.assert_matches_eager(received.result()[("self", layer)][0][:, : table.shape[1]], table, exact[layer],
                                 err_msg=f"layer {layer}")


def test_cross_attention_noncontent_mass_and_filtered_entropy_equal_eager() -> None:
    model, kind = _model("t5")
    inputs = tm.get("t5").inputs(2, "right")
    calls = ref.forward_attention(ref.eager_copy(model), kind, inputs)
    exclude = torch.rand(2, inputs["input_ids"].shape[1], generator=torch.Generator().manual_seed(4)) < 0.3
    raw, entropy, filtered = KeyMass(key_mask=exclude, exclude_own=False, stacks=["cross"]), Entropy(["cross"]), \
        FilteredEntropy(exclude, stacks=["cross"])
    # a reducer on every stack, as the analysis has: the engine reads which decoder queries are padding from
    # the decoder's self-attention, which it computes itself only when some reducer wants that stack
    with torch.no_grad(), Scope(model).capture(raw, entropy, filtered, SinkMass(), chunk_size=3):
        model(**inputs)

    cross = [calls["cross"]]
    ref.assert_exact(raw.result()["cross"], ref.key_mass, cross, key_mask=exclude, exclude_own=False)
    ref.assert_exact(entropy.result()["cross"], ref.entropy, cross)
    ref.assert_exact(filtered.result()["cross"], ref.filtered_entropy, cross, exclude)
    assert set(filtered.result()) == {"cross"}


def test_filtering_renormalises_each_cross_attention_row_over_content_tokens() -> None:
    model, kind = _model("t5")
    inputs = tm.get("t5").inputs(2, "right")
    probs = ref.forward_attention(ref.eager_copy(model), kind, inputs)["cross"][1].probs  # (B, H, Tq, S)
    keep = torch.rand(2, probs.shape[-1], generator=torch.Generator().manual_seed(5)) > 0.3
    keep &= inputs["attention_mask"].bool()
    filtered = renormalised(probs, keep)

    np.testing.assert_allclose(filtered.sum(-1).numpy(), 1.0, rtol=0, atol=1e-12)
    assert (filtered[~keep[:, None, None, :].expand_as(filtered)] == 0).all()
    content = probs * keep[:, None, None, :]
    np.testing.assert_allclose(filtered.numpy(), (content / content.sum(-1, keepdim=True)).numpy(), rtol=1e-12)
    assert (probs.sum(-1) - content.sum(-1)).max() > 0.1  # the raw rows did put mass on the left-out tokens


# --- the analysis on saved tiny models --------------------------------------------------------------------------


def planted_gpt2(vocab: int) -> torch.nn.Module:
    """A tiny GPT-2 whose layer-0 head 0 attends to position 0 and head 1 attends uniformly.

    Position 0's embedding alone holds a large value in hidden dimension MARK (every token embedding and
    every other position embedding hold 0 there), so after the layer norm only position 0 stands out in
    MARK. Head 0's query is a constant (its bias) and its key reads MARK alone: its score for position 0
    exceeds every other by about 30, so it puts all its attention there. Head 1's query is 0: equal scores,
    uniform attention over the visible keys.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=BOS,
                        eos_token_id=EOS, pad_token_id=PAD)
    model = tm.sharpen(GPT2LMHeadModel(config), 3)
    width, head_dim = 32, 8
    with torch.no_grad():
        model.transformer.wte.weight[:, MARK] = 0
        model.transformer.wpe.weight[:, MARK] = 0
        model.transformer.wpe.weight[0, MARK] = 10
        qkv = model.transformer.h[0].attn.c_attn  # Conv1D, weight (in, 3 * width): query | key | value
        for head in (SINK_HEAD, UNIFORM_HEAD):
            for part in (0, width):
                columns = slice(part + head * head_dim, part + (head + 1) * head_dim)
                qkv.weight[:, columns] = 0
                qkv.bias[columns] = 0
        qkv.bias[SINK_HEAD * head_dim] = 4.0
        qkv.weight[MARK, width + SINK_HEAD * head_dim] = 4.0
    return model


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory, tokenizer) -> Path:
    return save_tiny(planted_gpt2(len(tokenizer)), tmp_path_factory.mktemp("planted-gpt2"))


def run_sinks(folder: Path, **params) -> headscope.AnalysisResult:
    loaded = headscope.load(str(folder))
    return sinks.run(Context(loaded, Scope(loaded.model), params=params))


def test_planted_sink_head_is_found_and_uniform_head_is_not(planted_dir: Path) -> None:
    result = run_sinks(planted_dir)
    score, mass = result.map("sink_score", "self").values, result.map("sink_mass", "self").values
    tokens = 64
    harmonic = sum(1 / (t + 1) for t in range(tokens))  # uniform attention gives query t 1/(t+1) on the first token
    print(f"\nplanted sink head: score {score[0, SINK_HEAD]:.4f}, uniform head: score {score[0, UNIFORM_HEAD]:.4f}")

    assert result.top_heads("sink_score", k=1, stack="self")[0][:2] == (0, SINK_HEAD)
    assert result.top_heads("sink_mass", k=1, stack="self")[0][:2] == (0, SINK_HEAD)
    assert score[0, SINK_HEAD] > 0.99 and mass[0, SINK_HEAD] > 0.99
    # exact rows 1/(t+1), each rounded once, then a float32 mean of positive terms: relative error below tokens * eps
    rel = ref.SLACK * tokens * ref.FLOAT32_EPS
    assert score[0, UNIFORM_HEAD] == pytest.approx(harmonic / tokens, rel=rel, abs=0)
    assert mass[0, UNIFORM_HEAD] == pytest.approx((harmonic - 1) / (tokens - 1), rel=rel, abs=0)
    assert score[0, UNIFORM_HEAD] < result.params["eps"]
    assert "0.0=" in result.summary["top_sink_heads_self"][0]
    found = result.tables["sink_tokens"]
    assert ((found["layer"] == 0) & (found["position"] == 0) & (found["token"] == "<s>")).any()


def test_sink_mass_on_detected_sink_tokens_equals_eager(planted_dir: Path, tokenizer) -> None:
    result = run_sinks(planted_dir, sink_positions="detected")
    positions = tuple(int(item.split()[0]) for item in result.summary["sink_set_self"])
    model = headscope.load(str(planted_dir)).model
    inputs = tokenizer(prose(), return_tensors="pt")
    inputs = {name: tensor[:, :64] for name, tensor in inputs.items()}
    calls = ref.forward_attention(ref.eager_copy(model), "decoder", inputs)

    assert 0 in positions and result.params["sink_positions"] == "detected"
    ref.assert_exact(result.map("sink_mass", "self").values, ref.sink_mass, [calls["self"]], positions)


def test_analysis_maps_and_tables_equal_eager_attention(tiny_llama_dir: Path) -> None:
    """One forward pass of the prose, cut to the tiny model's 64 positions, measured by transformers alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_sinks(tiny_llama_dir, massive_threshold=1.0, massive_ratio=2.0, token_threshold=0.05)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    model.set_attn_implementation("eager")
    ids = AutoTokenizer.from_pretrained(tiny_llama_dir)(prose(), return_tensors="pt")["input_ids"][:, :64]

    def eager_statistics(eager: torch.nn.Module, inputs: dict) -> tuple[np.ndarray, ...]:
        """(sink_score, sink_mass, received): on the first token, every query and the later ones; received:
        attention each position gets, mean over heads and the later queries (layers, positions)."""
        with torch.no_grad():
            attentions = eager(**inputs, output_attentions=True).attentions
        score = np.stack([a[0, :, :, 0].double().mean(-1).numpy() for a in attentions])
        mass = np.stack([a[0, :, 1:, 0].double().mean(-1).numpy() for a in attentions])
        received = np.stack([np.array([a[0, :, s + 1:, s].double().mean().item() if s < 63 else np.nan
                                       for s in range(64)]) for a in attentions])
        return score, mass, received

    score, mass, received = eager_statistics(model, {"input_ids": ids})
    score64, mass64, received64 = eager_statistics(ref.float64_twin(model), ref.float64_inputs({"input_ids": ids}))
    ref.assert_matches_eager(result.map("sink_score", "self").values, score, score64)
    ref.assert_matches_eager(result.map("sink_mass", "self").values, mass, mass64)
    assert ("residual_mass", "self") not in result.maps and "none" in result.summary["residual_mass"]

    # attention received by each position, then averaged over layers
    judged = np.array([63 - s >= 8 for s in range(64)])  # min_queries = 8
    by_position = result.tables["attention_by_position"]
    ref.assert_matches_eager(by_position["received"].to_numpy(), np.where(judged, received.mean(0), np.nan),
                             np.where(judged, received64.mean(0), np.nan))
    sink_rows = result.tables["sink_tokens"]
    expected = {(layer, s) for layer in range(2) for s in range(64) if judged[s] and received[layer, s] > 0.05}
    assert set(zip(sink_rows["layer"], sink_rows["position"], strict=True)) == expected

    # massive activations: per layer output, the largest |x| and its ratio to the layer's median |x|
    with torch.no_grad():
        hidden_states = model(ids, output_hidden_states=True).hidden_states
    table = result.tables["massive_activations"]
    for layer, state in enumerate(hidden_states[1:]):
        x = state[0].abs().numpy()
        rows = table[table["layer"] == layer]
        top = rows.iloc[0]
        assert (top["position"], top["dimension"]) == np.unravel_index(x.argmax(), x.shape)
        assert top["ratio"] == pytest.approx(x.max() / np.median(x), rel=1e-5)
        massive = (x > 1.0) & (x / np.median(x) > 2.0)
        assert rows["massive"].sum() == min(int(massive.sum()), sinks.MAX_TABLE_ROWS_PER_LAYER)


# --- Gu et al.'s protocol: natural text, random tokens, one repeated token --------------------------------------------


def no_bos_tokenizer():
    """The shared tokenizer with nothing added before a text, as SmolLM2's."""
    from tokenizers import processors

    tokenizer = bpe_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no-bos"])
def test_gu_inputs_are_deterministic_and_each_of_its_kind(bos: bool) -> None:
    tokenizer = bpe_tokenizer() if bos else no_bos_tokenizer()
    prefix = [BOS] if bos else []
    assert tokenizer("a text")["input_ids"] == prefix + tokenizer("a text", add_special_tokens=False)["input_ids"]
    ordinary, special = set(candidate_ids(tokenizer).tolist()), set(tokenizer.all_special_ids)
    built = {kind: sink_inputs.build(kind, tokenizer, 40, 64, seed=7) for kind in sink_inputs.KINDS}

    for kind, inputs in built.items():
        again, other = (sink_inputs.build(kind, tokenizer, 40, 64, seed=seed) for seed in (7, 8))
        assert inputs.kind == kind and inputs.input_ids.shape == (40, 64) and inputs.prefix == len(prefix)
        assert torch.equal(inputs.input_ids, again.input_ids) and inputs.digest() == again.digest()
        assert not torch.equal(inputs.input_ids, other.input_ids)
        assert inputs.input_ids[:, : len(prefix)].eq(torch.tensor(prefix, dtype=torch.long)).all()
        assert inputs.attention_mask.eq(1).all() and inputs.attention_mask.shape == inputs.input_ids.shape
    body = {kind: inputs.input_ids[:, len(prefix):] for kind, inputs in built.items()}
    for kind in ("random", "repeated"):
        drawn = set(body[kind].flatten().tolist())
        assert drawn <= ordinary and not drawn & special, kind
    # random: uniform draws cover nearly the whole ordinary vocabulary (2560 draws of 381 ids), rows vary within
    assert len(set(body["random"].flatten().tolist())) > 0.95 * len(ordinary)
    assert min(len(set(row)) for row in body["random"].tolist()) > 45
    # repeated: one token per sequence, a different one for most sequences
    assert body["repeated"].eq(body["repeated"][:, :1]).all()
    assert len(set(body["repeated"][:, 0].tolist())) > 30
    # natural: each row is the start of a distinct paragraph of at least 64 tokens, as the tokenizer encodes it
    starts = [tokenizer(text)["input_ids"] for text in sink_inputs.paragraphs(sink_inputs.corpus())]
    long = [ids[:64] for ids in starts if len(ids) >= 64]
    indices = [long.index(row) for row in built["natural"].input_ids.tolist()]
    assert indices == sorted(set(indices)) and built["natural"].available == len(long) > 100
    everything = sink_inputs.natural(tokenizer, 10_000, 64)
    assert everything.input_ids.tolist() == long and "fewer than the 10000 asked" in everything.source
    narrow = sink_inputs.random_tokens(tokenizer, 4, 64, vocab_size=100)  # the model's embedding rows bound the ids
    assert int(narrow.input_ids.max()) < 100


def first_token_scores(eager: torch.nn.Module, ids: torch.Tensor) -> np.ndarray:
    """(sequences, layers, heads) Gu et al.'s alpha from eager attention: each query's attention on the first
    token, mean over the queries (all of them see it: causal, no window)."""
    with torch.no_grad():
        attentions = eager(input_ids=ids, output_attentions=True).attentions
    return np.stack([a[:, :, :, 0].double().mean(-1).numpy() for a in attentions], axis=1)


def test_gu_sink_rates_and_scores_equal_eager_attention_on_the_same_inputs(tiny_llama_dir: Path) -> None:
    """Each kind's sink rate, mean alpha and map from 12 sequences in batches of 5, against eager attention on the
    same sequences (rebuilt from the seed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    eps, sequences = 0.1, 12
    result = run_sinks(tiny_llama_dir, protocol="gu", eps=eps, gu_sequences=sequences, batch_size=5, seed=3)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    model.set_attn_implementation("eager")
    twin = ref.float64_twin(model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    table = result.tables["gu_sink_rates"].set_index("input")
    print(f"\ntiny llama, Gu protocol at eps {eps}:\n{table}")

    assert list(table.index) == list(sink_inputs.KINDS) and set(table["stack"]) == {"self"}
    assert result.summary["passes"] == sequences and set(result.summary["tokens"]) == {64}
    maps = {}
    for kind in sink_inputs.KINDS:
        ids = sink_inputs.build(kind, tokenizer, sequences, 64, seed=3, vocab_size=model.config.vocab_size).input_ids
        alpha, exact = first_token_scores(model, ids), first_token_scores(twin, ids)
        rate = 100 * (alpha > eps).mean(axis=(1, 2)).mean()
        near = np.abs(exact - eps) < 1e-5  # indicators float rounding could flip
        row = table.loc[kind]
        assert (row["sequences"], row["tokens"]) == (sequences, 64)
        assert abs(row["sink_rate"] - rate) <= 100 * near.mean() + 0.01, kind  # the table rounds to 0.01
        assert result.summary["gu_sink_rates_self"][kind] == row["sink_rate"]
        assert row["mean_alpha"] == pytest.approx(exact.mean(), abs=1e-5)
        maps[kind] = result.map("sink_score" if kind == "natural" else f"sink_score_{kind}", "self").values
        ref.assert_matches_eager(maps[kind], alpha.mean(axis=0), exact.mean(axis=0), err_msg=kind)
    assert result.summary["sink_rate_self"] == table.loc["natural", "sink_rate"]
    assert not np.allclose(maps["random"], maps["repeated"]) and not np.allclose(maps["natural"], maps["random"])


def test_gu_protocol_in_batches_equals_one_input_at_a_time(tiny_llama_dir: Path) -> None:
    """Batches do not mix inputs: every map and table (sink tokens, attention by position, massive activations)
    is that of one forward pass per input."""
    params = {"protocol": "gu", "gu_sequences": 7, "seed": 1, "token_threshold": 0.05, "massive_threshold": 1.0,
              "massive_ratio": 2.0}
    alone, batched = (run_sinks(tiny_llama_dir, batch_size=size, **params) for size in (1, 3))

    assert alone.maps.keys() == batched.maps.keys() and alone.tables.keys() == batched.tables.keys()
    for key, head_map in alone.maps.items():
        np.testing.assert_allclose(batched.maps[key].values, head_map.values, rtol=0, atol=1e-6, err_msg=str(key))
    for name, table in alone.tables.items():
        assert len(table), name
        pd.testing.assert_frame_equal(batched.tables[name], table, check_exact=False, rtol=1e-5, atol=1e-6)
    assert batched.tables["sink_tokens"]["input"].nunique() == 7


def test_gu_inputs_choose_the_kinds_measured(tiny_llama_dir: Path) -> None:
    result = run_sinks(tiny_llama_dir, protocol="gu", gu_inputs="repeated", gu_sequences=3)

    assert result.metrics() == ["sink_score_repeated"] and list(result.tables) == ["gu_sink_rates"]
    assert result.tables["gu_sink_rates"]["input"].tolist() == ["repeated"]
    assert list(result.summary["gu_sink_rates_self"]) == ["repeated"]
    assert "repeated 63 times" in result.summary["gu_inputs"]["repeated"]  # the tokenizer's <s> first
    assert list(sinks.figures(result)) == ["gu-rates"]
    prose_only = run_sinks(tiny_llama_dir)  # the default protocol: the maps and tables of before, nothing more
    assert prose_only.metrics() == ["sink_mass", "sink_score"] and "gu_sink_rates" not in prose_only.tables
    assert not any(key.startswith("gu_") for key in prose_only.summary)


def test_without_natural_text_the_main_metric_is_the_first_kinds_sink_score(tiny_llama_dir: Path) -> None:
    result = headscope.run("sinks", str(tiny_llama_dir), protocol="gu", gu_inputs="repeated,random", gu_sequences=3)

    assert result.summary["main_metric"] == "sink_score_repeated"
    assert result.top_heads(k=3) == result.top_heads("sink_score_repeated", k=3, stack="self")
    assert headscope.run("sinks", str(tiny_llama_dir), protocol="gu", gu_sequences=3).summary["main_metric"] == \
        "sink_score"


def test_gu_prefix_false_reads_the_token_ids_alone(tiny_llama_dir: Path) -> None:
    tokenizer = bpe_tokenizer()
    for kind in ("random", "repeated"):
        framed = sink_inputs.build(kind, tokenizer, 5, 64, seed=2)
        alone = sink_inputs.build(kind, tokenizer, 5, 64, seed=2, with_prefix=False)
        assert framed.input_ids[:, 0].eq(BOS).all() and framed.prefix == 1
        assert alone.prefix == 0 and alone.input_ids.shape == (5, 64) and not alone.input_ids.eq(BOS).any()
        assert "the tokenizer's own prefix left out" in alone.source
    assert sink_inputs.build("repeated", tokenizer, 5, 64, with_prefix=False).input_ids.unique(dim=1).shape[1] == 1

    from transformers import AutoModelForCausalLM

    result = run_sinks(tiny_llama_dir, protocol="gu", gu_inputs="repeated", gu_sequences=3, gu_prefix=False)
    assert "repeated 64 times" in result.summary["gu_inputs"]["repeated"]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    model.set_attn_implementation("eager")
    ids = sink_inputs.build("repeated", bpe_tokenizer(), 3, 64, vocab_size=model.config.vocab_size,
                            with_prefix=False).input_ids
    alpha, exact = first_token_scores(model, ids), first_token_scores(ref.float64_twin(model), ids)
    ref.assert_matches_eager(result.map("sink_score_repeated").values, alpha.mean(axis=0), exact.mean(axis=0))
    framed = run_sinks(tiny_llama_dir, protocol="gu", gu_inputs="repeated", gu_sequences=3)
    assert not np.allclose(framed.map("sink_score_repeated").values, result.map("sink_score_repeated").values)


def test_gu_protocol_on_an_encoder_and_an_encoder_decoder(tiny_bert_dir: Path, t5_dir: Path) -> None:
    encoder = run_sinks(tiny_bert_dir, protocol="gu", gu_sequences=3)
    decoded = run_sinks(t5_dir, protocol="gu", gu_sequences=2, max_new_tokens=2)

    assert encoder.tables["gu_sink_rates"]["input"].tolist() == list(sink_inputs.KINDS)
    assert {"sink_score_random", "sink_score_repeated"} <= set(encoder.metrics())
    rows = decoded.tables["gu_sink_rates"]
    assert set(rows["input"]) == {"natural"} and set(rows["stack"]) == {"encoder", "decoder", "cross"}
    assert "random, repeated" in decoded.summary["gu_inputs_left_out"]
    assert decoded.summary["passes"] == 2


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny T5 with as many decoder layers as encoder layers: transformers 5's ``generate`` sizes the
    decoder's cache from the encoder's layer count, so the shared ``tiny_t5_dir`` (2 and 3) cannot decode."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(2)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS)
    return save_tiny(tm.sharpen(T5ForConditionalGeneration(config), 2), tmp_path_factory.mktemp("tiny-t5-decode"))


def test_encoder_decoder_with_text_source_reports_noncontent_tokens(t5_dir: Path) -> None:
    result = run_sinks(t5_dir, max_new_tokens=4)
    source = result.tables["source_tokens"]

    assert {stack for _, stack in result.maps} == {"encoder", "decoder", "cross"}
    assert {"noncontent_mass", "entropy", "filtered_entropy"} <= set(result.metrics())
    assert source.loc[source["token"] == "<s>", "reason"].eq("special").all()
    assert source.loc[source["token"].isin([".", ","]), "reason"].eq("punctuation").all()
    assert source.loc[source["token"].str.strip().str.isalpha(), "non_content"].eq(False).all()
    assert 0 < result.summary["noncontent_share_cross"] < 1
    decoder = result.tables["attention_by_position"].query("stack == 'decoder'")
    assert decoder["token"].iloc[0] == "<pad>"  # T5 starts decoding from its pad token: positions line up


@pytest.mark.parametrize(("params", "message"), [
    ({"threshold": 0.2}, "unknown sinks parameter"),
    ({"protocol": "streaming"}, "sinks.protocol takes one of 'prose', 'gu'"),
    ({"gu_inputs": "natural,shuffled"}, "sinks.gu_inputs must name some of natural, random, repeated, each once; got "
                                        "natural, shuffled"),
    ({"gu_inputs": "random,random"}, "sinks.gu_inputs must name some of natural, random, repeated, each once"),
    ({"gu_inputs": ""}, r"sinks.gu_inputs must name some of natural, random, repeated, each once; got \(none\)"),
    ({"gu_sequences": 0}, "sinks.gu_sequences and sinks.batch_size must be at least 1, got 0 and 25"),
    ({"batch_size": "many"}, "sinks.batch_size takes an integer, not 'many'"),
], ids=["unknown", "protocol", "gu-kind", "gu-twice", "gu-none", "sequences", "batch"])
def test_bad_parameter_is_one_clear_error(tiny_llama_dir: Path, params: dict, message: str) -> None:
    with pytest.raises(headscope.HeadscopeError, match=message) as error:
        run_sinks(tiny_llama_dir, **params)
    assert "\n" not in str(error.value)


def test_cli_writes_sinks_results_and_figures(tmp_path: Path, planted_dir: Path) -> None:
    code = run_cli("analyze", str(planted_dir), "--analyses", "sinks", "--out", str(tmp_path), "--figures", "html",
                   "-q")

    assert code == 0
    result = Results.load(tmp_path / "results.json")["sinks"]
    assert result.status == "ok" and result.summary["sink_rate_self"] > 0
    figures = tmp_path / "figures"
    for name in ("sink_mass-self", "sink_score-self", "profile", "where-self"):
        assert (figures / f"sinks-{name}.html").is_file()
    page = (figures / "sinks-where-self.html").read_text(encoding="utf-8")
    assert "&lt;s&gt;" in page  # token text is escaped for the hover labels
    json.dumps(result.summary)


def test_cli_gu_protocol_finds_the_planted_sink_head_on_every_input_kind(tmp_path: Path, planted_dir: Path) -> None:
    """The planted heads read positions, not tokens: head 0 sinks and head 1 spreads its attention uniformly on
    natural text, random tokens and a repeated token alike."""
    code = run_cli("analyze", str(planted_dir), "--analyses", "sinks", "--out", str(tmp_path), "--figures", "html",
                   "-q", "--set", "sinks.protocol=gu", "--set", "sinks.gu_sequences=8", "--set", "sinks.batch_size=3")

    assert code == 0
    result = Results.load(tmp_path / "results.json")["sinks"]
    table = result.tables["gu_sink_rates"]
    assert table["input"].tolist() == list(sink_inputs.KINDS) and table["sequences"].eq(8).all()
    uniform = sum(1 / (t + 1) for t in range(64)) / 64  # query t puts 1/(t+1) on the first token
    for metric in ("sink_score", "sink_score_random", "sink_score_repeated"):
        values = result.map(metric, "self").values
        assert values[0, SINK_HEAD] > 0.99, metric
        assert values[0, UNIFORM_HEAD] == pytest.approx(uniform, rel=ref.SLACK * 64 * ref.FLOAT32_EPS, abs=0)
        assert (tmp_path / "figures" / f"sinks-{metric}-self.html").is_file()
    assert table["sink_rate"].ge(100 / 8).all()  # at least the planted sink head of the 8 heads
    figure = (tmp_path / "figures" / "sinks-gu-rates.html").read_text(encoding="utf-8")
    assert "repeated" in figure and "sink rate" in figure


# --- the packaged models -------------------------------------------------------------------------------------------


def needs(alias: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not zoo.PACKAGED[alias].installed(), reason=f"run `{zoo.PACKAGED[alias].install}`")


def _report(alias: str, result) -> None:
    summary = result.summary
    rates = {key: value for key, value in summary.items() if key.startswith(("sink_rate", "top_sink", "sink_tokens"))}
    print(f"\n{alias}: {result.seconds:.1f} s, tokens {summary['tokens']}, {json.dumps(rates)}")
    print(f"{alias}: massive activations {summary['massive_activations']}, top {summary.get('top_activation')}")


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_decoders_send_most_attention_to_the_first_token_in_middle_layers(alias: str, tmp_path: Path) -> None:
    if not zoo.PACKAGED[alias].installed():
        pytest.skip(f"run `{zoo.PACKAGED[alias].install}`")
    started = time.perf_counter()
    results = analyze(RunOptions(model=alias, analyses=["sinks"], out=tmp_path, figures=()))
    result = results["sinks"]
    _report(alias, result)
    gu = run_sinks_alias(alias, protocol="gu", gu_sequences=8)
    print(f"{alias}: Gu protocol sink rates, 8 sequences each: {gu.summary['gu_sink_rates_self']} (prose: "
          f"{result.summary['sink_rate_self']}); wall {time.perf_counter() - started:.1f} s")
    mass = result.map("sink_mass", "self").values
    layers = mass.shape[0]
    middle = float(np.nanmean(mass[layers // 3: 2 * layers // 3 + 1]))
    print(f"{alias}: mean first-token mass in the middle third of layers: {middle:.3f}")

    by_position = result.tables["attention_by_position"]
    assert result.status == "ok"
    assert 0 < result.summary["sink_rate_self"] <= 100 and 0 < gu.summary["sink_rate_self"] <= 100
    assert middle > 0.2  # measured: SmolLM2 0.36, Gemma 3 0.29
    assert by_position.loc[by_position["received"].idxmax(), "position"] == 0  # the first token takes the most


def run_sinks_alias(alias: str, **params):
    loaded = headscope.load(alias)
    return sinks.run(Context(loaded, Scope(loaded.model), params=params))


@pytest.mark.slow
@needs("smollm2-135m")
def test_smollm2_sinks_on_natural_text_and_random_tokens_but_not_on_one_repeated_token() -> None:
    """Gu et al. (2024), Table 1: rotary models such as LLaMA2 and Mistral have sinks on natural text and on random
    tokens, none on one repeated token. SmolLM2 (RoPE) adds no BOS, so a repeated sequence is one token 64 times:
    every position holds the same hidden state and nothing marks the first token."""
    started = time.perf_counter()
    result = run_sinks_alias("smollm2-135m", protocol="gu", gu_sequences=16, seed=0)
    rates = result.summary["gu_sink_rates_self"]
    repeated = result.map("sink_score_repeated", "self").values
    print(f"\nsmollm2-135m, Gu protocol, 16 sequences each: {rates}, mean alpha "
          f"{result.tables['gu_sink_rates']['mean_alpha'].round(4).tolist()}, largest alpha on the repeated token "
          f"{np.nanmax(repeated):.3f}; {time.perf_counter() - started:.1f} s")

    # measured (seeds 0-4): natural 69.1-73.7, random 71.1-78.9, repeated 0.0 (100 sequences: 70.8, 77.7, 0.0)
    assert rates["natural"] > 55 and rates["random"] > 55
    assert rates["repeated"] < 2 and np.nanmax(repeated) < result.params["eps"]
    assert result.tables["gu_sink_rates"]["sequences"].eq(16).all()


@pytest.mark.slow
@needs("minilm-l6")
def test_minilm_encoder_sinks(tmp_path: Path) -> None:
    result = analyze(RunOptions(model="minilm-l6", analyses=["sinks"], out=tmp_path, figures=()))["sinks"]
    _report("minilm-l6", result)

    assert result.status == "ok"
    assert result.map("sink_score", "self").values.shape == (6, 12)


@pytest.mark.slow
@needs("whisper-tiny.en")
def test_whisper_sinks_on_three_stacks_from_the_command_line(tmp_path: Path) -> None:
    started = time.perf_counter()
    code = run_cli("analyze", "whisper-tiny.en", "--analyses", "sinks", "--out", str(tmp_path), "--figures", "none",
                   "-q")
    print(f"\nheadscope analyze whisper-tiny.en --analyses sinks: {time.perf_counter() - started:.1f} s")

    assert code == 0
    result = Results.load(tmp_path / "results.json")["sinks"]
    _report("whisper-tiny.en", result)
    assert {stack for _, stack in result.maps} == {"encoder", "decoder", "cross"}
    decoder = result.tables["attention_by_position"].query("stack == 'decoder'")
    assert decoder["token"].iloc[0] == "<|startoftranscript|>"  # the start tokens generate() leaves out count
    assert all(f"sink_rate_{stack}" in result.summary for stack in ("encoder", "decoder", "cross"))
    print(f"whisper-tiny.en cross-attention: non-content {result.summary['noncontent_set_cross']}, share "
          f"{result.summary['noncontent_share_cross']}, entropy raw {result.summary['cross_entropy_raw']} / "
          f"filtered {result.summary['cross_entropy_filtered']}")

    # the audio non-content set: the padding starts where the clip ends, and the maps equal eager attention
    waveform, rate, _ = speech_input(None)
    frames = result.tables["source_frames"]
    reasons = np.repeat(frames["reason"].to_numpy(), frames["frames"].to_numpy())
    assert len(reasons) == 1500 and frames["reason"].iloc[-1] == "padding"
    assert frames["first_position"].iloc[-1] == -(-len(waveform) // (rate // 50))
    assert 0 < (reasons == "silence").sum() < (reasons == "speech").sum()
    loaded = headscope.load("whisper-tiny.en")
    eager = loaded.model
    eager.set_attn_implementation("eager")
    features = probe_inputs.build(loaded).inputs
    sequence = decoding.own_output(eager, features, 64).sequence
    assert loaded.processor.tokenizer.decode(sequence[0], skip_special_tokens=True).strip() == result.summary["output"]
    noncontent = torch.tensor(reasons != "speech")

    def cross_statistics(model: torch.nn.Module, inputs: dict) -> tuple[np.ndarray, np.ndarray]:
        """(noncontent_mass, filtered_entropy), each (layers, heads), from eager cross-attention."""
        with torch.no_grad():
            cross = model(**inputs, decoder_input_ids=sequence[:, :-1], output_attentions=True).cross_attentions
        attention = torch.stack(cross)[:, 0].double()  # (layers, heads, queries, 1500)
        kept = attention[..., ~noncontent]
        kept = kept / kept.sum(-1, keepdim=True)
        return (attention[..., noncontent].sum(-1).mean(-1).numpy(),
                -(kept * kept.clamp_min(1e-30).log()).sum(-1).mean(-1).numpy())

    mass, filtered = cross_statistics(eager, features)
    mass64, filtered64 = cross_statistics(ref.float64_twin(eager), ref.float64_inputs(features))
    ref.assert_matches_eager(result.map("noncontent_mass", "cross").values, mass, mass64)
    ref.assert_matches_eager(result.map("filtered_entropy", "cross").values, filtered, filtered64)


def test_audio_frames_past_the_clip_are_padding_and_quiet_ones_silence() -> None:
    rate = 16000
    t = np.arange(rate) / rate
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)  # 1 s of sound, 0.5 s of near-silence (-60 dB), 0.5 s of sound
    waveform = np.concatenate([tone, 0.0005 * tone[: rate // 2], tone[: rate // 2]]).astype(np.float32)
    reasons = audio_frames(waveform, rate, positions=150)
    assert reasons[:50] == [""] * 50 and reasons[50:75] == ["silence"] * 25 and reasons[75:100] == [""] * 25
    assert reasons[100:] == ["padding"] * 50
    assert audio_frames(waveform, rate, positions=150, silence_db=0)[50:75] == [""] * 25  # padding alone
    assert audio_frames(waveform, rate, positions=150, silence_db=80)[50:75] == [""] * 25  # -60 dB is above -80
