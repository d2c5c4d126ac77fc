"""Tiny, randomly initialised models of real architectures, and inputs for them.

Each factory builds a seeded model (eval mode, float32, hidden size 32-64, 2-3 layers) and returns a
:class:`Tiny`: the model plus ``inputs(batch, padding)``, which builds a batch of inputs with optional
``"left"`` or ``"right"`` padding of the second example. Weights are redrawn with a large standard
deviation so attention is peaked rather than nearly uniform: statistics then differ clearly from head to
head and from position to position, and an argmax is well defined.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    CLIPVisionConfig,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTModel,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

VOCAB = 96
PAD = 0
SEQ = 11  # text length: longer than Gemma3's sliding window, not a multiple of the chunk sizes tested
SHORT = 3  # the padded example has this many fewer real tokens
WEIGHT_STD = 0.25


@dataclass
class Tiny:
    """A tiny model and how to feed it.

    Attributes:
        name: architecture id used in test ids.
        model: the model, eval mode, float32.
        inputs: ``inputs(batch=1, padding=None)`` -> keyword arguments for ``model(...)``; with padding
            ("left" or "right") the last example of the batch is ``SHORT`` tokens shorter.
        kind: "decoder" (causal LM), "encoder" (bidirectional text), "seq2seq", "vision" or "vlm".
        paddings: the paddings this architecture is tested with.
        stacks: the attention stacks headscope should find.
        self_stack: the stack of the main (text) self-attention.
    """

    name: str
    model: nn.Module
    inputs: Callable[..., dict]
    kind: str
    paddings: tuple[str, ...]
    stacks: tuple[str, ...]
    self_stack: str = "self"
    extra: dict = field(default_factory=dict)


def sharpen(model: nn.Module, seed: int) -> nn.Module:
    """Redraw every matrix (projections, embeddings, T5's position buckets) from N(0, WEIGHT_STD^2)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.ndim >= 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * WEIGHT_STD)
    return model.eval().float()


def _tokens(batch: int, length: int, seed: int, low: int = 3) -> torch.Tensor:
    return torch.randint(low, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _pad(ids: torch.Tensor, padding: str | None, short: int = SHORT) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the last example of ``ids``: its first (left) or last (right) ``short`` tokens become padding."""
    mask = torch.ones_like(ids)
    if padding is not None and ids.shape[0] > 1:
        if padding == "left":
            mask[-1, :short] = 0
        elif padding == "right":
            mask[-1, -short:] = 0
        else:
            raise ValueError(padding)
    return ids.masked_fill(mask == 0, PAD), mask


def _text_inputs(seed: int) -> Callable[..., dict]:
    def inputs(batch: int = 1, padding: str | None = None) -> dict:
        ids, mask = _pad(_tokens(batch, SEQ, seed), padding)
        return {"input_ids": ids, "attention_mask": mask}

    return inputs


def _no_eos(model: nn.Module) -> nn.Module:
    """Greedy generation always makes ``max_new_tokens`` tokens: no end-of-sequence token."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


def llama() -> Tiny:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                         pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    model = _no_eos(sharpen(LlamaForCausalLM(config), 0))
    return Tiny("llama", model, _text_inputs(10), "decoder", ("left", "right"), ("self",))


def gpt2() -> Tiny:
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                        eos_token_id=2, pad_token_id=PAD)
    model = _no_eos(sharpen(GPT2LMHeadModel(config), 1))
    return Tiny("gpt2", model, _text_inputs(11), "decoder", ("left", "right"), ("self",))


def gemma3() -> Tiny:
    """Gemma3 text: sliding window 4 (< SEQ) on layers 0 and 2, full attention on layer 1."""
    torch.manual_seed(2)
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                              max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    model = _no_eos(sharpen(Gemma3ForCausalLM(config), 2))
    return Tiny("gemma3", model, _text_inputs(12), "decoder", ("left", "right"), ("self",),
                extra={"sliding_window": 4})


def qwen2() -> Tiny:
    torch.manual_seed(3)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    model = _no_eos(sharpen(Qwen2ForCausalLM(config), 3))
    return Tiny("qwen2", model, _text_inputs(13), "decoder", ("left", "right"), ("self",))


def bert() -> Tiny:
    torch.manual_seed(4)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=PAD)
    model = sharpen(BertModel(config, add_pooling_layer=False), 4)
    return Tiny("bert", model, _text_inputs(14), "encoder", ("right",), ("self",))


def t5() -> Tiny:
    """T5 with relative position bias; with padding, both the encoder and the decoder input are padded."""
    torch.manual_seed(5)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=1)
    model = _no_eos(sharpen(T5ForConditionalGeneration(config), 5))

    def inputs(batch: int = 1, padding: str | None = None) -> dict:
        ids, mask = _pad(_tokens(batch, SEQ, 15), padding)
        decoder_ids, decoder_mask = _pad(_tokens(batch, 7, 16), padding, short=2)
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder_ids,
                "decoder_attention_mask": decoder_mask}

    return Tiny("t5", model, inputs, "seq2seq", ("right",), ("encoder", "decoder", "cross"),
                self_stack="encoder")


def whisper() -> Tiny:
    torch.manual_seed(6)
    config = WhisperConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=12, max_target_positions=32,
                           decoder_start_token_id=1, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                           suppress_tokens=None, begin_suppress_tokens=None)
    model = _no_eos(sharpen(WhisperForConditionalGeneration(config), 6))

    def inputs(batch: int = 1, padding: str | None = None) -> dict:
        """Audio features (never padded: Whisper's encoder takes a fixed length) and decoder tokens."""
        features = torch.randn(batch, 8, 24, generator=torch.Generator().manual_seed(17))
        decoder_ids, decoder_mask = _pad(_tokens(batch, 7, 18), padding, short=2)
        return {"input_features": features, "decoder_input_ids": decoder_ids, "decoder_attention_mask": decoder_mask}

    return Tiny("whisper", model, inputs, "seq2seq", ("right",), ("encoder", "decoder", "cross"),
                self_stack="decoder")


def vit() -> Tiny:
    torch.manual_seed(7)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=16, patch_size=4)
    model = sharpen(ViTModel(config, add_pooling_layer=False), 7)

    def inputs(batch: int = 1, padding: str | None = None) -> dict:
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(19))}

    return Tiny("vit", model, inputs, "vision", (), ("self",))


LLAVA_IMAGE_TOKEN = VOCAB - 1
LLAVA_PATCHES = 16  # (16 / 4) ** 2 patches; the CLS feature is dropped ("default" strategy)


def llava() -> Tiny:
    """LLaVA: tiny CLIP vision tower + tiny Llama; the prompt is 4 text tokens, 16 image tokens, 3 text tokens."""
    torch.manual_seed(8)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=16, patch_size=4, projection_dim=32)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                       pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=LLAVA_IMAGE_TOKEN,
                         image_seq_length=LLAVA_PATCHES, vision_feature_layer=-1, pad_token_id=PAD)
    model = _no_eos(sharpen(LlavaForConditionalGeneration(config), 8))

    def inputs(batch: int = 1, padding: str | None = None) -> dict:
        text_ids = _tokens(batch, 7, 20).clamp_max(LLAVA_IMAGE_TOKEN - 1)
        image = torch.full((batch, LLAVA_PATCHES), LLAVA_IMAGE_TOKEN)
        # SHORT < 4 text tokens before the image and SHORT <= 3 after: padding never hides an image token
        ids, mask = _pad(torch.cat([text_ids[:, :4], image, text_ids[:, 4:]], dim=1), padding)
        pixel_values = torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(21))
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values}

    return Tiny("llava", model, inputs, "vlm", ("left", "right"), ("self", "vision"))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: tiny matrices gain nothing from more, and on a busy machine the extra
    threads' spinning makes every call tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


FACTORIES: dict[str, Callable[[], Tiny]] = {
    "llama": llama,
    "gpt2": gpt2,
    "gemma3": gemma3,
    "qwen2": qwen2,
    "bert": bert,
    "t5": t5,
    "whisper": whisper,
    "vit": vit,
    "llava": llava,
}
_CACHE: dict[str, Tiny] = {}


def get(name: str) -> Tiny:
    """The tiny model ``name``, built once per test session (tests must not change its weights)."""
    if name not in _CACHE:
        _CACHE[name] = FACTORIES[name]()
    return _CACHE[name]
