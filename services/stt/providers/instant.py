"""A capacity-planning STT: it hears the same words in every utterance, at once.

``voicebus bench pipeline --providers instant`` uses it so the CPU goes to the system (the bus,
the VAD, the stages' own work), not to a model: what it measures is how many sessions the
stages themselves carry. Never a default: a user would be answered the same words whatever
they said. ``VOICEBUS_STT_INSTANT_TEXT`` sets the words (a question by default, so the
end-of-turn rule answers without a hold).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from services.stt.config import SttConfig
from services.stt.provider import SAMPLE_RATE, SttResult, WantPartials

BYTES_PER_MS = SAMPLE_RATE * 2 // 1000


class InstantStt:
    name = "instant"

    def __init__(self, text: str = "What time is it?", partial_interval_ms: int = 200) -> None:
        self.words = text.split()
        self.partial_bytes = max(1, partial_interval_ms) * BYTES_PER_MS

    @classmethod
    def from_config(cls, cfg: SttConfig) -> InstantStt:
        return cls(cfg.stt_instant_text, cfg.stt_partial_interval_ms)

    async def stream(self, frames: AsyncIterator[bytes], *,
                     partials: WantPartials = None) -> AsyncIterator[SttResult]:
        """A partial every ``partial_interval_ms`` of audio with one more of the words (so
        barge-in sees speech as with a real recogniser), then all of them as the final."""
        heard = since = 0
        async for pcm in frames:
            since += len(pcm)
            if since >= self.partial_bytes:
                since = 0
                heard = min(heard + 1, len(self.words))
                yield SttResult(" ".join(self.words[:heard]))
        yield SttResult(" ".join(self.words), final=True, confidence=1.0)

    async def aclose(self) -> None:
        return None
