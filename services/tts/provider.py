"""The TTS provider interface: text chunks in, PCM out at the provider's native rate."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import msgspec


class SpokenAudio(msgspec.Struct, frozen=True):
    """Mono s16le PCM that speaks (part of) input chunk number ``chunk``."""

    pcm: bytes
    chunk: int


class TtsProvider(Protocol):
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
}
