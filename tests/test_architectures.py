"""Every transformers text architecture: exact, or refused in one line; never a silent wrong number.

The sweep (``tests/architectures.py``) builds a tiny model of every model type transformers registers and compares
headscope's statistics and the model's output inside a capture with eager attention; ``docs/architectures.md`` is
its table. The named tests below pin the families that were once wrong.
"""

from __future__ import annotations

import os

import architectures as arch
import pytest


@pytest.fixture(scope="module")
def outcomes() -> dict[str, arch.Outcome]:
    workers = max(1, min(2, os.cpu_count() or 1))
    return {o.model_type: o for o in arch.sweep(workers=workers)}


def test_no_architecture_gives_a_silent_wrong_number_a_changed_output_or_a_crash(outcomes):
    bugs = [o.line() for o in outcomes.values() if o.status in arch.BUGS]
    assert not bugs, f"{len(bugs)} architectures are neither exact nor refused:\n" + "\n".join(bugs)


def test_the_docs_table_is_the_sweeps(outcomes):
    assert arch.DOCS.read_text() == arch.render(list(outcomes.values())), \
        "docs/architectures.md is out of date: run python tests/architectures.py --write"


def test_refusals_are_one_line_that_names_the_model(outcomes):
    for outcome in outcomes.values():
        if outcome.status == "refused":
            assert "\n" not in outcome.detail and outcome.detail.startswith(("UnsupportedModelError", "HeadscopeError"))


@pytest.mark.parametrize("model_type, stacks", [
    ("falcon", "self 2x4"),  # on SDPA it cannot return maps: the fallback switches it to eager
    ("deepseek_v3", "self 2x4"),  # multi-head latent attention: query heads over decompressed keys
    ("deepseek_v2", "self 2x4"),
    ("bloom", "self 2x4"),  # the eager fallback reads the padding from the model's attention mask
    ("mpt", "self 2x4"),
    ("gpt_neo", "self 2x4"),
    ("distilbert", "self 2x4"),  # q_lin / out_lin
    ("xlm", "self 2x4"),
    ("deberta-v2", "self 2x4"),  # query_proj, outside the attention interface
    ("modernbert", "self 2x4"),  # Wqkv / Wo
    ("ctrl", "self 2x4"),  # Wq
    ("albert", "self 2x4"),  # one shared module, two layers: one site per use
    ("nllb-moe", "encoder 2x4, decoder 2x4, cross 2x4"),  # `cross_attention`; decoder marked non-causal
    ("seamless_m4t", "encoder 2x4, decoder 2x4, cross 2x4"),
    ("bigbird_pegasus", "encoder 2x4, decoder 2x4, cross 2x4"),  # an encoder outside the interface
    ("qwen3_next", "self 2x4"),  # hybrid: a delta-rule layer is not an attention site
    ("kimi_linear", "self 2x4"),
    ("granite_swa", "self 2x4"),  # a learned sink applied to the output: compared renormalised
    ("neomme", "self 2x4"),  # a gated output projection
    ("splinter", "self 2x4"),  # no is_causal on an eager-path encoder: no mask means none
    ("mpt", "self 2x4"),  # generate without a cache: every call compared as generate makes it
])
def test_once_wrong_families_are_exact(outcomes, model_type, stacks):
    outcome = outcomes[model_type]
    assert (outcome.status, outcome.stacks) == ("exact", stacks), outcome.line()


@pytest.mark.parametrize("model_type, reason", [
    ("t5gemma2", "merged self- and cross-attention"),
    ("prophetnet", "n-gram streams"),
    ("inkling2_text", "passes sinks to its attention function"),  # ignoring it would change the output
    ("deepseek_v32", "passes indices to its attention function"),  # sparse attention over chosen keys
])
def test_architectures_headscope_cannot_split_are_refused_with_the_reason(outcomes, model_type, reason):
    outcome = outcomes[model_type]
    assert outcome.status == "refused" and reason in outcome.detail, outcome.line()
