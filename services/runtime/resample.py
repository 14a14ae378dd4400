"""Resampling for audio that streams: a microphone, a call, the agent's track.

libsamplerate's ``sinc_medium`` converter (SNR ~121 dB) gives every chunk its output at once,
a few milliseconds of filter behind. soxr, which voicebus uses for whole files and for the
TTS's bursts, works in blocks when streaming: at its good qualities it holds 40-100 ms of a
20 ms-paced stream back before it gives any out (8 <-> 16 kHz: ~100 ms), which a listener
waits through at the end of every utterance and the start of every reply (docs/benchmarks.md,
"Resampling").
"""

from __future__ import annotations

import numpy as np
import samplerate


class StreamResampler:
    """Mono s16le from ``in_rate`` to ``out_rate``, chunk by chunk."""

    CONVERTER = "sinc_medium"

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.ratio = out_rate / in_rate
        self._converter = samplerate.Resampler(self.CONVERTER, channels=1)
        self._taken = self._given = 0  # samples in and out since the stream began

    def process(self, pcm: bytes | np.ndarray) -> bytes:
        samples = pcm if isinstance(pcm, np.ndarray) else np.frombuffer(pcm, dtype=np.int16)
        if not len(samples):
            return b""
        out = self._converter.process(samples.astype(np.float32) / 32768.0, self.ratio)
        self._taken += len(samples)
        self._given += len(out)
        return _to_int16(out)

    def flush(self) -> bytes:
        """What the filter still holds, once the stream ends (the whole stream's length, to the
        sample); then ready for a new stream."""
        owed = round(self._taken * self.ratio) - self._given
        parts: list[np.ndarray] = []
        # The filter gives its last samples only as more input pushes them out: silence does.
        push = np.zeros(max(64, int(owed / self.ratio) + 64), dtype=np.float32)
        while owed > 0 and sum(map(len, parts)) < owed and len(parts) < 8:
            parts.append(self._converter.process(push, self.ratio))
        self.clear()
        return _to_int16(np.concatenate(parts)[:owed]) if parts else b""

    def clear(self) -> None:
        """Forget what the filter holds (a cut: nothing of it is to be heard)."""
        self._converter.reset()
        self._taken = self._given = 0


def _to_int16(samples: np.ndarray) -> bytes:
    return np.clip(np.rint(samples * 32768.0), -32768, 32767).astype(np.int16).tobytes()
