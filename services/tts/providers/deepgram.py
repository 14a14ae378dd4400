"""Deepgram Aura text-to-speech over the REST ``/v1/speak`` API, through the ``deepgram-sdk``.

One request per text chunk for ``linear16`` audio without a container (raw s16le mono at the
configured rate), its body passed on as it arrives. REST rather than the speak WebSocket: our
chunks are whole sentences already, and a request per sentence needs no per-turn socket state,
while the socket's Flush is rate-limited (20 a minute) — about one per sentence here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar

import httpx
from deepgram import AsyncDeepgramClient
from deepgram.core.api_error import ApiError
from deepgram.environment import DeepgramClientEnvironment

from services.runtime.config import BaseConfig, require_key
from services.runtime.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ConfigError,
    ProviderError,
)
from services.tts.config import TtsConfig
from services.tts.providers._common import RequestPerChunk

log = logging.getLogger(__name__)

_RATES = (8000, 16000, 24000, 32000, 48000)  # what linear16 allows


class DeepgramTtsConfig(BaseConfig, frozen=True, kw_only=True):
    ENV: ClassVar[dict[str, str]] = {"deepgram_api_key": "DEEPGRAM_API_KEY"}
    SECRETS: ClassVar[frozenset[str]] = frozenset({"deepgram_api_key"})

    deepgram_api_key: str = ""
    # Base URL of the API (http:// or https://); empty means Deepgram's own.
    deepgram_url: str = ""
    # The Aura model names the voice too.
    deepgram_tts_model: str = "aura-2-thalia-en"
    deepgram_tts_sample_rate: int = 24000
    # Seconds to connect, and the longest silence before or between pieces of audio.
    tts_timeout: float = 10.0


class DeepgramTts(RequestPerChunk):
    """Speaks each chunk with one request; ``RequestPerChunk`` streams the audio back."""

    name = "deepgram"

    def __init__(self, cfg: DeepgramTtsConfig) -> None:
        require_key(cfg.deepgram_api_key, provider=self.name, stage="tts",
                    variable="DEEPGRAM_API_KEY")
        if cfg.deepgram_tts_sample_rate not in _RATES:
            raise ConfigError(f"VOICEBUS_DEEPGRAM_TTS_SAMPLE_RATE must be one of {_RATES}")
        self.sample_rate: int = cfg.deepgram_tts_sample_rate
        self._cfg = cfg
        # Our own HTTP client, so aclose() can close it; its timeout applies per connect/read.
        self._http = httpx.AsyncClient(timeout=cfg.tts_timeout, follow_redirects=True)
        self._client = AsyncDeepgramClient(
            api_key=cfg.deepgram_api_key, environment=_environment(cfg.deepgram_url),
            httpx_client=self._http, timeout=cfg.tts_timeout, max_retries=0)
        log.info("deepgram tts: model %s, %d Hz", cfg.deepgram_tts_model, self.sample_rate,
                 extra={"provider": self.name})

    @classmethod
    def from_config(cls, _stage: TtsConfig) -> DeepgramTts:
        return cls(DeepgramTtsConfig.from_env())

    async def aclose(self) -> None:
        await self._http.aclose()

    def _request(self, text: str) -> AbstractAsyncContextManager[Any]:
        return self._client.speak.v1.audio.with_raw_response.generate(
            text=text, model=self._cfg.deepgram_tts_model, encoding="linear16",
            container="none", sample_rate=self.sample_rate)

    def _body(self, response: Any) -> AsyncIterator[bytes]:
        return response.data

    def _map_error(self, exc: Exception) -> ProviderError:
        """Broad on purpose: read errors in a streamed body reach us as httpx's own, and the
        stage must only ever see ``ProviderError``."""
        if isinstance(exc, ApiError) and exc.status_code:
            return APIStatusError(self._redact(_describe(exc)), status=exc.status_code,
                                  provider=self.name)
        message = self._redact(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, httpx.TimeoutException):
            return APITimeoutError(message, provider=self.name)
        if isinstance(exc, httpx.TransportError):
            return APIConnectionError(message, provider=self.name)
        return ProviderError(message, provider=self.name)

    def _redact(self, text: str) -> str:
        # Some servers echo the key they rejected; it must never reach a log line.
        return text.replace(self._cfg.deepgram_api_key, "<redacted>")


def _environment(url: str) -> DeepgramClientEnvironment:
    if not url:
        return DeepgramClientEnvironment.PRODUCTION
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"VOICEBUS_DEEPGRAM_URL={url!r}: expected an http(s):// URL")
    base = url.rstrip("/")
    production = DeepgramClientEnvironment.PRODUCTION
    return DeepgramClientEnvironment(base=base, production="ws" + base[len("http"):],
                                     agent=production.agent, agent_rest=production.agent_rest)


def _describe(exc: ApiError) -> str:
    # Deepgram's errors are {"err_code", "err_msg", "request_id"}; the SDK's str() dumps headers.
    body = exc.body
    if isinstance(body, dict):
        return str(body.get("err_msg") or body.get("message") or body.get("err_code") or body)
    return str(body)[:200] if body else "error"
