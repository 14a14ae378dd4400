"""Ingress audio plumbing: WAV reading, resampling, framing, pacing (no NATS, no real time)."""

from __future__ import annotations

import asyncio
import struct
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from services.ingress.audio import (
    FRAME_BYTES,
    FRAME_MS,
    SAMPLE_RATE,
    AudioFormatError,
    Framer,
    Resampler,
    paced,
    read_wav,
    to_frames,
    wav_frames,
)


def tone(rate: int, seconds: float, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def write_wav(path: Path, samples: np.ndarray, rate: int, channels: int = 1,
              width: int = 2) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(width)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())
    return path


def peak_hz(pcm: bytes, rate: int = SAMPLE_RATE) -> float:
    x = np.frombuffer(pcm, np.int16).astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


# ---- resampling ----------------------------------------------------------------------------


async def test_wav_22050_stereo_becomes_16k_mono_frames(tmp_path: Path) -> None:
    left = tone(22050, 1.0)
    right = (left // 2).astype(np.int16)  # different levels: the downmix must not cancel them
    stereo = np.stack([left, right], axis=1).reshape(-1)
    path = write_wav(tmp_path / "tone.wav", stereo, 22050, channels=2)

    frames = [frame async for frame in wav_frames(path)]

    assert all(len(f) == FRAME_BYTES for f in frames)
    assert abs(len(frames) - 1000 // FRAME_MS) <= 1  # duration kept within one frame
    pcm = b"".join(frames)
    assert abs(peak_hz(pcm) - 440) <= 2
    # Zero crossings agree: 880 per second for 440 Hz.
    x = np.frombuffer(pcm, np.int16)[800:-800]  # skip filter edges
    crossings = np.count_nonzero(np.diff(np.signbit(x).astype(np.int8)))
    assert abs(crossings / (len(x) / SAMPLE_RATE) - 880) < 10
    # Downmix averages: amplitude ~ (0.5 + 0.25) / 2 of full scale.
    assert abs(np.abs(x).max() / 32767 - 0.375) < 0.02


def test_resampler_streaming_equals_one_shot_length() -> None:
    pcm = tone(22050, 0.5).tobytes()
    one = Resampler(22050, 1)
    whole = one.process(pcm) + one.flush()
    streamed = Resampler(22050, 1)
    out = bytearray()
    for i in range(0, len(pcm), 2 * 301):  # awkward chunk sizes, whole samples
        out += streamed.process(pcm[i:i + 2 * 301])
    out += streamed.flush()
    assert len(out) == len(whole)
    assert abs(len(whole) // 2 - 8000) <= 2


def test_resampler_passthrough_and_downmix_at_16k() -> None:
    pcm = tone(SAMPLE_RATE, 0.1).tobytes()
    mono = Resampler(SAMPLE_RATE, 1)
    assert mono.passthrough
    assert mono.process(pcm) == pcm
    assert mono.flush() == b""

    stereo = np.array([1000, 3000, -2000, -4000, 32767, 32767], np.int16).tobytes()
    down = Resampler(SAMPLE_RATE, 2)
    assert np.frombuffer(down.process(stereo), np.int16).tolist() == [2000, -3000, 32767]


@pytest.mark.parametrize(("channels", "nbytes"), [(1, 3), (2, 2), (2, 6)])
def test_resampler_rejects_partial_sample_frames(channels: int, nbytes: int) -> None:
    with pytest.raises(AudioFormatError, match="whole number"):
        Resampler(22050, channels).process(bytes(nbytes))


def test_resampler_rejects_nonsense_format() -> None:
    with pytest.raises(AudioFormatError):
        Resampler(0, 1)


# ---- reading WAV files ---------------------------------------------------------------------


def test_read_wav_returns_pcm_rate_channels(tmp_path: Path) -> None:
    samples = tone(8000, 0.05)
    pcm, rate, channels = read_wav(write_wav(tmp_path / "a.wav", samples, 8000))
    assert (pcm, rate, channels) == (samples.tobytes(), 8000, 1)


@pytest.mark.parametrize("width", [1, 3, 4])
def test_read_wav_rejects_other_sample_widths(tmp_path: Path, width: int) -> None:
    path = write_wav(tmp_path / "w.wav", np.zeros(160 * width, np.uint8), 16000, width=width)
    with pytest.raises(AudioFormatError, match=f"{8 * width}-bit"):
        read_wav(path)


def test_read_wav_rejects_float_wav(tmp_path: Path) -> None:
    data = np.zeros(160, np.float32).tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, 16000, 64000, 4, 32)  # format tag 3: IEEE float
    riff = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"data" + struct.pack("<I", len(data)) + data)
    path = tmp_path / "float.wav"
    path.write_bytes(b"RIFF" + struct.pack("<I", len(riff)) + riff)
    with pytest.raises(AudioFormatError, match="16-bit PCM"):
        read_wav(path)


@pytest.mark.parametrize("content", [b"", b"not a wav file at all", b"RIFF\x00\x00"])
def test_read_wav_rejects_garbage(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.wav"
    path.write_bytes(content)
    with pytest.raises(AudioFormatError):
        read_wav(path)


async def test_wav_frames_raises_format_error(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "8bit.wav", np.zeros(100, np.uint8), 8000, width=1)
    with pytest.raises(AudioFormatError):
        _ = [f async for f in wav_frames(path)]


# ---- framing -------------------------------------------------------------------------------


def test_framer_cuts_exact_frames_and_pads_the_rest() -> None:
    data = bytes(range(256)) * 10  # 2560 bytes = 4 frames exactly
    framer = Framer()
    frames: list[bytes] = []
    for size in (1, 639, 700, 2, 578, 640):
        chunk, data = data[:size], data[size:]
        frames += framer.push(chunk)
    frames += framer.push(data)
    assert [len(f) for f in frames] == [FRAME_BYTES] * 4
    assert b"".join(frames) == (bytes(range(256)) * 10)[:2560]
    assert framer.flush() is None

    assert framer.push(b"\x01\x02\x03") == []
    assert framer.flush() == b"\x01\x02\x03" + bytes(FRAME_BYTES - 3)
    assert framer.flush() is None


async def test_to_frames_pads_the_last_frame() -> None:
    async def source() -> AsyncIterator[bytes]:
        yield bytes(1000)
        yield b"\x01\x00" * 100  # 1200 bytes in all: one whole frame and a padded one

    frames = [f async for f in to_frames(source(), SAMPLE_RATE, 1)]
    assert len(frames) == 2
    assert frames[1] == bytes(360) + b"\x01\x00" * 100 + bytes(80)


# ---- pacing --------------------------------------------------------------------------------


class FakeTime:
    """A clock that only moves when the code under test sleeps (plus scripted lateness)."""

    def __init__(self, overshoot: float = 0.0) -> None:
        self.now = 100.0
        self.overshoot = overshoot
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.now += delay + self.overshoot
        await asyncio.sleep(0)


async def numbered(n: int) -> AsyncIterator[bytes]:
    for i in range(n):
        yield i.to_bytes(2, "little")


async def test_paced_keeps_schedule_without_drift() -> None:
    # Every sleep overshoots by 3 ms and the consumer works 5 ms per frame: a naive
    # "sleep(frame_ms) after each frame" would drift by 8 ms per frame.
    fake = FakeTime(overshoot=0.003)
    times: list[float] = []
    async for frame in paced(numbered(200), clock=fake.clock, sleep=fake.sleep):
        times.append(fake.now - 100.0)
        fake.now += 0.005
    assert len(times) == 200
    for n, t in enumerate(times):
        assert n * 0.020 - 1e-9 <= t <= n * 0.020 + 0.003 + 1e-9


async def test_paced_catches_up_without_sleeping_when_late() -> None:
    fake = FakeTime()
    times: list[float] = []
    async for frame in paced(numbered(10), clock=fake.clock, sleep=fake.sleep):
        n = int.from_bytes(frame, "little")
        times.append(round(fake.now - 100.0, 6))
        if n == 2:
            fake.now += 0.100  # the consumer stalls for 100 ms
    # Frames 3..6 are already due when asked for: out at once, then back on the grid.
    assert times == [0.0, 0.02, 0.04, 0.14, 0.14, 0.14, 0.14, 0.14, 0.16, 0.18]
    assert all(delay > 0 for delay in fake.sleeps)
