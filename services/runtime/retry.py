"""Retrying a streaming request before its first result, and only then: once the user has
heard the start of a reply, a second try would say it twice (the LLM providers share this)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from services.runtime.errors import ProviderError

T = TypeVar("T")


async def before_first(attempt: Callable[[], Awaitable[T]], *, retries: int, backoff: float,
                       transient: Callable[[ProviderError], bool], log: logging.Logger,
                       extra: Mapping[str, Any]) -> T:
    """``attempt()`` (which opens the stream, reads up to its first result, and closes what it
    opened if it fails), tried again after ``backoff`` seconds (doubled each time) while it
    raises a ``transient`` error, ``retries`` times at most."""
    for number in range(retries + 1):
        try:
            return await attempt()
        except ProviderError as exc:
            if number >= retries or not transient(exc):
                raise
            delay = backoff * 2 ** number
            log.info("retrying in %.2fs after: %s", delay, exc, extra=dict(extra))
            await asyncio.sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")
