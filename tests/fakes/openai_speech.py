"""A local fake of OpenAI's speech API (``POST /v1/audio/speech``) streaming raw PCM, and the
base it shares with the Deepgram fake: a POST that streams s16le audio, with failure injection.

The real SDK is pointed at it (``base_url=fake.base_url``), so tests cover our code *and* the
SDK's request building and error handling, with failures injected where real servers fail:

    fake = await FakeOpenAISpeech(api_key="test-key").start()
    fake.fail_with_status(503, times=1)   # an error status (with the API's error JSON)
    fake.stall()                          # no response at all until the client gives up
    fake.disconnect_after(2)              # drop the connection after two body writes
    fake.hold_after(1)                    # stop writing and wait for the client to hang up
    fake.malformed()                      # 200 with an HTML page instead of audio
    await fake.stopped.wait()             # the client hung up while audio was owed

The audio is a tone whose length follows the text (``tone_pcm``): tests know exactly what each
chunk must sound like. Bodies are written in odd-sized pieces, as TCP may deliver them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

MS_PER_CHAR = 10


def tone_pcm(text: str, sample_rate: int) -> bytes:
    """Deterministic stand-in for speech: a 440 Hz tone, ``MS_PER_CHAR`` per character."""
    count = len(text) * MS_PER_CHAR * sample_rate // 1000
    wave = 8000 * np.sin(2 * np.pi * 440 * np.arange(count) / sample_rate)
    return wave.astype("<i2").tobytes()


@dataclass
class Faults:
    status: int | None = None
    # How many more requests get ``status``; None means all of them.
    status_times: int | None = None
    stall: bool = False
    disconnect_after: int | None = None
    hold_after: int | None = None
    malformed: bool = False


class PcmSpeechServer:
    """A POST endpoint streaming raw s16le; subclasses say how the vendor authenticates, reads
    the request and words its errors."""

    route = "/"
    content_type = "application/octet-stream"
    # Odd on purpose: a client must not assume reads end on a sample boundary.
    piece_bytes = 4801

    def __init__(self, api_key: str = "test-key", *, host: str = "127.0.0.1") -> None:
        self.api_key = api_key
        self.host = host
        self.faults = Faults()
        # Each request: {"body", "query", "headers" (lower-cased names)}.
        self.requests: list[dict[str, Any]] = []
        self.streams_completed = 0
        # Set when a client hung up while audio was still owed (stalled, held or mid-body).
        self.stopped = asyncio.Event()
        self.port = 0
        self._runner: web.AppRunner | None = None

    # -- to override ----------------------------------------------------------------------------

    def authorized(self, request: web.Request) -> bool:
        raise NotImplementedError

    def error(self, status: int) -> web.Response:
        raise NotImplementedError

    def speech(self, request: web.Request, body: dict[str, Any]) -> tuple[str, int] | web.Response:
        """(text, sample rate) of a valid request, or the error response for an invalid one."""
        raise NotImplementedError

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> PcmSpeechServer:
        app = web.Application()
        app.router.add_post(self.route, self._handle)
        # handler_cancellation: a client that hangs up cancels its handler, which is how the
        # fake notices an early close even while it is holding or stalling.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0,
                                     access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- failure injection ----------------------------------------------------------------------

    def fail_with_status(self, status: int, *, times: int | None = None) -> None:
        self.faults.status, self.faults.status_times = status, times

    def stall(self) -> None:
        """Send nothing, not even headers, until the client gives up."""
        self.faults.stall = True

    def disconnect_after(self, pieces: int) -> None:
        """Drop the connection after ``pieces`` body writes."""
        self.faults.disconnect_after = pieces

    def hold_after(self, pieces: int) -> None:
        """Stop after ``pieces`` body writes and keep the response open until the client
        leaves, so a test can prove that closing early really closes the connection."""
        self.faults.hold_after = pieces

    def malformed(self) -> None:
        """Answer 200 with an HTML page, as a misrouted proxy does."""
        self.faults.malformed = True

    def reset(self) -> None:
        self.faults = Faults()

    # -- the endpoint ---------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._answer(request)
        except asyncio.CancelledError:
            self.stopped.set()
            raise

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return self.error(400)
        self.requests.append({"body": body, "query": dict(request.query),
                              "headers": {k.lower(): v for k, v in request.headers.items()}})
        if not self.authorized(request):
            return self.error(401)
        if (status := self._take_status()) is not None:
            return self.error(status)
        if self.faults.stall:
            await asyncio.Event().wait()  # until the client hangs up and we are cancelled
        if self.faults.malformed:
            return web.Response(text="<html><body>502 Bad Gateway</body></html>",
                                content_type="text/html")
        speech = self.speech(request, body)
        if isinstance(speech, web.Response):
            return speech
        return await self._stream(request, tone_pcm(*speech))

    def _take_status(self) -> int | None:
        faults = self.faults
        if faults.status is None or faults.status_times == 0:
            return None
        if faults.status_times is not None:
            faults.status_times -= 1
        return faults.status

    async def _stream(self, request: web.Request, pcm: bytes) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": self.content_type})
        await response.prepare(request)
        try:
            for count, start in enumerate(range(0, len(pcm), self.piece_bytes)):
                if count == self.faults.disconnect_after:
                    assert request.transport is not None
                    request.transport.close()  # flushes what was written, then drops it
                    return response
                if count == self.faults.hold_after:
                    await asyncio.Event().wait()  # until the client hangs up
                await response.write(pcm[start:start + self.piece_bytes])
            await response.write_eof()
        except ConnectionResetError:
            self.stopped.set()
            return response
        self.streams_completed += 1
        return response


_OPENAI_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("Invalid request body.", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    429: ("Rate limit reached for requests.", "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request.", "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}
_VOICES = {"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage",
           "shimmer", "verse", "marin", "cedar"}


class FakeOpenAISpeech(PcmSpeechServer):
    route = "/v1/audio/speech"
    content_type = "audio/pcm"
    sample_rate = 24000

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.api_key}"

    def error(self, status: int) -> web.Response:
        default = (f"Fake error {status}.", "api_error", None)
        message, type_, code = _OPENAI_ERRORS.get(status, default)
        body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
        return web.json_response(body, status=status)

    def speech(self, request: web.Request, body: dict[str, Any]) -> tuple[str, int] | web.Response:
        text = body.get("input")
        if not isinstance(text, str) or not text or body.get("voice") not in _VOICES \
                or not body.get("model"):
            return self.error(400)
        if body.get("response_format") != "pcm":
            return self.error(400)  # this fake only speaks raw PCM
        return text, self.sample_rate
