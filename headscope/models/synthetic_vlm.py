"""A synthetic LLaVA for offline demos: a real language model with a randomly initialised vision side.

No vision-language weights install offline, so the packaged alias ``synthetic-llava-smollm2`` joins the real
SmolLM2-135M-Instruct (the ``smollm2-135m`` conversion, weights copied unchanged) to a small CLIP vision tower and
a LLaVA projector drawn from a fixed seed. The language side is exactly SmolLM2: a text-only prompt generates what
SmolLM2 generates. The vision side is untrained: the image tokens carry random features of the picture, so
image-side results (``vhd``, attention to image tokens) show how a method works, not what a trained model does.
The saved ``config.json`` says so (``headscope_synthetic``), and so does the folder's ``README.md``.

The tokenizer is SmolLM2's with ``<image>`` added (its embedding row is the mean of SmolLM2's rows, so building is
deterministic); the processor is a ``LlavaProcessor`` with a ``CLIPImageProcessor`` at :data:`IMAGE_SIZE` pixels
and SmolLM2's ChatML template extended to image parts.
"""

from __future__ import annotations

from pathlib import Path

SEED = 20250601
IMAGE_SIZE = 112
PATCH_SIZE = 14
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
IMAGE_TOKEN = "<image>"
NOTE = "vision tower randomly initialised: image-side results show the method, not a trained model"
VISION = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
          "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "projection_dim": 256}
CHAT_TEMPLATE = (  # SmolLM2-Instruct's template; a message's content may also be a list of image and text parts
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '" + IMAGE_TOKEN + "\\n' }}{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CARD = f"""# synthetic-llava-smollm2 (SYNTHETIC: untrained vision side)

Built by headscope for offline demos. A `LlavaForConditionalGeneration` whose language model is
SmolLM2-135M-Instruct (weights unchanged, Apache-2.0) and whose CLIP vision tower ({VISION['num_hidden_layers']}
layers x {VISION['num_attention_heads']} heads, {IMAGE_SIZE} x {IMAGE_SIZE} pixels, patch {PATCH_SIZE},
{IMAGE_TOKENS} image tokens) and projector are randomly initialised from seed {SEED}.

**{NOTE}.** Text-only generation is SmolLM2's; nothing it says about an image is grounded in the image.
"""


def build(language_folder: Path, out: Path) -> None:
    """Save the synthetic LLaVA into ``out``, the language model read from ``language_folder`` (a Llama
    ``save_pretrained`` folder with its tokenizer)."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    language = AutoModelForCausalLM.from_pretrained(language_folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(language_folder)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    text = language.config
    text.vocab_size = len(tokenizer)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=text.to_dict(),
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=IMAGE_TOKENS,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         tie_word_embeddings=text.tie_word_embeddings, headscope_synthetic=NOTE)
    generator = torch.random.fork_rng()
    with generator:
        torch.manual_seed(SEED)
        model = LlavaForConditionalGeneration(config)
    state = language.model.state_dict()
    embeddings = state["embed_tokens.weight"]
    state["embed_tokens.weight"] = torch.cat([embeddings, embeddings.mean(0, keepdim=True)])
    model.model.language_model.load_state_dict(state)
    if not text.tie_word_embeddings:
        head = language.lm_head.weight
        model.lm_head.weight.data.copy_(torch.cat([head, head.mean(0, keepdim=True)]))
    model.generation_config = language.generation_config
    images = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "README.md").write_text(CARD)
