"""What Sarvam's STT and TTS providers share: the SDK's environment for a configured origin,
Sarvam's spelling of language tags, what a socket's close means, and keeping the key out of the
SDK's handshake log. Imported only by those providers (the ``sarvamai`` SDK is an optional
extra)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from sarvamai.environment import SarvamAIEnvironment

from services.runtime.errors import APIConnectionError, APIStatusError, ConfigError, ProviderError

PRODUCTION = SarvamAIEnvironment.PRODUCTION.production  # wss://api.sarvam.ai


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


class _RedactKey(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.keys: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if any(key in text for key in self.keys):
            for key in self.keys:
                text = text.replace(key, "<redacted>")
            record.msg, record.args = text, None
        return True


_REDACT = _RedactKey()


def redact_websocket_log(key: str) -> None:
    # The SDK opens its sockets with websockets' legacy client, which logs each upgrade's
    # headers (the key among them) at DEBUG on this logger, and takes no logger of ours.
    _REDACT.keys.add(key)
    handshake_log = logging.getLogger("websockets.client")
    if _REDACT not in handshake_log.filters:
        handshake_log.addFilter(_REDACT)
