"""KV-cache eviction through the attention interface, and the ``eviction`` analysis.

The policy's visibility restriction is checked against references written here, never against headscope's own
masks: transformers' eager attention given the equivalent explicit 4D mask (built by loops over positions), and a
plain masked attention registered in transformers' ``AttentionInterface`` by this test, computing softmax(q k^T)
v from the q, k, v the model hands it (for the per-head policy, whose mask differs from layer to layer). On tiny
random models with grouped-query attention (Llama, Qwen2: 4 query heads on 2 KV heads; Gemma 3: 1 KV head and its
own sliding window of 4), batch 2 with left or right padding, on the SDPA path (no reducer), the kernel path and the
chunked path; with a KV cache, step by step. The attention mass a policy would evict equals the mass eager
``output_attentions=True`` maps put on the evicted keys. Tolerances as everywhere (``tests/reference.py``): a small
multiple of eager float32's own error against its float64 twin.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import reference as ref
import tiny_models as tm
import torch
from cli_runner import run_cli
from conftest import bpe_tokenizer
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import headscope
from headscope.analyses import eviction
from headscope.capture.adapters import Stack
from headscope.capture.engine import Scope
from headscope.capture.eviction import EvictedMass, Eviction
from headscope.capture.reducers import Entropy, KeyMass
from headscope.errors import HeadscopeError
from headscope.models import zoo
from headscope.models.cache import cache_kwargs, output_cache
from headscope.probes.text import prose
from headscope.results import AnalysisResult, HeadMap

NAMES = ("llama", "qwen2", "gemma3")  # GQA 4 on 2, GQA 4 on 2 with biases, 1 KV head with a sliding window of 4
PADDINGS = (None, "left", "right")
WINDOW, SINKS = 3, 2  # SEQ = 11 tokens: a query far enough on loses keys between the sinks and its window
POLICIES = {"window": (WINDOW, 0), "sinks+window": (WINDOW, SINKS)}
MODES = ("sdpa", "kernel", "chunked")  # no reducer (SDPA with the mask), a reducer on each of the two paths
HIDDEN = torch.finfo(torch.float32).min


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with tm.one_thread():
        yield


def _case_id(name: str, padding: str | None) -> str:
    return f"{name}-{padding or 'nopad'}"


CASES = [(name, padding) for name in NAMES for padding in PADDINGS]
case_param = pytest.mark.parametrize(("name", "padding"), CASES, ids=[_case_id(*c) for c in CASES])


def _full_heads(name: str) -> torch.Tensor:
    """Retrieval heads of the per-head policy: some in each layer, never all of one."""
    layers = len(tm.get(name).model.model.layers)
    table = torch.zeros(layers, 4, dtype=torch.bool)
    table[0, 1] = True
    table[1, [0, 3]] = True
    return table


# --- references -------------------------------------------------------------------------------------------------


def allowed_by_hand(mask: torch.Tensor, window: int | None, sinks: int, full: torch.Tensor | None = None,
                    model_window: int | None = None) -> torch.Tensor:
    """(B, H or 1, T, T) bool from the 2D padding mask, position by position: key s is a real token at or before the
    query t, within the model's own window, and kept by the policy (t - s < window, or s among the first ``sinks``
    real tokens, or a full head)."""
    batch, tokens = mask.shape
    heads = 1 if full is None else full.shape[0]
    allowed = torch.zeros(batch, heads, tokens, tokens, dtype=torch.bool)
    for b in range(batch):
        first = int(mask[b].nonzero()[0, 0])
        for t in range(tokens):
            for s in range(t + 1):
                if not mask[b, s] or (model_window is not None and t - s >= model_window):
                    continue
                kept = window is None or t - s < window or 0 <= s - first < sinks
                for h in range(heads):
                    allowed[b, h, t, s] = kept or (full is not None and bool(full[h]))
    return allowed


def _mask_argument(name: str, mask: torch.Tensor, window: int | None, sinks: int) -> object:
    """The explicit 4D additive mask eager attention takes (Gemma 3: one per layer type, its own window included)."""
    additive = torch.zeros(mask.shape[0], 1, mask.shape[1], mask.shape[1])
    full = additive.masked_fill(~allowed_by_hand(mask, window, sinks), HIDDEN)
    if name != "gemma3":
        return full
    sliding = additive.masked_fill(~allowed_by_hand(mask, window, sinks,
                                                    model_window=tm.get(name).extra["sliding_window"]), HIDDEN)
    return {"full_attention": full, "sliding_attention": sliding}


@functools.cache
def _eager(name: str):
    return ref.eager_copy(tm.get(name).model)


def _eager_logits(name: str, inputs: dict, mask_argument: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention's logits given ``mask_argument`` as the attention mask: float32, and the float64 twin's."""
    def run(model, masks):
        with torch.no_grad():
            return model(input_ids=inputs["input_ids"], attention_mask=masks).logits.double()

    double = ({k: v.double() for k, v in mask_argument.items()} if isinstance(mask_argument, dict)
              else mask_argument.double())
    eager = _eager(name)
    return run(eager, mask_argument), ref.in_float64_default(run, ref.float64_twin(eager), double)


_RECIPES: dict[int, torch.Tensor] = {}  # per model copy, the (B, H, T, T) masks by layer, for the reference below


def _masked_reference(module, query, key, value, attention_mask, scaling=None, **_):
    """Plain masked attention: softmax(scale q k^T + hidden) v, the mask of the module's layer from ``_RECIPES``
    (the model's own sliding window intersected in, from the mask transformers built)."""
    allowed = _RECIPES[module.config_id][module.layer_idx].to(query.device)
    if attention_mask is not None:  # transformers' boolean mask: padding, causality, the layer's own window
        allowed = allowed & attention_mask[..., : key.shape[2]]
    group = query.shape[1] // key.shape[1]
    keys, values = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = query @ keys.transpose(-1, -2) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)  # (all-hidden padding rows)
    return (probs @ values).transpose(1, 2).contiguous(), None


AttentionInterface.register("test_masked_reference", _masked_reference)
AttentionMaskInterface.register("test_masked_reference", functools.partial(sdpa_mask, allow_is_causal_skip=False))


def _reference_logits(name: str, inputs: dict, per_layer: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the model with ``_masked_reference`` as its attention, float32 and float64."""
    results = []
    for dtype in (torch.float32, torch.float64):
        model = copy.deepcopy(tm.get(name).model).to(dtype)
        model.set_attn_implementation("test_masked_reference")
        for layer in model.model.layers:
            layer.self_attn.config_id = id(model)
        _RECIPES[id(model)] = per_layer
        with torch.no_grad():
            results.append(model(**inputs).logits.double())
        del _RECIPES[id(model)]
    return results[0], results[1]


def _captured_logits(name: str, inputs: dict, policy: Eviction | None, mode: str) -> tuple[torch.Tensor, dict]:
    """The model's logits inside a capture with ``policy``: no reducer (``sdpa``), or a reducer on the kernel or the
    chunked path; and the paths the calls took."""
    reducers = () if mode == "sdpa" else (KeyMass(),)
    scope = Scope(tm.get(name).model)
    with torch.no_grad(), scope.capture(*reducers, eviction=policy, path="chunked" if mode == "chunked" else "auto",
                                        chunk_size=3 if mode == "chunked" else None):
        logits = tm.get(name).model(**inputs).logits.double()
    return logits, dict(scope.paths)


def _real(inputs: dict) -> torch.Tensor:
    return inputs["attention_mask"].bool()


# --- the policy on the model's output ----------------------------------------------------------------------------


@case_param
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("policy", list(POLICIES))
def test_policy_logits_equal_eager_attention_with_the_explicit_mask(name, padding, mode, policy):
    inputs = tm.get(name).inputs(2, padding)
    window, sinks = POLICIES[policy]
    got, paths = _captured_logits(name, inputs, Eviction(window, sinks), mode)
    want, exact = _eager_logits(name, inputs, _mask_argument(name, _real(inputs), window, sinks))
    real = _real(inputs)
    ref.assert_matches_eager(got[real], want[real], exact[real], err_msg=f"{name} {padding} {mode} {policy}")
    assert {"sdpa": set(), "kernel": {"kernel"}, "chunked": {"chunked: the chunked path was asked for"}}[mode] \
        == set(paths), paths
    with torch.no_grad():
        plain = tm.get(name).model(**inputs).logits.double()
    assert (plain - got)[real].abs().max() > 1e-2  # the policy changes the output: the comparison has teeth


@case_param
@pytest.mark.parametrize("mode", MODES)
def test_per_head_policy_equals_masked_attention_written_by_hand(name, padding, mode):
    """DuoAttention's split: the full heads see every key, the others sinks + window; the mask differs per layer."""
    inputs = tm.get(name).inputs(2, padding)
    full = _full_heads(name)
    got, _ = _captured_logits(name, inputs, Eviction(WINDOW, SINKS, full), mode)
    per_layer = [allowed_by_hand(_real(inputs), WINDOW, SINKS, full[layer]) for layer in range(full.shape[0])]
    want, exact = _reference_logits(name, inputs, per_layer)
    real = _real(inputs)
    ref.assert_matches_eager(got[real], want[real], exact[real], err_msg=f"{name} {padding} {mode}")
    uniform, _ = _captured_logits(name, inputs, Eviction(WINDOW, SINKS), mode)
    assert (uniform - got)[real].abs().max() > 1e-2  # the full heads matter


@pytest.mark.parametrize("name", NAMES)
def test_the_hand_written_reference_is_eager_attention_under_the_same_mask(name):
    """The per-head test's reference, with one mask for every head and layer, gives eager attention's logits."""
    inputs = tm.get(name).inputs(2, "left")
    layers = _full_heads(name).shape[0]
    per_layer = [allowed_by_hand(_real(inputs), WINDOW, SINKS)] * layers
    got, _ = _reference_logits(name, inputs, per_layer)
    want, exact = _eager_logits(name, inputs, _mask_argument(name, _real(inputs), WINDOW, SINKS))
    real = _real(inputs)
    ref.assert_matches_eager(got[real], want[real], exact[real])


@case_param
@pytest.mark.parametrize("mode", ("kernel", "chunked"))
def test_full_policy_leaves_outputs_and_statistics_as_eager(name, padding, mode):
    """A policy that keeps every key goes through the same masks and changes nothing."""
    tiny = tm.get(name)
    inputs = tiny.inputs(2, padding)
    mass, entropy = KeyMass(), Entropy()
    scope = Scope(tiny.model)
    with torch.no_grad(), scope.capture(mass, entropy, eviction=Eviction(), path="auto" if mode == "kernel"
                                        else "chunked", chunk_size=3 if mode == "chunked" else None):
        got = tiny.model(**inputs).logits.double()
    want, exact = _eager_logits(name, inputs, _mask_argument(name, _real(inputs), None, 0))
    real = _real(inputs)
    ref.assert_matches_eager(got[real], want[real], exact[real])
    reference = ref.forward_attention(_eager(name), tiny.kind, inputs)
    scale = ref.LogitScale()
    with torch.no_grad(), Scope(tiny.model).capture(scale):
        tiny.model(**inputs)
    floor = ref.kernel_entropy_floor(scale.scale("self")) if mode == "kernel" else 0.0
    ref.assert_exact(mass.result()["self"], ref.key_mass, [reference["self"]], floor=floor)
    ref.assert_exact(entropy.result()["self"], ref.entropy, [reference["self"]], floor=floor)
    assert set(scope.paths) == ({"kernel"} if mode == "kernel" else {"chunked: the chunked path was asked for"})


DECODE_CASES = [("llama", "left"), ("gemma3", None), ("gemma3", "left")]


@pytest.mark.parametrize(("name", "padding"), DECODE_CASES, ids=[_case_id(*c) for c in DECODE_CASES])
@pytest.mark.parametrize("mode", MODES)
def test_decoding_with_a_cache_under_the_policy_equals_the_masked_forward(name, padding, mode):
    """Prefill 6 tokens, then feed the rest one at a time with the KV cache (Gemma 3's sliding layers keep only their
    last keys): each step's logits are the explicit-mask forward's at that position. The masked forward is the
    model decoding with an evicting cache."""
    tiny = tm.get(name)
    inputs = tiny.inputs(2 if padding else 1, padding)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    prompt = 6
    policy = Eviction(WINDOW, SINKS)
    reducers = () if mode == "sdpa" else (KeyMass(),)
    steps = []
    with torch.no_grad(), Scope(tiny.model).capture(*reducers, eviction=policy, path="chunked" if mode == "chunked"
                                                    else "auto"):
        out = tiny.model(input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)
        cache = output_cache(out)
        for position in range(prompt, ids.shape[1]):
            out = tiny.model(input_ids=ids[:, position:position + 1], attention_mask=mask[:, :position + 1],
                             use_cache=True, **cache_kwargs(tiny.model, cache))
            cache = output_cache(out)
            steps.append(out.logits[:, -1].double())
    got = torch.stack(steps, 1)
    want, exact = _eager_logits(name, inputs, _mask_argument(name, _real(inputs), WINDOW, SINKS))
    real = _real(inputs)[:, prompt:]
    ref.assert_matches_eager(got[real], want[:, prompt:][real], exact[:, prompt:][real])


# --- the mass a policy evicts -------------------------------------------------------------------------------------


def lost_mass(calls: list[ref.Call], window: int, sinks: int, full: torch.Tensor | None,
              query_mask: torch.Tensor) -> np.ndarray:
    """Mean over real queries marked in ``query_mask`` of the eager attention on the keys the policy evicts:
    t - s >= window and s not among the first ``sinks`` real tokens, for heads outside ``full``."""
    sums, counts = np.zeros((len(calls[0]), calls[0][0].probs.shape[1])), np.zeros((len(calls[0]), 1))
    for call in calls:
        for index, layer in enumerate(call):
            batch, _, n_queries, n_keys = layer.probs.shape
            for b in range(batch):
                for t in range(n_queries):
                    if not layer.query_valid[b, t] or not query_mask[b, t]:
                        continue
                    query = int(layer.query_pos[t])
                    evicted = [k for k in range(n_keys) if query - int(layer.key_pos[k]) >= window
                               and not 0 <= int(layer.key_pos[k]) - int(layer.first[b]) < sinks]
                    row = layer.probs[b, :, t, evicted].sum(-1).numpy()
                    if full is not None:
                        row = np.where(full[index].numpy(), 0.0, row)
                    sums[index] += row
                    counts[index] += 1
    return sums / counts


@case_param
@pytest.mark.parametrize("mode", ("kernel", "chunked"))
def test_evicted_mass_equals_eager_attention_on_the_evicted_keys(name, padding, mode):
    tiny = tm.get(name)
    inputs = tiny.inputs(2, padding)
    query_mask = torch.zeros(2, tm.SEQ, dtype=torch.bool)
    query_mask[:, 5:] = True
    full = _full_heads(name)
    policies = {"window": (WINDOW, 0, None), "sinks+window": (WINDOW, SINKS, None), "per-head": (WINDOW, SINKS, full)}
    reducers = {label: EvictedMass(Eviction(window, sinks, heads), query_mask=query_mask)
                for label, (window, sinks, heads) in policies.items()}
    scale = ref.LogitScale()
    scope = Scope(tiny.model)
    with torch.no_grad(), scope.capture(*reducers.values(), scale, path="auto" if mode == "kernel" else "chunked",
                                        chunk_size=3 if mode == "chunked" else None):
        tiny.model(**inputs)
    assert set(scope.paths) == ({"kernel"} if mode == "kernel" else {"chunked: the chunked path was asked for"})
    calls = [ref.forward_attention(_eager(name), tiny.kind, inputs)["self"]]
    floor = max(ref._map_error(calls), ref.kernel_entropy_floor(scale.scale("self")) if mode == "kernel" else 0.0)
    got = {label: reducer.result()["self"] for label, reducer in reducers.items()}
    for label, (window, sinks, heads) in policies.items():
        ref.assert_exact(got[label], lost_mass, calls, window, sinks, heads, query_mask, floor=floor, err_msg=label)
    assert (got["window"] - got["sinks+window"]).max() > 0.01  # the sinks hold attention in some head
    assert np.all(got["per-head"][full.numpy()] == 0)
    assert got["sinks+window"][~full.numpy()].max() > 0.01


# --- refusals -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "words"), [
    (lambda: Eviction(window=0), "at least 1 key"),
    (lambda: Eviction(sinks=4), "sink tokens need a window"),
    (lambda: Eviction(window=4, sinks=-1), "0 or more sink tokens"),
    (lambda: Eviction(window=4, full_heads=torch.ones(4, dtype=torch.bool)), "(layers, heads) table"),
    (lambda: Eviction(window=2.5), "at least 1 key (the query's own), a whole number; got 2.5"),
    (lambda: Eviction(window="256"), "a whole number; got '256'"),
    (lambda: Eviction(window=4, sinks=1.5), "0 or more sink tokens, a whole number; got 1.5"),
    (lambda: Eviction(window=4, sinks=True), "0 or more sink tokens, a whole number; got True"),
    (lambda: Eviction(window=4, full_heads=torch.rand(2, 4) + 0.1), "bools (or 0 and 1)"),
    (lambda: Eviction(window=4, full_heads=[[True, False], [False]]), "table of bools; got list"),
])
def test_a_malformed_policy_is_one_clear_error(make, words):
    with pytest.raises(HeadscopeError, match=words.replace("(", r"\(").replace(")", r"\)")) as caught:
        make()
    assert "\n" not in str(caught.value)


def test_full_heads_may_be_a_tensor_an_array_or_lists_of_bools_or_zeros_and_ones():
    table = [[False, True, False, False], [True, False, False, True]]
    expected = torch.tensor(table)
    for given in (expected, np.array(table), table, np.array(table, dtype=np.int64), expected.float()):
        policy = Eviction(window=2, sinks=1, full_heads=given)
        assert policy.full_heads.dtype == torch.bool and torch.equal(policy.full_heads, expected), type(given)
        assert policy.describe() == "1 sink + window 2, 3 heads full"
    assert Eviction(window=np.int64(2), sinks=np.int64(1)).describe() == "1 sink + window 2"
    assert Eviction(window=2, full_heads=[[True, False]]).describe() == "window 2, 1 head full"


@pytest.mark.parametrize(("name", "policy", "words"), [
    ("t5", Eviction(window=2, stack="cross"), "acts on self-attention"),
    ("llama", Eviction(window=2, stack="vision"), "no attention stack named 'vision'"),
    ("llama", Eviction(window=2, full_heads=torch.zeros(3, 4, dtype=torch.bool)), "stack 'self' has 2 layers"),
])
def test_a_policy_that_does_not_fit_the_model_is_refused_before_anything_runs(name, policy, words):
    with pytest.raises(HeadscopeError, match=words), Scope(tm.get(name).model).capture(eviction=policy):
        pytest.fail("the capture opened")


def test_without_a_policy_the_model_is_unchanged():
    """A capture that names no policy still computes the model's own output (the guarantee holds without one)."""
    tiny = tm.get("llama")
    inputs = tiny.inputs(2, "left")
    with torch.no_grad():
        plain = tiny.model(**inputs).logits
        with Scope(tiny.model).capture(EvictedMass(Eviction(WINDOW, SINKS))):
            read = tiny.model(**inputs).logits
    real = _real(inputs)
    torch.testing.assert_close(read[real], plain[real], rtol=0, atol=1e-5)


# --- the analysis --------------------------------------------------------------------------------------------------

TEXT_TOKENS, SCORE_FROM, TINY_WINDOW = 48, 16, 4


@pytest.fixture(scope="module")
def tiny_loaded(tiny_llama_dir: Path):
    return headscope.load(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def analysed(tiny_loaded):
    return headscope.run("eviction", tiny_loaded, text=prose(), tokens=TEXT_TOKENS, score_from=SCORE_FROM,
                         windows=[TINY_WINDOW], sinks="1,2", retrieval_heads=["0.1", "1.2"])


def _nll_by_hand(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, float]:
    """Mean next-token loss over the scored tokens, from the whole logits of one eager forward: float32, and the
    float64 twin's."""
    def mean_loss(eager, mask):
        with torch.no_grad():
            logits = eager(input_ids=ids, attention_mask=mask).logits[0].double()
        losses = [-torch.log_softmax(logits[t - 1], -1)[ids[0, t]] for t in range(SCORE_FROM, ids.shape[1])]
        return float(torch.stack(losses).mean())

    eager = ref.eager_copy(model)
    return mean_loss(eager, mask), ref.in_float64_default(mean_loss, ref.float64_twin(eager),
                                                          None if mask is None else mask.double())


def test_the_analysis_table_has_every_policy_and_their_perplexities(analysed, tiny_loaded):
    table = analysed.tables["policies"]
    assert table["policy"].tolist() == ["full", "window", "sinks+window", "per-head", "sinks+window", "per-head"]
    assert table["n_sink"].tolist() == [0, 0, 1, 1, 2, 2]
    assert table["window"].isna().tolist() == [True] + [False] * 5 and table["window"].iloc[1:].eq(4).all()
    assert table["tokens_scored"].eq(TEXT_TOKENS - SCORE_FROM).all()
    assert table["full_heads"].tolist() == [0, 0, 0, 2, 0, 2]
    ids = bpe_tokenizer()(prose(), return_tensors="pt")["input_ids"][:, :TEXT_TOKENS]
    model = tiny_loaded.model
    full = _nll_by_hand(model, ids)
    window = _nll_by_hand(model, ids, _mask_argument("llama", torch.ones_like(ids), TINY_WINDOW, 0))
    want, exact = np.array([full[0], window[0]]), np.array([full[1], window[1]])
    ref.assert_matches_eager(table["mean_nll"].iloc[:2], want, exact)
    ref.assert_matches_eager(np.log(table["perplexity"].iloc[:2]), want, exact)
    assert abs(full[1] - window[1]) > 1e-3
    assert analysed.summary["perplexity"] == {row.label: round(row.perplexity, 4) for row in table.itertuples()}
    assert analysed.summary["retrieval_heads"] == ["0.1", "1.2"]


def test_the_analysis_maps_are_the_mass_each_policy_evicts(analysed, tiny_loaded):
    assert analysed.metrics() == ["lost_mass_window_4", "lost_mass_sinks_1_window_4",
                                  "lost_mass_per_head_sinks_1_window_4", "lost_mass_sinks_2_window_4",
                                  "lost_mass_per_head_sinks_2_window_4"]
    ids = bpe_tokenizer()(prose(), return_tensors="pt")["input_ids"][:, :TEXT_TOKENS]
    scored = torch.zeros(ids.shape, dtype=torch.bool)
    scored[:, SCORE_FROM - 1:-1] = True
    calls = [ref.forward_attention(ref.eager_copy(tiny_loaded.model), "decoder",
                                   {"input_ids": ids, "attention_mask": torch.ones_like(ids)})["self"]]
    for metric, (sinks, full) in {"lost_mass_window_4": (0, None), "lost_mass_sinks_2_window_4": (2, None),
                                  "lost_mass_per_head_sinks_2_window_4": (2, torch.tensor([[0, 1, 0, 0],
                                                                                           [0, 0, 1, 0]]).bool())
                                  }.items():
        ref.assert_exact(analysed.map(metric).values, lost_mass, calls, TINY_WINDOW, sinks, full, scored,
                         floor=ref._map_error(calls), err_msg=metric)
    assert analysed.summary["main_metric"] == "lost_mass_sinks_2_window_4"
    assert analysed.top_heads()[0][2] == np.nanmax(analysed.map("lost_mass_sinks_2_window_4").values)


def test_the_analysis_figures_draw_perplexity_and_lost_mass(analysed):
    drawn = analysed.plot()
    assert {"perplexity", "lost_mass_by_layer", "lost_mass_window_4-self"} <= set(drawn)
    bars = drawn["perplexity"].data[0]
    assert list(bars.y) == analysed.tables["policies"]["perplexity"].tolist()
    assert len(drawn["lost_mass_by_layer"].data) == 5


def test_the_command_line_runs_eviction_by_name(tiny_llama_dir: Path, tmp_path: Path):
    code = run_cli("analyze", str(tiny_llama_dir), "--analyses", "eviction", "--text", prose(), "--max-tokens", "64",
                   "--set", "eviction.tokens=40", "--set", "eviction.score_from=20", "--set", "eviction.windows=4",
                   "--set", "eviction.sinks=1", "--set", "eviction.policies=window,sinks+window",
                   "--out", str(tmp_path / "out"), "--figures", "none", "-q")
    assert code == 0
    saved = headscope.Results.load(tmp_path / "out" / "results.json")["eviction"]
    assert saved.tables["policies"]["policy"].tolist() == ["full", "window", "sinks+window"]
    assert saved.summary["tokens"] == 40 and saved.summary["tokens_scored"] == 20


def _stack() -> Stack:
    return Stack("self", layers=2, heads=4, kv_heads=2, kind="self")


def test_retrieval_heads_come_from_a_list_or_the_top_of_a_score_file(tmp_path: Path):
    assert eviction.retrieval_heads(("1.2", "0-3"), 10, _stack()) == [(1, 2), (0, 3)]
    scores = {f"{layer}-{head}": [0.1 * (layer * 4 + head), 0.0] for layer in range(2) for head in range(4)}
    scores["0-0"] = [0.9, 0.9]
    (tmp_path / "retrieval_heads.json").write_text(json.dumps(scores))
    assert eviction.retrieval_heads((str(tmp_path / "retrieval_heads.json"),), 3, _stack()) == [(0, 0), (1, 3), (1, 2)]
    result = AnalysisResult(name="retrieval")
    values = np.arange(8.0).reshape(2, 4)
    values[1, 1] = np.nan
    result.add_map("retrieval_score", HeadMap(values, "self"))
    headscope.Results(analyses={"retrieval": result}).save(tmp_path / "results.json")
    assert eviction.retrieval_heads((str(tmp_path / "results.json"),), 2, _stack()) == [(1, 3), (1, 2)]
    table = eviction.full_head_table([(0, 1), (1, 2)], _stack(), per_kv_head=True)
    assert table.int().tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]  # the query heads sharing each KV head
    assert eviction.full_head_table([(0, 1)], _stack(), per_kv_head=False).sum() == 1


@pytest.mark.parametrize(("params", "words"), [
    ({"windows": "0"}, "windows must be window sizes of at least 1"),
    ({"sinks": "0"}, "sinks must be sink counts of at least 1"),
    ({"score_from": 64, "tokens": 64}, "1 <= score_from < tokens"),
    ({"policies": "streaming"}, "eviction.policies takes"),
    ({"retrieval_heads": "a.b,c"}, "retrieval_heads takes layer.head items"),
    ({"retrieval_heads": "missing.json"}, "no such file missing.json"),
    ({"retrieval_heads": "7.1"}, "no head 7.1 in stack 'self'"),
    ({"score_from": 300, "tokens": 400}, "the text has 64 tokens after it was cut to 64 tokens by the model.s context"),
    ({"top_k": 0}, "top_k must be at least 1"),
])
def test_bad_parameters_are_one_clear_error(tiny_loaded, params, words):
    with pytest.raises(HeadscopeError, match=words) as caught:
        headscope.run("eviction", tiny_loaded, text=prose(), **{"tokens": 40, "score_from": 20, **params})
    assert "\n" not in str(caught.value)


def test_a_bad_retrieval_score_file_is_one_clear_error(tiny_loaded, tmp_path: Path):
    (tmp_path / "scores.json").write_text(json.dumps({"heads": [1, 2]}))
    with pytest.raises(HeadscopeError, match=r"neither a headscope results\.json nor"):
        headscope.run("eviction", tiny_loaded, text=prose(), tokens=40, score_from=20,
                      retrieval_heads=str(tmp_path / "scores.json"))


# --- a real model -------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not zoo.PACKAGED["smollm2-135m"].installed(),
                    reason=f"run `{zoo.PACKAGED['smollm2-135m'].install}`")
def test_smollm2_window_attention_collapses_and_sinks_restore_it():
    """StreamingLLM's Table 1 in small: 1024 tokens of the shipped haystack, window 128, scored from token 256.
    Measured: full 22.14, window 128 alone 61.09, 4 sinks + window 128 25.00; lost mass 0.54 vs 0.26."""
    result = headscope.run("eviction", "smollm2-135m", tokens=1024, windows=128, sinks=4, score_from=256,
                           policies="window,sinks+window")
    perplexity = result.tables["policies"].set_index("policy")["perplexity"]
    print(f"\nsmollm2-135m eviction: {result.summary['perplexity']}, lost mass {result.summary['lost_mass']}, "
          f"{result.seconds:.1f} s")
    assert perplexity["full"] < perplexity["sinks+window"] < 1.3 * perplexity["full"]
    assert perplexity["window"] > 2 * perplexity["sinks+window"]
    lost = result.summary["lost_mass"]
    assert lost["window 128"] > lost["4 sinks + window 128"] + 0.15  # the sinks hold much of the attention
