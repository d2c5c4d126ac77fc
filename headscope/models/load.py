"""Loading any model: a packaged alias, a local folder, a ``.gguf`` file, or a hub id.

:func:`load` returns the model (eval mode, chosen dtype and device), its tokenizer or processor, and a
:class:`ModelInfo` describing its kind, attention stacks and provenance.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from headscope.capture.adapters import Stack, adapt
from headscope.errors import HeadscopeError
from headscope.models import zoo
from headscope.models.placement import placed_on, placement_options

Kind = Literal["decoder", "encoder", "encoder-decoder", "vision-language"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


@dataclass
class ModelInfo:
    """What a loaded model is: kind, architecture, attention stacks, context length and provenance."""

    kind: Kind
    architecture: str
    model_type: str
    stacks: dict[str, Stack]
    max_tokens: int | None
    dtype: str
    device: str
    source: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "architecture": self.architecture,
            "model_type": self.model_type,
            "stacks": {name: stack.as_dict() for name, stack in self.stacks.items()},
            "max_tokens": self.max_tokens,
            "dtype": self.dtype,
            "device": self.device,
            "source": self.source,
        }


class Loaded(NamedTuple):
    """``model, processor, info = headscope.load(...)``."""

    model: nn.Module
    processor: Any
    info: ModelInfo


def load(
    source: str | Path | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    revision: str | None = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    device_map: str | dict[str, Any] | None = None,
    offload_folder: str | Path | None = None,
) -> Loaded:
    """Load a model for inspection.

    Args:
        source: a packaged alias (``smollm2-135m``, the default; ``gemma3-270m``, ``minilm-l6``,
            ``whisper-tiny.en``, ``whisper-base``; ``synthetic-llava-smollm2``, whose vision side is untrained), a
            local folder in ``save_pretrained`` layout, a ``.gguf`` file, or a hub id. A model whose config carries
            ``headscope_synthetic`` says so in ``info.source["synthetic"]``.
        dtype: ``float32``, ``float16`` or ``bfloat16``.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        revision: the hub revision (hub ids only).
        trust_remote_code: run the model repository's own Python code; off unless asked.
        allow_pickle: accept pickle checkpoints (``pytorch_model.bin``), which can run code when loaded.
        device_map: spread the model over several devices with accelerate instead of moving it to ``device``:
            ``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``, a ``{module: device}`` dict
            (devices ``cuda:N``/N, ``cpu`` or ``disk`` for offloaded weights), or that dict as JSON text or a
            ``.json`` file (see :mod:`headscope.models.placement`).
        offload_folder: where ``disk`` offload keeps weights (default: a temporary folder removed with the model).
    """
    if dtype not in DTYPES:
        raise HeadscopeError(f"unknown dtype '{dtype}': choose one of {', '.join(DTYPES)}")
    _check_device(device)
    source = zoo.DEFAULT_ALIAS if source is None else source
    folder, provenance = _resolve(str(source), revision)
    if provenance["type"] == "local":
        _refuse_pickle(folder, allow_pickle)
    options = {"revision": revision, "trust_remote_code": trust_remote_code}
    config = _config(folder, options, str(source))
    if getattr(config, "headscope_synthetic", None):  # a model headscope built with untrained parts says so
        provenance["synthetic"] = str(config.headscope_synthetic)
    kind = kind_of(config)
    placement = placement_options(device_map, offload_folder)
    with _quiet_transformers():
        model = _model_class(config, kind).from_pretrained(
            folder, dtype=DTYPES[dtype], use_safetensors=None if allow_pickle else True, **options, **placement
        )
        processor = _processor(folder, kind, options)
    model = (model if placement else model.to(device)).eval()
    info = describe(model, kind, provenance, dtype, placed_on(model) if placement else device)
    return Loaded(model, processor, info)


def describe(model: nn.Module, kind: Kind, source: dict[str, Any], dtype: str, device: str) -> ModelInfo:
    """The :class:`ModelInfo` of a loaded model."""
    config = model.config
    text = config.get_text_config(decoder=True)
    max_tokens = getattr(text, "max_position_embeddings", None) or getattr(text, "max_target_positions", None)
    return ModelInfo(
        kind=kind,
        architecture=type(model).__name__,
        model_type=config.model_type,
        stacks=adapt(model).stacks(),
        max_tokens=max_tokens,
        dtype=dtype,
        device=device,
        source=source,
    )


def _resolve(source: str, revision: str | None) -> tuple[str, dict[str, Any]]:
    """(folder or hub id to load from, provenance)."""
    if source in zoo.PACKAGED:
        model = zoo.packaged(source)
        folder = zoo.materialise(source)
        return str(folder), {"type": "packaged", "alias": source, "package": model.distribution,
                             "version": model.version()}
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise HeadscopeError(f"no such GGUF file: {path}")
        stat = path.stat()
        digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        try:
            folder = zoo.gguf_to_folder(path, zoo.cache_dir() / f"gguf-{path.stem}-{digest}")
        except HeadscopeError:
            raise
        except Exception as error:  # a corrupt or unsupported file is the user's input, not a bug
            raise HeadscopeError(f"cannot load GGUF file {path}: {_first_line(error)}") from error
        return str(folder), {"type": "gguf", "path": str(path.resolve())}
    if path.exists() or source.startswith((".", "/", "~")):
        if not path.is_dir():
            raise HeadscopeError(f"no such model folder: {path} (give a folder in save_pretrained layout)")
        if not (path / "config.json").is_file():
            raise HeadscopeError(f"{path} is not a transformers model folder: it has no config.json")
        return str(path), {"type": "local", "path": str(path.resolve())}
    if "/" not in source:
        raise HeadscopeError(
            f"unknown model '{source}': not a packaged alias ({', '.join(zoo.PACKAGED)}), not a local path, "
            "and not a hub id (owner/name)"
        )
    return source, {"type": "hub", "id": source, "revision": revision or "main"}


def _refuse_pickle(folder: str, allow_pickle: bool) -> None:
    path = Path(folder)
    has_safetensors = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists()
    pickled = [name for name in PICKLE_WEIGHTS if (path / name).exists()]
    if pickled and not has_safetensors and not allow_pickle:
        raise HeadscopeError(
            f"{path} holds only pickle weights ({pickled[0]}), which can run code when loaded: "
            "convert them to safetensors, or pass --allow-pickle if you trust the file"
        )


def _config(folder: str, options: dict[str, Any], source: str):
    from transformers import AutoConfig

    try:
        with _quiet_transformers():
            return AutoConfig.from_pretrained(folder, **options)
    except OSError as error:
        if Path(folder).is_dir():
            raise HeadscopeError(f"cannot read the config.json of {folder}: {_first_line(error)}") from error
        raise HeadscopeError(
            f"cannot load '{source}': the hub cannot be reached or has no such model, and it is not in the "
            "local cache (offline? run `headscope models` for the packaged ones)"
        ) from error
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise HeadscopeError(
                f"'{source}' needs its own Python code to load: pass --trust-remote-code if you trust it"
            ) from error
        raise HeadscopeError(f"'{source}' is not a transformers model: {_first_line(error)}") from error


def kind_of(config) -> Kind:
    """What a model of ``config`` is: decoder, encoder, encoder-decoder or vision-language."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and hasattr(config, "vision_config"):
        return "vision-language"
    causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    masked = config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if causal and (not masked or getattr(config, "is_decoder", False)):
        return "decoder"
    return "encoder"


def _model_class(config, kind: Kind):
    import transformers

    candidates = {
        "decoder": ["AutoModelForCausalLM"],
        "encoder": ["AutoModel"],
        "encoder-decoder": ["AutoModelForSpeechSeq2Seq", "AutoModelForSeq2SeqLM", "AutoModel"],
        "vision-language": ["AutoModelForImageTextToText"],
    }[kind]
    for name in candidates:
        auto = getattr(transformers, name)
        if type(config) in auto._model_mapping:
            return auto
    raise HeadscopeError(f"headscope cannot load a {config.model_type} model as a {kind}: unsupported architecture")


def _processor(folder: str, kind: Kind, options: dict[str, Any]):
    from transformers import AutoProcessor, AutoTokenizer

    if kind in ("encoder-decoder", "vision-language"):
        try:
            return AutoProcessor.from_pretrained(folder, **options)
        except (OSError, ValueError, TypeError, ImportError):  # ImportError: e.g. Qwen2-VL's needs torchvision
            pass
    try:
        return AutoTokenizer.from_pretrained(folder, **options)
    except (OSError, ValueError) as error:
        raise HeadscopeError(
            f"cannot load a tokenizer from '{folder}' ({type(error).__name__}): save one beside the model "
            "with tokenizer.save_pretrained"
        ) from error


def _check_device(device: str) -> None:
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise HeadscopeError(f"device '{device}' asked for, but no CUDA GPU is available: use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise HeadscopeError(f"device '{device}' asked for, but MPS is not available: use --device cpu")
    if kind not in ("cpu", "cuda", "mps"):
        raise HeadscopeError(f"unknown device '{device}': use cpu, cuda, cuda:N or mps")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Keep transformers' warnings and progress bars off the output while headscope calls it: its log records stop
    at its own stream handlers (a handler a caller added, such as a test's, still sees them), its UserWarnings are
    ignored, and its tqdm bars are off. Deprecation warnings are left as they are."""
    from transformers.utils import logging as hf_logging

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    streams = [h for h in logging.getLogger("transformers").handlers if isinstance(h, logging.StreamHandler)]
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    for handler in streams:
        handler.addFilter(keep)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
            yield
    finally:
        for handler in streams:
            handler.removeFilter(keep)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' informational logging and progress bars while loading."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
