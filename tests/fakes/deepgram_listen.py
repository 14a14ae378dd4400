"""A local fake of Deepgram's live transcription WebSocket (``GET /v1/listen``).

It speaks the real protocol, so the real ``deepgram-sdk`` can be pointed at it
(``VOICEBUS_DEEPGRAM_URL=fake.url``): query parameters and ``Authorization: Token <key>`` are
checked at the handshake, binary linear16 audio goes in, JSON ``Results`` come out, and
``Finalize``, ``CloseStream`` and ``KeepAlive`` do what Deepgram documents.

What it "hears" is scripted: the words of ``fake.transcript`` are revealed as audio arrives
(one per ``bytes_per_word`` of audio), as interim results that Deepgram's endpointing turns
into a final segment every ``segment_words`` words. ``Finalize`` flushes the rest, if any
audio came at all: no audio, no words.

    fake = await start_fake_deepgram(api_key="dg-test-key")
    fake.transcript = "what time is it"
    fake.disconnect_after(2)             # drop the TCP connection after two Results
    fake.hold_after(1)                   # one Result, then silence on an open socket
    ...
    conn = fake.connections[0]            # what one WebSocket carried
    assert conn.query["model"] == "nova-3" and conn.controls == ["Finalize", "CloseStream"]
    await fake.close()
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from aiohttp import WSMsgType, web

from tests.fakes._base import BaseFaults, FakeServer, drop, pause

BYTES_PER_SECOND = 16000 * 2
_CLOSE = object()  # queued after Metadata: the server closes the socket
_ERRORS = {
    400: ("Bad Request", "Failed to process the request."),
    401: ("INVALID_AUTH", "Invalid credentials."),
    429: ("TOO_MANY_REQUESTS", "Too many requests. Please try again later."),
    500: ("INTERNAL_SERVER_ERROR", "Something went wrong."),
    503: ("SERVICE_UNAVAILABLE", "Service temporarily unavailable."),
}


@dataclass
class Faults(BaseFaults):
    # ``status`` refuses the WebSocket upgrade, with Deepgram's error JSON.
    stall_handshake: float = 0.0
    stall: float = 0.0  # before the first message of a connection (audio is still read)
    disconnect_after: int | None = None  # counts Results; the TCP connection, no close frame
    malformed_after: int | None = None  # counts Results
    hold_after: int | None = None  # counts Results: then silence until the client leaves
    malformed_frame: str = '{"type": "Results", "channel": {"alternatives": ['
    answer_finalize: bool = True


@dataclass
class Connection:
    """What one WebSocket carried, for tests to assert on."""

    query: dict[str, str]
    audio_bytes: int = 0
    controls: list[str] = field(default_factory=list)  # Finalize, CloseStream, KeepAlive
    results_sent: int = 0
    # Set when the socket ended; ``clean`` says whether the client sent CloseStream first.
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    clean: bool = False


class FakeDeepgram(FakeServer):
    Faults = Faults

    def __init__(self, api_key: str = "dg-test-key", *, host: str = "127.0.0.1") -> None:
        super().__init__(api_key, host=host)
        self.transcript = "what time is it"
        self.bytes_per_word = BYTES_PER_SECOND // 5  # 0.2 s of audio per word
        self.segment_words = 3
        self.confidence = 0.9
        self.connections: list[Connection] = []
        self.handshakes = 0  # every attempt, refused ones too

    @property
    def url(self) -> str:
        return self.address("ws")  # an origin, as VOICEBUS_DEEPGRAM_URL takes it

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/v1/listen", self._listen)]

    # -- failure injection --------------------------------------------------------------------

    # The faults of a WebSocket come at the upgrade: a refused one is a failed handshake.
    fail_handshake = FakeServer.fail_with_status

    def malformed_after(self, count: int, frame: str | None = None) -> None:
        """Send a broken text frame (by default, not even JSON) after ``count`` Results."""
        super().malformed_after(count)
        if frame is not None:
            self.faults.malformed_frame = frame

    def ignore_finalize(self) -> None:
        """Answer only CloseStream, as a server that flushes nothing on Finalize would."""
        self.faults.answer_finalize = False

    # -- the endpoint -------------------------------------------------------------------------

    async def _listen(self, request: web.Request) -> web.StreamResponse:
        self.handshakes += 1
        await pause(self.faults.stall_handshake)
        if request.headers.get("Authorization") != f"Token {self.api_key}":
            return deepgram_error(401)
        if (status := self._take_status()) is not None:
            return deepgram_error(status)
        query = dict(request.query)
        if not _valid_query(query):
            return deepgram_error(400, "Failed to process the query parameters.")
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        conn = Connection(query)
        self.connections.append(conn)
        session = _Session(self, conn, ws, request)
        try:
            await session.run()
        finally:
            conn.ended.set()
        return ws


class _Session:
    """One connection: a reader turns audio and control messages into queued replies, and a
    writer sends them (so a stalled writer never stops the reading, as on a real server)."""

    _ids = itertools.count(1)

    def __init__(self, fake: FakeDeepgram, conn: Connection, ws: web.WebSocketResponse,
                 request: web.Request) -> None:
        self.fake, self.conn, self.ws, self.request = fake, conn, ws, request
        self.words = fake.transcript.split()
        self.finalized = 0  # words already sent in a final segment
        self.heard = 0  # words revealed so far
        self.sent_at = 0.0  # audio seconds already covered by a final segment
        self.request_id = str(uuid.UUID(int=next(self._ids)))
        self.outbox: asyncio.Queue[Any] = asyncio.Queue()

    async def run(self) -> None:
        writer = asyncio.create_task(self._write())
        try:
            async for msg in self.ws:
                if msg.type is WSMsgType.BINARY:
                    self._on_audio(msg.data)
                elif msg.type is WSMsgType.TEXT:
                    self._on_control(msg.data)
        finally:
            if self.conn.clean:  # let our own close handshake finish
                await asyncio.wait({writer}, timeout=1.0)
            writer.cancel()  # the client has gone: nothing left to say
            await asyncio.gather(writer, return_exceptions=True)

    def _on_audio(self, pcm: bytes) -> None:
        self.conn.audio_bytes += len(pcm)
        heard = min(len(self.words), self.conn.audio_bytes // self.fake.bytes_per_word)
        if heard == self.heard:
            return
        self.heard = heard
        if heard - self.finalized >= self.fake.segment_words:
            self._segment(is_final=True)
        else:
            self._segment(is_final=False)

    def _on_control(self, text: str) -> None:
        kind = json.loads(text).get("type", "")
        self.conn.controls.append(kind)
        if kind == "Finalize" and self.fake.faults.answer_finalize:
            self._flush(from_finalize=True)
        elif kind == "CloseStream":
            self.conn.clean = True
            if self.finalized < self._all_heard():
                self._flush(from_finalize=False)
            self.outbox.put_nowait(self._metadata())
            self.outbox.put_nowait(_CLOSE)

    def _all_heard(self) -> int:
        return len(self.words) if self.conn.audio_bytes else 0

    def _flush(self, *, from_finalize: bool) -> None:
        self.heard = self._all_heard()
        self._segment(is_final=True, from_finalize=from_finalize)

    def _segment(self, *, is_final: bool, from_finalize: bool = False) -> None:
        text = " ".join(self.words[self.finalized:self.heard])
        now = self.conn.audio_bytes / BYTES_PER_SECOND
        self.outbox.put_nowait(self._results(text, self.sent_at, now - self.sent_at, is_final,
                                             from_finalize))
        if is_final:
            self.finalized, self.sent_at = self.heard, now

    async def _write(self) -> None:
        try:
            await self._write_all()
        except ConnectionResetError:
            pass  # the client closed while replies were still queued

    async def _write_all(self) -> None:
        faults = self.fake.faults
        await pause(faults.stall)
        while (item := await self.outbox.get()) is not _CLOSE:
            if item["type"] == "Results":
                if faults.disconnect_after == self.conn.results_sent:
                    drop(self.request)  # no close frame: an abrupt loss
                    return
                if faults.malformed_after == self.conn.results_sent:
                    await self.ws.send_str(faults.malformed_frame)
                if faults.hold_after == self.conn.results_sent:
                    await self.conn.ended.wait()  # the socket stays open, nothing more comes
                    return
                self.conn.results_sent += 1
            await self.ws.send_str(json.dumps(item, separators=(",", ":")))
        await self.ws.close(code=1000)

    def _results(self, text: str, start: float, duration: float, is_final: bool,
                 from_finalize: bool) -> dict[str, Any]:
        confidence = self.fake.confidence if text else 0.0
        step = duration / max(1, len(text.split()))
        words = [{"word": w, "start": start + i * step, "end": start + (i + 1) * step,
                  "confidence": confidence, "punctuated_word": w}
                 for i, w in enumerate(text.split())]
        return {
            "type": "Results", "channel_index": [0, 1], "duration": duration, "start": start,
            "is_final": is_final, "speech_final": from_finalize, "from_finalize": from_finalize,
            "channel": {"alternatives": [{"transcript": text, "confidence": confidence,
                                          "words": words}]},
            "metadata": {"request_id": self.request_id, "model_uuid": str(uuid.UUID(int=3)),
                         "model_info": {"name": f"general-{self.conn.query.get('model')}",
                                        "version": "2025-01-01.0", "arch": "nova-3"}},
        }

    def _metadata(self) -> dict[str, Any]:
        return {
            "type": "Metadata", "transaction_key": "deprecated", "request_id": self.request_id,
            "sha256": hashlib.sha256(str(self.conn.audio_bytes).encode()).hexdigest(),
            "created": datetime.now(timezone.utc).isoformat(),
            "duration": self.conn.audio_bytes / BYTES_PER_SECOND, "channels": 1,
        }


def _valid_query(query: dict[str, str]) -> bool:
    # What Deepgram refuses at the handshake: raw audio it cannot interpret.
    if "model" not in query:
        return False
    return query.get("encoding") != "linear16" or query.get("sample_rate", "").isdigit()


def deepgram_error(status: int, message: str | None = None) -> web.Response:
    """An error ``status`` with Deepgram's error JSON: its own wording for it, or ``message``
    (what was wrong with the request)."""
    code, default = _ERRORS.get(status, ("ERROR", f"Fake error {status}."))
    message = message or default
    body = {"err_code": code, "err_msg": message, "request_id": str(uuid.uuid4())}
    return web.json_response(body, status=status, headers={"dg-error": message})


async def start_fake_deepgram(api_key: str = "dg-test-key") -> FakeDeepgram:
    """Start a fake on 127.0.0.1 with a free port; ``await fake.close()`` when done."""
    return await FakeDeepgram(api_key).start()
