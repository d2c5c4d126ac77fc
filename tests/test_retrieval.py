"""The ``retrieval`` analysis: a planted copying head gets the top score and uniform heads 0, the score of a
hand-made trace, the ROUGE gate, argmax keys equal to eager attention (sliding window included), the causal
check, the Retrieval_Head export, the probe grid, the command line; ``slow``: the packaged SmolLM2.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cli_runner import run_cli
from tiny_models import get, one_thread

import headscope
from headscope.analyses import retrieval
from headscope.capture import engine
from headscope.capture.engine import Scope
from headscope.errors import HeadscopeError
from headscope.models import zoo
from headscope.probes import needle as probe_needle
from headscope.registry import Context
from headscope.results import Results

PLANTED = (1, 2)  # (layer, head) of the copying head
NEEDLE = {"needle": "The ruby key hides under violet moss near old pines",
          "question": "Where does the ruby key hide?", "prefix": "The ruby key hides",
          "answer": "under violet moss near old pines"}
# Shares the planted head's first answer tokens, then words it cannot copy: it copies "under violet" and
# falls back on the prompt's commonest planted token, so its answer's recall stays below the gate.
DECOY = {"needle": "The ruby key hides under violet lamps beside seven brass bells",
         "question": "Where does the ruby key hide?", "prefix": "The ruby key hides",
         "answer": "under violet lamps beside seven brass bells"}
FILLER = ("We walked to the river in the morning. The water was cold and clear. Birds sang in the tall trees. "
          "A boat drifted past the bridge while children played on the bank. Later we ate bread and cheese "
          "and talked about the weather. ")
HIDDEN, HEAD_DIM, SLOTS = 64, 32, [*range(5, 16), *range(21, 32)]  # RoPE barely turns these dims (theta 1e20)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def word_tokenizer(text: str):
    """A word-level tokenizer (one token per word or punctuation mark) over the words of ``text`` and the
    prompt frame; ``<s>`` before every text, ``</s>`` = end of sequence."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    frame = " ".join([probe_needle.INSTRUCTION, probe_needle.QUESTION, probe_needle.ANSWER])
    words = sorted({word for word, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text + " " + frame)})
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def planted_llama(tokenizer, needle: str) -> torch.nn.Module:
    """A 2-layer Llama (4 heads of 32 dims per layer) whose head 1.2 copies ``needle``: at a needle token it
    attends to the key holding the needle's next token and the output is that token; after the needle's last
    token it outputs ``</s>``. Every other head attends uniformly (zero queries) and writes nothing.

    Residual stream (64 dims): needle token i is 8 e_i (block A, dims 0-15); other tokens are random in dims
    32-63. Head 1.2: key slot s_i holds x[A_i], query slot s_(i+1) holds 2 x[A_i] (slots in dims whose RoPE
    frequency is below 1e-6, so positions do not matter), value i holds x[A_i], and the output projection
    writes value i to dim 16 + i (block B); the unembedding reads token i from dim 16 + i and ``</s>`` from
    dim A_last. A match scores 8 * 2 * 8 / sqrt(32) = 22.6 against 0 elsewhere: probability ~1.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = tokenizer(" " + needle, add_special_tokens=False)["input_ids"]
    assert len(set(ids)) == len(ids) <= 16, "the planted needle needs distinct tokens"
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=8, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, head_dim=HEAD_DIM, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e20}, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    layer, head = PLANTED
    q, k, v = (slice(head * HEAD_DIM, (head + 1) * HEAD_DIM),) * 3
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim >= 2:
                parameter.zero_()
        model.model.embed_tokens.weight[:, 32:] = torch.randn(len(tokenizer), 32)
        attention = model.model.layers[layer].self_attn
        for i, token in enumerate(ids):
            model.model.embed_tokens.weight[token] = 0.0
            model.model.embed_tokens.weight[token, i] = 8.0
            attention.k_proj.weight[k][SLOTS[i], i] = 1.0
            if i + 1 < len(ids):
                attention.q_proj.weight[q][SLOTS[i + 1], i] = 2.0
            attention.v_proj.weight[v][i, i] = 1.0
            attention.o_proj.weight[16 + i, head * HEAD_DIM + i] = 1.0
            model.lm_head.weight[token, 16 + i] = 10.0
        model.lm_head.weight[tokenizer.eos_token_id, len(ids) - 1] = 10.0
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("planted-retrieval")
    tokenizer = word_tokenizer(" ".join([FILLER, *NEEDLE.values(), *DECOY.values()]))
    planted_llama(tokenizer, NEEDLE["needle"]).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / "haystack.txt").write_text(FILLER * 6, encoding="utf-8")
    (folder / "needles.jsonl").write_text(json.dumps(NEEDLE) + "\n", encoding="utf-8")
    (folder / "needles_decoy.jsonl").write_text(json.dumps(NEEDLE) + "\n" + json.dumps(DECOY) + "\n",
                                                encoding="utf-8")
    return folder


def run_planted(folder: Path, needles_file: str = "needles.jsonl", **params):
    loaded = headscope.load(str(folder))
    params = {"lengths": [64, 128], "depths": 3, "haystack": str(folder / "haystack.txt"),
              "needles_file": str(folder / needles_file), "max_new_tokens": 12, **params}
    return retrieval.run(Context(loaded, Scope(loaded.model), params=params))


def expected_planted_score() -> float:
    """Needle tokens n_0..n_m, prompt ending at n_p: each step p..m-1 copies n_(i+1) from the needle (an
    event), the step at n_m outputs ``</s>`` with uniform attention (argmax: position 0, no event)."""
    words = NEEDLE["needle"].split()
    m, p = len(words) - 1, len(NEEDLE["prefix"].split()) - 1
    return (m - p) / (m + 1)


def test_planted_copying_head_gets_the_top_score_and_uniform_heads_score_zero(planted_dir: Path) -> None:
    result = run_planted(planted_dir)

    tests = result.tables["tests"]
    assert len(tests) == 6 and tests["passed"].all()
    assert (tests["output"] == NEEDLE["answer"]).all()
    score = result.map("retrieval_score").values
    expected = np.zeros_like(score)
    expected[PLANTED] = expected_planted_score()  # 6 copied tokens / 10 needle tokens
    np.testing.assert_allclose(score, expected, atol=1e-12)
    assert result.top_heads("retrieval_score", k=1)[0][:2] == PLANTED
    assert result.summary["retrieval_heads"] == [f"{PLANTED[0]}.{PLANTED[1]}=0.6"]
    assert result.summary["retrieval_heads_share"] == 1 / 8
    assert result.summary["accuracy_per_length"] == {"64": 1.0, "128": 1.0}
    assert result.summary["passed_per_length"] == {"64": 3, "128": 3}
    assert result.summary["chat_template_used"] is False  # the word-level tokenizer has none
    # the needle really moved through the haystack
    assert tests.query("length == 128")["needle_depth"].tolist() == [0.0, pytest.approx(0.5, abs=0.2), 1.0]


def test_score_of_a_hand_made_trace_equals_the_hand_computation() -> None:
    prompt = [1, 5, 6, 7, 8, 9, 3]  # the needle is positions 2, 3, 4: tokens 6, 7, 8
    generated = [7, 8, 4]
    positions = np.array([  # (steps, layers, heads): each head's argmax key at each step
        [[3, 1], [3, 8]],  # step 0 generates 7: key 3 holds 7 (events for 0.0 and 1.0); 8 is a generated token
        [[4, 5], [2, 4]],  # step 1 generates 8: key 4 holds 8 (0.0, 1.1); key 5 is past the needle; key 2 holds 6
        [[4, 3], [0, 6]],  # step 2 generates 4: nothing in the needle holds 4
    ])
    scores = retrieval.copy_paste_scores(positions, generated, prompt, (2, 5))
    np.testing.assert_allclose(scores, [[2 / 3, 0.0], [1 / 3, 1 / 3]])


def test_a_test_whose_output_misses_the_needle_contributes_nothing(planted_dir: Path, tmp_path: Path) -> None:
    result = run_planted(planted_dir, "needles_decoy.jsonl", lengths=[64], depths=[0.5])

    tests = result.tables["tests"].set_index("needle")
    assert tests.loc[0, "passed"] and not tests.loc[1, "passed"]
    assert tests.loc[1, "recall"] < 0.5
    decoy_scores = result.tables["head_scores"].query(f"test == {tests.loc[1, 'test']}")
    assert len(decoy_scores) == 1 and decoy_scores["score"].iloc[0] > 0  # the copying head did copy
    np.testing.assert_allclose(result.map("retrieval_score").values[PLANTED], expected_planted_score())
    assert result.summary["tests_passed"] == 1
    exported = json.loads(retrieval.export_json(result, tmp_path / "heads.json").read_text())
    assert exported[f"{PLANTED[0]}-{PLANTED[1]}"] == [pytest.approx(expected_planted_score())]
    assert len(exported) == 8 and exported["0-0"] == [0.0]


def test_masking_the_planted_head_breaks_retrieval_and_masking_random_heads_does_not(planted_dir: Path) -> None:
    result = run_planted(planted_dir, lengths=[64], depths=2, verify=True, top_k=1, random_seeds=3)

    verify = result.tables["verify"]
    assert (verify.query("condition == 'top_k'")["heads"] == f"{PLANTED[0]}.{PLANTED[1]}").all()
    assert not verify.query("condition == 'random'")["heads"].str.contains(f"{PLANTED[0]}.{PLANTED[1]}").any()
    summary = result.summary["verify"]
    assert summary["accuracy_clean"] == 1.0
    assert summary["accuracy_top_k_masked"] == 0.0
    assert summary["accuracy_random_masked"] == 1.0
    assert set(retrieval.figures(result)) == {"needle_accuracy", "verify"}


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_argmax_keys_and_tokens_equal_eager_attention_over_the_whole_sequence(name: str, tokenizer) -> None:
    """The last prompt token and each decode step read one row per head (``LastRow``); the absolute argmax
    positions equal those of eager attention over prompt + output, also under Gemma 3's sliding window (4)."""
    tiny = get(name)
    model, scope = tiny.model, Scope(tiny.model)
    prompt = torch.randint(3, 96, (1, 14), generator=torch.Generator().manual_seed(4))
    generation = retrieval.greedy(model, scope, tokenizer, prompt, 6, score=True)
    steps = len(generation.tokens[0])

    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    sequence = torch.cat([prompt, torch.tensor([generation.tokens[0][:-1]], dtype=torch.long)], dim=1)
    with torch.no_grad():
        out = eager(sequence, output_attentions=True)
    queries = torch.arange(prompt.shape[1] - 1, sequence.shape[1])
    expected = torch.stack([a[0][:, queries].argmax(-1) for a in out.attentions]).permute(2, 0, 1).numpy()
    assert steps >= 2
    np.testing.assert_array_equal(generation.positions, expected)
    assert generation.tokens[0] == out.logits[0, queries].argmax(-1).tolist()
    if name == "gemma3":  # sliding layers 0 and 2 (window 4) look at most 3 tokens back, in absolute positions
        window = generation.positions[:, [0, 2]] - queries.numpy()[:, None, None]
        assert window.min() >= -3 and window.max() <= 0


def test_prefill_stays_out_of_the_chunked_capture(planted_dir: Path, monkeypatch) -> None:
    """Only one query row per call reaches headscope's chunked attention: the prefill runs on SDPA."""
    queries = []
    chunked = engine._chunked_attention

    def spy(session, site, reducers, module, query, *args, **kwargs):
        queries.append(query.shape[2])
        return chunked(session, site, reducers, module, query, *args, **kwargs)

    monkeypatch.setattr(engine, "_chunked_attention", spy)
    result = run_planted(planted_dir, lengths=[128], depths=[0.5])

    steps = int(result.tables["tests"]["generated_tokens"].iloc[0])
    assert queries == [1] * (2 * steps)  # 2 layers, one row per decode step (the last prompt token's included)


def test_rouge1_recall_counts_reference_words_found_in_the_output() -> None:
    assert retrieval.rouge1_recall("under violet moss, near old pines.", "Under violet moss!") == 0.5
    assert retrieval.rouge1_recall("a b a", "a") == pytest.approx(1 / 3)
    assert retrieval.rouge1_recall("a b a", "a a b c") == 1.0
    assert retrieval.rouge1_recall("", "anything") == 0.0


def test_grid_is_deterministic_from_the_seed_and_the_needle_span_is_exact(tokenizer) -> None:
    needles = probe_needle.read_needles()
    assert len(needles) >= 6 and probe_needle.choose_needles(needles, 3, 5) == probe_needle.choose_needles(
        needles, 3, 5)
    chosen = [(i, needles[i]) for i in probe_needle.choose_needles(needles, 2, 5)]
    documents = probe_needle.haystack_documents()
    grid = probe_needle.build(tokenizer, [600, 1200], probe_needle.depth_grid(3), chosen, documents, seed=5)
    again = probe_needle.build(tokenizer, [600, 1200], probe_needle.depth_grid(3), chosen, documents, seed=5)
    other = probe_needle.build(tokenizer, [600, 1200], probe_needle.depth_grid(3), chosen, documents, seed=6)

    assert [t.input_ids for t in grid] == [t.input_ids for t in again]
    assert [t.input_ids for t in grid] != [t.input_ids for t in other]
    assert len(grid) == 2 * 2 * 3
    for test in grid:
        start, stop = test.span
        assert tokenizer.decode(test.input_ids[start:stop]) == " " + test.needle.needle
        assert len(test.input_ids) <= test.length
        assert tokenizer.decode(test.input_ids).endswith("Answer: " + test.needle.prefix)
    assert [t.actual_depth for t in grid[:3]] == [0.0, pytest.approx(0.5, abs=0.15), 1.0]


def test_shipped_haystack_holds_over_20k_tokens_of_prose(tokenizer) -> None:
    documents = probe_needle.haystack_documents()
    assert len(documents) >= 8
    words = sum(len(d.split()) for d in documents)
    assert words > 15000  # about 24k tokens with SmolLM2's tokenizer


def test_bad_needles_and_parameters_are_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "needles.jsonl"
    bad.write_text('{"needle": "x is y.", "question": "what is x?", "prefix": "x is"}\n', encoding="utf-8")
    with pytest.raises(HeadscopeError, match=r"line 1: needs non-empty text fields .*missing or not text: answer"):
        probe_needle.read_needles(bad)
    bad.write_text("not json\n", encoding="utf-8")
    with pytest.raises(HeadscopeError, match="line 1: not a JSON object"):
        probe_needle.read_needles(bad)
    bad.write_text('{"needle": "x is y.", "question": "q?", "prefix": "y is", "answer": "y."}\n', encoding="utf-8")
    with pytest.raises(HeadscopeError, match="prefix must be the start of the needle"):
        probe_needle.read_needles(bad)
    with pytest.raises(HeadscopeError, match="unknown retrieval parameter"):
        retrieval.Params.read({"lenghts": [64]})
    with pytest.raises(HeadscopeError, match="depths must be fractions"):
        retrieval.Params.read({"depths": [0.5, 2]})
    params = retrieval.Params.read({"lengths": "64,128", "depths": "3", "verify": "true"}, seed=4)
    assert (params.lengths, params.depths, params.verify, params.seed) == ((64, 128), 3, True, 4)


def test_cli_runs_retrieval_on_a_tiny_model_folder(tmp_path: Path, planted_dir: Path) -> None:
    code = run_cli("analyze", str(planted_dir), "--analyses", "retrieval", "--out", str(tmp_path), "--figures", "html",
                   "--input", str(planted_dir / "haystack.txt"), "-q",
                   "--set", "retrieval.lengths=64", "--set", "retrieval.depths=2", "--set", "retrieval.verify=true",
                   "--set", "retrieval.top_k=1", "--set", "retrieval.random_seeds=1", "--set",
                   f"retrieval.needles_file={planted_dir / 'needles.jsonl'}", "--set", "retrieval.max_new_tokens=10")

    assert code == 0
    result = Results.load(tmp_path / "results.json")["retrieval"]
    assert result.status == "ok", result.error
    assert result.top_heads("retrieval_score", k=1)[0][:2] == PLANTED
    assert {"tests", "accuracy", "head_scores", "verify", "verify_accuracy"} <= set(result.tables)
    assert result.summary["haystack"] == "user file (haystack.txt)"
    for name in ("retrieval_score-self", "needle_accuracy", "verify"):
        assert (tmp_path / "figures" / f"retrieval-{name}.html").is_file()
    exported = json.loads((tmp_path / "exports" / retrieval.EXPORT_NAME).read_text())
    assert exported[f"{PLANTED[0]}-{PLANTED[1]}"] == [pytest.approx(expected_planted_score())] * 2


def test_two_gloo_processes_split_the_needle_tests_and_give_the_results_of_one(tmp_path: Path,
                                                                                planted_dir: Path) -> None:
    from test_distributed import torchrun

    settings = ["--set", "retrieval.lengths=64,96", "--set", "retrieval.depths=3", "--set",
                f"retrieval.needles_file={planted_dir / 'needles.jsonl'}", "--set", "retrieval.max_new_tokens=10"]
    common = ["--analyses", "retrieval", "--input", str(planted_dir / "haystack.txt"), "--figures", "none", "-q"]
    assert run_cli("analyze", str(planted_dir), *common, "--out", str(tmp_path / "one"), *settings) == 0
    torchrun(2, "analyze", str(planted_dir), *common, "--out", str(tmp_path / "two"), *settings)

    one = Results.load(tmp_path / "one" / "results.json")["retrieval"]
    two = Results.load(tmp_path / "two" / "results.json")["retrieval"]
    assert len(one.tables["tests"]) == 6  # 2 lengths x 3 depths, dealt 3 and 3
    np.testing.assert_allclose(two.map("retrieval_score").values, one.map("retrieval_score").values, atol=1e-6)
    for table in ("tests", "accuracy", "head_scores"):
        pd.testing.assert_frame_equal(two.tables[table], one.tables[table])
    assert one.top_heads("retrieval_score", k=1)[0][:2] == PLANTED


def test_cli_malformed_needles_file_is_exit_2_and_one_line(tmp_path: Path, planted_dir: Path, capsys) -> None:
    bad = tmp_path / "needles.jsonl"
    bad.write_text('{"needle": "a b", "question": "q"\n', encoding="utf-8")
    code = run_cli("analyze", str(planted_dir), "--analyses", "retrieval", "--out", str(tmp_path / "out"), "-q",
                   "--set", f"retrieval.needles_file={bad}")

    assert code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "line 1: not a JSON object" in error


# --- the packaged model ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_packaged_smollm2_finds_retrieval_heads_on_a_small_grid() -> None:
    if not zoo.PACKAGED["smollm2-135m"].installed():
        pytest.skip(f"run `{zoo.PACKAGED['smollm2-135m'].install}`")
    loaded = headscope.load("smollm2-135m")
    result = retrieval.run(Context(loaded, Scope(loaded.model), params={"lengths": [256], "depths": 2, "needles": 2}))

    summary = result.summary
    print(f"\nsmollm2-135m ({result.seconds:.1f} s): accuracy per length {summary['accuracy_per_length']}, "
          f"{summary['retrieval_heads_count']} heads over 0.1: {summary['retrieval_heads']}")
    assert summary["tests_passed"] >= 2
    score = result.map("retrieval_score").values
    assert summary["retrieval_heads_count"] >= 1 and np.nanmax(score) > 0.3
    assert summary["retrieval_heads_share"] < 0.25  # a few heads, not most
