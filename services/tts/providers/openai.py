"""OpenAI text-to-speech, streamed as raw PCM, through the official ``openai`` SDK.

One ``/audio/speech`` request per text chunk with ``response_format="pcm"`` (24 kHz s16le mono),
its body passed on as it arrives. The SDK's own retries are off: whether to retry, and with which
provider, is the fallback chain's decision. Works with any OpenAI-compatible speech server
(``OPENAI_BASE_URL``, shared with the OpenAI LLM provider).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import ClassVar

import httpx2
import openai

from services.runtime.config import BaseConfig
from services.runtime.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ConfigError,
    ProviderError,
)
from services.tts.config import TtsConfig
from services.tts.provider import SpokenAudio

log = logging.getLogger(__name__)

SAMPLE_RATE = 24000  # what the API's "pcm" format is


class OpenAITtsConfig(BaseConfig, frozen=True, kw_only=True):
    ENV: ClassVar[dict[str, str]] = {
        "openai_api_key": "OPENAI_API_KEY",
        "openai_base_url": "OPENAI_BASE_URL",
    }
    SECRETS: ClassVar[frozenset[str]] = frozenset({"openai_api_key"})

    openai_api_key: str = ""
    openai_base_url: str = ""
    openai_tts_model: str = "gpt-4o-mini-tts"
    openai_tts_voice: str = "alloy"
    # Seconds to connect, and the longest silence before or between pieces of audio.
    tts_timeout: float = 10.0


class OpenAITts:
    name = "openai"
    sample_rate = SAMPLE_RATE

    def __init__(self, cfg: OpenAITtsConfig) -> None:
        if not cfg.openai_api_key:
            raise ConfigError("the openai TTS provider needs an API key: set OPENAI_API_KEY "
                              "(or VOICEBUS_TTS_PROVIDER=piper to run offline)")
        self._cfg = cfg
        self._client = openai.AsyncOpenAI(
            api_key=cfg.openai_api_key,
            base_url=cfg.openai_base_url or None,  # None: the SDK's default endpoint
            # Per connect/read: a body that keeps coming is fine, one that stalls fails fast.
            timeout=cfg.tts_timeout,
            max_retries=0,
        )
        log.info("openai tts: model %s, voice %s", cfg.openai_tts_model, cfg.openai_tts_voice,
                 extra={"provider": self.name})

    @classmethod
    def from_config(cls, _stage: TtsConfig) -> OpenAITts:
        return cls(OpenAITtsConfig.from_env())

    async def synthesize(self, chunks: AsyncIterator[str]) -> AsyncIterator[SpokenAudio]:
        """Audio per chunk as it streams in. An error raised by ``chunks`` passes through."""
        index = -1
        async for text in chunks:
            index += 1  # counts skipped chunks too: indices match the caller's chunk list
            if not _speakable(text):
                continue
            # Leaving this block early (closed, cancelled) closes the response, which is what
            # tells the server to stop.
            async with contextlib.AsyncExitStack() as stack:
                body = await self._open(stack, text)
                carry = _Carry()
                while (pcm := await self._next_pcm(body, carry)) is not None:
                    if pcm:
                        yield SpokenAudio(pcm, chunk=index)

    async def aclose(self) -> None:
        await self._client.close()

    async def _open(self, stack: contextlib.AsyncExitStack, text: str) -> AsyncIterator[bytes]:
        request = self._client.audio.speech.with_streaming_response.create(
            model=self._cfg.openai_tts_model, voice=self._cfg.openai_tts_voice, input=text,
            response_format="pcm")
        try:
            response = await stack.enter_async_context(request)
        except Exception as exc:
            raise self._map_error(exc) from exc
        _require_audio(response.headers.get("content-type", ""), self.name)
        return response.iter_bytes()

    async def _next_pcm(self, body: AsyncIterator[bytes], carry: _Carry) -> bytes | None:
        # Error mapping lives here, not around the ``yield``, so an exception the consumer
        # throws into the generator is never mistaken for a provider failure.
        try:
            data = await anext(body)
        except StopAsyncIteration:
            if carry.pending:
                log.warning("speech ended in half a sample; dropped", extra={"provider": self.name})
            return None
        except Exception as exc:
            raise self._map_error(exc) from exc
        return carry.whole(data)

    def _map_error(self, exc: Exception) -> ProviderError:
        """Broad on purpose: read errors in a streamed body reach us as the HTTP library's own,
        and the stage must only ever see ``ProviderError``."""
        message = self._redact(_describe(exc))
        if isinstance(exc, openai.APIStatusError):
            return APIStatusError(message, status=exc.status_code, provider=self.name)
        if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException):
            return APITimeoutError(message, provider=self.name)
        if isinstance(exc, openai.APIConnectionError | httpx2.TransportError):
            return APIConnectionError(message, provider=self.name)
        return ProviderError(f"{type(exc).__name__}: {message}", provider=self.name)

    def _redact(self, text: str) -> str:
        # Some servers echo the key they rejected; it must never reach a log line.
        key = self._cfg.openai_api_key
        return text.replace(key, "<redacted>") if key else text


class _Carry:
    """Keeps samples whole: HTTP reads may end in the middle of one."""

    def __init__(self) -> None:
        self.pending = b""

    def whole(self, data: bytes) -> bytes:
        data = self.pending + data
        cut = len(data) & ~1
        self.pending = data[cut:]
        return data[:cut]


def _require_audio(content_type: str, provider: str) -> None:
    # A proxy's error page or a JSON error with status 200 must not be played as noise.
    if content_type.startswith(("application/json", "text/")):
        raise ProviderError(f"expected audio, got {content_type}", provider=provider)


def _describe(exc: Exception) -> str:
    # Prefer the API's own error message over the SDK's "Error code: 500 - {...}" dump.
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return str(exc) or type(exc).__name__


def _speakable(text: str) -> bool:
    """Whether a chunk has anything to say: punctuation or whitespace alone has not."""
    return any(ch.isalnum() for ch in text)
