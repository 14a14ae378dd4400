"""Audio plumbing of ingress: WAV in, 16 kHz mono s16le 20 ms frames out, optional real-time pacing.

Pure library code (no NATS) so every piece is testable on its own: ``read_wav`` → ``Resampler``
→ ``Framer`` → ``paced``. ``wav_frames`` and ``to_frames`` glue them together without pacing, so
a file can also be converted as fast as the CPU allows (tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import time
import wave
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from os import PathLike

import numpy as np

from proto.events import FRAME_MS, INGRESS_RATE
from services.runtime.audio import frame_bytes
from services.runtime.resample import StreamResampler

SAMPLE_RATE = INGRESS_RATE
FRAME_BYTES = frame_bytes(SAMPLE_RATE)  # 640: s16le mono
# wav_frames hands the resampler this much input at a time (whole sample frames), so a long file
# never becomes one huge resampling call.
_READ_MS = 200


class AudioFormatError(ValueError):
    """Audio we cannot take: not 16-bit PCM, or bytes that are not whole sample frames."""


def read_wav(path: str | PathLike[str]) -> tuple[bytes, int, int]:
    """Return ``(pcm, sample_rate, channels)`` of a 16-bit PCM WAV file (s16le, interleaved)."""
    try:
        with wave.open(str(path), "rb") as wav:
            width, rate, channels = wav.getsampwidth(), wav.getframerate(), wav.getnchannels()
            if width != 2:
                raise AudioFormatError(
                    f"{path}: {8 * width}-bit samples; only 16-bit PCM WAV is accepted")
            pcm = wav.readframes(wav.getnframes())
    except wave.Error as exc:
        # Python's wave reads only integer PCM: float, A-law, µ-law, ADPCM… land here
        # ("unknown format: 3").
        raise AudioFormatError(
            f"{path}: not a PCM WAV file ({exc}); only uncompressed 16-bit PCM is accepted"
        ) from None
    except EOFError:
        raise AudioFormatError(f"{path}: truncated or empty WAV file") from None
    if rate <= 0 or channels <= 0:
        raise AudioFormatError(f"{path}: invalid header ({rate} Hz, {channels} channels)")
    return pcm, rate, channels


class Resampler:
    """Streaming s16le interleaved PCM at any rate/channel count → 16 kHz mono s16le.

    Channels are averaged before resampling (less work). The resampler keeps its filter state
    across calls, so chunk boundaries leave no clicks, and gives each chunk's output at once
    (services/runtime/resample.py: no block of 40-100 ms held back, as soxr's streaming mode
    does); ``flush`` ends a stream and readies the resampler for a new one.
    """

    def __init__(self, in_rate: int, in_channels: int) -> None:
        if in_rate <= 0 or in_channels <= 0:
            raise AudioFormatError(f"invalid input format: {in_rate} Hz, {in_channels} channels")
        self.in_rate = in_rate
        self.in_channels = in_channels
        self._frame_bytes = 2 * in_channels
        self._stream: StreamResampler | None = None
        if in_rate != SAMPLE_RATE:
            self._stream = StreamResampler(in_rate, SAMPLE_RATE)

    @property
    def passthrough(self) -> bool:
        return self._stream is None and self.in_channels == 1

    def process(self, pcm: bytes) -> bytes:
        if len(pcm) % self._frame_bytes:
            raise AudioFormatError(
                f"{len(pcm)} bytes is not a whole number of {self.in_channels}-channel "
                "16-bit sample frames")
        if self.passthrough:
            return bytes(pcm)
        mono = self._downmix(np.frombuffer(pcm, dtype=np.int16))
        if self._stream is None:
            return mono.tobytes()
        return self._stream.process(mono)

    def flush(self) -> bytes:
        if self._stream is None:
            return b""
        return self._stream.flush()

    def _downmix(self, samples: np.ndarray) -> np.ndarray:
        if self.in_channels == 1:
            return samples
        frames = samples.reshape(-1, self.in_channels)
        # Sum in int32 so loud channels cannot wrap; the mean always fits back in int16.
        return (frames.sum(axis=1, dtype=np.int32) // self.in_channels).astype(np.int16)


class Framer:
    """Cuts a byte stream into exact frames; ``flush`` zero-pads the remainder."""

    def __init__(self, frame_bytes: int = FRAME_BYTES) -> None:
        if frame_bytes <= 0:
            raise ValueError("frame_bytes must be positive")
        self.frame_bytes = frame_bytes
        self._buf = bytearray()

    def push(self, pcm: bytes) -> list[bytes]:
        size = self.frame_bytes
        if not self._buf and len(pcm) == size:
            return [bytes(pcm)]  # the common case (already framed audio): no copy into _buf
        self._buf += pcm
        whole = len(self._buf) - len(self._buf) % size
        if not whole:
            return []
        frames = [bytes(self._buf[i:i + size]) for i in range(0, whole, size)]
        del self._buf[:whole]
        return frames

    def flush(self) -> bytes | None:
        if not self._buf:
            return None
        frame = bytes(self._buf) + bytes(self.frame_bytes - len(self._buf))
        self._buf.clear()
        return frame


async def to_frames(source: AsyncIterable[bytes], rate: int,
                    channels: int) -> AsyncIterator[bytes]:
    """16 kHz mono 20 ms frames from a stream of s16le chunks (each a whole number of sample
    frames); the last frame is zero-padded. No pacing."""
    resampler = Resampler(rate, channels)
    framer = Framer()
    async for chunk in source:
        for frame in framer.push(resampler.process(chunk)):
            yield frame
    for frame in framer.push(resampler.flush()):
        yield frame
    last = framer.flush()
    if last is not None:
        yield last


async def wav_frames(path: str | PathLike[str]) -> AsyncIterator[bytes]:
    """16 kHz mono 20 ms frames of a 16-bit PCM WAV file, as fast as they can be made."""
    pcm, rate, channels = await asyncio.to_thread(read_wav, path)
    step = max(1, rate * _READ_MS // 1000) * 2 * channels

    async def chunks() -> AsyncIterator[bytes]:
        view = memoryview(pcm)
        for i in range(0, len(pcm), step):
            yield view[i:i + step]  # type: ignore[misc]  # bytes-like is all soxr/numpy need

    async for frame in to_frames(chunks(), rate, channels):
        yield frame


async def paced(frames: AsyncIterable[bytes], frame_ms: int = FRAME_MS,
                clock: Callable[[], float] = time.monotonic,
                sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
                ) -> AsyncIterator[bytes]:
    """Yield ``frames`` in real time: frame n at ``start + n * frame_ms``.

    Deadlines come from the start time, never from the previous wake-up, so sleep overshoot and
    consumer work do not accumulate into drift. A frame that is already late goes out at once
    (the schedule then catches up rather than shifting everything later).
    """
    period = frame_ms / 1000
    start: float | None = None
    n = 0
    async for frame in frames:
        now = clock()
        if start is None:
            start = now
        delay = start + n * period - now
        if delay > 0:
            await sleep(delay)
        yield frame
        n += 1
