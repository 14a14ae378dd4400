"""OpenAI transcription (``gpt-4o-mini-transcribe``, ``whisper-1``…) through the ``openai`` SDK.

The endpoint takes a whole file, so this provider is batch per utterance: frames are buffered
until the end of speech, wrapped as a WAV in memory and sent in one request. No partials; the
user's wait is that one request. Works with any OpenAI-compatible server (``OPENAI_BASE_URL``).
The SDK's own retries are off, as for the LLM: retrying is the fallback chain's decision.
"""

from __future__ import annotations

import io
import logging
import wave
from collections.abc import AsyncIterator

import openai

from services.runtime.config import require_key
from services.runtime.errors import ProviderError
from services.runtime.openai_api import OpenAIConfig, make_client, map_openai_error
from services.stt.config import SttConfig
from services.stt.provider import SAMPLE_RATE, SttResult, WantPartials

log = logging.getLogger(__name__)

# The API refuses audio shorter than 0.1 s; there is nothing to transcribe in it anyway.
MIN_AUDIO_BYTES = SAMPLE_RATE * 2 // 10


class OpenAISttConfig(OpenAIConfig, frozen=True, kw_only=True):
    openai_stt_model: str = "gpt-4o-mini-transcribe"
    # Seconds for the whole request (upload, transcription, answer).
    openai_stt_timeout: float = 15.0


class OpenAIStt:
    name = "openai"

    def __init__(self, client: openai.AsyncOpenAI, *, model: str, language: str | None) -> None:
        self._client = client
        self.model = model
        self.language = language

    @classmethod
    def from_config(cls, cfg: SttConfig) -> OpenAIStt:
        own = OpenAISttConfig.from_env()
        require_key(own.openai_api_key, provider=cls.name, stage="stt",
                    variable="OPENAI_API_KEY")
        client = make_client(own.openai_api_key, own.openai_base_url, own.openai_stt_timeout)
        provider = cls(client, model=own.openai_stt_model, language=_iso639(cfg.stt_language))
        log.info("openai STT at %s, model %s", client.base_url, provider.model,
                 extra={"stage": "stt", "provider": cls.name})
        return provider

    async def stream(self, frames: AsyncIterator[bytes], *,
                     partials: WantPartials = None) -> AsyncIterator[SttResult]:
        """One final once ``frames`` has ended. An error raised by ``frames`` itself is the
        caller's and passes through unchanged."""
        pcm = bytearray()
        async for frame in frames:
            pcm += frame
        if len(pcm) < MIN_AUDIO_BYTES:
            yield SttResult("", final=True)
            return
        text = await self._transcribe(bytes(pcm))
        yield SttResult(text, final=True)

    async def _transcribe(self, pcm: bytes) -> str:
        options = {"language": self.language} if self.language else {}
        try:
            # Cancelling this await (an early close, a cancelled turn) closes the request.
            result = await self._client.audio.transcriptions.create(
                file=("utterance.wav", _wav(pcm), "audio/wav"), model=self.model,
                response_format="json", **options,
            )
        except Exception as exc:
            raise self._map_error(exc) from exc
        text = getattr(result, "text", None)
        if not isinstance(text, str):
            raise ProviderError("transcription response has no text", provider=self.name)
        return text.strip()

    async def aclose(self) -> None:
        await self._client.close()

    def _map_error(self, exc: Exception) -> ProviderError:
        return map_openai_error(exc, provider=self.name, client=self._client)


def _wav(pcm: bytes) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes(pcm)
    return out.getvalue()


def _iso639(language: str) -> str | None:
    # The API takes ISO-639-1 ("en"); anything else (e.g. "multi") means "detect it".
    primary = language.partition("-")[0].lower()
    return primary if len(primary) == 2 and primary.isalpha() else None
