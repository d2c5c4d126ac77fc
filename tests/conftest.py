"""Shared fixtures: tiny random models saved in ``save_pretrained`` layout, built offline in a second.

The hub is switched off for the whole session (``HF_HUB_OFFLINE=1``): nothing here may reach the network.
``HEADSCOPE_CACHE`` is left alone so that the packaged models' conversions are reused from the user cache
across runs; tests of caching behaviour point it at their own tmp folder with ``monkeypatch``.

Every tiny model shares one tokenizer: a byte-level BPE trained in a few milliseconds on the shipped prose,
with ``<pad>`` = 0, ``<s>`` = 1 (prepended to every text, as Llama tokenizers do) and ``</s>`` = 2. Weights are
redrawn with a large standard deviation so that attention is peaked and differs from head to head.
"""

from __future__ import annotations

import logging
import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers or huggingface_hub read it
# the command lines and notebook kernels the tests start fail on a FutureWarning too (pyproject's filterwarnings
# covers this process): transformers announces removals with them
os.environ["PYTHONWARNINGS"] = "error::FutureWarning"
# One torch thread in this process and in every process it starts (command lines, notebook kernels, workers):
# on a machine where other work holds a core, a second thread makes each call wait on the slower one (a forward
# pass 2x slower, a generate step 2.5x, measured on 2 cores beside `yes`), while one thread loses about a third
# on a quiet one. HEADSCOPE_TEST_THREADS sets another count; every exactness tolerance holds for any count.
os.environ.setdefault("HEADSCOPE_TEST_THREADS", "1")
os.environ["OMP_NUM_THREADS"] = os.environ["HEADSCOPE_TEST_THREADS"]
os.environ["MKL_NUM_THREADS"] = os.environ["HEADSCOPE_TEST_THREADS"]

from pathlib import Path

import pytest
import torch
from tiny_models import sharpen
from torch import nn

torch.set_num_threads(int(os.environ["HEADSCOPE_TEST_THREADS"]))  # if a plugin imported torch before OMP_NUM_THREADS


class _Deprecations(logging.Handler):
    """Collects transformers' deprecation messages: transformers logs many of them (``warning_once``) instead
    of raising a ``DeprecationWarning``, which pytest's ``filterwarnings = error`` would turn into a failure."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "deprecat" in message.lower() and not TRANSFORMERS_OWN.match(message):
            self.messages.append(message)


TRANSFORMERS_OWN = re.compile(
    # WhisperForConditionalGeneration.generate passes its generation_config together with these two itself
    # (transformers/models/whisper/generation_whisper.py), whatever its caller passes: not a call headscope makes
    r"Passing `generation_config` together with generation-related arguments=\(\{'(begin_)?suppress_tokens'"
    r"(, '(begin_)?suppress_tokens')?\}\)"
)


@pytest.fixture(autouse=True)
def no_transformers_deprecation():
    """Fail a test whose calls make transformers log a deprecation: headscope follows transformers' current API."""
    handler = _Deprecations()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not handler.messages, f"transformers logged a deprecation: {handler.messages[0]}"


PAD, BOS, EOS = 0, 1, 2
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
BPE_VOCAB = 384
TINY_CONTEXT = 64  # max_position_embeddings of the tiny llama: the shipped prose is longer


def bpe_tokenizer():
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on the shipped prose (offline, milliseconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from headscope.probes.text import prose

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([prose()], trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_tiny(model: nn.Module, folder: Path) -> Path:
    """Save ``model`` (safetensors) and the shared tokenizer into ``folder``."""
    model.save_pretrained(folder, safe_serialization=True)
    bpe_tokenizer().save_pretrained(folder)
    return folder


def tiny_llama(vocab: int, context: int = TINY_CONTEXT) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=context,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    return sharpen(LlamaForCausalLM(config), 0)


@pytest.fixture(scope="session")
def tokenizer():
    """The shared tiny BPE tokenizer."""
    return bpe_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random LlamaForCausalLM (2 layers x 4 heads, 2 KV heads, context 64) and its tokenizer."""
    return save_tiny(tiny_llama(len(tokenizer)), tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random BertModel encoder (2 layers x 4 heads, context 64) and the shared tokenizer."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(1)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=TINY_CONTEXT, pad_token_id=PAD)
    model = sharpen(BertModel(config, add_pooling_layer=False), 1)
    return save_tiny(model, tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random T5ForConditionalGeneration (encoder 2 x 4, decoder 3 x 4) and the shared tokenizer."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(2)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
                      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS)
    model = sharpen(T5ForConditionalGeneration(config), 2)
    return save_tiny(model, tmp_path_factory.mktemp("tiny-t5"))
