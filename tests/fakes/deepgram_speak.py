"""A local fake of Deepgram's Aura REST API (``POST /v1/speak``) streaming linear16.

Speaks the real wire protocol as ``deepgram-sdk`` uses it: ``Authorization: Token <key>``, the
options as query parameters (``model``, ``encoding``, ``container``, ``sample_rate``), the text
as ``{"text": ...}``, and errors as ``{"err_code", "err_msg", "request_id"}``. Failure injection
and the deterministic tone come from the streaming base (``tests.fakes.openai_speech``):

    fake = await FakeDeepgramSpeak(api_key="test-key").start()
    fake.fail_with_status(429)  # or stall(), disconnect_after(n), hold_after(n), malformed()
    ...                                   # point DeepgramTts at fake.base_url
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from tests.fakes.deepgram_listen import deepgram_error
from tests.fakes.openai_speech import PcmSpeechServer

_LINEAR16_RATES = {"8000", "16000", "24000", "32000", "48000"}


class FakeDeepgramSpeak(PcmSpeechServer):
    route = "/v1/speak"
    content_type = "audio/l16"

    @property
    def base_url(self) -> str:
        return self.address("http")

    def authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Token {self.api_key}"

    def error(self, status: int) -> web.Response:
        return deepgram_error(status)

    def speech(self, request: web.Request, body: dict[str, Any]) -> tuple[str, int] | web.Response:
        text, query = body.get("text"), request.query
        if not isinstance(text, str) or not text.strip():
            return self.error(400)
        # This fake only speaks raw linear16; anything else would need a real encoder.
        if query.get("encoding") != "linear16" or query.get("container") != "none" \
                or query.get("sample_rate") not in _LINEAR16_RATES \
                or not query.get("model", "").startswith("aura-"):
            return self.error(400)
        return text, int(query["sample_rate"])
