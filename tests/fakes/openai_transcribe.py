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

import io
import wave
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.fakes._base import BaseFaults, FakeServer, pause
from tests.fakes.openai_server import openai_error

EXPECTED_RATE = 16000


@dataclass
class Faults(BaseFaults):
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


class FakeTranscribe(FakeServer):
    Faults = Faults

    def __init__(self, api_key: str = "test-key", *, host: str = "127.0.0.1") -> None:
        super().__init__(api_key, host=host)
        self.transcript = "what time is it"
        self.uploads: list[Upload] = []
        self.requests = 0  # every request that reached the endpoint

    @property
    def base_url(self) -> str:
        return self.address("http", "/v1")

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/audio/transcriptions", self._watched(self._answer))]

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return openai_error(401)
        if (status := self._take_status()) is not None:
            return openai_error(status)
        form = await request.post()
        upload = _read_upload(form)
        if isinstance(upload, str):
            return openai_error(400, upload)
        self.uploads.append(upload)
        await pause(self.faults.stall)
        if self.faults.malformed:
            return web.Response(text='{"text": "what ti', content_type="application/json")
        if upload.fields.get("response_format", "json") == "text":
            return web.Response(text=self.transcript + "\n")
        return web.json_response({"text": self.transcript, "usage": {
            "type": "duration", "seconds": max(1, round(upload.frames / upload.rate))}})


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
