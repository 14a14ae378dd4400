"""The STT provider interface: one utterance's frames in, transcripts out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Protocol

import msgspec

from proto.events import INGRESS_RATE

SAMPLE_RATE = INGRESS_RATE  # what ingress publishes


class SttResult(msgspec.Struct, frozen=True):
    """A partial, or the utterance's one final. ``stable`` (a partial): the words the final
    will have if the speech ends now; a provider that knows them early says so, and the agent
    starts preparing its answer before the end of speech is certain."""

    text: str
    final: bool = False
    confidence: float = 0.0
    stable: bool = False


# Whether the stage wants partials now (None: always). Asked before each partial a provider
# would pay for: Whisper decodes the whole utterance again for each, and while the agent only
# listens nobody reads them (docs/turn-taking.md, "Partials"); a streaming provider, whose
# partials come for free, may ignore it.
WantPartials = Callable[[], bool] | None


class SttProvider(Protocol):
    name: str

    def stream(self, frames: AsyncIterator[bytes], *,
               partials: WantPartials = None) -> AsyncIterator[SttResult]:
        """Transcribe one utterance of 16 kHz mono s16le frames.

        Yields partial results while frames arrive and exactly one final result after the
        frame iterator ends (the end of speech). A ``stable`` partial promises nothing: speech
        that goes on changes the words. Raises only ``ProviderError``.
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
