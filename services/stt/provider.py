"""The STT provider interface: one utterance's frames in, transcripts out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import msgspec

from proto.events import INGRESS_RATE

SAMPLE_RATE = INGRESS_RATE  # what ingress publishes


class SttResult(msgspec.Struct, frozen=True):
    text: str
    final: bool = False
    confidence: float = 0.0


class SttProvider(Protocol):
    name: str

    def stream(self, frames: AsyncIterator[bytes]) -> AsyncIterator[SttResult]:
        """Transcribe one utterance of 16 kHz mono s16le frames.

        Yields partial results while frames arrive and exactly one final result after the
        frame iterator ends (the end of speech). Raises only ``ProviderError``.
        """
        ...

    async def aclose(self) -> None: ...


PROVIDERS = {
    "pocketsphinx": "services.stt.providers.pocketsphinx:PocketSphinxStt",
    "whisper": "services.stt.providers.whisper:WhisperCppStt",
    "deepgram": "services.stt.providers.deepgram:DeepgramStt",
    "openai": "services.stt.providers.openai:OpenAIStt",
    "sarvam": "services.stt.providers.sarvam:SarvamStt",
    # Capacity planning only (voicebus bench pipeline --providers instant): the same words always.
    "instant": "services.stt.providers.instant:InstantStt",
}
