#!/usr/bin/env python
"""Benchmark: what scoring retrieval heads costs over plain greedy generation of the same tokens.

Loads a model (the packaged SmolLM2 by default), builds one needle prompt per ``--lengths`` (the shipped
haystack, needle 0, depth 0.5) and times, each after a warm-up: ``retrieval.greedy`` with scoring (the
prompt less its last token prefilled with SDPA outside the capture, then every step inside it with a
``LastRow`` reducer); the same loop without scoring; transformers' ``generate`` made to produce exactly the
same number of tokens (``min_new_tokens`` keeps it from stopping, so its last token may differ where the
others stop at end-of-sequence); the scored loop with the prefill inside the capture too (the engine then computes
the prefill's attention in query chunks for the reducer), to show what keeping the prefill out saves; and the
approach of Wu et al.'s published Retrieval_Head code, the baseline a user would copy: the prompt prefilled with
fast attention (SDPA here, FlashAttention there), then each decode step run under eager attention with
``output_attentions=True`` over the cache and each head's argmax read from the returned maps. Its argmax positions
are compared with headscope's. Peak resident memory is read after each length (it only grows: lengths run in
increasing order).

    python benchmarks/retrieval.py --lengths 256,1024,2048 --threads 2
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import common
import numpy as np
import torch

import headscope
from headscope.analyses import retrieval
from headscope.capture.reducers import LastRow
from headscope.models.cache import cache_kwargs, output_cache
from headscope.probes import needle


def _timed(function):
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


def _prefill_inside(model, scope, input_ids: torch.Tensor, steps: int) -> None:
    """The scored loop with the whole prompt prefilled inside the capture (chunked attention for the reducer)."""
    stack = scope.stacks["self"]
    rows = retrieval._ArgmaxRows(stack.layers, stack.heads)
    with torch.no_grad(), scope.capture(LastRow(callback=rows, stacks=["self"])):
        out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        cache, current = output_cache(out), out.logits[:, -1:].argmax(-1)
        for _ in range(steps - 1):
            current = model(input_ids=current, use_cache=True, **cache_kwargs(model, cache)).logits[:, -1:].argmax(-1)


def _retrieval_head(model, input_ids: torch.Tensor, steps: int) -> np.ndarray:
    """Wu et al.'s loop: fast-attention prefill, then eager decode steps returning every layer's attention;
    (steps, layers, heads) absolute argmax positions, as ``retrieval.greedy`` records them."""
    positions = []
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        cache = output_cache(model(input_ids=input_ids[:, :-1], use_cache=True, logits_to_keep=1))
        model.set_attn_implementation("eager")
        current = input_ids[:, -1:]
        try:
            for _ in range(steps):
                out = model(input_ids=current, use_cache=True, output_attentions=True, **cache_kwargs(model, cache))
                rows = torch.stack([attention[0, :, -1] for attention in out.attentions])  # (layers, heads, keys)
                positions.append(rows.argmax(-1).numpy())  # keys are positions 0 .. prompt - 1 + step
                current = out.logits[:, -1:].argmax(-1)
        finally:
            model.set_attn_implementation("sdpa")
    return np.stack(positions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="256,1024,2048")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help=f"the tiny random {common.TINY}, short inputs: seconds")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.lengths = common.TINY, "160,256"
    torch.set_num_threads(args.threads)

    model, tokenizer = common.load(args.model, args.device)
    scope = headscope.Scope(model)
    lengths = [int(length) for length in args.lengths.split(",")]
    tests = needle.build(tokenizer, lengths, [0.5], [(0, needle.read_needles()[0])], needle.haystack_documents())
    warm = torch.tensor([tests[0].input_ids])
    retrieval.greedy(model, scope, tokenizer, warm, 4, score=True)
    rows = []
    for test in tests:
        ids = torch.tensor([test.input_ids])
        scored, scored_s = _timed(lambda ids=ids: retrieval.greedy(model, scope, tokenizer, ids, 50, score=True))
        steps = len(scored.tokens[0])
        plain, plain_s = _timed(lambda ids=ids: retrieval.greedy(model, scope, tokenizer, ids, 50))
        generated, generate_s = _timed(lambda ids=ids, steps=steps: model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps, do_sample=False))
        _, inside_s = _timed(lambda ids=ids, steps=steps: _prefill_inside(model, scope, ids, steps))
        baseline, baseline_s = _timed(lambda ids=ids, steps=steps: _retrieval_head(model, ids, steps))
        rows.append({
            "prompt_tokens": len(test.input_ids), "generated_tokens": steps, "answer": scored.texts[0],
            # min_new_tokens suppresses end-of-sequence, so generate's last token may differ
            "same_tokens": plain.tokens[0] == scored.tokens[0]
            and generated[0, ids.shape[1]:-1].tolist() == scored.tokens[0][:-1],
            "generate_s": round(generate_s, 3), "plain_loop_s": round(plain_s, 3),
            "plain_prefill_s": round(plain.seconds["prefill"], 3), "plain_decode_s": round(plain.seconds["decode"], 3),
            "scored_s": round(scored_s, 3),
            "scored_prefill_s": round(scored.seconds["prefill"], 3),
            "scored_decode_s": round(scored.seconds["decode"], 3),
            "scored_over_generate": round(scored_s / generate_s, 2),
            "prefill_inside_capture_s": round(inside_s, 3),
            "retrieval_head_s": round(baseline_s, 3), "retrieval_head_over_scored": round(baseline_s / scored_s, 2),
            "same_argmax_as_retrieval_head": float((baseline == scored.positions).mean()),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        })
    common.write({"model": args.model, "device": args.device, "threads": args.threads, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
