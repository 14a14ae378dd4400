"""What the cloud TTS providers share, free of any vendor's SDK.

A provider module imports its own vendor's SDK at the top, so one provider cannot import from
another without requiring both SDKs; what they have in common lives here instead.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Any

from services.runtime.errors import ProviderError
from services.tts.provider import SpokenAudio


def speakable(text: str) -> bool:
    """Whether a chunk has anything to say: punctuation or whitespace alone has not."""
    return any(ch.isalnum() for ch in text)


class WholeSamples:
    """Keeps s16le samples whole: network reads may end in the middle of one."""

    def __init__(self) -> None:
        self.pending = b""

    def whole(self, data: bytes) -> bytes:
        """``data`` after what was left over, up to its last whole sample; keeps the rest."""
        data = self.pending + data
        cut = len(data) & ~1
        self.pending = data[cut:]
        return data[:cut]


def require_audio(content_type: str, provider: str) -> None:
    # A proxy's error page or a JSON error with status 200 must not be played as noise.
    if content_type.startswith(("application/json", "text/")):
        raise ProviderError(f"expected audio, got {content_type}", provider=provider)


class RequestPerChunk:
    """A provider that makes one streamed HTTP request per text chunk and passes its body on as
    it arrives. A subclass says how to ask (``_request``), where the audio is in the response
    (``_body``) and how to translate a failure (``_map_error``)."""

    name: str

    async def synthesize(self, chunks: AsyncIterator[str]) -> AsyncIterator[SpokenAudio]:
        """Audio per chunk as it streams in. An error raised by ``chunks`` passes through."""
        index = -1
        async for text in chunks:
            index += 1  # counts skipped chunks too: indices match the caller's chunk list
            if not speakable(text):
                continue
            # Leaving this block early (closed, cancelled) closes the response, which is what
            # tells the server to stop.
            async with contextlib.AsyncExitStack() as stack:
                body = await self._open(stack, text)
                carry = WholeSamples()
                while (pcm := await self._next_pcm(body, carry)) is not None:
                    if pcm:
                        yield SpokenAudio(pcm, chunk=index)

    def _request(self, text: str) -> AbstractAsyncContextManager[Any]:
        """The SDK's streamed request speaking ``text``, not yet sent."""
        raise NotImplementedError

    def _body(self, response: Any) -> AsyncIterator[bytes]:
        raise NotImplementedError

    def _map_error(self, exc: Exception) -> ProviderError:
        raise NotImplementedError

    async def _open(self, stack: contextlib.AsyncExitStack, text: str) -> AsyncIterator[bytes]:
        request = self._request(text)
        try:
            response = await stack.enter_async_context(request)
        except Exception as exc:
            raise self._map_error(exc) from exc
        require_audio(response.headers.get("content-type", ""), self.name)
        return self._body(response)

    async def _next_pcm(self, body: AsyncIterator[bytes], carry: WholeSamples) -> bytes | None:
        # Error mapping lives here, not around the ``yield``, so an exception the consumer
        # throws into the generator is never mistaken for a provider failure.
        try:
            data = await anext(body)
        except StopAsyncIteration:
            if carry.pending:
                # Under the subclass's module name, as its other log lines are.
                logging.getLogger(type(self).__module__).warning(
                    "speech ended in half a sample; dropped", extra={"provider": self.name})
            return None
        except Exception as exc:
            raise self._map_error(exc) from exc
        return carry.whole(data)
