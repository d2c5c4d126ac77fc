#!/usr/bin/env python
"""Benchmark: the L x H single-head zero ablations of ``importance``, batched against a plain loop.

Loads a model (the packaged SmolLM2 by default), takes the first ``--tokens`` tokens of the shipped prose and
times, each once after a warm-up forward: one plain forward pass; one plain forward and backward pass of the
loss; the gradient importance (one forward and one backward under gates, with its token-product hooks); every
single-head zero ablation batched ``--batch-size`` rows per pass (``importance.ablation_importance``), with
prefix reuse (the layers before a pass's first ablated layer run once at batch 1) and without; and the same
ablations as a loop of one forward pass per head with a shared (layers, heads) gate. The ablation results are
compared (max abs difference to the loop).

    python benchmarks/importance.py --tokens 256 --batch-size 16 --threads 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common
import numpy as np
import torch

import headscope
from headscope.analyses import importance
from headscope.capture.gates import Gates
from headscope.probes import text


def _timed(function):
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


def _forward_backward(model, inputs: dict[str, torch.Tensor]) -> None:
    """The plain model's next-token loss and its backward pass: what any gradient method costs at least."""
    logits = model(**inputs, use_cache=False).logits
    importance.next_token_losses(logits, inputs["input_ids"], inputs.get("attention_mask")).sum().backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help=f"the tiny random {common.TINY}, short inputs: seconds")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.tokens = common.TINY, 32
    torch.set_num_threads(args.threads)

    model, tokenizer = common.load(args.model, args.device)
    inputs = text.encode(tokenizer, text.prose(), None, args.tokens)
    scope = headscope.Scope(model)
    layers, heads = scope.stacks["self"].layers, scope.stacks["self"].heads
    importance.losses(model, scope, inputs)  # warm-up

    _, forward = _timed(lambda: importance.losses(model, scope, inputs))
    _forward_backward(model, inputs)  # warm-up: the first backward allocates the gradients
    _, backward = _timed(lambda: _forward_backward(model, inputs))
    _, gradient = _timed(lambda: importance.gradient_importance(model, scope, importance.next_token_loss(inputs)))
    batched, batched_s = _timed(lambda: importance.ablation_importance(
        model, scope, inputs, "zero", batch_size=args.batch_size, prefix_reuse=True))
    no_prefix, no_prefix_s = _timed(lambda: importance.ablation_importance(
        model, scope, inputs, "zero", batch_size=args.batch_size, prefix_reuse=False))

    def alone(layer: int, head: int) -> float:
        return float(importance.losses(model, scope, inputs, [Gates.zero([(layer, head)], layers, heads)])[0])

    def loop() -> np.ndarray:
        return np.array([[alone(layer, head) for head in range(heads)] for layer in range(layers)])

    one_by_one, loop_s = _timed(loop)
    common.write({
        "model": args.model, "tokens": int(inputs["input_ids"].shape[1]), "heads": layers * heads,
        "threads": args.threads, "batch_size": args.batch_size, "forward_s": round(forward, 3),
        "forward_backward_s": round(backward, 3), "gradient_s": round(gradient, 3),
        "gradient_over_forward": round(gradient / forward, 2),
        "gradient_over_forward_backward": round(gradient / backward, 2),
        "ablation_batched_s": round(batched_s, 2), "ablation_batched_no_prefix_s": round(no_prefix_s, 2),
        "ablation_loop_s": round(loop_s, 2), "speedup": round(loop_s / batched_s, 2),
        "speedup_no_prefix": round(loop_s / no_prefix_s, 2), "prefix_reuse_gain": round(no_prefix_s / batched_s, 2),
        "max_abs_difference": float(np.abs(batched - one_by_one).max()),
        "max_abs_difference_no_prefix": float(np.abs(no_prefix - one_by_one).max()),
    }, args.json)


if __name__ == "__main__":
    main()
