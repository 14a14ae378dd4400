"""A local fake of Anthropic's Messages API that speaks the real wire protocol.

The real ``anthropic`` SDK can be pointed at it (``base_url=fake.base_url``): it checks the
key (``x-api-key``, or ``Authorization: Bearer``, which the SDK sends since 2.x), refuses what the real API refuses (no ``max_tokens``, turns that do not
alternate or open with the assistant, empty text blocks, a ``tool_result`` that answers no
``tool_use`` of the turn before), answers errors with Anthropic's error JSON, and streams the
real event sequence (``message_start``, ``ping``, ``content_block_start`` / ``_delta`` /
``_stop`` with ``text_delta`` and ``input_json_delta``, ``message_delta`` with the stop reason
and usage, ``message_stop``), with failures injected where real servers fail.

    fake = await start_fake_anthropic(api_key="test-key")
    fake.reply = "Hello there."          # or leave None: "You said: <last user text>."
    fake.disconnect_after(2)             # drop the connection after two text pieces
    fake.error_after(1)                  # an ``error`` event (overloaded) after one piece
    fake.tool_calls = [{"name": "get_time", "arguments": "{}"}]
                                         # answer a user's words with these tool_use blocks
                                         # (their JSON streamed in parts); after the tools'
                                         # results: "The tools said: <their contents>."
    assert fake.requests[0]["system"] == "..."
    await fake.close()

Token counts in ``usage`` are word counts: deterministic, not a real tokenizer.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.fakes._base import BaseFaults, FakeServer, drop, hold, pause

_PIECE = re.compile(r"\S+\s*")
_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "The requested resource could not be found."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit."),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}


@dataclass
class Faults(BaseFaults):
    """What the next requests should suffer. Piece counts are text deltas, then tool calls."""

    stall: float = 0.0  # before the first byte
    disconnect_after: int | None = None
    malformed_after: int | None = None  # an event whose data is not JSON
    hold_after: int | None = None
    error_after: int | None = None  # an ``error`` event (``error_type``) mid-stream
    error_type: str = "overloaded_error"


class FakeAnthropic(FakeServer):
    Faults = Faults

    def __init__(self, api_key: str = "test-key", *, host: str = "127.0.0.1") -> None:
        super().__init__(api_key, host=host)
        self.reply: str | None = None
        # Tool calls to answer a user's words with (after any ``reply`` text): name and
        # arguments (JSON text) of each.
        self.tool_calls: list[dict[str, str]] = []
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._ids = itertools.count(1)

    @property
    def base_url(self) -> str:
        return self.address("http")  # the SDK adds /v1/messages

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/messages", self._watched(self._answer))]

    def error_after(self, count: int, error_type: str = "overloaded_error") -> None:
        """Send an ``error`` event (and nothing after it) after ``count`` pieces, as the API
        does when it is overloaded mid-reply."""
        self.faults.error_after, self.faults.error_type = count, error_type

    # -- the endpoint -------------------------------------------------------------------------

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return anthropic_error(400, "There was an issue with the format of your request.")
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.api_key not in (request.headers.get("x-api-key"),
                                _bearer(request.headers.get("Authorization", ""))):
            return anthropic_error(401)
        if (status := self._take_status()) is not None:
            return anthropic_error(status)
        if (problem := _invalid(body)) is not None:
            return anthropic_error(400, problem)
        await pause(self.faults.stall)
        calls = self._calls_for(body)
        reply = self._reply_text(body)
        if calls and self.reply is None:
            reply = ""
        if not body.get("stream"):
            return anthropic_error(400, "This fake only streams: set stream=true.")
        return await self._stream_reply(request, body, reply, calls)

    def _calls_for(self, body: dict[str, Any]) -> list[dict[str, str]]:
        """The calls to make: only after a user's words, and only of offered tools."""
        offered = {tool["name"] for tool in body.get("tools") or ()}
        if _results(body["messages"][-1]):
            return []
        return [call for call in self.tool_calls if call["name"] in offered]

    def _reply_text(self, body: dict[str, Any]) -> str:
        last = body["messages"][-1]
        if results := _results(last):
            said = [_text_of(block.get("content")) for block in results]
            return f"The tools said: {'; '.join(said)}."
        if self.reply is not None:
            return self.reply
        heard = " ".join(_text_of(last["content"]).split())
        return f"You said: {heard}."

    async def _stream_reply(self, request: web.Request, body: dict[str, Any],
                            reply: str, calls: list[dict[str, str]]) -> web.StreamResponse:
        pieces = _PIECE.findall(reply)
        message_id = f"msg_fake{next(self._ids)}"

        async def write(response: web.StreamResponse) -> bool:
            await _send(response, "message_start", {"type": "message_start", "message": {
                "id": message_id, "type": "message", "role": "assistant",
                "model": body["model"], "content": [], "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": _prompt_words(body), "output_tokens": 1}}})
            await _send(response, "ping", {"type": "ping"})
            index = 0
            if pieces:
                await _block_start(response, index, {"type": "text", "text": ""})
                for number, piece in enumerate(pieces):
                    if not await self._inject(request, response, number):
                        return False
                    await _delta(response, index, {"type": "text_delta", "text": piece})
                await _send(response, "content_block_stop",
                            {"type": "content_block_stop", "index": index})
                index += 1
            for number, call in enumerate(calls):
                if not await self._inject(request, response, len(pieces) + number):
                    return False
                await _block_start(response, index, {
                    "type": "tool_use", "id": f"toolu_fake{next(self._ids)}",
                    "name": call["name"], "input": {}})
                half = len(call["arguments"]) // 2
                for part in (call["arguments"][:half], call["arguments"][half:]):
                    await _delta(response, index, {"type": "input_json_delta",
                                                   "partial_json": part})
                await _send(response, "content_block_stop",
                            {"type": "content_block_stop", "index": index})
                index += 1
            if not await self._inject(request, response, len(pieces) + len(calls)):
                return False
            await _send(response, "message_delta", {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use" if calls else "end_turn",
                          "stop_sequence": None},
                "usage": {"output_tokens": len(pieces) + len(calls)}})
            await _send(response, "message_stop", {"type": "message_stop"})
            return True

        headers = {"Content-Type": "text/event-stream; charset=utf-8",
                   "Cache-Control": "no-cache", "request-id": f"req_fake{next(self._ids)}"}
        return await self._stream(request, headers, write)

    async def _inject(self, request: web.Request, response: web.StreamResponse, index: int) -> bool:
        """Apply mid-stream faults before piece ``index``; False ends the response."""
        faults = self.faults
        if faults.disconnect_after == index:
            drop(request)
            return False
        if faults.malformed_after == index:
            await response.write(b'event: content_block_delta\ndata: {"type": "content_bl\n\n')
        if faults.error_after == index:
            kind = faults.error_type
            message = next((m for t, m in _ERRORS.values() if t == kind), "Error")
            await _send(response, "error", {"type": "error",
                                            "error": {"type": kind, "message": message}})
            await response.write_eof()
            return False
        if faults.hold_after == index:
            await hold()
        return True


def _bearer(header: str) -> str | None:
    scheme, _, token = header.partition(" ")
    return token if scheme.lower() == "bearer" else None


def _invalid(body: dict[str, Any]) -> str | None:
    """What the real API would refuse in ``body`` (400 invalid_request_error), if anything."""
    if not isinstance(body.get("max_tokens"), int):
        return "max_tokens: Field required"
    if not isinstance(body.get("model"), str):
        return "model: Field required"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    if messages[0].get("role") != "user":
        return "messages: first message must use the \"user\" role"
    for number, message in enumerate(messages):
        if number and message.get("role") == messages[number - 1].get("role"):
            return f"messages.{number}: roles must alternate between \"user\" and \"assistant\""
        for block in _blocks(message):
            if block.get("type") == "text" and not block.get("text"):
                return f"messages.{number}: text content blocks must be non-empty"
        if results := _results(message):
            asked = {b.get("id") for b in _blocks(messages[number - 1]) if number
                     and b.get("type") == "tool_use"}
            if any(r.get("tool_use_id") not in asked for r in results):
                return (f"messages.{number}.content: unexpected `tool_use_id` found in "
                        "`tool_result` blocks: each must answer a `tool_use` of the turn before")
    if not body.get("tools") and any(b.get("type") in ("tool_use", "tool_result")
                                     for m in messages for b in _blocks(m)):
        return ("Requests which include `tool_use` or `tool_result` blocks must define tools.")
    for tool in body.get("tools") or ():
        if (tool.get("input_schema") or {}).get("type") != "object":
            return "tools: input_schema: Input should be an object schema"
    return None


def _blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content or ())


def _results(message: dict[str, Any]) -> list[dict[str, Any]]:
    if message.get("role") != "user":
        return []
    return [b for b in _blocks(message) if b.get("type") == "tool_result"]


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return " ".join(b.get("text", "") for b in content or () if b.get("type") == "text")


def _prompt_words(body: dict[str, Any]) -> int:
    system = body.get("system") or ""
    words = len(_text_of(system).split())
    return words + sum(len(_text_of(m.get("content")).split()) for m in body["messages"])


async def _block_start(response: web.StreamResponse, index: int, block: dict[str, Any]) -> None:
    await _send(response, "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": block})


async def _delta(response: web.StreamResponse, index: int, delta: dict[str, Any]) -> None:
    await _send(response, "content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": delta})


async def _send(response: web.StreamResponse, event: str, data: dict[str, Any]) -> None:
    payload = json.dumps(data, separators=(",", ":"))
    await response.write(f"event: {event}\ndata: {payload}\n\n".encode())


def anthropic_error(status: int, message: str | None = None) -> web.Response:
    """An error ``status`` with Anthropic's error JSON: the API's own wording for it, or
    ``message`` (what was wrong with the request)."""
    kind, default = _ERRORS.get(status, ("api_error", f"Fake error {status}."))
    body = {"type": "error", "error": {"type": kind, "message": message or default},
            "request_id": "req_fakeerror"}
    return web.json_response(body, status=status, headers={"request-id": "req_fakeerror"})


async def start_fake_anthropic(api_key: str = "test-key") -> FakeAnthropic:
    """Start a fake on 127.0.0.1 with a free port; ``await fake.close()`` when done."""
    return await FakeAnthropic(api_key).start()
