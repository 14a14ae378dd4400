"""What every OpenAI provider (LLM, STT, TTS) shares: the account settings, the client, the errors.

One place for them, so the three stages translate the same SDK failure the same way and never
let the key into a message. Depends only on the ``openai`` SDK (and the HTTP library it is built
on), so a stage that loads it loads no other vendor's SDK.
"""

from __future__ import annotations

from typing import Any, ClassVar

import httpx2
import openai

from services.runtime.config import BaseConfig
from services.runtime.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ProviderError,
)


class OpenAIConfig(BaseConfig, frozen=True, kw_only=True):
    """The account settings, under the names the OpenAI SDK itself reads."""

    ENV: ClassVar[dict[str, str]] = {
        "openai_api_key": "OPENAI_API_KEY",
        "openai_base_url": "OPENAI_BASE_URL",
    }
    SECRETS: ClassVar[frozenset[str]] = frozenset({"openai_api_key"})

    openai_api_key: str = ""
    openai_base_url: str = ""


def make_client(api_key: str, base_url: str, timeout: Any) -> openai.AsyncOpenAI:
    # The SDK's own retries are off: whether to retry, and with which provider, is ours to
    # decide (the LLM's first-token retries, the fallback chain).
    return openai.AsyncOpenAI(
        api_key=api_key,
        base_url=base_url or None,  # None: the SDK's default endpoint
        # Applied per connect/read: a stream that keeps coming is fine, one that stalls fails.
        timeout=timeout,
        max_retries=0,
    )


def map_openai_error(exc: Exception, *, provider: str,
                     client: openai.AsyncOpenAI) -> ProviderError:
    """Translate into our taxonomy. Broad on purpose: on a malformed stream the SDK lets JSON
    errors escape unwrapped, a raw response body's read errors reach us as the HTTP library's
    own, and the stage must only ever see ``ProviderError``."""
    message = _redact(_describe(exc), client)
    if isinstance(exc, openai.APIStatusError):
        return APIStatusError(message, status=exc.status_code, provider=provider)
    if isinstance(exc, openai.APITimeoutError | httpx2.TimeoutException):
        return APITimeoutError(message, provider=provider)
    if isinstance(exc, openai.APIConnectionError | httpx2.TransportError):
        return APIConnectionError(message, provider=provider)
    return ProviderError(f"{type(exc).__name__}: {message}", provider=provider)


def _redact(text: str, client: openai.AsyncOpenAI) -> str:
    # Some servers echo the key they rejected; it must never reach a log line.
    key = client.api_key
    return text.replace(key, "<redacted>") if isinstance(key, str) and key else text


def _describe(exc: Exception) -> str:
    # Prefer the API's own error message over the SDK's "Error code: 500 - {...}" dump.
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return str(exc) or type(exc).__name__
