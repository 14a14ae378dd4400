"""What Sarvam's STT and TTS providers share: the SDK's environment for a configured origin,
Sarvam's spelling of language tags, what a socket's close means, and keeping the key out of the
SDK's handshake log. Imported only by those providers (the ``sarvamai`` SDK is an optional
extra)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Any

import websockets
from sarvamai.core.api_error import ApiError
from sarvamai.environment import SarvamAIEnvironment

from services.runtime.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ConfigError,
    ProviderError,
)
from services.runtime.logs import redact

PRODUCTION = SarvamAIEnvironment.PRODUCTION.production  # wss://api.sarvam.ai
CLOSE_SECONDS = 1.0  # a socket that cannot close this fast is dropped (websockets' own is 10)


async def open_socket(connecting: AbstractAsyncContextManager[Any], stack: AsyncExitStack, *,
                      timeout: float, provider: str, redact: Callable[[str], str]) -> Any:
    """The SDK's socket, entered on ``stack`` within ``timeout``; its failures as ours."""
    try:
        async with asyncio.timeout(timeout):
            socket = await stack.enter_async_context(connecting)
    except TimeoutError:
        raise APITimeoutError(f"no WebSocket handshake within {timeout:g} s",
                              provider=provider) from None
    except Exception as exc:
        raise sdk_error(exc, provider, redact) from None  # never chained: ApiError shows the key
    # The SDK takes no socket options; a turn cut short must not wait websockets' 10 s for a
    # server that does not answer the close handshake.
    socket._websocket.close_timeout = CLOSE_SECONDS
    return socket


def sdk_error(exc: BaseException, provider: str, redact: Callable[[str], str]) -> ProviderError:
    """Our error for an SDK or WebSocket failure; an ``ApiError``'s text is never used (it
    shows every handshake header, the key among them)."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, ApiError):
        status = exc.status_code or 0
        why = ("Sarvam refused the API key (SARVAM_API_KEY)" if status in (401, 403)
               else "Sarvam refused the WebSocket handshake")
        return APIStatusError(why, status=status, provider=provider)
    if isinstance(exc, websockets.ConnectionClosed):
        return closed_error(exc.rcvd, provider, redact)
    if isinstance(exc, ValueError):  # not JSON, or JSON the SDK cannot parse
        return ProviderError(f"malformed message from Sarvam: {type(exc).__name__}",
                             provider=provider)
    if isinstance(exc, OSError | websockets.InvalidHandshake | EOFError):
        return APIConnectionError(f"cannot reach Sarvam: {type(exc).__name__}: "
                                  f"{redact(str(exc))}", provider=provider)
    return ProviderError(type(exc).__name__, provider=provider)


def language_code(language: str) -> str:
    """Sarvam's spelling of a BCP-47 tag: "hi-in" -> "hi-IN"; "auto" (and the like) as is."""
    primary, _, region = language.strip().partition("-")
    if len(region) == 2:
        return f"{primary.lower()}-{region.upper()}"
    return language.strip()


def environment(url: str) -> SarvamAIEnvironment:
    """The SDK's environment for an origin given as ws(s):// or http(s)://, without a path."""
    origin = url.rstrip("/")
    if not re.match(r"(wss?|https?)://[^/]+$", origin):
        raise ConfigError(f"VOICEBUS_SARVAM_URL must be an origin without a path (like "
                          f"{PRODUCTION}), not {url!r}")
    websocket = re.sub(r"^http", "ws", origin)
    http = re.sub(r"^ws", "http", origin)
    return SarvamAIEnvironment(base=http, creative=f"{http}/dubbing", production=websocket)


def closed_error(close: Any, provider: str, redact: Callable[[str], str]) -> ProviderError:
    """A socket closed without an error event first (``close``: the close frame received, if
    any). Sarvam closes with 4000 when it rejects the request itself (model, language, voice, a
    parameter, no beta access): no retry helps that. The reason is the server's text, which may
    echo what it was sent: redacted."""
    if close is None:
        return APIConnectionError("connection lost (no close frame)", provider=provider)
    why = redact(f"code {close.code}, {close.reason or 'no reason'}")
    if close.code == 4000:
        return APIStatusError(f"Sarvam rejected the stream ({why})", status=400,
                              provider=provider)
    return APIConnectionError(f"connection closed ({why})", provider=provider)


def redact_websocket_log(key: str) -> None:
    # The SDK opens its sockets with websockets' legacy client, which logs each upgrade's
    # headers (the key among them) at DEBUG on this logger, and takes no logger of ours.
    redact(logging.getLogger("websockets.client"), key)
