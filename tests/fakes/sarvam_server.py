"""A local fake of Sarvam's two streaming WebSockets, speaking the protocol ``sarvamai`` speaks.

Both take the key as the ``api-subscription-key`` header of the upgrade.

``GET /speech-to-text-realtime/ws`` (STT; ``speech_to_text_realtime_streaming`` in the SDK):
query ``language_code`` (required), ``model``, ``mode``, ``endpointing``, ``encoding``,
``sample_rate``. JSON events in: ``speech_start``, ``audio_input`` (base64 audio),
``speech_end``, ``flush``, ``ping``, ``end``; out: ``session.begin`` at once, then
``transcript.partial`` / ``transcript.final`` (per ``utterance_idx``), ``pong``, ``session.end``
and ``error`` (``code``, ``is_fatal``, ``message``, and ``status_code`` when fatal). A fatal
error is followed by a close: 1003 for the key, rate limits and quota, 4000 for a request Sarvam
rejects (a parameter, a language), 1011 for its own failures. This fake does
``endpointing=manual`` only (what voicebus asks for): the client delimits each utterance.

``GET /text-to-speech/ws`` (TTS): query ``model`` and ``send_completion_event``. JSON messages
in: ``config`` (first: ``language_code``, ``speaker``, ``speech_sample_rate``,
``output_audio_codec``…), ``text``, ``flush``, ``ping``; out: ``audio`` (base64 in
``data.audio``), ``event`` with ``event_type: final`` once a flushed text is spoken (if asked
for), and ``error`` (``data.message``, ``data.code``). This fake speaks ``linear16`` only.

What it hears is scripted as for the Deepgram fake: the words of ``fake.transcript`` are revealed
one per ``bytes_per_word`` of audio as partials; ``speech_end`` finalizes all of them if any audio
came. What it says is ``tone_pcm(text)`` of each flushed text, in 100 ms chunks.

    fake = await FakeSarvam(api_key="sv-key").start()
    fake.fail_handshake(503)          # refuse the upgrade (both endpoints)
    fake.stall_handshake()            # never answer the upgrade
    fake.stall()                      # take audio or text, never answer
    fake.disconnect_after(2)          # drop the TCP connection before a socket's 3rd piece
    fake.malformed_after(1)           # a frame that is not JSON (or ``frame``) after one piece
    fake.hold_after(1)                # one piece, then silence until the client leaves
    fake.error_after(0, status=429)   # a fatal error instead of the first piece
    fake.close_after(1, code=4000)    # a close frame alone (no error event) after one piece
    fake.close_after(0, reason="…")   # …with a reason of its own (default "Fake rejection")
    await fake.stopped.wait()         # a client left while an answer was owed

A "piece" is a transcript event (STT) or an audio chunk (TTS), counted per socket.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from tests.fakes._base import BaseFaults, FakeServer, drop, pause
from tests.fakes.openai_speech import tone_pcm

STT_LANGUAGES = frozenset({
    "auto", "en-IN", "hi-IN", "bn-IN", "kn-IN", "ml-IN", "mr-IN", "or-IN", "pa-IN", "ta-IN",
    "te-IN", "gu-IN", "as-IN", "ur-IN", "ne-IN", "kok-IN", "ks-IN", "sd-IN", "sa-IN", "sat-IN",
    "mni-IN", "brx-IN", "mai-IN", "doi-IN"})
TTS_LANGUAGES = frozenset({"bn-IN", "en-IN", "gu-IN", "hi-IN", "kn-IN", "ml-IN", "mr-IN",
                           "od-IN", "pa-IN", "ta-IN", "te-IN"})
TTS_RATES = frozenset({8000, 16000, 22050, 24000})
BYTES_PER_SECOND = 16000 * 2
_CLOSE_CODES = {401: 1003, 403: 1003, 429: 1003, 400: 4000}  # otherwise 1011
_CLOSE = object()  # queued last: the server closes the socket


@dataclass
class Faults(BaseFaults):
    # ``status`` refuses the upgrade. Counts are pieces of one socket (see the module).
    stall_handshake: float = 0.0
    disconnect_after: int | None = None
    malformed_after: int | None = None
    malformed_frame: str = '{"event": "transcript.partial", "text": '
    hold_after: int | None = None
    error_after: int | None = None
    error_status: int = 500
    close_after: int | None = None  # a close frame with ``close_code``, no error event first
    close_code: int = 4000
    close_reason: str = "Fake rejection"


@dataclass
class SttSocket:
    """What one STT WebSocket carried, for tests to assert on."""

    query: dict[str, str]
    events: list[str] = field(default_factory=list)  # the client's, audio_input left out
    audio_bytes: int = 0
    sent: list[dict[str, Any]] = field(default_factory=list)  # transcript events sent
    violations: list[str] = field(default_factory=list)  # what the real server would refuse
    ended: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class TtsSocket:
    query: dict[str, str]
    messages: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] | None = None
    chunks_sent: int = 0
    owed: int = 0  # flushes whose audio is not all out yet
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class FakeSarvam(FakeServer):
    Faults = Faults

    def __init__(self, api_key: str = "sv-test-key", *, host: str = "127.0.0.1") -> None:
        super().__init__(api_key, host=host)
        self.transcript = "what time is it"
        self.bytes_per_word = BYTES_PER_SECOND // 5  # 0.2 s of audio per word
        self.handshakes = 0  # every upgrade attempt, refused ones too
        self.headers: list[dict[str, str]] = []  # of each accepted upgrade, names lower-cased
        self.stt_sockets: list[SttSocket] = []
        self.tts_sockets: list[TtsSocket] = []
        self.requests: list[dict[str, Any]] = []  # every TTS message, in order

    @property
    def url(self) -> str:
        return self.address("ws")  # an origin, as VOICEBUS_SARVAM_URL takes it

    @property
    def base_url(self) -> str:
        return self.address("http")  # VOICEBUS_SARVAM_URL takes an http(s) origin too

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/speech-to-text-realtime/ws", self._stt),
                web.get("/text-to-speech/ws", self._tts)]

    # -- failure injection ----------------------------------------------------------------------

    fail_handshake = FakeServer.fail_with_status

    def stall(self, seconds: float = math.inf) -> None:
        """Take audio or text and answer nothing until the client leaves."""
        if seconds != math.inf:
            raise TypeError("FakeSarvam stalls only until the client gives up")
        self.hold_after(0)

    def malformed(self) -> None:
        """A frame that is not JSON after the first piece (a WebSocket has no bad body)."""
        self.malformed_after(1)

    def malformed_after(self, count: int, frame: str | None = None) -> None:
        super().malformed_after(count)
        if frame is not None:
            self.faults.malformed_frame = frame

    def error_after(self, count: int, *, status: int = 500) -> None:
        """A fatal error message instead of piece number ``count``."""
        self.faults.error_after, self.faults.error_status = count, status

    def close_after(self, count: int, *, code: int = 4000,
                    reason: str = "Fake rejection") -> None:
        """Close the socket with ``code`` and ``reason`` (and no error event first) instead of
        piece ``count``."""
        self.faults.close_after, self.faults.close_code = count, code
        self.faults.close_reason = reason

    # -- the upgrade ----------------------------------------------------------------------------

    async def _upgrade(self, request: web.Request) -> web.WebSocketResponse | web.Response:
        self.handshakes += 1
        await pause(self.faults.stall_handshake)
        if (status := self._take_status()) is not None:
            return sarvam_error(status)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        return ws

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("api-subscription-key") == self.api_key

    async def _inject(self, ws: web.WebSocketResponse, request: web.Request, count: int,
                      ended: asyncio.Event) -> bool:
        """Faults before piece number ``count``; False: send nothing more on this socket."""
        faults = self.faults
        if count == faults.disconnect_after:
            drop(request)  # no close frame: an abrupt loss
            return False
        if count == faults.malformed_after:
            await ws.send_str(faults.malformed_frame)
        if count == faults.hold_after:
            await ended.wait()  # the socket stays open; nothing more comes
            return False
        if count == faults.close_after:
            await ws.close(code=faults.close_code, message=faults.close_reason.encode()[:123])
            return False
        return True

    # -- speech to text -------------------------------------------------------------------------

    async def _stt(self, request: web.Request) -> web.StreamResponse:
        ws = await self._upgrade(request)
        if not isinstance(ws, web.WebSocketResponse):
            return ws
        sock = SttSocket(dict(request.query))
        self.stt_sockets.append(sock)
        session = _SttSession(self, sock, ws, request)
        try:
            if not self._authorized(request):
                await session.fatal(401, "invalid_api_key", "Invalid API subscription key")
            elif (problem := _stt_query_problem(sock.query)) is not None:
                await session.fatal(400, "invalid_request", problem)
            else:
                await session.run()
        finally:
            sock.ended.set()
        return ws

    # -- text to speech -------------------------------------------------------------------------

    async def _tts(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):  # as the SDK expects: a 401 on the upgrade
            self.handshakes += 1
            return sarvam_error(401)
        ws = await self._upgrade(request)
        if not isinstance(ws, web.WebSocketResponse):
            return ws
        sock = TtsSocket(dict(request.query))
        self.tts_sockets.append(sock)
        session = _TtsSession(self, sock, ws, request)
        try:
            await session.run()
        finally:
            if sock.owed:
                self.stopped.set()  # the client left while audio was owed
            sock.ended.set()
        return ws


class _SttSession:
    """One STT socket: the reader turns the client's events into queued replies, and a writer
    sends them, so a stalled writer never stops the reading (as on a real server)."""

    def __init__(self, fake: FakeSarvam, sock: SttSocket, ws: web.WebSocketResponse,
                 request: web.Request) -> None:
        self.fake, self.sock, self.ws, self.request = fake, sock, ws, request
        self.words = fake.transcript.split()
        self.request_id = f"fake-{uuid.uuid4().hex[:12]}"
        self.utterance: int | None = None  # the open utterance's index
        self.next_index = 0
        self.utterance_bytes = 0
        self.heard = 0  # words revealed in the open utterance
        self.outbox: asyncio.Queue[Any] = asyncio.Queue()

    async def fatal(self, status: int, code: str, message: str) -> None:
        await self.ws.send_json(_stt_error(code, message, status))
        await self.ws.close(code=_CLOSE_CODES.get(status, 1011), message=message[:123].encode())

    async def run(self) -> None:
        config = {"model": self.sock.query.get("model", "saaras:v3-realtime"),
                  "language_code": self.sock.query["language_code"],
                  "turn_detection": self.sock.query.get("endpointing", "vad")}
        self.outbox.put_nowait({"event": "session.begin", "request_id": self.request_id,
                                "config": config})
        writer = asyncio.create_task(self._write())
        try:
            async for msg in self.ws:
                if msg.type is WSMsgType.TEXT:
                    self._on_event(msg.data)
                elif msg.type is WSMsgType.BINARY:
                    self.sock.violations.append("binary frame")
        finally:
            writer.cancel()  # the client has gone: nothing left to say
            await asyncio.gather(writer, return_exceptions=True)

    def _on_event(self, text: str) -> None:
        try:
            event = json.loads(text)
            kind = event["event"]
        except (ValueError, KeyError, TypeError):
            self._refuse("invalid_message", "not a JSON event")
            return
        if kind != "audio_input":
            self.sock.events.append(kind)
        if kind == "speech_start":
            if self.utterance is not None:
                self._refuse("invalid_state", "speech_start inside an utterance")
            self.utterance, self.next_index = self.next_index, self.next_index + 1
            self.utterance_bytes = self.heard = 0
        elif kind == "audio_input":
            self._on_audio(event.get("audio"))
        elif kind in ("speech_end", "flush", "end"):
            if self.utterance is not None:
                self._finalize()
            elif kind != "end":
                self._refuse("invalid_state", f"{kind} outside an utterance")
            if kind == "end":
                seconds = self.sock.audio_bytes / BYTES_PER_SECOND
                self.outbox.put_nowait({"event": "session.end", "request_id": self.request_id,
                                        "audio_duration_s": seconds})
                self.outbox.put_nowait(_CLOSE)
        elif kind == "ping":
            self.outbox.put_nowait({"event": "pong"})
        else:
            self._refuse("invalid_message", f"unknown event {kind!r}")

    def _on_audio(self, audio: Any) -> None:
        try:
            pcm = base64.b64decode(audio, validate=True)
        except (binascii.Error, TypeError, ValueError):
            self._refuse("invalid_audio", "audio is not base64")
            return
        if self.utterance is None:  # manual endpointing: audio needs an open utterance
            self._refuse("invalid_state", "audio_input outside an utterance")
            return
        self.sock.audio_bytes += len(pcm)
        self.utterance_bytes += len(pcm)
        heard = min(len(self.words), self.utterance_bytes // self.fake.bytes_per_word)
        if heard > self.heard:
            self.heard = heard
            self.outbox.put_nowait({"event": "transcript.partial", "utterance_idx": self.utterance,
                                    "text": " ".join(self.words[:heard])})

    def _finalize(self) -> None:
        text = " ".join(self.words) if self.utterance_bytes else ""
        final: dict[str, Any] = {"event": "transcript.final", "utterance_idx": self.utterance,
                                 "text": text}
        if self.sock.query["language_code"] == "auto":
            final.update(language="en-IN", language_confidence=0.9)
        self.outbox.put_nowait(final)
        self.utterance = None

    def _refuse(self, code: str, message: str) -> None:
        self.sock.violations.append(message)
        self.outbox.put_nowait(_stt_error(code, message))

    async def _write(self) -> None:
        try:
            while (item := await self.outbox.get()) is not _CLOSE:
                if item["event"].startswith("transcript."):
                    if not await self._piece(item):
                        return
                else:
                    await self.ws.send_json(item)
            await self.ws.close(code=WSCloseCode.OK)
        except ConnectionResetError:
            pass  # the client closed while replies were still queued

    async def _piece(self, item: dict[str, Any]) -> bool:
        faults, count = self.fake.faults, len(self.sock.sent)
        if not await self.fake._inject(self.ws, self.request, count, self.sock.ended):
            return False
        if count == faults.error_after:
            await self.fatal(faults.error_status, "fake_failure", "Fake failure")
            return False
        self.sock.sent.append(item)
        await self.ws.send_json(item)
        return True


class _TtsSession:
    """One TTS socket: the reader buffers text; a speaker speaks each flushed text in order."""

    def __init__(self, fake: FakeSarvam, sock: TtsSocket, ws: web.WebSocketResponse,
                 request: web.Request) -> None:
        self.fake, self.sock, self.ws, self.request = fake, sock, ws, request
        self.buffer = ""
        self.work: asyncio.Queue[str] = asyncio.Queue()
        self.request_id = f"fake-{uuid.uuid4().hex[:12]}"

    async def run(self) -> None:
        speaker = asyncio.create_task(self._speak_all())
        try:
            async for msg in self.ws:
                if msg.type is WSMsgType.TEXT:
                    await self._on_message(msg.data)
        finally:
            speaker.cancel()
            await asyncio.gather(speaker, return_exceptions=True)

    async def _on_message(self, text: str) -> None:
        try:
            message = json.loads(text)
            kind = message["type"]
        except (ValueError, KeyError, TypeError):
            await self._error(400, "Invalid JSON message")
            return
        self.fake.requests.append(message)
        self.sock.messages.append(message)
        data = message.get("data") or {}
        if kind == "config":
            if (problem := _tts_config_problem(data)) is not None:
                await self._error(400, problem)
            else:
                self.sock.config = data
        elif kind == "text":
            if self.sock.config is None:
                await self._error(400, "the first message must be a config message")
            else:
                self.buffer += data.get("text", "")
        elif kind == "flush" and self.buffer:
            self.sock.owed += 1
            self.work.put_nowait(self.buffer)
            self.buffer = ""
        elif kind not in ("flush", "ping"):
            await self._error(400, f"unknown message type {kind!r}")

    async def _speak_all(self) -> None:
        try:
            while True:
                text = await self.work.get()
                if not await self._speak(text):
                    return
                self.sock.owed -= 1
                if self.sock.query.get("send_completion_event") == "true":
                    await self.ws.send_json({"type": "event", "data": {
                        "event_type": "final", "message": "Audio generation complete",
                        "timestamp": "2026-01-01T00:00:00Z"}})
        except ConnectionResetError:
            pass

    async def _speak(self, text: str) -> bool:
        assert self.sock.config is not None
        rate = self.sock.config.get("speech_sample_rate", 22050)
        pcm = tone_pcm(text, rate)
        step = rate // 10 * 2  # 100 ms
        faults = self.fake.faults
        for start in range(0, len(pcm), step):
            count = self.sock.chunks_sent
            if not await self.fake._inject(self.ws, self.request, count, self.sock.ended):
                return False
            if count == faults.error_after:
                await self._error(faults.error_status, "Fake failure")
                return False
            self.sock.chunks_sent += 1
            await self.ws.send_json({"type": "audio", "data": {
                "content_type": "audio/pcm", "request_id": self.request_id,
                "audio": base64.b64encode(pcm[start:start + step]).decode()}})
        return True

    async def _error(self, status: int, message: str) -> None:
        await self.ws.send_json({"type": "error", "data": {
            "message": message, "code": status, "request_id": self.request_id}})


def _stt_query_problem(query: dict[str, str]) -> str | None:
    """Why the realtime endpoint would reject the connection's parameters."""
    if query.get("language_code") not in STT_LANGUAGES:
        return f"unsupported language_code {query.get('language_code')!r}"
    if query.get("model", "saaras:v3-realtime") not in ("saaras:v3-realtime", "saaras:v4"):
        return f"invalid model {query.get('model')!r}"
    if query.get("sample_rate", "16000") not in ("8000", "16000"):
        return "sample_rate must be 8000 or 16000"
    if query.get("endpointing") != "manual":
        return "this fake implements endpointing=manual only"
    return None


def _tts_config_problem(data: dict[str, Any]) -> str | None:
    """Why the TTS endpoint would refuse a config message."""
    if data.get("language_code") not in TTS_LANGUAGES:
        return f"unsupported language_code {data.get('language_code')!r}"
    if not data.get("speaker"):
        return "speaker is required"
    if data.get("speech_sample_rate", 22050) not in TTS_RATES:
        return "speech_sample_rate must be 8000, 16000, 22050 or 24000"
    if data.get("output_audio_codec") != "linear16":
        return "this fake speaks linear16 only"
    return None


def _stt_error(code: str, message: str, status: int | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"event": "error", "code": code, "is_fatal": status is not None,
                             "message": message}
    if status is not None:
        error["status_code"] = status
    return error


def sarvam_error(status: int) -> web.Response:
    """A refused upgrade, with the JSON error body of Sarvam's API."""
    code = {401: "invalid_api_key_error", 429: "rate_limit_exceeded_error",
            400: "invalid_request_error"}.get(status, "internal_server_error")
    body = {"error": {"message": f"Fake error {status}", "code": code,
                      "request_id": f"fake-{uuid.uuid4().hex[:12]}"}}
    return web.json_response(body, status=status)
