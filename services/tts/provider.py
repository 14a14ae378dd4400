"""The TTS provider interface: text chunks in, PCM out at the provider's native rate."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Protocol

import msgspec

from proto import events as ev


class SpokenAudio(msgspec.Struct, frozen=True):
    """Mono s16le PCM that speaks (part of) input chunk number ``chunk``."""

    pcm: bytes
    chunk: int


class WordTiming(msgspec.Struct, frozen=True):
    """One spoken word, in seconds from the start of the turn's audio (its ``pts_ms`` clock)."""

    word: str
    start: float
    end: float


class TtsProvider(Protocol):
    """A provider whose class sets ``word_timestamps = True`` also takes ``words=``, a list it
    appends a ``WordTiming`` to for every word it speaks."""

    name: str
    sample_rate: int

    def synthesize(self, chunks: AsyncIterator[str]) -> AsyncIterator[SpokenAudio]:
        """Speak each text chunk in order, yielding audio as soon as it exists. Closing the
        iterator early must stop synthesis. Raises only ``ProviderError``."""
        ...

    async def aclose(self) -> None: ...


PROVIDERS = {
    "piper": "services.tts.providers.piper:PiperTts",
    "cartesia": "services.tts.providers.cartesia:CartesiaTts",
    "openai": "services.tts.providers.openai:OpenAITts",
    "deepgram": "services.tts.providers.deepgram:DeepgramTts",
    "elevenlabs": "services.tts.providers.elevenlabs:ElevenLabsTts",
    "sarvam": "services.tts.providers.sarvam:SarvamTts",
    # Capacity planning only (voicebus bench pipeline --providers instant): a tone, at once.
    "instant": "services.tts.providers.instant:InstantTts",
}


def word_marks(text: str, words: list[WordTiming]) -> list[ev.WordMark]:
    """Place timed words in the reply ``text``: each is looked for as a whole word after the one
    before it. A word the provider spoke differently from the text (a number read out, a
    markdown mark dropped) is skipped, so the marks never claim more of the text than was said.
    """
    marks: list[ev.WordMark] = []
    cursor, end_ms = 0, 0
    for timing in words:
        token = timing.word.strip()
        if not token:
            continue
        found = re.compile(rf"(?<!\w){re.escape(token)}(?!\w)", re.IGNORECASE).search(text, cursor)
        if found is None:
            continue
        cursor = found.end()
        end_ms = max(end_ms, round(timing.end * 1000))
        marks.append(ev.WordMark(end_ms=end_ms, text_end=cursor))
    return marks

