"""Speech input for audio models: the shipped English clip and a reader for the user's own WAV files.

``data/speech.wav`` is 16 kHz mono 16-bit PCM made with espeak-ng (see ``data/README.md``);
``data/speech.txt`` is its exact transcript.
"""

from __future__ import annotations

import wave
from math import gcd
from pathlib import Path

import numpy as np

from headscope.errors import HeadscopeError

SAMPLE_RATE = 16000
DATA_DIR = Path(__file__).parent / "data"
WHISPER_POSITION_S = 0.02  # audio one Whisper encoder position covers: 10 ms mel frames, a stride-2 convolution
_PCM_DTYPES = {1: np.dtype("u1"), 2: np.dtype("<i2"), 4: np.dtype("<i4")}


def load_speech() -> tuple[np.ndarray, int, str]:
    """Return the shipped clip as ``(waveform, sample_rate, transcript)``.

    The waveform is float32 in [-1, 1] at 16 kHz; the transcript is the sentence text that was spoken.
    """
    waveform = read_wav(DATA_DIR / "speech.wav", target_rate=SAMPLE_RATE)
    transcript = (DATA_DIR / "speech.txt").read_text(encoding="utf-8").strip()
    return waveform, SAMPLE_RATE, transcript


def speech_input(input_path: str | None) -> tuple[np.ndarray, int, str]:
    """The speech an audio model reads: the user's WAV at ``input_path`` (resampled to 16 kHz), else the shipped
    clip; as ``(waveform, sample_rate, description)``."""
    if input_path is None:
        waveform, rate, _ = load_speech()
        return waveform, rate, "shipped speech clip (probes/data/speech.wav)"
    if Path(input_path).suffix.lower() != ".wav":
        raise HeadscopeError(f"{input_path} is not a .wav file: Whisper models take 16-bit PCM WAV audio")
    return read_wav(Path(input_path)), SAMPLE_RATE, f"user audio ({Path(input_path).name})"


def read_wav(path: Path, target_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read an integer-PCM WAV file as a mono float32 waveform in [-1, 1] at ``target_rate`` Hz.

    Channels are averaged; other sample rates are resampled with a polyphase anti-aliasing filter (and
    the rare filter overshoot past full scale is clipped).
    Raises HeadscopeError if the file is missing, not a PCM WAV, or uses an unsupported sample width.
    """
    path = Path(path)
    frames, rate = _read_pcm(path)
    mono = frames.mean(axis=1, dtype=np.float64)
    return np.clip(_resample(mono, rate, target_rate), -1.0, 1.0).astype(np.float32)


def _read_pcm(path: Path) -> tuple[np.ndarray, int]:
    """Return the file's samples as a (frames, channels) float64 array in [-1, 1], and its sample rate."""
    try:
        with wave.open(str(path), "rb") as reader:
            width, channels, rate = reader.getsampwidth(), reader.getnchannels(), reader.getframerate()
            raw = reader.readframes(reader.getnframes())
    except (OSError, EOFError, wave.Error) as error:
        raise HeadscopeError(
            f"cannot read {path} as a PCM WAV file ({error}); convert it, e.g. `sox in.ext -b 16 out.wav`."
        ) from error
    if width not in _PCM_DTYPES:
        raise HeadscopeError(f"{path} uses {8 * width}-bit samples; convert it to 16-bit PCM WAV.")
    samples = np.frombuffer(raw, dtype=_PCM_DTYPES[width]).astype(np.float64)
    if width == 1:  # 8-bit WAV is unsigned, centred on 128
        samples -= 128.0
    samples /= float(2 ** (8 * width - 1))
    return samples.reshape(-1, channels), rate


def _resample(waveform: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Resample ``waveform`` from ``rate`` to ``target_rate`` Hz (polyphase FIR, exact rational ratio)."""
    if rate == target_rate:
        return waveform
    from scipy.signal import resample_poly

    common = gcd(rate, target_rate)
    return resample_poly(waveform, target_rate // common, rate // common)


def frame_reasons(waveform: np.ndarray, rate: int, positions: int, seconds_per_position: float = WHISPER_POSITION_S,
                  silence_db: float = 40.0) -> list[str]:
    """Why each audio encoder position is non-content ("" for speech): ``"padding"`` where it starts at or after
    the end of the clip (Whisper pads every clip to 30 s), ``"silence"`` where the clip's RMS over the position's
    window lies more than ``silence_db`` dB below its loudest window (``silence_db <= 0``: no silence test).

    ``seconds_per_position`` is the audio an encoder position covers: 20 ms for Whisper (10 ms mel frames, then
    a stride-2 convolution).
    """
    width = round(seconds_per_position * rate)
    spoken = min(positions, -(-len(waveform) // width))  # positions that hold some of the clip
    reasons = ["padding"] * positions
    if spoken == 0:
        return reasons
    padded = np.zeros(spoken * width, dtype=np.float64)
    padded[: len(waveform)] = waveform[: spoken * width]
    rms = np.sqrt(np.mean(padded.reshape(spoken, width) ** 2, axis=1))
    floor = rms.max() * 10 ** (-silence_db / 20) if silence_db > 0 else 0.0
    for position in range(spoken):
        reasons[position] = "silence" if rms[position] < floor else ""
    return reasons
