"""A local fake of ElevenLabs' TTS stream-input WebSocket
(``/v1/text-to-speech/{voice_id}/stream-input``) speaking the real protocol.

As the API and the ``elevenlabs`` SDK's models (``InitializeConnection``, ``SendText``,
``CloseConnection``, ``AudioOutput``, ``FinalOutput``) describe it: the query names
``model_id``, ``output_format`` (``pcm_<rate>``, raw s16le, is all this fake speaks) and
``sync_alignment``; the key comes as an ``xi-api-key`` header on the upgrade, or in the first
message (``xi_api_key``, or ``authorization: Bearer``). The first message opens the stream
(text " ", optional ``voice_settings``); then text messages, spoken on ``flush`` (the real server
may also start on its chunk-length schedule); empty text ends the input: what is left is spoken,
``{"isFinal": true}`` follows and the server closes (1000). Audio messages are
``{"audio": <base64>, "alignment": {"chars", "charStartTimesMs", "charDurationsMs"},
"normalizedAlignment": ...}`` (timings only with ``sync_alignment=true``), times in ms from the
start of that message's audio.

Errors come as this socket reports them: an error message ``{"message", "error", "code"}``, then
a close with that code: 1008 (policy violation) for the client's faults, a wrong key among them
(checked when the first message comes), 1011 for the server's own.

    fake = await FakeElevenLabs(api_key="test-key").start()
    fake.fail_handshake(503)              # refuse the upgrade with an HTTP status
    fake.stall_handshake()                # never answer the upgrade
    await fake.refuse_connections()       # stop listening: connection refused
    await fake.accept_connections()       # listen again, on the same port
    fake.stall()                          # take text, send nothing back
    fake.delay_first_audio(3.0)           # a socket's first audio comes this late
    fake.disconnect_after(2)              # drop the connection before the third audio message
    fake.malformed_after(1)               # a frame that is not JSON (counts are per socket)
    fake.error_after(1, "system_busy")    # an error message, then a close
    fake.close_after(1, 1011, "Oops")     # a close frame alone
    fake.hold_after(1)                    # wait for the client to close the socket
    await fake.stopped.wait()             # a client closed a socket that still owed audio

Audio is ``tone_pcm(text)`` of each flushed text (outer blanks trimmed), in 100 ms messages;
every character lasts ``MS_PER_CHAR``.
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

RATES = {8000, 16000, 22050, 24000, 44100}
MESSAGE_MS = 100
# The errors this fake can send: name -> (close code, message), as ElevenLabs words them.
ERRORS = {
    "invalid_api_key": (1008, "Invalid API key"),
    "quota_exceeded": (1008, "This request exceeds your quota. You have 0 credits remaining."),
    "too_many_concurrent_requests": (1008, "Too many concurrent requests for your plan."),
    "input_timeout_exceeded": (1008, "Have not received a new text input within the timeout."),
    "invalid_request": (1008, "Invalid message."),
    "system_busy": (1011, "The system is experiencing heavy traffic, please try again later."),
    "internal_error": (1011, "An internal server error occurred."),
}
_REST_STATUS = {401: "invalid_api_key", 429: "too_many_concurrent_requests", 503: "system_busy"}


@dataclass
class Faults(BaseFaults):
    # ``status`` refuses the upgrade. Counts are audio messages of one socket, so of one turn.
    stall_handshake: float = 0.0
    first_audio_delay: float = 0.0
    disconnect_after: int | None = None
    malformed_after: int | None = None
    error_after: int | None = None
    error: str = "system_busy"
    close_after: int | None = None
    close_code: int = 1011
    close_reason: str = ""
    hold_after: int | None = None  # until the client closes the socket


@dataclass
class _Socket:
    ws: web.WebSocketResponse
    request: web.Request
    buffer: str = ""
    audio_sent: int = 0
    opened: bool = False  # the first message came, with a good key
    final: bool = False
    ended_by_server: bool = False  # a fault ended it: nobody stopped anything
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    work: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)  # None: the end


class FakeElevenLabs(FakeServer):
    Faults = Faults

    def __init__(self, api_key: str = "test-key", *, host: str = "127.0.0.1") -> None:
        super().__init__(api_key, host=host)
        self.handshakes: list[dict[str, str]] = []  # headers (lower-cased) of each upgrade
        self.queries: list[dict[str, str]] = []  # the query of each upgrade
        self.voices: list[str] = []
        self.requests: list[dict[str, Any]] = []  # every JSON message received, in order
        self.finals = 0  # streams that ended with isFinal
        self.audio_messages = 0

    @property
    def url(self) -> str:
        return self.address("ws")

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/v1/text-to-speech/{voice_id}/stream-input", self._handle)]

    # -- failure injection ----------------------------------------------------------------------

    fail_handshake = FakeServer.fail_with_status

    def stall(self, seconds: float = math.inf) -> None:
        """Take text and send nothing back until the client closes the socket."""
        if seconds != math.inf:
            raise TypeError("FakeElevenLabs stalls only until the client gives up "
                            "(delay_first_audio is the finite kind)")
        self.hold_after(0)

    def delay_first_audio(self, seconds: float) -> None:
        self.faults.first_audio_delay = seconds

    def error_after(self, count: int, error: str = "system_busy") -> None:
        """An error message named ``error`` (one of ``ERRORS``) and its close, before audio
        message ``count``."""
        if error not in ERRORS:
            raise ValueError(f"unknown error {error!r}")
        self.faults.error_after, self.faults.error = count, error

    def close_after(self, count: int, code: int = 1011, reason: str = "") -> None:
        """A close frame without an error message before audio message ``count``."""
        self.faults.close_after, self.faults.close_code = count, code
        self.faults.close_reason = reason

    async def refuse_connections(self) -> None:
        """Stop listening: new connections are refused (sockets already open stay)."""
        assert self._runner is not None
        for site in list(self._runner.sites):
            await site.stop()

    async def accept_connections(self) -> None:
        assert self._runner is not None and self.port
        await web.TCPSite(self._runner, self.host, self.port).start()

    # -- the socket -----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if (status := self._take_status()) is not None:
            name = _REST_STATUS.get(status, "error")
            return web.json_response({"detail": {"status": name, "message": f"Fake {status}"}},
                                     status=status)
        await pause(self.faults.stall_handshake)
        self.handshakes.append({k.lower(): v for k, v in request.headers.items()})
        self.queries.append(dict(request.query))
        self.voices.append(request.match_info["voice_id"])
        ws = web.WebSocketResponse(max_msg_size=16 * 2**20)
        await ws.prepare(request)
        sock = _Socket(ws, request)
        speaker = asyncio.create_task(self._speak_all(sock))
        try:
            await self._receive(sock)
        finally:
            sock.closed.set()
            if sock.opened and not sock.final and not sock.ended_by_server:
                self.stopped.set()  # the client left while audio was owed
            speaker.cancel()
        return ws

    async def _receive(self, sock: _Socket) -> None:
        async for msg in sock.ws:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                message = json.loads(msg.data)
            except ValueError:
                message = None
            if not isinstance(message, dict) or not isinstance(message.get("text"), str):
                await self._error(sock, "invalid_request")
                return
            self.requests.append(message)
            if not sock.opened:
                if problem := self._opening_problem(sock.request, message):
                    await self._error(sock, problem)
                    return
                sock.opened = True
                continue
            if message["text"] == "":  # the end of the input
                sock.work.put_nowait(sock.buffer)
                sock.work.put_nowait(None)
                sock.buffer = ""
                continue
            sock.buffer += message["text"]
            if message.get("flush"):
                sock.work.put_nowait(sock.buffer)
                sock.buffer = ""

    def _opening_problem(self, request: web.Request, message: dict[str, Any]) -> str | None:
        keys = {request.headers.get("xi-api-key"), message.get("xi_api_key"),
                message.get("xi-api-key")}
        bearer = message.get("authorization") == f"Bearer {self.api_key}"
        if self.api_key not in keys and not bearer:
            return "invalid_api_key"
        if message["text"] != " " or not request.query.get("model_id") \
                or _rate(request) not in RATES:
            return "invalid_request"
        return None

    async def _speak_all(self, sock: _Socket) -> None:
        while (text := await sock.work.get()) is not None:
            if not await self._speak(sock, text.strip()):
                return
        sock.final = True
        self.finals += 1
        await sock.ws.send_json({"isFinal": True})
        await sock.ws.close()

    async def _speak(self, sock: _Socket, text: str) -> bool:
        """Send ``text``'s audio; False if a fault ended the socket."""
        rate = _rate(sock.request)
        pcm = tone_pcm(text, rate)
        step = rate * MESSAGE_MS // 1000 * 2
        per = MESSAGE_MS // MS_PER_CHAR  # characters per message
        timed = sock.request.query.get("sync_alignment") == "true"
        for count, start in enumerate(range(0, len(pcm), step)):
            if not await self._inject(sock):
                return False
            chars = list(text[count * per:(count + 1) * per])
            await sock.ws.send_json({
                "audio": base64.b64encode(pcm[start:start + step]).decode(),
                "alignment": _alignment(chars) if timed else None,
                # As the model read it: lower case stands for the normalization here.
                "normalizedAlignment": _alignment([c.lower() for c in chars]) if timed else None,
            })
            sock.audio_sent += 1
            self.audio_messages += 1
        return True

    async def _inject(self, sock: _Socket) -> bool:
        """Apply the faults due before the next audio message; False ends the socket."""
        faults, count = self.faults, sock.audio_sent
        if count == 0:
            await pause(faults.first_audio_delay)
        if count == faults.disconnect_after:
            sock.ended_by_server = True
            drop(sock.request)
            return False
        if count == faults.malformed_after:
            await sock.ws.send_str('{"audio": "AAAA", "alignment": ')
        if count == faults.error_after:
            await self._error(sock, faults.error)
            return False
        if count == faults.close_after:
            sock.ended_by_server = True
            await sock.ws.close(code=faults.close_code, message=faults.close_reason.encode())
            return False
        if count == faults.hold_after:
            await sock.closed.wait()
            return False
        return True

    async def _error(self, sock: _Socket, name: str) -> None:
        code, message = ERRORS[name]
        sock.ended_by_server = True
        await sock.ws.send_json({"message": message, "error": name, "code": code})
        await sock.ws.close(code=code, message=message.encode())


def _rate(request: web.Request) -> int | None:
    fmt = request.query.get("output_format", "")
    return int(fmt[4:]) if fmt.startswith("pcm_") and fmt[4:].isdigit() else None


def _alignment(chars: list[str]) -> dict[str, list[Any]]:
    return {"chars": chars, "charStartTimesMs": [i * MS_PER_CHAR for i in range(len(chars))],
            "charDurationsMs": [MS_PER_CHAR] * len(chars)}
