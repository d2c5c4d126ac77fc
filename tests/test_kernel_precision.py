"""The kernel path keeps float32 statistics from a bfloat16 model, on the real models with massive activations.

SmolLM2 and Gemma 3 put up to ~0.9 of a head's attention on the first token, through logits far larger than the
rest. Loaded in bfloat16, each layer's queries and keys are recorded as the model hands them to attention, and the
statistics are computed from them exactly (float64). The kernel path's key mass and entropy equal those to float32
precision (the tolerance of :func:`reference.kernel_entropy_floor`, from the logits' magnitude: ~2e-5 here), where
attention computed in bfloat16 (eager's way, and the chunked path's in a bfloat16 model) is off by ~1e-3.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest
import reference as ref
import torch
from transformers import AttentionInterface

import headscope
from headscope.capture import engine
from headscope.probes import text

pytestmark = pytest.mark.slow

TOKENS = 96


@contextlib.contextmanager
def _recorded():
    """Each call of headscope's attention function in order: (query, key, mask, scaling), queries and keys in
    float64 exactly as the model passed them."""
    calls = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        mask = attention_mask[..., : key.shape[2]] if attention_mask is not None else None
        calls.append((query.detach().double(), key.detach().double(), mask, kwargs.get("scaling")))
        return engine.headscope_attention(module, query, key, value, attention_mask, **kwargs)

    engine._register()
    AttentionInterface.register(engine.IMPLEMENTATION, recording)
    try:
        yield calls
    finally:
        AttentionInterface.register(engine.IMPLEMENTATION, engine.headscope_attention)


def _exact(calls) -> tuple[np.ndarray, np.ndarray, float]:
    """Per (layer, head), from the recorded calls in float64: mass on the first token over the queries after it,
    entropy over all queries; and the largest |log-sum-exp|."""
    masses, entropies, largest = [], [], 0.0
    for query, key, mask, scaling in calls:
        _, heads, tokens, head_dim = query.shape
        scaling = head_dim**-0.5 if scaling is None else scaling
        logits = scaling * query @ key.repeat_interleave(heads // key.shape[1], dim=1).transpose(-1, -2)
        hidden = torch.ones(tokens, tokens, dtype=torch.bool).triu(1) if mask is None else ~mask
        logits = logits.masked_fill(hidden, float("-inf"))
        lse = logits.logsumexp(dim=-1)
        largest = max(largest, float(lse.abs().max()))
        probs = (logits - lse[..., None]).exp()
        masses.append(probs[0, :, 1:, 0].mean(dim=-1))
        entropies.append(-torch.special.xlogy(probs, probs).sum(dim=-1)[0].mean(dim=-1))
    return torch.stack(masses).numpy(), torch.stack(entropies).numpy(), largest


@functools.cache
def _measured(alias: str, path: str = "auto"):
    loaded = headscope.load(alias, dtype="bfloat16")
    ids = loaded.processor(text.prose(), return_tensors="pt")["input_ids"][:, :TOKENS]
    mass, entropy = headscope.KeyMass(), headscope.Entropy()
    scope = headscope.Scope(loaded.model)
    with _recorded() as calls, torch.no_grad(), scope.capture(mass, entropy, path=path):
        loaded.model(input_ids=ids)
    return mass.result()["self"], entropy.result()["self"], _exact(calls), dict(scope.paths)


@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_kernel_path_statistics_of_a_bfloat16_model_are_float32_exact(alias: str) -> None:
    mass, entropy, (exact_mass, exact_entropy, largest), paths = _measured(alias, "auto")
    assert set(paths) == {"kernel"}, paths
    assert exact_mass.max() > 0.5  # the massive-activation sink this test is about
    tolerance = ref.SLACK * ref.kernel_entropy_floor(largest)  # ~2e-5 at these logits
    np.testing.assert_allclose(mass, exact_mass, rtol=0, atol=tolerance)
    np.testing.assert_allclose(entropy, exact_entropy, rtol=0, atol=tolerance)
