"""A local fake of Deepgram's Aura REST API (``POST /v1/speak``) streaming linear16.

Speaks the real wire protocol as ``deepgram-sdk`` uses it: ``Authorization: Token <key>``, the
options as query parameters (``model``, ``encoding``, ``container``, ``sample_rate``), the text
as ``{"text": ...}``, and errors as ``{"err_code", "err_msg", "request_id"}``. Failure injection
and the deterministic tone come from the shared base (``tests.fakes.openai_speech``):

    fake = await FakeDeepgramSpeak(api_key="test-key").start()
    fake.fail_with_status(429)  # or stall(), disconnect_after(n), hold_after(n), malformed()
    ...                                   # point DeepgramTts at fake.base_url
"""

from __future__ import annotations

import itertools
from typing import Any

from aiohttp import web

from tests.fakes.openai_speech import PcmSpeechServer

_ERRORS = {
    400: ("Bad Request", "Failed to process the request."),
    401: ("INVALID_AUTH", "Invalid credentials."),
    429: ("TOO_MANY_REQUESTS", "Too many requests. Please try again later."),
    500: ("INTERNAL_SERVER_ERROR", "Something went wrong."),
    503: ("SERVICE_UNAVAILABLE", "The service is temporarily unavailable."),
}
_LINEAR16_RATES = {"8000", "16000", "24000", "32000", "48000"}


class FakeDeepgramSpeak(PcmSpeechServer):
    route = "/v1/speak"
    content_type = "audio/l16"
    _ids = itertools.count(1)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Token {self.api_key}"

    def error(self, status: int) -> web.Response:
        code, message = _ERRORS.get(status, ("ERROR", f"Fake error {status}."))
        body = {"err_code": code, "err_msg": message, "request_id": f"fake-{next(self._ids)}"}
        return web.json_response(body, status=status)

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
