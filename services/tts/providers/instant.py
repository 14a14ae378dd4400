"""A capacity-planning TTS: a fixed tone for each chunk of text, made at once.

``voicebus bench pipeline --providers instant`` uses it so the CPU goes to the system, not to
a voice model. The tone lasts ``ms_per_word`` per word (at least one word), so a reply still
plays for about as long as speech would, and egress paces it like any other audio.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import numpy as np

from services.tts.config import TtsConfig
from services.tts.provider import SpokenAudio
from services.tts.providers._common import speakable


class InstantTts:
    name = "instant"
    sample_rate = 16000

    def __init__(self, ms_per_word: int = 250) -> None:
        self.ms_per_word = ms_per_word
        t = np.arange(self.sample_rate * ms_per_word // 1000) / self.sample_rate
        # A quiet 220 Hz tone, faded in and out so words do not click against each other.
        fade = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.01)
        self.word = (0.1 * 32767 * np.sin(2 * math.pi * 220 * t) * fade).astype("<i2").tobytes()

    @classmethod
    def from_config(cls, cfg: TtsConfig) -> InstantTts:
        return cls(cfg.tts_instant_ms_per_word)

    async def synthesize(self, chunks: AsyncIterator[str]) -> AsyncIterator[SpokenAudio]:
        index = -1
        async for text in chunks:
            index += 1  # counts skipped chunks too: indices match the caller's chunk list
            if speakable(text):
                yield SpokenAudio(self.word * max(1, len(text.split())), chunk=index)

    async def aclose(self) -> None:
        return None
