"""A local fake of OpenAI's Chat Completions API that speaks the real wire protocol.

The real ``openai`` SDK can be pointed at it (``base_url=fake.base_url``), so tests cover our
code *and* the SDK's parsing, with failures injected where real servers fail: an error status
before streaming, a stall before the first byte, a broken connection or garbage mid-stream.

    fake = await start_fake_openai(api_key="test-key")
    fake.reply = "Hello there."          # or leave None: "You said: <last user text>."
    fake.disconnect_after(2)             # drop the connection after two content chunks
    fake.tool_calls = [{"name": "get_time", "arguments": "{}"}]
                                         # answer a user message with these calls (streamed
                                         # in pieces, as the API does); after the tools'
                                         # answers: "The tools said: <their contents>."
    ...                                  # point OpenAILlm at fake.base_url
    assert fake.requests[0]["messages"][0]["role"] == "system"
    await fake.close()

``path`` and ``dialect`` make it an OpenAI-compatible vendor: ``FakeOpenAI(path="/openai/v1",
dialect="groq")`` serves Groq's path, refuses ``messages[].name`` and reports usage as
``x_groq.usage``; ``dialect="gemini"`` streams each tool call whole without ``index`` and with a
thought signature it requires back with the call, finishes with ``stop``, and answers errors
(a bad key: 400) as Gemini's one-element list.

Token counts in ``usage`` are word counts: deterministic, not a real tokenizer.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.fakes._base import BaseFaults, FakeServer, drop, hold, pause

_PIECE = re.compile(r"\S+\s*")
_ERRORS: dict[int, tuple[str, str, str | None]] = {
    400: ("Invalid request body.", "invalid_request_error", None),
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    429: ("Rate limit reached for requests.", "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request. Sorry about that!",
          "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}


@dataclass
class Faults(BaseFaults):
    """What the next requests should suffer. Chunk counts are content chunks."""

    stall: float = 0.0  # before the first byte
    first_token_delay: float = 0.0  # the stream is open: before its first content chunk
    disconnect_after: int | None = None
    malformed_after: int | None = None  # an SSE event whose data is not JSON
    hold_after: int | None = None


class FakeOpenAI(FakeServer):
    Faults = Faults

    def __init__(self, api_key: str = "test-key", *, host: str = "127.0.0.1", path: str = "/v1",
                 dialect: str = "openai") -> None:
        super().__init__(api_key, host=host)
        self.path = path.rstrip("/")  # where chat/completions is served
        self.dialect = dialect  # "openai", "groq" or "gemini"
        self.headers: list[dict[str, str]] = []
        # The reply text; None means "You said: <last user message>."
        self.reply: str | None = None
        # Tool calls to answer a user's message with (after any ``reply`` text): name and
        # arguments (JSON text, possibly malformed on purpose) of each.
        self.tool_calls: list[dict[str, str]] = []
        self.requests: list[dict[str, Any]] = []
        self._ids = itertools.count(1)

    @property
    def base_url(self) -> str:
        return self.address("http", self.path)

    def routes(self) -> list[web.RouteDef]:
        return [web.post(f"{self.path}/chat/completions", self._watched(self._answer))]

    def slow_first_token(self, seconds: float = math.inf) -> None:
        """Open the stream at once, then hold its first token back ``seconds``."""
        self._set_fault("first_token_delay", seconds)

    # -- the endpoint -------------------------------------------------------------------------

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return openai_error(400, "We could not parse the JSON body of your request.")
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._error(401)
        if (status := self._take_status()) is not None:
            return self._error(status)
        if (problem := self._refused(body)) is not None:
            return self._error(400, problem)
        await pause(self.faults.stall)
        calls = self._calls_for(body)
        reply = self._reply_text(body)
        if calls and self.reply is None:
            reply = ""
        if body.get("stream"):
            return await self._stream_reply(request, body, reply, calls)
        return web.json_response(self._completion(body, reply), headers=self._headers())

    def _error(self, status: int, message: str | None = None) -> web.Response:
        if self.dialect != "gemini":
            return openai_error(status, message)
        if status == 401:  # Gemini's answer to a bad key
            status, message = 400, "API key not valid. Please pass a valid API key."
        error = {"code": status, "message": message or f"Fake error {status}.",
                 "status": _GEMINI_STATUS.get(status, "UNKNOWN")}
        return web.json_response([{"error": error}], status=status)

    def _refused(self, body: dict[str, Any]) -> str | None:
        """What the vendor would refuse in a well-formed request."""
        for number, message in enumerate(body.get("messages") or ()):
            if self.dialect == "groq" and "name" in message:
                return f"'messages.{number}' : property 'name' is unsupported"
            calls = message.get("tool_calls")
            if self.dialect == "gemini" and calls and not _signature(calls[0]):
                return ("Function call is missing a thought_signature in functionCall parts. "
                        f"Additional data, position {number}.")
        return None

    def _calls_for(self, body: dict[str, Any]) -> list[dict[str, str]]:
        """The tool calls to make: only for a user's message, and only of offered tools."""
        messages = body.get("messages") or [{}]
        offered = {t["function"]["name"] for t in body.get("tools") or ()}
        if messages[-1].get("role") != "user":
            return []
        return [call for call in self.tool_calls if call["name"] in offered]

    def _reply_text(self, body: dict[str, Any]) -> str:
        messages = body.get("messages") or [{}]
        if messages[-1].get("role") == "tool":
            said = [m.get("content") or "" for m in messages if m.get("role") == "tool"
                    and m.get("tool_call_id") in _last_calls(messages)]
            return f"The tools said: {'; '.join(said)}."
        if self.reply is not None:
            return self.reply
        users = [m.get("content") or "" for m in body.get("messages", []) if m.get("role") == "user"]
        heard = " ".join(users[-1].split()) if users else ""
        return f"You said: {heard}."

    def _headers(self) -> dict[str, str]:
        return {"x-request-id": f"req_fake{next(self._ids)}", "openai-processing-ms": "1"}

    async def _stream_reply(self, request: web.Request, body: dict[str, Any],
                            reply: str, calls: list[dict[str, str]]) -> web.StreamResponse:
        chunks = _Chunks(body.get("model", "gpt-4o-mini"), body)

        async def write(response: web.StreamResponse) -> bool:
            await _send(response, chunks.delta({"role": "assistant", "content": ""}))
            pieces = _PIECE.findall(reply)
            if pieces:
                await pause(self.faults.first_token_delay)
            for index, piece in enumerate(pieces):
                if not await self._inject(request, response, index):
                    return False
                await _send(response, chunks.delta({"content": piece}))
            for number, call in enumerate(calls):
                # As the API streams a call: id and name first, the arguments in pieces after.
                if not await self._inject(request, response, len(pieces) + number):
                    return False
                if self.dialect == "gemini":  # whole, no index, signed
                    await _send(response, chunks.delta({"tool_calls": [{
                        "id": f"function-call-{next(self._ids)}", "type": "function",
                        "function": {"name": call["name"], "arguments": call["arguments"]},
                        "extra_content": {"google": {"thought_signature": f"sig-{number}"}}}]}))
                    continue
                head = {"index": number, "id": f"call_fake{next(self._ids)}", "type": "function",
                        "function": {"name": call["name"], "arguments": ""}}
                await _send(response, chunks.delta({"tool_calls": [head]}))
                half = len(call["arguments"]) // 2
                for part in (call["arguments"][:half], call["arguments"][half:]):
                    await _send(response, chunks.delta(
                        {"tool_calls": [{"index": number, "function": {"arguments": part}}]}))
            finish = "tool_calls" if calls and self.dialect != "gemini" else "stop"
            last = chunks.delta({}, finish_reason=finish)
            if self.dialect == "groq":  # usage on the last chunk, under Groq's own key
                last["x_groq"] = {"id": "req_fake", "usage": chunks.usage(reply)["usage"]}
            await _send(response, last)
            if chunks.include_usage and self.dialect != "groq":
                await _send(response, chunks.usage(reply))
            await response.write(b"data: [DONE]\n\n")
            return True

        headers = {"Content-Type": "text/event-stream; charset=utf-8",
                   "Cache-Control": "no-cache", **self._headers()}
        return await self._stream(request, headers, write)

    async def _inject(self, request: web.Request, response: web.StreamResponse, index: int) -> bool:
        """Apply mid-stream faults before content chunk ``index``; False ends the response."""
        faults = self.faults
        if faults.disconnect_after == index:
            drop(request)
            return False
        if faults.malformed_after == index:
            await response.write(b'data: {"id": "chatcmpl-broken", "choices": [\n\n')
        if faults.hold_after == index:
            await hold()
        return True

    def _completion(self, body: dict[str, Any], reply: str) -> dict[str, Any]:
        chunks = _Chunks(body.get("model", "gpt-4o-mini"), body)
        return {
            "id": chunks.id, "object": "chat.completion", "created": chunks.created,
            "model": chunks.model, "system_fingerprint": "fp_fake",
            "choices": [{
                "index": 0, "message": {"role": "assistant", "content": reply, "refusal": None},
                "logprobs": None, "finish_reason": "stop",
            }],
            "usage": chunks.usage(reply)["usage"],
        }


class _Chunks:
    """Builds ``chat.completion.chunk`` objects in OpenAI's exact shape."""

    _ids = itertools.count(1)

    def __init__(self, model: str, body: dict[str, Any]) -> None:
        self.id = f"chatcmpl-fake{next(self._ids)}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.prompt_words = sum(len(str(m.get("content") or "").split())
                                for m in body.get("messages", []))

    def _base(self) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "system_fingerprint": "fp_fake"}

    def delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        chunk = self._base()
        chunk["choices"] = [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish_reason}]
        if self.include_usage:
            chunk["usage"] = None  # the real API sends an explicit null until the last chunk
        return chunk

    def usage(self, reply: str) -> dict[str, Any]:
        completion = len(_PIECE.findall(reply))
        chunk = self._base()
        chunk["choices"] = []
        chunk["usage"] = {"prompt_tokens": self.prompt_words, "completion_tokens": completion,
                          "total_tokens": self.prompt_words + completion}
        return chunk


_GEMINI_STATUS = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                  429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


def _signature(call: dict[str, Any]) -> str | None:
    return ((call.get("extra_content") or {}).get("google") or {}).get("thought_signature")


def _last_calls(messages: list[dict[str, Any]]) -> set[str]:
    """The ids of the calls of the last assistant message that made some."""
    for message in reversed(messages):
        if message.get("role") == "assistant" and message.get("tool_calls"):
            return {call["id"] for call in message["tool_calls"]}
    return set()


async def _send(response: web.StreamResponse, chunk: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode())


def openai_error(status: int, message: str | None = None) -> web.Response:
    """An error ``status`` with OpenAI's error JSON: the API's own wording for it, or
    ``message`` (what was wrong with the request)."""
    default, type_, code = _ERRORS.get(status, (f"Fake error {status}.", "api_error", None))
    body = {"error": {"message": message or default, "type": type_, "param": None, "code": code}}
    return web.json_response(body, status=status)


async def start_fake_openai(api_key: str = "test-key") -> FakeOpenAI:
    """Start a fake on 127.0.0.1 with a free port; ``await fake.close()`` when done (or use
    ``async with await start_fake_openai() as fake``)."""
    return await FakeOpenAI(api_key).start()
