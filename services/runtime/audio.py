"""What a valid audio frame on the bus looks like (the contract's rule, checked by consumers)."""

from __future__ import annotations

from proto.events import FRAME_MS, AudioFrame


def frame_bytes(sample_rate: int) -> int:
    """Size of one 20 ms s16le mono frame at ``sample_rate``."""
    return sample_rate * FRAME_MS // 1000 * 2


def frame_problem(frame: AudioFrame, sample_rate: int | None = None) -> str | None:
    """Why ``frame`` is not a valid bus frame (at ``sample_rate``, if one is required)."""
    if sample_rate is not None and frame.sample_rate != sample_rate:
        return f"{frame.sample_rate} Hz where {sample_rate} Hz is due"
    if not 8000 <= frame.sample_rate <= 48000 or frame.channels != 1:
        return f"{frame.sample_rate} Hz x{frame.channels}: not mono 8-48 kHz"
    if len(frame.pcm) != frame_bytes(frame.sample_rate):
        return f"{len(frame.pcm)} bytes is not 20 ms at {frame.sample_rate} Hz"
    return None
