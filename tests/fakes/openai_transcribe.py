"""A local fake of OpenAI's transcription endpoint (``POST /v1/audio/transcriptions``).

The real ``openai`` SDK can be pointed at it (``OPENAI_BASE_URL=fake.base_url``). It checks what
the real API checks and more: the bearer key, a multipart form with ``file`` and ``model``, and
that the file is a WAV of 16 kHz mono 16-bit audio (what our provider promises to send).

    fake = await start_fake_transcribe(api_key="test-key")
    fake.transcript = "what time is it"
    fake.fail_with_status(429, times=1)
    ...
    upload = fake.uploads[0]              # the form fields and the WAV's parameters
    await fake.close()
"""

from __future__ import annotations

import asyncio
import io
import wave
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.fakes.openai_server import _ERRORS, _error

EXPECTED_RATE = 16000


@dataclass
class Faults:
    status: int | None = None
    status_times: int | None = None  # how many requests get ``status``; None: all
    stall: float = 0.0  # before answering
    malformed: bool = False  # answer 200 with a body that is not JSON


@dataclass
class Upload:
    """One request as the fake understood it."""

    fields: dict[str, str]
    filename: str
    rate: int
    channels: int
    sample_width: int
    frames: int


class FakeTranscribe:
    def __init__(self, api_key: str = "test-key", *, host: str = "127.0.0.1") -> None:
        self.api_key = api_key
        self.host = host
        self.transcript = "what time is it"
        self.faults = Faults()
        self.uploads: list[Upload] = []
        self.requests = 0  # every request that reached the endpoint
        # Set when a client hung up while its request was still being answered.
        self.client_disconnected = asyncio.Event()
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> FakeTranscribe:
        app = web.Application()
        app.router.add_post("/v1/audio/transcriptions", self._transcriptions)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0,
                                     access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, 0).start()
        self.base_url = f"http://{self.host}:{self._runner.addresses[0][1]}/v1"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def fail_with_status(self, status: int, *, times: int | None = None) -> None:
        self.faults.status, self.faults.status_times = status, times

    def stall(self, seconds: float) -> None:
        self.faults.stall = seconds

    def malformed(self) -> None:
        self.faults.malformed = True

    async def _transcriptions(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        try:
            return await self._answer(request)
        except asyncio.CancelledError:
            self.client_disconnected.set()
            raise

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, *_ERRORS[401])
        if (status := self._take_status()) is not None:
            return _error(status, *_ERRORS.get(status, (f"Fake error {status}.", "api_error", None)))
        form = await request.post()
        upload = _read_upload(form)
        if isinstance(upload, str):
            return _error(400, upload, "invalid_request_error", None)
        self.uploads.append(upload)
        if self.faults.stall:
            await asyncio.sleep(self.faults.stall)
        if self.faults.malformed:
            return web.Response(text='{"text": "what ti', content_type="application/json")
        if upload.fields.get("response_format", "json") == "text":
            return web.Response(text=self.transcript + "\n")
        return web.json_response({"text": self.transcript, "usage": {
            "type": "duration", "seconds": max(1, round(upload.frames / upload.rate))}})

    def _take_status(self) -> int | None:
        faults = self.faults
        if faults.status is None or faults.status_times == 0:
            return None
        if faults.status_times is not None:
            faults.status_times -= 1
        return faults.status


def _read_upload(form: Any) -> Upload | str:
    """The upload, or why the API would refuse it."""
    file = form.get("file")
    if not isinstance(file, web.FileField):
        return "Missing required parameter: 'file'."
    if not form.get("model"):
        return "Missing required parameter: 'model'."
    with file.file:  # aiohttp spools uploads to a temporary file; ours to close
        data = file.file.read()
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            params = wav.getparams()
    except (wave.Error, EOFError):
        return "Invalid file format. Supported formats: ['flac', 'm4a', 'mp3', 'mp4', 'mpeg', " \
               "'mpga', 'oga', 'ogg', 'wav', 'webm']"
    if (params.framerate, params.nchannels, params.sampwidth) != (EXPECTED_RATE, 1, 2):
        return f"fake: expected 16 kHz mono s16 WAV, got {params}"
    if params.nframes < EXPECTED_RATE // 10:
        return "Audio file is too short. Minimum audio length is 0.1 seconds."
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    return Upload(fields, file.filename, params.framerate, params.nchannels, params.sampwidth,
                  params.nframes)


async def start_fake_transcribe(api_key: str = "test-key") -> FakeTranscribe:
    """Start a fake on 127.0.0.1 with a free port; ``await fake.close()`` when done."""
    return await FakeTranscribe(api_key).start()
