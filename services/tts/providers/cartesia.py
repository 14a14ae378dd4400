"""Streaming TTS over Cartesia's WebSocket API, through the official ``cartesia`` SDK.

A turn is one Cartesia context on one WebSocket. Each text chunk is sent with ``continue`` the
moment it arrives, then flushed: the server starts speaking it at once instead of waiting up to
its buffer delay for more text, and it tags that audio with a flush id, which is how audio is
matched to the chunk it speaks. An empty, non-continued request ends the context. Closing the
iterator early cancels the context.

Sockets outlive turns (a small pool per provider): a handshake per turn would cost a round trip
or more before the first audio. One socket carries one turn at a time, so a slow or broken turn
never holds up another session's.

We drive the SDK's connection with ``send``/``recv`` instead of its ``context().receive()``
helper: that helper's background router swallows a dropped connection and leaves the receiver
waiting for ever, while ``recv`` raises ``ConnectionClosed``, which we can report.

Word timestamps are requested. To get them pass a list: ``synthesize(chunks, words=[])`` appends
a ``WordTiming`` per word, in seconds from the start of the turn's audio, which is the turn's
``pts_ms`` clock too. The TTS stage places them in the reply (``SynthesisDone.words``) and egress
then reports in ``Playback.text_offset`` the words heard up to the played position, not a guess
from character counts. The ``word_timestamps`` class attribute says a provider can do this.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import cartesia
from cartesia.lib._tts import AsyncTTSResourceConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.protocol import State

from services.runtime.config import BaseConfig, require_key
from services.runtime.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ConfigError,
    ProviderError,
)
from services.runtime.logs import redact
from services.tts.config import TtsConfig
from services.tts.provider import SpokenAudio, WordTiming
from services.tts.providers._common import WholeSamples, speakable

log = logging.getLogger(__name__)

_RATES = (8000, 16000, 22050, 24000, 44100, 48000)  # what raw pcm_s16le output allows
_MAX_IDLE = 8  # idle sockets kept per provider; more than that are closed after their turn
_CANCEL_SECONDS = 1.0  # a cancel that cannot be sent this fast means the socket is unusable
_WAKE = object()  # tells the receiving side that the sending side changed the turn's state


class CartesiaConfig(BaseConfig, frozen=True, kw_only=True):
    ENV: ClassVar[dict[str, str]] = {"cartesia_api_key": "CARTESIA_API_KEY"}
    SECRETS: ClassVar[frozenset[str]] = frozenset({"cartesia_api_key"})

    cartesia_api_key: str = ""
    # Base URL of the API (ws://, wss://, http:// or https://); empty means Cartesia's own.
    cartesia_url: str = ""
    # (The voice, model and language are the stage's, TtsConfig: an agent may choose them.)
    cartesia_tts_sample_rate: int = 24000
    # Seconds the server may stay silent while it owes us audio (and to open a socket).
    tts_timeout: float = 10.0


class CartesiaTts:
    name = "cartesia"
    word_timestamps = True

    def __init__(self, cfg: CartesiaConfig, voice: TtsConfig) -> None:
        require_key(cfg.cartesia_api_key, provider=self.name, stage="tts",
                    variable="CARTESIA_API_KEY")
        if cfg.cartesia_tts_sample_rate not in _RATES:
            raise ConfigError(f"VOICEBUS_CARTESIA_TTS_SAMPLE_RATE must be one of {_RATES}")
        self.sample_rate: int = cfg.cartesia_tts_sample_rate
        self._cfg, self._voice = cfg, voice
        self._client = cartesia.AsyncCartesia(
            api_key=cfg.cartesia_api_key, websocket_base_url=_websocket_url(cfg.cartesia_url),
            max_retries=0)
        self._idle: list[AsyncTTSResourceConnection] = []
        self._closed = False
        # websockets logs the upgrade's headers at DEBUG, the key among them.
        self._ws_log = logging.getLogger(f"{__name__}.websocket")
        redact(self._ws_log, cfg.cartesia_api_key)
        log.info("cartesia tts: model %s, voice %s, %d Hz", voice.cartesia_tts_model,
                 voice.cartesia_tts_voice, self.sample_rate, extra={"provider": self.name})

    @classmethod
    def from_config(cls, stage: TtsConfig) -> CartesiaTts:
        return cls(CartesiaConfig.from_env(), stage)

    async def synthesize(self, chunks: AsyncIterator[str], *,
                         words: list[WordTiming] | None = None) -> AsyncIterator[SpokenAudio]:
        """Audio as it arrives, tagged with its chunk's index in ``chunks``; word timings go to
        ``words`` if given. An error raised by ``chunks`` passes through."""
        turn = _Turn(uuid.uuid4().hex, words)
        # Before the first chunk: a new socket's handshake overlaps the LLM's first sentence.
        conn = await self._acquire()
        reader = asyncio.create_task(self._read(conn, turn))
        sender = asyncio.create_task(self._send_all(conn, turn, chunks))
        try:
            while not turn.finished():
                piece = turn.take(await self._next(turn))
                if piece is not None:
                    yield piece
        except Exception:
            turn.failed = True
            raise
        finally:
            await self._release(conn, turn, reader, sender)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await _close_quietly(conn)
        await self._client.close()

    # -- one turn -------------------------------------------------------------------------------

    async def _next(self, turn: _Turn) -> object:
        # Silence is a stall only while the server owes us something; between the LLM's
        # sentences it is normal, however long the LLM takes.
        timeout = self._cfg.tts_timeout if turn.owed() else None
        try:
            async with asyncio.timeout(timeout):  # not wait_for: it can drop a cancel (3.11)
                return await turn.inbox.get()
        except TimeoutError:
            raise APITimeoutError(f"no audio for {timeout:.1f}s", provider=self.name) from None

    async def _send_all(self, conn: AsyncTTSResourceConnection, turn: _Turn,
                        chunks: AsyncIterator[str]) -> None:
        try:
            index = -1
            async for text in chunks:
                index += 1  # counts skipped chunks too: indices match the caller's chunk list
                if not speakable(text):
                    continue
                turn.sent.append(index)  # before sending: its audio may arrive at once
                await self._send(conn, self._request(turn, text))
                await self._send(conn, self._request(turn, "", flush=True))
                turn.inbox.put_nowait(_WAKE)
            if turn.sent:
                await self._send(conn, self._request(turn, "", more=False))
            turn.input_done = True
            turn.inbox.put_nowait(_WAKE)
        except Exception as exc:  # ours are mapped in _send; the input's own pass through
            turn.inbox.put_nowait(exc)

    async def _read(self, conn: AsyncTTSResourceConnection, turn: _Turn) -> None:
        while True:
            try:
                event = await conn.recv()
            except Exception as exc:
                turn.inbox.put_nowait(self._map_error(exc))
                return
            turn.inbox.put_nowait(event)

    def _request(self, turn: _Turn, transcript: str, *, flush: bool = False,
                 more: bool = True) -> dict[str, Any]:
        voice = self._voice
        request: dict[str, Any] = {
            "context_id": turn.context_id, "model_id": voice.cartesia_tts_model,
            "transcript": transcript, "voice": {"mode": "id", "id": voice.cartesia_tts_voice},
            "output_format": {"container": "raw", "encoding": "pcm_s16le",
                              "sample_rate": self.sample_rate},
            "language": voice.cartesia_tts_language, "add_timestamps": True, "continue": more,
        }
        if flush:
            request["flush"] = True
        return request

    async def _send(self, conn: AsyncTTSResourceConnection, message: dict[str, Any]) -> None:
        try:
            await conn.send(message)  # type: ignore[arg-type]
        except Exception as exc:
            raise self._map_error(exc) from exc

    # -- sockets --------------------------------------------------------------------------------

    async def _acquire(self) -> AsyncTTSResourceConnection:
        while self._idle:
            conn = self._idle.pop()
            # The SDK's own reconnect check reads the same attribute; its reconnect would hand
            # back the closed socket, so a socket the server closed while idle is dropped here.
            if conn._connection.state is State.OPEN:
                return conn
            await _close_quietly(conn)
        options: Any = {"open_timeout": self._cfg.tts_timeout, "close_timeout": _CANCEL_SECONDS,
                        "logger": self._ws_log}
        manager = self._client.tts.websocket_connect(websocket_connection_options=options)
        try:
            return await manager.enter()
        except Exception as exc:
            raise self._map_error(exc) from exc

    async def _release(self, conn: AsyncTTSResourceConnection, turn: _Turn,
                       reader: asyncio.Task[None], sender: asyncio.Task[None]) -> None:
        sender.cancel()
        reader.cancel()  # the SDK documents recv() as safe to cancel: no message is lost
        await asyncio.gather(sender, reader, return_exceptions=True)
        reusable = turn.done or not turn.sent
        if not reusable and not turn.failed:
            reusable = await self._cancel(conn, turn)  # closed early: stop the generation
        if reusable and not self._closed and len(self._idle) < _MAX_IDLE:
            self._idle.append(conn)
        else:
            await _close_quietly(conn)

    async def _cancel(self, conn: AsyncTTSResourceConnection, turn: _Turn) -> bool:
        try:
            await asyncio.wait_for(conn.send({"context_id": turn.context_id, "cancel": True}),
                                   _CANCEL_SECONDS)
        except Exception:  # a socket that cannot take a cancel is closed instead
            return False
        return True

    def _map_error(self, exc: BaseException) -> ProviderError:
        error = _classify(exc, self.name)
        key = self._cfg.cartesia_api_key
        if key in str(error):  # a server may echo the key it rejected; never let it reach a log
            error.args = (str(error).replace(key, "<redacted>"),)
        return error


class _Turn:
    """One synthesize() call: what was sent, what came back."""

    def __init__(self, context_id: str, words: list[WordTiming] | None) -> None:
        self.context_id = context_id
        self.words = words
        # Items from the reader (server events, errors) and the sender (_WAKE, errors).
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self.sent: list[int] = []  # the input index of each flushed chunk, in flush order
        self.flushes_done = 0
        self.input_done = False
        self.done = False
        self.failed = False
        self.carry = WholeSamples()  # a byte left over waits for the next chunk

    def finished(self) -> bool:
        return self.done or (self.input_done and not self.sent)

    def owed(self) -> bool:
        return bool(self.sent) and (self.flushes_done < len(self.sent) or self.input_done)

    def take(self, item: object) -> SpokenAudio | None:
        if isinstance(item, BaseException):
            raise item
        if item is _WAKE:
            return None
        kind = getattr(item, "type", None)
        if not isinstance(kind, str):
            raise ProviderError(f"malformed message from the server: {str(item)[:200]}",
                                provider=CartesiaTts.name)
        context = getattr(item, "context_id", None)
        if kind == "error" and context in (None, self.context_id):
            raise _server_error(item)
        if context != self.context_id:
            return None  # late news of a context cancelled earlier on this socket
        return self._on_event(kind, item)

    def _on_event(self, kind: str, event: Any) -> SpokenAudio | None:
        if kind == "chunk":
            return self._audio(event)
        if kind == "timestamps" and self.words is not None and event.word_timestamps:
            stamps = event.word_timestamps
            self.words.extend(WordTiming(w, s, e) for w, s, e in
                              zip(stamps.words, stamps.start, stamps.end, strict=False))
        elif kind == "flush_done":
            self.flushes_done = max(self.flushes_done, event.flush_id or 0)
        elif kind == "done":
            self.done = True
        return None  # other kinds (phoneme timestamps, future ones) are of no use to us

    def _audio(self, event: Any) -> SpokenAudio | None:
        try:
            data = base64.b64decode(event.data or "", validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise ProviderError("audio chunk is not base64", provider=CartesiaTts.name) from None
        if not self.sent:
            raise ProviderError("audio before any text was sent", provider=CartesiaTts.name)
        pcm = self.carry.whole(data)
        if not pcm:
            return None
        # Flush ids count from 1, one per flushed chunk; audio without one belongs to the
        # oldest chunk whose flush has not completed.
        position = event.flush_id - 1 if event.flush_id else self.flushes_done
        index = self.sent[min(max(position, 0), len(self.sent) - 1)]
        return SpokenAudio(pcm, chunk=index)


def _server_error(event: Any) -> ProviderError:
    message = event.message or event.title or event.error_code or "error"
    status = event.status_code
    if isinstance(status, int) and status >= 400:
        return APIStatusError(message, status=status, provider=CartesiaTts.name)
    return ProviderError(message, provider=CartesiaTts.name)


def _classify(exc: BaseException, provider: str) -> ProviderError:
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, InvalidStatus):
        body = exc.response.body.decode(errors="replace")[:200] if exc.response.body else ""
        return APIStatusError(body or "handshake rejected", status=exc.response.status_code,
                              provider=provider)
    if isinstance(exc, TimeoutError):
        return APITimeoutError("timed out opening the socket", provider=provider)
    if isinstance(exc, ConnectionClosed | OSError | WebSocketException):
        return APIConnectionError(f"{type(exc).__name__}: {exc}", provider=provider)
    if isinstance(exc, ValueError):  # the SDK lets JSON errors out of recv() as they are
        return ProviderError(f"malformed message from the server: {exc}", provider=provider)
    return ProviderError(f"{type(exc).__name__}: {exc}", provider=provider)


def _websocket_url(url: str) -> str | None:
    if not url:
        return None  # the SDK's default endpoint
    for http, ws in (("https://", "wss://"), ("http://", "ws://")):
        if url.startswith(http):
            url = ws + url[len(http):]
    if not url.startswith(("ws://", "wss://")):
        raise ConfigError(f"VOICEBUS_CARTESIA_URL={url!r}: expected a ws(s):// or http(s):// URL")
    return url.rstrip("/")


async def _close_quietly(conn: AsyncTTSResourceConnection) -> None:
    try:
        await asyncio.wait_for(conn.close(), 2 * _CANCEL_SECONDS)
    except Exception:  # closing a broken socket has nothing left to tell us
        pass
