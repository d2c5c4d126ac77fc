"""The ``patterns`` analysis: planted heads found, scores equal to eager attention, deterministic probes and
clusters, the command line on a tiny model; ``slow``: induction heads in the packaged SmolLM2 and Gemma 3.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import reference as ref
import torch
from cli_runner import run_cli
from conftest import save_tiny
from tiny_models import sharpen

from headscope import load
from headscope.analyses import patterns
from headscope.capture.engine import Scope
from headscope.models import zoo
from headscope.probes import repeated
from headscope.probes.text import prose
from headscope.registry import Context
from headscope.results import Results
from headscope.runner import RunOptions, analyze

PLANTED_LENGTH = 10  # len(r): the planted model has 1 + 2 * 10 positions
PREVIOUS, INDUCTION = (0, 0), (0, 1)  # (layer, head) of the planted heads


def planted_gpt2(vocab: int) -> torch.nn.Module:
    """A 2-layer GPT-2 whose head 0.0 attends to t - 1 and head 0.1 to t - (len(r) - 1); the rest are random.

    Token embeddings are zero, so layer 0 sees only the learned positions: position p is a unit vector u_p in
    the first 32 coordinates (orthonormal, zero mean, so LayerNorm only rescales it, to sqrt(128) u_p). A
    planted head's keys are x[:32] and its queries map u_t to u_(t - d): the score of key s is 128 / sqrt(32)
    = 22.6 when s = t - d and 0 otherwise, so the head puts ~1 on t - d. The scores measure where attention
    goes, not how it is computed: a positional head at the induction offset is what the induction score
    must rank first, without the two-layer circuit a trained model uses.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    positions = 1 + 2 * PLANTED_LENGTH
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_embd=128, n_layer=2, n_head=4, n_positions=positions,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = sharpen(GPT2LMHeadModel(config), 0)
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(32, 32, generator=generator, dtype=torch.float64)
    basis -= basis.mean(dim=0, keepdim=True)  # every column orthogonal to the all-ones vector
    u = torch.linalg.qr(basis)[0][:, :positions].T  # (positions, 32), orthonormal rows, each of zero mean
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
        model.transformer.wpe.weight.zero_()
        model.transformer.wpe.weight[:, :32] = u.float()
        attention = model.transformer.h[0].attn.c_attn  # Conv1D: x @ W, W (128, 3 * 128) = [Q | K | V]
        for head, shift in ((PREVIOUS[1], 1), (INDUCTION[1], PLANTED_LENGTH - 1)):
            shift_map = sum(torch.outer(u[t], u[t - shift]) for t in range(shift, positions))
            q, k = slice(32 * head, 32 * head + 32), slice(128 + 32 * head, 128 + 32 * head + 32)
            attention.weight[:, q] = 0
            attention.weight[:, k] = 0
            attention.weight[:32, q] = shift_map.float()
            attention.weight[:32, k] = torch.eye(32)
            attention.bias[q] = 0
            attention.bias[k] = 0
    return model


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory, tokenizer) -> Path:
    return save_tiny(planted_gpt2(len(tokenizer)), tmp_path_factory.mktemp("planted-gpt2"))


def test_planted_heads_get_the_top_score_of_their_kind(tmp_path: Path, planted_dir: Path) -> None:
    result = analyze(RunOptions(model=str(planted_dir), analyses=["patterns"], out=tmp_path, figures=()))["patterns"]

    assert result.status == "ok", result.error
    assert result.params["length"] == PLANTED_LENGTH
    (layer, head, previous), = result.top_heads("previous_token", k=1)
    assert (layer, head) == PREVIOUS and previous > 0.99
    (layer, head, induction), = result.top_heads("induction", k=1)
    assert (layer, head) == INDUCTION and induction > 0.99
    second = result.top_heads("induction", k=2)[1][2]
    assert second < 0.5


def context_for(folder: Path, **params) -> Context:
    loaded = load(str(folder))
    return Context(loaded, Scope(loaded.model), seed=3, params=params)


def test_scores_equal_eager_attention(tiny_llama_dir: Path, tokenizer) -> None:
    context = context_for(tiny_llama_dir, samples=4)
    result = patterns.run(context)
    model = context.loaded.model
    probe = repeated.build(tokenizer, samples=4, seed=3, context=64, vocab_size=model.config.vocab_size)
    eager = model.__class__.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()
    probe_inputs = {"input_ids": probe.input_ids}
    prose_inputs = {"input_ids": tokenizer(prose(), return_tensors="pt")["input_ids"][:, :64]}
    length, start, tokens = probe.length, probe.prefix + probe.length, probe.tokens
    names = ("induction", "previous_token", "duplicate_token", "entropy", "mean_distance")

    def scores(model: torch.nn.Module, probe_inputs: dict, prose_inputs: dict) -> dict[str, np.ndarray]:
        """Each score per (layer, head), from eager maps of the repeated probe (induction, duplicate, previous)
        and of the prose (entropy, mean distance)."""
        with torch.no_grad():
            maps = [a.double() for a in model(**probe_inputs, output_attentions=True).attentions]
            prose_maps = [a[0].double() for a in model(**prose_inputs, output_attentions=True).attentions]
        expected = {name: np.zeros((len(maps), 4)) for name in names}
        for layer, probs in enumerate(maps):  # (samples, heads, T, T)
            for head in range(probs.shape[1]):
                induction, duplicate, previous = [], [], []
                for b in range(len(probs)):
                    for t in range(1, tokens):
                        previous.append(float(probs[b, head, t, t - 1]))
                        if start <= t < start + length:  # the second copy of r
                            induction.append(float(probs[b, head, t, t - (length - 1)]))
                            duplicate.append(float(probs[b, head, t, t - length]))
                expected["induction"][layer, head] = np.mean(induction)
                expected["duplicate_token"][layer, head] = np.mean(duplicate)
                expected["previous_token"][layer, head] = np.mean(previous)
                p = prose_maps[layer][head]  # (T, T)
                distance = (torch.arange(len(p))[:, None] - torch.arange(len(p))[None, :]).abs().double()
                expected["entropy"][layer, head] = float((-torch.special.xlogy(p, p).sum(-1)).mean())
                expected["mean_distance"][layer, head] = float((p * distance).sum(-1).mean())
        return expected

    want = scores(eager, probe_inputs, prose_inputs)
    exact = scores(ref.float64_twin(eager), ref.float64_inputs(probe_inputs), ref.float64_inputs(prose_inputs))
    for name in names:
        ref.assert_matches_eager(result.map(name).values, want[name], exact[name], err_msg=name)
    # heads differ by far more than the tolerance: a map with heads or layers swapped could not pass
    assert all(np.ptp(values) > 1e-3 for values in want.values())


def test_probe_is_deterministic_from_the_seed_and_repeats_ordinary_tokens(tokenizer) -> None:
    first, again = repeated.build(tokenizer, seed=5), repeated.build(tokenizer, seed=5)
    other = repeated.build(tokenizer, seed=6)

    assert torch.equal(first.input_ids, again.input_ids) and first.digest() == again.digest()
    assert not torch.equal(first.input_ids, other.input_ids)
    assert first.input_ids.shape == (10, 101) and first.prefix == 1
    assert (first.input_ids[:, 0] == tokenizer.bos_token_id).all()
    r = first.input_ids[:, 1:51]
    assert torch.equal(r, first.input_ids[:, 51:101])
    assert not np.isin(r.numpy(), tokenizer.all_special_ids).any()
    assert repeated.build(tokenizer, length=50, context=41).length == 20  # (41 - 1 BOS) // 2


def test_tokenizer_without_a_prefix_gets_its_bos_token(tokenizer) -> None:
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.post_processor = processors.ByteLevel(trim_offsets=False)  # adds no special token (as SmolLM2's)
    bare = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")

    assert bare("a b")["input_ids"] == bare("a b", add_special_tokens=False)["input_ids"]
    assert repeated.special_frame(bare) == ([tokenizer.bos_token_id], [])


def test_clustering_is_deterministic_and_recovers_planted_groups() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(3) * 5
    labels = np.repeat(np.arange(3), 8)
    features = centres[labels] + rng.normal(scale=0.3, size=(24, 3))
    names = ["induction", "previous_token", "entropy"]

    first = patterns.cluster_heads(features, names, heads_per_layer=4, seed=1)
    again = patterns.cluster_heads(features, names, heads_per_layer=4, seed=1)

    assert first.k_ == 3
    assert np.array_equal(first.labels_, again.labels_) and np.array_equal(first.embedding_, again.embedding_)
    assert first.representatives_.equals(again.representatives_)
    # each planted group is one cluster, named after its distinctive feature
    assert all(len(set(first.labels_[labels == g])) == 1 for g in range(3))
    assert sorted(first.types_) == ["broad", "induction", "previous-token"]


def test_cli_runs_patterns_on_a_tiny_model_folder(tmp_path: Path, tiny_llama_dir: Path) -> None:
    code = run_cli("analyze", str(tiny_llama_dir), "--analyses", "patterns", "--out", str(tmp_path),
                   "--figures", "html", "-q")

    assert code == 0
    result = Results.load(tmp_path / "results.json")["patterns"]
    assert result.status == "ok"
    assert set(result.metrics()) == {"induction", "previous_token", "duplicate_token", "entropy", "mean_distance",
                                     "cluster"}
    assert result.map("cluster").values.shape == (2, 4)
    assert {"features", "representatives", "silhouette", "gallery", "gallery_tokens"} <= set(result.tables)
    for name in ("induction-self", "clusters", "gallery"):
        assert (tmp_path / "figures" / f"patterns-{name}.html").is_file()


# --- the packaged models ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_packaged_decoders_have_induction_heads(alias: str, tmp_path: Path) -> None:
    if not zoo.PACKAGED[alias].installed():
        pytest.skip(f"run `{zoo.PACKAGED[alias].install}`")
    result = analyze(RunOptions(model=alias, analyses=["patterns"], out=tmp_path, figures=()))["patterns"]

    assert result.status == "ok", result.error
    induction = result.map("induction").values
    print(f"\n{alias} ({result.seconds:.1f} s): median induction {np.median(induction):.3f}")
    for kind in patterns.KINDS:
        print(f"  {kind}: {result.summary[f'top_{kind}']}")
    print(f"  clusters (k={result.summary['k']}): {result.summary['clusters']}")
    best = float(np.max(induction))
    assert best > 0.3 and best > 5 * float(np.median(induction))


@pytest.mark.slow
def test_packaged_encoder_has_a_previous_token_head(tmp_path: Path) -> None:
    if not zoo.PACKAGED["minilm-l6"].installed():
        pytest.skip(f"run `{zoo.PACKAGED['minilm-l6'].install}`")
    result = analyze(RunOptions(model="minilm-l6", analyses=["patterns"], out=tmp_path, figures=()))["patterns"]

    assert result.status == "ok", result.error
    print(f"\nminilm-l6 ({result.seconds:.1f} s):")
    for kind in patterns.KINDS:
        print(f"  {kind}: {result.summary[f'top_{kind}']}")
    print(f"  clusters (k={result.summary['k']}): {result.summary['clusters']}")
    assert result.top_heads("previous_token", k=1)[0][2] > 0.9
