"""Image probes for vision-language models: shape pictures drawn by code, the user's images, and the
image / no-image input pairs that vision-aware analyses compare.

Each shipped picture is drawn with PIL from a seed: one to three filled shapes (circle, square, triangle) of
distinct named colours on a plain background, so every picture knows its own description ("a red circle and
a blue square on a white background"). Nothing is downloaded and no photograph is shipped.

An :class:`ImagePair` holds the model inputs with the image (the processor's output: ``input_ids`` with the
image placeholder expanded to one token per image feature, ``pixel_values`` and the like) and without it: the
same ``input_ids`` (and other per-token inputs) with every image-token position removed and no pixel inputs,
so both runs read the same text prompt. Tokens that frame the image (Idefics3's ``<fake_token_around_image>``,
Qwen2-VL's ``<|vision_start|>``) stay.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from headscope.capture.engine import Scope
from headscope.capture.gates import Gates
from headscope.capture.reducers import Reducer
from headscope.errors import HeadscopeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
           "purple": (140, 60, 180), "orange": (245, 140, 30), "black": (20, 20, 20)}
BACKGROUNDS = {"white": (250, 250, 250), "grey": (170, 170, 170)}
SHAPES = ("circle", "square", "triangle")
PROMPTS = ("Describe the image in detail.", "What shapes do you see in this picture?",
           "What colours are the shapes in the image?")
DEFAULT_PROMPT = PROMPTS[0]
TEXT_KEYS = ("input_ids", "attention_mask")


@dataclass
class ImageProbe:
    """One picture and the prompt asked about it; ``description`` is what the picture holds."""

    image: object  # PIL.Image.Image
    prompt: str
    description: str
    source: str


@dataclass
class ImagePair:
    """Model inputs for one prompt with the image (``with_image``) and with its image tokens removed
    (``without_image``); ``image_mask`` (tokens,) is True at the image-token positions of ``with_image``."""

    with_image: dict[str, torch.Tensor]
    without_image: dict[str, torch.Tensor]
    image_mask: torch.Tensor
    probe: ImageProbe


def shapes(seed: int = 0, size: int = 224) -> tuple[object, str]:
    """A ``size`` x ``size`` RGB picture of one to three shapes, deterministic from ``seed``, and its description."""
    from PIL import Image, ImageDraw

    generator = np.random.default_rng(seed)
    background = list(BACKGROUNDS)[int(generator.integers(len(BACKGROUNDS)))]
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    count = int(generator.integers(1, 4))
    kinds = generator.choice(SHAPES, size=count, replace=False)
    colours = generator.choice(list(COLOURS), size=count, replace=False)
    cell = size // count
    named = []
    for index, (kind, colour) in enumerate(zip(kinds, colours, strict=True)):
        extent = int(cell * generator.uniform(0.5, 0.8))
        left = index * cell + int(generator.integers(0, cell - extent + 1))
        top = int(generator.integers(0, size - extent + 1))
        box = (left, top, left + extent, top + extent)
        fill = COLOURS[str(colour)]
        if kind == "circle":
            draw.ellipse(box, fill=fill)
        elif kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(left + extent // 2, top), (left, top + extent), (left + extent, top + extent)], fill=fill)
        named.append(f"{'an' if str(colour)[0] in 'aeiou' else 'a'} {colour} {kind}")
    listed = named[0] if count == 1 else ", ".join(named[:-1]) + " and " + named[-1]
    return image, f"{listed} on a {background} background"


def shipped(count: int = 3, seed: int = 0, prompt: str | None = None) -> list[ImageProbe]:
    """``count`` shape pictures (seeds ``seed``, ``seed + 1``, ...), each with a prompt from :data:`PROMPTS`
    in turn, or with ``prompt`` when given."""
    probes = []
    for index in range(count):
        image, description = shapes(seed + index)
        probes.append(ImageProbe(image, prompt or PROMPTS[index % len(PROMPTS)], description,
                                 f"shipped shapes picture (seed {seed + index})"))
    return probes


def is_image_file(path: str | Path) -> bool:
    """Whether ``path`` names an image by its suffix."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def read_image(path: str | Path) -> object:
    """The user's image as RGB; one clear error when it is missing or not an image."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise HeadscopeError(f"no such input file: {path}")
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as error:
        raise HeadscopeError(f"cannot read {path} as an image ({type(error).__name__}): vision-language models "
                             f"take an image file ({', '.join(IMAGE_SUFFIXES)})") from None


def user(input_path: str | None, text: str | None, seed: int = 0) -> ImageProbe:
    """The user's probe: their image (else the shipped picture of ``seed``) with their prompt (else the default)."""
    if text is not None and not text.strip():
        raise HeadscopeError("the prompt is empty: give some text with --text")
    if input_path is None:
        image, description = shapes(seed)
        return ImageProbe(image, text, description, f"shipped shapes picture (seed {seed}) with user prompt")
    return ImageProbe(read_image(input_path), text or DEFAULT_PROMPT, "unknown (user image)",
                      f"user image ({Path(input_path).name})")


def digest(probe: ImageProbe) -> str:
    """sha256 of the picture's pixels and the prompt."""
    pixels = np.asarray(probe.image, dtype=np.uint8).tobytes()
    return "sha256:" + hashlib.sha256(pixels + probe.prompt.encode()).hexdigest()


def prompt_text(processor, prompt: str) -> str:
    """The prompt as the model expects it: through the processor's chat template (a user turn holding the
    image then the text, and the assistant's turn opened), else, when there is none or it cannot place an image
    (a text-only template), the image placeholder, a newline, the text."""
    from jinja2 import TemplateError

    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        try:
            rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
        except (TemplateError, TypeError, ValueError, KeyError):
            rendered = None
        if isinstance(rendered, str) and processor.image_token in rendered:
            return rendered
    return f"{processor.image_token}\n{prompt}"


def encode(loaded, probe: ImageProbe) -> dict[str, torch.Tensor]:
    """The processor's inputs (batch 1) for ``probe``: text with the image placeholder expanded, and pixels."""
    model, processor, info = loaded
    if info.kind != "vision-language":
        raise HeadscopeError(f"image inputs need a vision-language model; this one is a {info.kind} model")
    if getattr(processor, "image_processor", None) is None or not hasattr(processor, "image_token"):
        raise HeadscopeError(
            f"this {info.model_type} model loaded without an image processor (got {type(processor).__name__}): "
            "AutoProcessor could not build its processor from the model folder (Qwen2-VL's needs torchvision "
            "installed beside torch)")
    encoded = processor(images=[probe.image], text=prompt_text(processor, probe.prompt), return_tensors="pt")
    return {name: value.to(model.device, model.dtype if value.is_floating_point() else value.dtype)
            for name, value in encoded.items() if isinstance(value, torch.Tensor)}


def without_image(inputs: dict[str, torch.Tensor], image_token_id: int) -> tuple[dict[str, torch.Tensor],
                                                                                 torch.Tensor]:
    """``inputs`` (batch 1) with every image-token position removed and no pixel inputs; and the (tokens,)
    mask of the removed positions."""
    ids = inputs["input_ids"]
    if ids.shape[0] != 1:
        raise ValueError("image/no-image pairs are built one prompt at a time (batch 1)")
    image_mask = ids[0] == image_token_id
    if not bool(image_mask.any()):
        raise HeadscopeError("the input holds no image token: nothing to remove for the no-image run")
    kept = {name: value[:, ~image_mask] for name, value in inputs.items() if token_aligned(name, value, ids)}
    return kept, image_mask


def token_aligned(name: str, value: torch.Tensor, input_ids: torch.Tensor) -> bool:
    """Whether input ``name`` holds one value per text token (``attention_mask``, Qwen2-VL's
    ``mm_token_type_ids``), as opposed to pixel inputs."""
    return name in TEXT_KEYS or (value.ndim == 2 and value.shape == input_ids.shape)


def pair(loaded, probe: ImageProbe, image_token_id: int) -> ImagePair:
    """The image / no-image inputs for ``probe``."""
    with_image = encode(loaded, probe)
    text_only, image_mask = without_image(with_image, image_token_id)
    return ImagePair(with_image, text_only, image_mask, probe)


# --- decoding a vision-language model ----------------------------------------------------------------------


def extended(inputs: dict[str, torch.Tensor], prefix: torch.Tensor) -> dict[str, torch.Tensor]:
    """``inputs`` (batch 1) with the tokens ``prefix`` (n,) appended to the text, as teacher forcing feeds them:
    the attention mask grows by ones, other per-token inputs (Qwen2-VL's ``mm_token_type_ids``) by zeros (text)."""
    ids = inputs["input_ids"]
    out = dict(inputs)
    for name, value in inputs.items():
        if name != "input_ids" and token_aligned(name, value, ids):
            fill = value.new_ones if name == "attention_mask" else value.new_zeros
            out[name] = torch.cat([value, fill(1, len(prefix))], dim=1)
    out["input_ids"] = torch.cat([ids, prefix[None].to(ids)], dim=1)
    return out


def patch_grid(model: torch.nn.Module, inputs: dict[str, torch.Tensor], tokens: int) -> tuple[int, int]:
    """(rows, columns) of the image tokens on the picture: Qwen2-VL's merged patch grid from ``image_grid_thw``,
    else a square when ``tokens`` is one (LLaVA, Idefics3 without splitting), else one row."""
    grid = inputs.get("image_grid_thw")
    if grid is not None:
        merge = getattr(model.config.vision_config, "spatial_merge_size", 1)
        _, height, width = (int(v) for v in grid[0])
        if (height // merge) * (width // merge) == tokens:
            return height // merge, width // merge
    side = math.isqrt(tokens)
    return (side, side) if side * side == tokens else (1, tokens)


def generate(model: torch.nn.Module, scope: Scope, inputs: dict[str, torch.Tensor], max_new_tokens: int,
             gates: Gates | None = None, reducers: tuple[Reducer, ...] = ()) -> torch.Tensor:
    """(new tokens,) greedy continuation of ``inputs`` (batch 1), under ``gates`` when given (e.g. VHR's), with
    ``reducers`` capturing attention on the way. The image placeholder token is never generated (an untrained
    model may rank it first): read back, it would ask for image features the pixels do not hold."""
    image_token = scope.adapter.image_token_id
    suppress = {"suppress_tokens": [image_token]} if image_token is not None else {}
    with torch.no_grad(), scope.capture(*reducers, gates=[] if gates is None else [gates]):
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **suppress)
    return out[0, inputs["input_ids"].shape[1]:].cpu()
