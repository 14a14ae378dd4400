"""OpenAI text-to-speech, streamed as raw PCM, through the official ``openai`` SDK.

One ``/audio/speech`` request per text chunk with ``response_format="pcm"`` (24 kHz s16le mono),
its body passed on as it arrives. The SDK's own retries are off: whether to retry, and with which
provider, is the fallback chain's decision. Works with any OpenAI-compatible speech server
(``OPENAI_BASE_URL``, shared with the OpenAI LLM provider).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

from services.runtime.config import require_key
from services.runtime.errors import ProviderError
from services.runtime.openai_api import OpenAIConfig, make_client, map_openai_error
from services.tts.config import TtsConfig
from services.tts.providers._common import RequestPerChunk

log = logging.getLogger(__name__)

SAMPLE_RATE = 24000  # what the API's "pcm" format is


class OpenAITtsConfig(OpenAIConfig, frozen=True, kw_only=True):
    openai_tts_model: str = "gpt-4o-mini-tts"
    openai_tts_voice: str = "alloy"
    # Seconds to connect, and the longest silence before or between pieces of audio.
    tts_timeout: float = 10.0


class OpenAITts(RequestPerChunk):
    """Speaks each chunk with one request; ``RequestPerChunk`` streams the audio back."""

    name = "openai"
    sample_rate = SAMPLE_RATE

    def __init__(self, cfg: OpenAITtsConfig) -> None:
        require_key(cfg.openai_api_key, provider=self.name, stage="tts",
                    variable="OPENAI_API_KEY")
        self._cfg = cfg
        self._client = make_client(cfg.openai_api_key, cfg.openai_base_url, cfg.tts_timeout)
        log.info("openai tts: model %s, voice %s", cfg.openai_tts_model, cfg.openai_tts_voice,
                 extra={"provider": self.name})

    @classmethod
    def from_config(cls, _stage: TtsConfig) -> OpenAITts:
        return cls(OpenAITtsConfig.from_env())

    async def aclose(self) -> None:
        await self._client.close()

    def _request(self, text: str) -> AbstractAsyncContextManager[Any]:
        return self._client.audio.speech.with_streaming_response.create(
            model=self._cfg.openai_tts_model, voice=self._cfg.openai_tts_voice, input=text,
            response_format="pcm")

    def _body(self, response: Any) -> AsyncIterator[bytes]:
        return response.iter_bytes()

    def _map_error(self, exc: Exception) -> ProviderError:
        return map_openai_error(exc, provider=self.name, client=self._client)
