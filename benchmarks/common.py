"""What the benchmark scripts share: loading the model they measure (a packaged alias, a folder, or the tiny random
model of the smoke runs) and writing their raw numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY = "tiny-smollm2"  # smoke runs: a 2-layer random Llama on SmolLM2's tokenizer, so that text probes still work
TINY_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 2048, "tie_word_embeddings": True}


def load(model: str, device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode on ``device``: ``TINY`` or anything ``headscope.load`` takes."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import headscope
    from headscope.models import zoo

    if model != TINY:
        loaded = headscope.load(model, device=device)
        return loaded.model, getattr(loaded.processor, "tokenizer", loaded.processor)
    tokenizer = AutoTokenizer.from_pretrained(zoo.materialise("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **TINY_CONFIG)
    return LlamaForCausalLM(config).float().eval().to(device), tokenizer


def write(report: dict[str, Any], path: Path | None) -> None:
    """Print ``report`` as JSON, and write it to ``path`` when given (the suite reads it from there)."""
    text = json.dumps(report, indent=2)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
