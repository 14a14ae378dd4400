"""A local fake of Cartesia's TTS WebSocket (``/tts/websocket``) speaking the real protocol.

As the ``cartesia`` SDK (4.x) speaks it: the key as ``Authorization: Bearer <key>`` and the API
version as a ``cartesia-version`` header on the upgrade; JSON generation requests with
``context_id``, ``transcript``, ``continue`` and ``flush``; ``{"context_id", "cancel": true}``
to cancel. Answers are the SDK's ``WebsocketResponse`` shapes: ``chunk`` (base64 audio tagged
with ``flush_id``), ``timestamps``, ``flush_done``, ``done`` and ``error``. Text is spoken on a
flush or at the end of the context (the real server may also start on its own buffer delay).

    fake = await FakeCartesia(api_key="test-key").start()
    fake.fail_handshake(503)          # refuse the upgrade
    fake.stall_handshake()            # never answer the upgrade
    fake.stall()                      # accept text, send nothing back
    fake.disconnect_after(2)          # drop the socket before a context's third audio chunk
    fake.malformed_after(1)           # a frame that is not JSON (counts are per context)
    fake.error_after(0, status=500)   # an error message for the context
    fake.hold_after(1)                # wait for a cancel (or a closed socket)
    await fake.stopped.wait()         # a context was cancelled, or a socket closed mid-context

Audio is ``tone_pcm(text)`` of each flushed text, in 100 ms chunks.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from tests.fakes._base import BaseFaults, FakeServer, drop, pause
from tests.fakes.openai_speech import MS_PER_CHAR, tone_pcm

_RATES = {8000, 16000, 22050, 24000, 44100, 48000}


@dataclass
class Faults(BaseFaults):
    # ``status`` refuses the WebSocket upgrade. Chunk counts are audio chunks of one context.
    stall_handshake: float = 0.0
    disconnect_after: int | None = None
    malformed_after: int | None = None
    error_after: int | None = None
    error_status: int = 500
    hold_after: int | None = None  # until the context is cancelled or the socket closed


@dataclass
class _Context:
    text: str = ""
    flush_id: int = 1
    elapsed: float = 0.0  # seconds of audio sent so far: timestamps count from the start
    chunks_sent: int = 0  # faults count audio chunks per context, so per turn
    done: bool = False
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


class _Socket:
    """One client connection and its contexts."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        self.ws = ws
        self.request = request
        self.contexts: dict[str, _Context] = {}
        self.closed = asyncio.Event()


class FakeCartesia(FakeServer):
    Faults = Faults

    def __init__(self, api_key: str = "test-key", *, host: str = "127.0.0.1") -> None:
        super().__init__(api_key, host=host)
        self.handshakes: list[dict[str, str]] = []  # headers (lower-cased) of each upgrade
        self.requests: list[dict[str, Any]] = []  # every JSON message received, in order
        self.cancelled: list[str] = []
        self.contexts_done = 0

    @property
    def url(self) -> str:
        return self.address("ws")

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/tts/websocket", self._handle)]

    # -- failure injection ----------------------------------------------------------------------

    # The faults of a WebSocket come at the upgrade: a refused one is a failed handshake.
    fail_handshake = FakeServer.fail_with_status

    def stall(self, seconds: float = math.inf) -> None:
        """Accept text and send nothing back until the client cancels or hangs up."""
        if seconds != math.inf:
            raise TypeError("FakeCartesia stalls only until the client gives up")
        self.hold_after(0)

    def error_after(self, chunks: int, *, status: int = 500) -> None:
        """An error message for the context after ``chunks`` audio chunks."""
        self.faults.error_after, self.faults.error_status = chunks, status

    # -- the socket -----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"error": "Invalid API key"}, status=401)
        if (status := self._take_status()) is not None:
            return web.json_response({"error": "Unavailable"}, status=status)
        await pause(self.faults.stall_handshake)
        self.handshakes.append({k.lower(): v for k, v in request.headers.items()})
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sock = _Socket(ws, request)
        work: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        speaker = asyncio.create_task(self._speak_all(sock, work))
        try:
            await self._receive(sock, work)
        finally:
            sock.closed.set()
            if any(not c.done and not c.cancelled.is_set() for c in sock.contexts.values()):
                self.stopped.set()  # the client left in the middle of a context
            speaker.cancel()
        return ws

    async def _receive(self, sock: _Socket, work: asyncio.Queue[dict[str, Any]]) -> None:
        async for msg in sock.ws:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                message = json.loads(msg.data)
            except ValueError:
                await sock.ws.send_json(_error(None, 400, "Invalid JSON"))
                continue
            self.requests.append(message)
            context_id = message.get("context_id", "")
            if message.get("cancel"):
                # Handled here, not in the queue, so it overtakes generation in progress.
                self.cancelled.append(context_id)
                sock.contexts.setdefault(context_id, _Context()).cancelled.set()
                self.stopped.set()
            else:
                sock.contexts.setdefault(context_id, _Context())
                work.put_nowait(message)

    async def _speak_all(self, sock: _Socket, work: asyncio.Queue[dict[str, Any]]) -> None:
        while True:
            message = await work.get()
            context_id = message["context_id"]
            context = sock.contexts[context_id]
            if context.cancelled.is_set() or context.done:
                continue
            if (problem := _invalid(message)) is not None:
                context.done = True
                await sock.ws.send_json(_error(context_id, 400, problem))
                continue
            context.text += message["transcript"]
            more = message.get("continue", False)
            if message.get("flush") or not more:
                if not await self._speak(sock, context_id, context, message):
                    continue
            if message.get("flush"):
                await sock.ws.send_json({**_base(context_id, "flush_done"), "flush_done": True,
                                         "flush_id": context.flush_id})
                context.flush_id += 1
            if not more:
                context.done = True
                self.contexts_done += 1
                await sock.ws.send_json({**_base(context_id, "done"), "done": True})

    async def _speak(self, sock: _Socket, context_id: str, context: _Context,
                     message: dict[str, Any]) -> bool:
        """Send the buffered text's timestamps and audio; False if the context ended early."""
        text, context.text = context.text, ""
        if not text:
            return True
        rate = message["output_format"]["sample_rate"]
        if message.get("add_timestamps"):
            await sock.ws.send_json(_timestamps(context_id, context, text))
        context.elapsed += len(text) * MS_PER_CHAR / 1000
        pcm = tone_pcm(text, rate)
        step = rate // 10 * 2  # 100 ms
        for start in range(0, len(pcm), step):
            if not await self._inject(sock, context_id, context):
                return False
            data = base64.b64encode(pcm[start:start + step]).decode()
            await sock.ws.send_json({**_base(context_id, "chunk"), "data": data, "step_time": 1.5,
                                     "flush_id": context.flush_id, "status_code": 206})
            context.chunks_sent += 1
        return True

    async def _inject(self, sock: _Socket, context_id: str, context: _Context) -> bool:
        """Apply faults before an audio chunk; False ends this context's audio."""
        faults, count = self.faults, context.chunks_sent
        if count == faults.disconnect_after:
            drop(sock.request)
            return False
        if count == faults.malformed_after:
            await sock.ws.send_str('{"type": "chunk", "data": ')
        if count == faults.error_after:
            context.done = True
            await sock.ws.send_json(_error(context_id, faults.error_status, "Fake failure"))
            return False
        if count == faults.hold_after:
            cancelled = asyncio.create_task(context.cancelled.wait())
            closed = asyncio.create_task(sock.closed.wait())
            await asyncio.wait({cancelled, closed}, return_when=asyncio.FIRST_COMPLETED)
            cancelled.cancel()
            closed.cancel()
            return False
        return not context.cancelled.is_set()


def _base(context_id: str, kind: str) -> dict[str, Any]:
    return {"type": kind, "context_id": context_id, "done": False, "status_code": 200}


def _timestamps(context_id: str, context: _Context, text: str) -> dict[str, Any]:
    words, starts, ends = [], [], []
    offset = 0
    for word in text.split():
        offset = text.index(word, offset)
        words.append(word)
        starts.append(round(context.elapsed + offset * MS_PER_CHAR / 1000, 3))
        ends.append(round(context.elapsed + (offset + len(word)) * MS_PER_CHAR / 1000, 3))
        offset += len(word)
    return {**_base(context_id, "timestamps"), "flush_id": context.flush_id,
            "word_timestamps": {"words": words, "start": starts, "end": ends}}


def _error(context_id: str | None, status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "context_id": context_id, "done": True, "status_code": status,
            "title": "Error", "message": message, "error_code": f"fake_{status}",
            "request_id": "fake-request"}


def _invalid(message: dict[str, Any]) -> str | None:
    """Why a generation request would be refused, as the real API checks it."""
    for key in ("context_id", "model_id", "transcript", "voice", "output_format"):
        if key not in message:
            return f"missing {key}"
    fmt = message["output_format"]
    if fmt.get("container") != "raw" or fmt.get("encoding") != "pcm_s16le" \
            or fmt.get("sample_rate") not in _RATES:
        return "this fake speaks raw pcm_s16le only"
    voice = message["voice"]
    if not (isinstance(voice, str) or (isinstance(voice, dict) and voice.get("id"))):
        return "invalid voice"
    return None
