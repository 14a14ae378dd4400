"""Logging for every service: stdlib logging, text or JSON (``VOICEBUS_LOG_FORMAT=json``).

Context goes in ``extra={"session", "stage", "provider"}``; ``Throttle`` keeps a burst of bad
messages down to one line per interval.
"""

from __future__ import annotations

import json
import logging
import sys
import time

_CONTEXT = ("stage", "session", "provider", "replica")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in _CONTEXT:
            if key in record.__dict__:
                out[key] = record.__dict__[key]
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ctx = " ".join(f"{k}={record.__dict__[k]}" for k in _CONTEXT if k in record.__dict__)
        return f"{line} [{ctx}]" if ctx else line


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("nats", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Throttle:
    """Allows one log line per ``interval`` seconds per key; counts what it held back."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        """Returns how many lines were held back since the last allowed one, or None."""
        now = time.monotonic()
        if now - self._last.get(key, -1e9) >= self.interval:
            self._last[key] = now
            return self._held.pop(key, 0)
        self._held[key] = self._held.get(key, 0) + 1
        return None


def held_back(held: int) -> str:
    """The end of a throttled line: how many like it ``Throttle.allow`` held back before it."""
    return f" (+{held} more since last report)" if held else ""


class _Redact(logging.Filter):
    """Writes ``<redacted>`` for each secret in a record's message."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if any(secret in text for secret in self.secrets):
            for secret in self.secrets:
                text = text.replace(secret, "<redacted>")
            record.msg, record.args = text, None
        return True


def redact(logger: logging.Logger, secret: str) -> None:
    """Keep ``secret`` out of what ``logger`` writes: for a library's logger that prints what
    we send (a WebSocket client logs each upgrade's headers, an API key among them, at DEBUG).
    One filter per logger, however many secrets and providers share it."""
    if not secret:
        return
    own = next((f for f in logger.filters if isinstance(f, _Redact)), None)
    if own is None:
        own = _Redact()
        logger.addFilter(own)
    own.secrets.add(secret)
