"""The ``saliency`` analysis: pooling to encoder positions, agreement measures equal scipy's, captured cross-attention
equals eager attention, a planted copy head agrees with every saliency method while the other heads do not, the
command line runs it on a tiny T5, and bad input gets one line. The ``slow`` test measures the packaged Whisper.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import reference as ref
import tiny_models as tm
import torch
from cli_runner import run_cli
from scipy import stats

import headscope
from headscope.analyses import saliency
from headscope.capture.engine import Scope
from headscope.models import zoo
from headscope.results import Results
from headscope.runner import RunOptions, analyze


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with tm.one_thread():
        yield


# --- pooling and agreement on hand-made numbers ----------------------------------------------------------------


def test_audio_pooling_takes_the_max_over_frequency_and_stride_and_crops_padding():
    # (tokens 1, mel 3, frames 6), stride 2: three encoder positions, the last one padding
    attribution = torch.tensor([[[1.0, -5.0, 0.0, 2.0, 9.0, 9.0],
                                 [-3.0, 0.0, 0.5, -0.5, 9.0, 9.0],
                                 [0.0, 1.0, -4.0, 1.0, 9.0, 9.0]]])
    pooled = saliency.pool_audio(attribution, stride=2, positions=2, pooling="max")
    # |.| max over mel per frame: [3, 5, 4, 2, 9, 9]; max per pair of frames: [5, 4, (9 cropped)]
    np.testing.assert_array_equal(pooled, [[5.0, 4.0]])
    mean = saliency.pool_audio(attribution, stride=2, positions=2, pooling="mean")
    # |.| mean over mel per frame: [4/3, 2, 1.5, 3.5/3]; mean per pair
    np.testing.assert_allclose(mean, [[(4 / 3 + 2) / 2, (1.5 + 3.5 / 3) / 2]])
    assert pooled.shape == (1, 2)


def test_vector_pooling_sums_absolute_values_over_the_dimension():
    attribution = torch.tensor([[[1.0, -2.0], [0.5, 0.5], [-3.0, 0.0]]])  # (tokens, positions, dim)
    np.testing.assert_array_equal(saliency.pool_vectors(attribution, positions=2), [[3.0, 1.0]])


def test_agreement_equals_scipy_and_is_undefined_for_a_constant_vector():
    generator = np.random.default_rng(0)
    x, y = generator.random(17), generator.random(17)
    y[3] = y[5]  # a tie, where Kendall's tau-b and Spearman's ranks matter
    found = saliency.agreement(x, y)
    assert found["pearson"] == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert found["spearman"] == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert found["kendall"] == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
    assert saliency.agreement([0.0, 1.0, 2.0], [1.0, 3.0, 5.0])["pearson"] == pytest.approx(1.0)
    assert all(math.isnan(v) for v in saliency.agreement(np.ones(5), generator.random(5)).values())

    attention = np.stack([x, np.ones(17), y])
    sal = np.stack([y, x, y])
    per_token = saliency.token_agreement(attention, sal)
    assert per_token.shape == (3, 3)
    assert np.isnan(per_token[1]).all()
    np.testing.assert_allclose(saliency.mean_over_tokens(per_token), (per_token[0] + per_token[2]) / 2)
    kept = saliency.token_agreement(attention, sal, keep=np.arange(17) % 2 == 0)
    assert kept[0, 0] == pytest.approx(stats.pearsonr(x[::2], y[::2]).statistic)


def test_aggregates_average_heads_layers_and_the_named_heads():
    attention = np.random.default_rng(1).random((3, 2, 4, 5))  # (layers, heads, tokens, positions)
    found = saliency.aggregates(attention, [(0, 1), (2, 0)])
    np.testing.assert_allclose(found["layer_1"], attention[1].mean(0))
    np.testing.assert_allclose(found["last_layer"], attention[2].mean(0))
    np.testing.assert_allclose(found["all_layers"], attention.mean((0, 1)))
    np.testing.assert_allclose(found["alignment_heads"], (attention[0, 1] + attention[2, 0]) / 2)
    assert "alignment_heads" not in saliency.aggregates(attention)


def test_deletion_auc_is_the_mean_drop_over_the_curve():
    table = pd.DataFrame({"explanation": ["a", "a"], "fraction": [0.5, 1.0], "mean_drop": [1.0, 1.0]})
    # trapezoids from (0, 0): 0.5 * 0.5 + 0.5 * 1.0 = 0.75, over the largest fraction 1.0
    assert saliency.deletion_auc(table)["a"] == pytest.approx(0.75)


# --- captured cross-attention equals eager attention ------------------------------------------------------------


def _source_target(tiny: tm.Tiny) -> tuple[saliency.Source, saliency.Target]:
    inputs = tiny.inputs(1)
    decoder_ids = inputs["decoder_input_ids"]
    if "input_features" in inputs:
        x = inputs["input_features"]
        stride = x.shape[-1] // tiny.model.config.max_source_positions
        source = saliency.Source("audio", x, {"input_features": x}, x.shape[-1] // stride, stride,
                                 torch.zeros(1, 1, 1), [])
    else:
        ids = inputs["input_ids"]
        source = saliency.Source("text", tiny.model.get_input_embeddings()(ids).detach(),
                                 {"input_ids": ids, "attention_mask": inputs["attention_mask"]}, ids.shape[1], 1,
                                 torch.zeros(1, 1, 32), [])
    queries = np.arange(decoder_ids.shape[1] - 1)
    return source, saliency.Target(decoder_ids, queries, [str(q) for q in queries], "", "given")


@pytest.mark.parametrize("name", ["t5", "whisper"])
def test_captured_cross_attention_equals_eager_cross_attentions(name):
    tiny = tm.get(name)
    source, target = _source_target(tiny)
    found = saliency.cross_attention(tiny.model, Scope(tiny.model), source, target)

    def eager_cross_attention(eager: torch.nn.Module, inputs: dict) -> np.ndarray:
        with torch.no_grad():
            outputs = eager(**inputs, decoder_input_ids=target.sequence[:, :-1], output_attentions=True)
        return torch.stack(outputs.cross_attentions)[:, 0][:, :, target.queries].double().numpy()

    eager = ref.eager_copy(tiny.model)
    expected = eager_cross_attention(eager, source.inputs)
    exact = eager_cross_attention(ref.float64_twin(eager), ref.float64_inputs(source.inputs))
    assert found.shape == expected.shape == (2, 4, len(target.queries), source.positions)
    ref.assert_matches_eager(found, expected, exact)
    assert expected.std(-1).mean() > 0.01  # the rows are not uniform: the comparison has teeth


# --- a planted copy head ---------------------------------------------------------------------------------------

VOCAB, D_MODEL, D_KV, HEADS = 16, 32, 16, 3
CONTENT = list(range(3, 16))  # 0 pad and decoder start, 1 end of sequence, 2 unused
PLANTED, DISTRACTOR = (1, 2), (0, 1)
LOOKED_UP = 15  # the distractor always attends to this source token, which the copy chain never reaches


def _next(token: int) -> int:
    """The copy head writes tau(a) for the source token a it attends to: the next content token, cyclically."""
    return CONTENT[(CONTENT.index(token) + 1) % len(CONTENT)]


def planted_t5() -> torch.nn.Module:
    """A T5 whose output is decided by one cross-attention head, PLANTED, that copies a source token.

    Embeddings are one-hot: token v is e_v in dims 0-15 of the residual stream, and the LM head is the same
    matrix (T5 ties them). Every sub-layer's output
    projection is zero except the planted head's, so the encoder output at position s is sqrt(32) e_{a_s} (the
    final RMS norm of a one-hot vector) and the decoder's residual stream is its input token d until the planted
    head. That head's query for decoder token d is beta * e_{m(d)} with m(d) = d for content tokens (3 for the
    start token 0), its keys and values are e_{a_s}: it attends (logit beta = 12, unscaled as in T5) to the
    source position holding token m(d), and writes gamma * e_{tau(a)} (gamma = 4) beside the input's e_d; after
    the final RMS norm (weight 6) and T5's d_model ** -0.5 the LM head's logits are 5.8 for tau(a), 1.5 for d
    and 0 for the others (p(tau(a)) = 0.95): the output is tau(a), and greedy decoding from 0 emits 4, 5, 6, ...
    while the attended position jumps
    around the permuted source. No other head writes anything: the log-probability of each output token depends
    on the source only through the position the planted head attends to.

    The distractor head (layer 0, head 1) always attends to the position of token LOOKED_UP, and the other heads
    attend almost uniformly (small random queries and keys); none of them has any effect on the output. (The
    integrated gradients baseline is the pad token's embedding e_0: from a zero baseline, the RMS norm of a
    one-hot embedding is scale-invariant along the whole path, and the attribution of a one-hot input vanishes.)
    """
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=VOCAB, d_model=D_MODEL, d_kv=D_KV, d_ff=8, num_layers=2, num_decoder_layers=2,
                      num_heads=HEADS, relative_attention_num_buckets=8, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(3)
    scale, beta, gamma = D_MODEL**-0.5, 12.0, 4.0
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for name, parameter in model.named_parameters():
            if "layer_norm" in name:
                parameter.fill_(1.0)
        model.shared.weight[:, :VOCAB] = torch.eye(VOCAB)
        model.decoder.final_layer_norm.weight.fill_(6.0)  # undoes T5's d_model ** -0.5 before the tied LM head
        for layer_index, block in enumerate(model.decoder.block):
            cross = block.layer[1].EncDecAttention
            cross.q.weight.normal_(0, 0.05, generator=generator)
            cross.k.weight.normal_(0, 0.05, generator=generator)
            for head in range(HEADS):
                if (layer_index, head) in (PLANTED, DISTRACTOR):
                    rows = slice(head * D_KV, (head + 1) * D_KV)
                    cross.q.weight[rows] = 0.0
                    cross.k.weight[rows] = 0.0
                    cross.k.weight[rows, :VOCAB] = torch.eye(VOCAB) * scale  # key = e_{a_s}
            if layer_index == DISTRACTOR[0]:
                cross.q.weight[DISTRACTOR[1] * D_KV + LOOKED_UP, :] = beta * scale  # the same query for every d
            if layer_index == PLANTED[0]:
                base = PLANTED[1] * D_KV
                cross.q.weight[base + 3, 0] = beta * scale  # start token 0 looks up token 3
                for token in CONTENT:
                    cross.q.weight[base + token, token] = beta * scale
                    cross.v.weight[base + token, token] = scale
                    cross.o.weight[_next(token), base + token] = gamma
    return model


def _planted_source(model) -> saliency.Source:
    order = torch.randperm(len(CONTENT), generator=torch.Generator().manual_seed(4))
    ids = torch.tensor([CONTENT])[:, order]
    embed = model.get_input_embeddings()
    pad = embed(torch.tensor([[0]])).detach()  # the "floor" baseline: e_0, which no query looks up
    return saliency.Source("text", embed(ids).detach(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                           ids.shape[1], 1, pad, [str(i) for i in ids[0].tolist()])


def test_the_planted_model_copies_as_designed():
    model = planted_t5()
    source = _planted_source(model)
    target = saliency.decode(model, source, max_new_tokens=10)
    assert target.sequence[0].tolist() == [0, *range(4, 14)]
    attention = saliency.cross_attention(model, Scope(model), source, target)
    ids = source.inputs["input_ids"][0].tolist()
    looked_up = [3, *range(4, 13)]  # the token each output step attends to
    assert attention[PLANTED][np.arange(10), [ids.index(t) for t in looked_up]].min() > 0.99
    assert attention[DISTRACTOR][:, ids.index(LOOKED_UP)].min() > 0.99


def test_a_planted_copy_head_agrees_with_every_saliency_method_and_ranks_first():
    model = planted_t5()
    source = _planted_source(model)
    target = saliency.decode(model, source, max_new_tokens=10)
    params = saliency.Params(methods=saliency.METHODS, ig_steps=16, deletion_tokens=0,
                             deletion_fractions=(1 / 13,), deletion_attention="layer_1")
    explanation = saliency.explain(model, Scope(model), source, target, params)
    result = saliency.assemble(explanation, source, target, params)
    assert np.exp(explanation.log_probs).min() > 0.9  # the tokens explained are the ones the model emits

    for method in saliency.METHODS:
        pearson = result.map(f"pearson_{method}").values
        assert result.top_heads(f"pearson_{method}", k=1)[0][:2] == PLANTED, method
        assert pearson[PLANTED] > 0.95, method
        others = np.delete(pearson.ravel(), PLANTED[0] * HEADS + PLANTED[1])
        assert np.nanmax(others) < 0.5, method
        assert pearson[DISTRACTOR] < 0.1, method
        spearman = result.map(f"spearman_{method}").values
        assert spearman[PLANTED] > np.nanmax(np.delete(spearman.ravel(), PLANTED[0] * HEADS + PLANTED[1])), method
        # averaging the planted head with the others dilutes it, but the aggregate still follows it
        table = result.tables["aggregates"].set_index(["method", "aggregate"])
        assert 0.3 < table.loc[(method, "layer_1"), "pearson"] < pearson[PLANTED], method

    # deleting the one position the planted head attends to destroys the token; a random position rarely does
    deletion = saliency.deletion_curves(saliency.Scorer(model, source, target), source,
                                        {"attention": saliency.aggregates(explanation.attention)["layer_1"],
                                         **explanation.saliency}, explanation.log_probs, params)
    drops = deletion.set_index("explanation")["mean_drop"]
    assert drops["attention"] > 1.0 and drops["saliency"] > 1.0
    assert drops["random"] < 0.5 * drops["attention"]


# --- the command line and bad input -----------------------------------------------------------------------------


def test_cli_runs_saliency_on_a_tiny_t5_folder(tmp_path: Path, tiny_t5_dir: Path) -> None:
    code = run_cli("analyze", str(tiny_t5_dir), "--analyses", "saliency", "--out", str(tmp_path), "--figures", "html",
                   "-q", "--set", "saliency.max_new_tokens=5", "--set", "saliency.source_tokens=12",
                   "--set", "saliency.methods=saliency,integrated_gradients,feature_ablation,encoder_saliency",
                   "--set", "saliency.ig_steps=4", "--set", "saliency.deletion_tokens=2", "--set", "saliency.tokens=3")

    assert code == 0
    result = Results.load(tmp_path / "results.json")["saliency"]
    assert result.status == "ok", result.error
    for method in saliency.METHODS:
        for measure in saliency.MEASURES:
            values = result.map(f"{measure}_{method}", "cross").values
            assert values.shape == (3, 4)  # the fixture's decoder: 3 layers x 4 heads
            assert np.isfinite(values).any() and np.nanmax(np.abs(values)) <= 1 + 1e-9
    table = result.tables["aggregates"]
    assert {"layer_0", "layer_2", "last_layer", "all_layers", "per_head_median"} <= set(table["aggregate"])
    assert result.summary["encoder_positions"] == 12
    assert result.summary["tokens_explained"] == 3  # of the 5 decoded
    assert set(result.summary["deletion_auc"]) == {"attention:all_layers", *saliency.METHODS, "random"}
    for name in ("aggregates", "overlay", "deletion", "pearson_saliency-cross"):
        assert (tmp_path / "figures" / f"saliency-{name}.html").is_file()


def test_no_deletion_fractions_skips_the_curves_and_says_so(tiny_t5_dir: Path) -> None:
    result = headscope.run("saliency", str(tiny_t5_dir), max_new_tokens=5, source_tokens=12, tokens=3,
                           deletion_fractions=())
    assert "deletion" not in result.tables
    assert result.summary["deletion_auc"] == "not run: saliency.deletion_fractions is empty"
    assert np.isfinite(result.map("pearson_saliency", "cross").values).any()
    assert "deletion" not in result.plot()


def test_a_decoder_only_model_or_an_unknown_method_is_one_line_and_exit_2(tmp_path: Path, tiny_llama_dir: Path,
                                                                         tiny_t5_dir: Path, capsys) -> None:
    code = run_cli("analyze", str(tiny_llama_dir), "--analyses", "saliency", "--out", str(tmp_path), "-q")
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert "'saliency' does not fit a decoder model" in error and len(error.splitlines()) == 1

    code = run_cli("analyze", str(tiny_t5_dir), "--analyses", "saliency", "--out", str(tmp_path), "-q",
                   "--set", "saliency.methods=saliency,gradcam")
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert "unknown saliency method(s) gradcam" in error and len(error.splitlines()) == 1

    code = run_cli("analyze", str(tiny_t5_dir), "--analyses", "saliency", "--out", str(tmp_path), "-q",
                   "--set", "saliency.steps=3")
    assert code == 2
    assert "unknown saliency parameter(s) steps" in capsys.readouterr().err


# --- the packaged model ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_packaged_whisper_saliency(tmp_path: Path) -> None:
    if not zoo.PACKAGED["whisper-tiny.en"].installed():
        pytest.skip(f"run `{zoo.PACKAGED['whisper-tiny.en'].install}`")
    started = time.perf_counter()
    result = analyze(RunOptions(model="whisper-tiny.en", analyses=["saliency"], out=tmp_path, figures=()))["saliency"]
    assert result.status == "ok", result.error
    print(f"\nwhisper-tiny.en saliency ({result.seconds:.1f} s, {time.perf_counter() - started:.1f} s with loading):")
    for key, value in result.summary.items():
        print(f"  {key}: {value}")
    print(result.tables["aggregates"].to_string())
    print(result.tables["deletion"].to_string())
    assert result.summary["output"].startswith("The weather was warm and sunny")
    assert result.summary["tokens_explained"] == 28  # the transcript's tokens; the end of text is not explained
    assert result.summary["encoder_positions"] == 391  # 7.8 s of audio: 781 frames, 2 per encoder position
    table = result.tables["aggregates"]
    assert {"layer_0", "layer_3", "last_layer", "all_layers", "alignment_heads"} <= set(table["aggregate"])
    assert table[["pearson", "spearman", "kendall"]].abs().max().max() <= 1
    for method in ("saliency", "encoder_saliency"):
        assert result.map(f"pearson_{method}").values.shape == (4, 6)
        # attention points where the input matters (measured: all layers 0.55 with input saliency, 0.88 with
        # encoder-output saliency)
        assert table.set_index(["method", "aggregate"]).loc[(method, "all_layers"), "pearson"] > 0.3
    auc = result.summary["deletion_auc"]
    assert auc["saliency"] > 2 * auc["random"] and auc["attention:all_layers"] > 2 * auc["random"]
    deletion = result.tables["deletion"]
    random = deletion[deletion["explanation"] == "random"]["mean_drop"].to_numpy()
    assert random[-1] > random[0]  # deleting more at random costs more
