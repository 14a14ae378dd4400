"""Streaming chat completions through the official ``openai`` SDK.

Works with any OpenAI-compatible server (``OPENAI_BASE_URL``). The SDK's own retries are off:
whether to retry, and with which provider, is the fallback chain's decision, and a retry after
the first delta went out would make the user hear the start of the reply twice.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import openai
from openai.types.chat import ChatCompletionChunk

from services.llm.config import LlmConfig
from services.llm.provider import ChatMessage
from services.runtime.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ConfigError,
    ProviderError,
)

log = logging.getLogger(__name__)
_LOG_EXTRA = {"stage": "llm", "provider": "openai"}


class OpenAILlm:
    name = "openai"

    def __init__(self, client: openai.AsyncOpenAI, *, model: str) -> None:
        self._client = client
        self.model = model
        # Token usage of the last finished completion, as the API reported it.
        self.last_usage: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, cfg: LlmConfig) -> OpenAILlm:
        if not cfg.openai_api_key:
            raise ConfigError(
                "the openai LLM provider needs an API key: set OPENAI_API_KEY "
                "(or VOICEBUS_LLM_PROVIDER=echo to run offline)"
            )
        client = openai.AsyncOpenAI(
            api_key=cfg.openai_api_key,
            # None lets the SDK use its default endpoint.
            base_url=cfg.openai_base_url or None,
            # The SDK applies this per connect/read, so a stream that keeps trickling is fine
            # but one that stalls (before or between chunks) fails fast.
            timeout=cfg.llm_timeout,
            max_retries=0,
        )
        return cls(client, model=cfg.llm_model)

    async def complete(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str]:
        self.last_usage = None
        try:
            stream = await self._client.chat.completions.create(
                model=self.model,
                messages=[_wire_message(m) for m in messages],
                stream=True,
                stream_options={"include_usage": True},
            )
        except Exception as exc:
            raise self._map_error(exc) from exc
        # Leaving this block early (the turn was cancelled, aclose()) closes the HTTP response,
        # which is what tells the server to stop generating.
        async with stream:
            while (chunk := await self._next_chunk(stream)) is not None:
                if chunk.usage is not None:
                    self.last_usage = chunk.usage.model_dump(exclude_none=True)
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        log.debug("completion usage: %s", self.last_usage, extra=_LOG_EXTRA)

    async def _next_chunk(self, stream: openai.AsyncStream[ChatCompletionChunk]) -> ChatCompletionChunk | None:
        # Error mapping lives here, not around the ``yield``, so an exception the consumer
        # throws into the generator is never mistaken for a provider failure.
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            return None
        except Exception as exc:
            raise self._map_error(exc) from exc

    def _map_error(self, exc: Exception) -> ProviderError:
        """Translate into our taxonomy. Broad on purpose: on a malformed stream the SDK lets
        JSON errors escape unwrapped, and the stage must only ever see ``ProviderError``."""
        message = self._redact(_describe(exc))
        if isinstance(exc, openai.APIStatusError):
            return APIStatusError(message, status=exc.status_code, provider=self.name)
        if isinstance(exc, openai.APITimeoutError):
            return APITimeoutError(message, provider=self.name)
        if isinstance(exc, openai.APIConnectionError):
            return APIConnectionError(message, provider=self.name)
        return ProviderError(f"{type(exc).__name__}: {message}", provider=self.name)

    def _redact(self, text: str) -> str:
        # Some servers echo the key they rejected; it must never reach a log line.
        key = self._client.api_key
        return text.replace(key, "<redacted>") if isinstance(key, str) and key else text

    async def aclose(self) -> None:
        await self._client.close()


def _wire_message(message: ChatMessage) -> dict[str, str]:
    # ``interrupted`` stays off the wire: Chat Completions has no such field (strict
    # OpenAI-compatible servers reject unknown keys), and writing a marker into the content
    # teaches the model to say the marker itself.
    return {"role": message.role, "content": message.content}


def _describe(exc: Exception) -> str:
    # Prefer the API's own error message over the SDK's "Error code: 500 - {...}" dump.
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return str(exc) or type(exc).__name__
