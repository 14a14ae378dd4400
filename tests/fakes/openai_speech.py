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

from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from tests.fakes._base import BaseFaults, FakeServer, drop, hold, pause
from tests.fakes.openai_server import openai_error

MS_PER_CHAR = 10


def tone_pcm(text: str, sample_rate: int) -> bytes:
    """Deterministic stand-in for speech: a 440 Hz tone, ``MS_PER_CHAR`` per character."""
    count = len(text) * MS_PER_CHAR * sample_rate // 1000
    wave = 8000 * np.sin(2 * np.pi * 440 * np.arange(count) / sample_rate)
    return wave.astype("<i2").tobytes()


@dataclass
class Faults(BaseFaults):
    stall: float = 0.0  # before the headers
    disconnect_after: int | None = None  # counts body writes
    hold_after: int | None = None
    malformed: bool = False  # an HTML page, as a misrouted proxy sends


class PcmSpeechServer(FakeServer):
    """A POST endpoint streaming raw s16le; subclasses say how the vendor authenticates, reads
    the request and words its errors."""

    Faults = Faults
    route = "/"
    content_type = "application/octet-stream"
    # Odd on purpose: a client must not assume reads end on a sample boundary.
    piece_bytes = 4801

    def __init__(self, api_key: str = "test-key", *, host: str = "127.0.0.1") -> None:
        super().__init__(api_key, host=host)
        # Each request: {"body", "query", "headers" (lower-cased names)}.
        self.requests: list[dict[str, Any]] = []

    def routes(self) -> list[web.RouteDef]:
        return [web.post(self.route, self._watched(self._answer))]

    # -- to override ----------------------------------------------------------------------------

    def authorized(self, request: web.Request) -> bool:
        raise NotImplementedError

    def error(self, status: int) -> web.Response:
        raise NotImplementedError

    def speech(self, request: web.Request, body: dict[str, Any]) -> tuple[str, int] | web.Response:
        """(text, sample rate) of a valid request, or the error response for an invalid one."""
        raise NotImplementedError

    # -- the endpoint ---------------------------------------------------------------------------

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
        await pause(self.faults.stall)
        if self.faults.malformed:
            return web.Response(text="<html><body>502 Bad Gateway</body></html>",
                                content_type="text/html")
        speech = self.speech(request, body)
        if isinstance(speech, web.Response):
            return speech
        return await self._speak(request, tone_pcm(*speech))

    async def _speak(self, request: web.Request, pcm: bytes) -> web.StreamResponse:
        async def write(response: web.StreamResponse) -> bool:
            for count, start in enumerate(range(0, len(pcm), self.piece_bytes)):
                if count == self.faults.disconnect_after:
                    drop(request)
                    return False
                if count == self.faults.hold_after:
                    await hold()
                await response.write(pcm[start:start + self.piece_bytes])
            return True

        return await self._stream(request, {"Content-Type": self.content_type}, write)


_VOICES = {"alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage",
           "shimmer", "verse", "marin", "cedar"}


class FakeOpenAISpeech(PcmSpeechServer):
    route = "/v1/audio/speech"
    content_type = "audio/pcm"
    sample_rate = 24000

    @property
    def base_url(self) -> str:
        return self.address("http", "/v1")

    def authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.api_key}"

    def error(self, status: int) -> web.Response:
        return openai_error(status)

    def speech(self, request: web.Request, body: dict[str, Any]) -> tuple[str, int] | web.Response:
        text = body.get("input")
        if not isinstance(text, str) or not text or body.get("voice") not in _VOICES \
                or not body.get("model"):
            return self.error(400)
        if body.get("response_format") != "pcm":
            return self.error(400)  # this fake only speaks raw PCM
        return text, self.sample_rate
