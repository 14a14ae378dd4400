"""Smart Turn v3.2, an audio model of whether a speaker has finished their turn, for
``voicebus bench turns --smart-turn`` (docs/benchmarks.md, "An audio end-of-turn model").

Pipecat's Smart Turn (BSD-2-Clause; a Whisper-tiny encoder with a classifier, as ONNX) hears the
last 8 s of the speaker's audio and says how likely it is that they are done, from the voice
alone: a falling tone and a closed phrase against a rising or held tone. Its weights reach PyPI
only inside the ``pipecat-ai`` wheel. ``fetch`` takes that one file out of it (``pip download
--no-deps``, checked by its SHA-256) into the cache the first time, so nothing else of Pipecat
or its dependencies is installed.

The model reads Whisper's log-mel features: 16 kHz audio normalised to zero mean and unit
variance, padded with zeros in front to 8 s; 25 ms periodic Hann windows every 10 ms; 80 mel
bands on Slaney's scale up to 8 kHz, each of unit area; log10, floored 8 below the peak, then
(x + 4) / 4.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
WINDOW_S = 8
N_FFT = 400
HOP = 160
N_MELS = 80
WHEEL = "pipecat-ai==1.14.0"
MEMBER = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"
FILE = "smart-turn-v3.2-cpu.onnx"
SHA256 = "2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f"


def _slaney_mel(hz: np.ndarray) -> np.ndarray:
    """Hertz to Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), log above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz * 3.0 / 200.0
    log = 15.0 + np.log(np.maximum(hz, 1e-9) / 1000.0) * (27.0 / np.log(6.4))
    return np.where(hz < 1000.0, linear, log)


def _slaney_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel < 15.0, mel * 200.0 / 3.0,
                    1000.0 * np.exp((mel - 15.0) * (np.log(6.4) / 27.0)))


def mel_filters() -> np.ndarray:
    """(N_MELS, N_FFT // 2 + 1): triangles evenly spaced in mels from 0 to 8 kHz, each scaled
    to unit area (2 / its width in Hz)."""
    edges = _slaney_hz(np.linspace(0.0, _slaney_mel(SAMPLE_RATE / 2), N_MELS + 2))
    bins = np.linspace(0.0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    low, centre, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None, :] - low) / (centre - low)
    falling = (high - bins[None, :]) / (high - centre)
    triangles = np.clip(np.minimum(rising, falling), 0.0, None)
    return triangles * (2.0 / (high - low))


_FILTERS = mel_filters()
_HANN = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic


def features(pcm: bytes) -> np.ndarray:
    """The model's input (1, N_MELS, 800) for the last 8 s of 16 kHz s16le ``pcm``."""
    samples = SAMPLE_RATE * WINDOW_S
    audio = np.frombuffer(pcm, dtype="<i2")[-samples:].astype(np.float32) / 32768.0
    audio = np.concatenate([np.zeros(samples - audio.size, np.float32), audio])
    audio = (audio - audio.mean()) / np.sqrt(audio.var() + 1e-7)
    padded = np.pad(audio.astype(np.float64), N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][:-1]
    power = np.abs(np.fft.rfft(frames * _HANN, axis=-1)) ** 2
    log = np.log10(np.maximum(_FILTERS @ power.T, 1e-10))
    log = np.maximum(log, log.max() - 8.0)
    return ((log + 4.0) / 4.0).astype(np.float32)[None]


class SmartTurn:
    """One loaded model. ``complete`` blocks: ~45 ms a call on this 2-core machine."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Pool threads stop at each run's end instead of spinning on (docs/benchmarks.md,
        # "What the models' threads burn…").
        options.add_session_config_entry("session.force_spinning_stop", "1")
        self.session = ort.InferenceSession(str(path), sess_options=options,
                                            providers=["CPUExecutionProvider"])

    def complete(self, pcm: bytes) -> float:
        """How likely (0–1) the speaker of ``pcm`` (the turn so far, newest last) is done."""
        (out,) = self.session.run(None, {"input_features": features(pcm)})
        return float(np.asarray(out).reshape(-1)[0])


def model_path(cache: Path) -> Path:
    return cache.expanduser() / FILE


def pip_download(folder: Path) -> Path:
    """The ``pipecat-ai`` wheel, downloaded from the package index into ``folder``."""
    pip = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                          "--only-binary=:all:", "--dest", str(folder), WHEEL],
                         capture_output=True, text=True)
    if pip.returncode:
        raise RuntimeError(f"Smart Turn's weights: pip could not download {WHEEL}: "
                           f"{pip.stderr.strip()[-500:]}")
    (wheel,) = folder.glob("*.whl")
    return wheel


def fetch(cache: Path, download: Callable[[Path], Path] = pip_download) -> Path:
    """The model in ``cache``, taken out of the ``pipecat-ai`` wheel the first time."""
    out = model_path(cache)
    if out.exists() and _sha256(out.read_bytes()) == SHA256:
        return out
    with tempfile.TemporaryDirectory(prefix="voicebus-smart-turn-") as folder:
        with zipfile.ZipFile(download(Path(folder))) as archive:
            data = archive.read(MEMBER)
    if (digest := _sha256(data)) != SHA256:
        raise RuntimeError(f"Smart Turn's weights: {WHEEL}'s {FILE} has SHA-256 {digest}, "
                           f"not {SHA256}")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(f".{os.getpid()}.part")
    partial.write_bytes(data)
    partial.replace(out)  # atomic: a bench starting meanwhile reads a whole file or none
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


if __name__ == "__main__":  # python -m voicebus.bench.smart_turn [cache]: fetch it now
    print(fetch(Path(sys.argv[1] if len(sys.argv) > 1 else "~/.cache/voicebus")))
