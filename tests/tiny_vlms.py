"""Tiny, randomly initialised vision-language models of real architectures, saved with working processors.

Each builder saves a ``save_pretrained`` folder: the model (safetensors), and a processor built offline from
the shared byte-level BPE tokenizer (``conftest.bpe_tokenizer``) with the architecture's image tokens added,
the architecture's own image processor at a tiny size, and a small chat template. ``headscope.load`` reads
the folder back as a ``vision-language`` model with its processor.

- ``llava``: CLIP vision tower (16 x 16 pixels, patch 4), 16 image tokens (CLS dropped), Llama 2 x 4 heads;
- ``idefics3``: SigLIP-like tower, pixel shuffle 2: 4 image tokens between ``<fake_token_around_image><global-img>``
  and ``<fake_token_around_image>``, Llama 2 x 4 heads;
- ``qwen2_vl``: Qwen2-VL ViT (patch 4, merge 2): 4 image tokens between ``<|vision_start|>`` and ``<|vision_end|>``,
  Qwen2 2 x 4 heads with M-RoPE. Its processor needs torchvision (for its video half): without it the folder holds
  the tokenizer and the image processor only.

Every language model has 2 key/value heads for its 4 query heads.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
from conftest import BOS, EOS, PAD, bpe_tokenizer
from tiny_models import sharpen

IMAGE_SIZE = 16
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ image }}"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _template(image: str) -> str:
    return "{% set image = '" + image + "' %}" + CHAT_TEMPLATE


def _tokenizer(extra: list[str]):
    tokenizer = bpe_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    return tokenizer


def _text_config(cls, vocab: int, **extra):
    return cls(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=128, pad_token_id=PAD, bos_token_id=BOS,
               eos_token_id=EOS, **extra)


def _save(model, processor, folder: Path, seed: int) -> Path:
    model = sharpen(model, seed)
    model.generation_config.eos_token_id = None  # greedy decoding always makes max_new_tokens tokens
    model.generation_config.pad_token_id = PAD
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def llava(folder: Path) -> Path:
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _tokenizer(["<image>"])
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=4, projection_dim=32)
    config = LlavaConfig(vision_config=vision, text_config=_text_config(LlamaConfig, len(tokenizer)),
                         image_token_id=image_token, image_seq_length=16, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", pad_token_id=PAD)
    torch.manual_seed(30)
    model = LlavaForConditionalGeneration(config)
    images = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE,
                                                                                  "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=4,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=_template("<image>"))
    return _save(model, processor, folder, 30)


def idefics3(folder: Path) -> Path:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    tokenizer = _tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"])
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=IMAGE_SIZE, patch_size=4)
    config = Idefics3Config(vision_config=vision, text_config=_text_config(LlamaConfig, len(tokenizer)),
                            image_token_id=image_token, scale_factor=2, pad_token_id=PAD)
    torch.manual_seed(31)
    model = Idefics3ForConditionalGeneration(config)
    images = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": IMAGE_SIZE},
                                       max_image_size={"longest_edge": IMAGE_SIZE})
    processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=_template("<image>"))
    return _save(model, processor, folder, 31)


def qwen2_vl(folder: Path) -> Path:
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
        Qwen2VLProcessor,
        Qwen2VLTextConfig,
    )

    tokenizer = _tokenizer(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    ids = {token: tokenizer.convert_tokens_to_ids(token)
           for token in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")}
    text = _text_config(Qwen2VLTextConfig, len(tokenizer),
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 2, "patch_size": 4,
              "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}
    config = Qwen2VLConfig(text_config=text.to_dict(), vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], pad_token_id=PAD)
    torch.manual_seed(32)
    model = Qwen2VLForConditionalGeneration(config)
    pixels = IMAGE_SIZE * IMAGE_SIZE
    images = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=4, merge_size=2,
                                      temporal_patch_size=2)
    template = _template("<|vision_start|><|image_pad|><|vision_end|>")
    if importlib.util.find_spec("torchvision") is None:  # Qwen2VLProcessor's video half needs torchvision
        tokenizer.chat_template = template
        _save(model, tokenizer, folder, 32)
        images.save_pretrained(folder)
        return folder
    processor = Qwen2VLProcessor(image_processor=images, tokenizer=tokenizer, chat_template=template)
    return _save(model, processor, folder, 32)


BUILDERS: dict[str, Callable[[Path], Path]] = {"llava": llava, "idefics3": idefics3, "qwen2_vl": qwen2_vl}
