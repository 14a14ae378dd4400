"""A local fake of OpenAI's Chat Completions API that speaks the real wire protocol.

The real ``openai`` SDK can be pointed at it (``base_url=fake.base_url``), so tests cover our
code *and* the SDK's parsing, with failures injected where real servers fail: an error status
before streaming, a stall before the first byte, a broken connection or garbage mid-stream.

    fake = await start_fake_openai(api_key="test-key")
    fake.reply = "Hello there."          # or leave None: "You said: <last user text>."
    fake.disconnect_after(2)             # drop the connection after two content chunks
    ...                                  # point OpenAILlm at fake.base_url
    assert fake.requests[0]["messages"][0]["role"] == "system"
    await fake.close()

Token counts in ``usage`` are word counts: deterministic, not a real tokenizer.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

_PIECE = re.compile(r"\S+\s*")
_ERRORS: dict[int, tuple[str, str, str | None]] = {
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    429: ("Rate limit reached for requests.", "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request. Sorry about that!",
          "server_error", None),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}


@dataclass
class Faults:
    """What the next requests should suffer. Chunk counts are content chunks."""

    status: int | None = None
    # How many more requests get ``status``; None means all of them.
    status_times: int | None = None
    stall: float = 0.0
    disconnect_after: int | None = None
    malformed_after: int | None = None
    hold_after: int | None = None


class FakeOpenAI:
    def __init__(self, api_key: str = "test-key", *, host: str = "127.0.0.1") -> None:
        self.api_key = api_key
        self.host = host
        # The reply text; None means "You said: <last user message>."
        self.reply: str | None = None
        self.faults = Faults()
        self.requests: list[dict[str, Any]] = []
        self.streams_completed = 0
        # Set when a client went away while a response was still being produced.
        self.client_disconnected = asyncio.Event()
        self.base_url = ""
        self._runner: web.AppRunner | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._ids = itertools.count(1)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> FakeOpenAI:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        # handler_cancellation: a client that hangs up cancels its handler, which is how the
        # fake notices an early close even while it is holding or stalling.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0,
                                     access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://{self.host}:{port}/v1"
        return self

    async def close(self) -> None:
        for task in list(self._handlers):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeOpenAI:
        return self if self._runner is not None else await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- failure injection --------------------------------------------------------------------

    def fail_with_status(self, status: int, *, times: int | None = None) -> None:
        """Answer with ``status`` and OpenAI's error JSON before any streaming."""
        self.faults.status, self.faults.status_times = status, times

    def stall(self, seconds: float) -> None:
        """Wait ``seconds`` before sending the first byte of the response."""
        self.faults.stall = seconds

    def disconnect_after(self, chunks: int) -> None:
        """Close the connection after ``chunks`` content chunks, mid-stream."""
        self.faults.disconnect_after = chunks

    def malformed_after(self, chunks: int) -> None:
        """Send an SSE event whose data is not JSON after ``chunks`` content chunks."""
        self.faults.malformed_after = chunks

    def hold_after(self, chunks: int) -> None:
        """Stop after ``chunks`` content chunks and keep the stream open until the client
        leaves, so a test can prove that closing early really closes the connection."""
        self.faults.hold_after = chunks

    def reset(self) -> None:
        self.faults = Faults()

    # -- the endpoint -------------------------------------------------------------------------

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            return await self._answer(request)
        except asyncio.CancelledError:
            self.client_disconnected.set()
            raise
        finally:
            self._handlers.discard(task)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "We could not parse the JSON body of your request.",
                          "invalid_request_error", None)
        self.requests.append(body)
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, *_ERRORS[401])
        if (status := self._take_status()) is not None:
            return _error(status, *_ERRORS.get(status, (f"Fake error {status}.", "api_error", None)))
        if self.faults.stall:
            await asyncio.sleep(self.faults.stall)
        reply = self._reply_text(body)
        if body.get("stream"):
            return await self._stream(request, body, reply)
        return web.json_response(self._completion(body, reply), headers=self._headers())

    def _take_status(self) -> int | None:
        faults = self.faults
        if faults.status is None or faults.status_times == 0:
            return None
        if faults.status_times is not None:
            faults.status_times -= 1
        return faults.status

    def _reply_text(self, body: dict[str, Any]) -> str:
        if self.reply is not None:
            return self.reply
        users = [m.get("content") or "" for m in body.get("messages", []) if m.get("role") == "user"]
        heard = " ".join(users[-1].split()) if users else ""
        return f"You said: {heard}."

    def _headers(self) -> dict[str, str]:
        return {"x-request-id": f"req_fake{next(self._ids)}", "openai-processing-ms": "1"}

    async def _stream(self, request: web.Request, body: dict[str, Any], reply: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
            **self._headers(),
        })
        await response.prepare(request)
        chunks = _Chunks(body.get("model", "gpt-4o-mini"), body)
        try:
            await _send(response, chunks.delta({"role": "assistant", "content": ""}))
            for index, piece in enumerate(_PIECE.findall(reply)):
                if not await self._inject(request, response, index):
                    return response
                await _send(response, chunks.delta({"content": piece}))
            await _send(response, chunks.delta({}, finish_reason="stop"))
            if chunks.include_usage:
                await _send(response, chunks.usage(reply))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            self.client_disconnected.set()
            return response
        self.streams_completed += 1
        return response

    async def _inject(self, request: web.Request, response: web.StreamResponse, index: int) -> bool:
        """Apply mid-stream faults before content chunk ``index``; False ends the response."""
        faults = self.faults
        if faults.disconnect_after == index:
            assert request.transport is not None
            request.transport.close()  # flushes what was written, then drops the connection
            return False
        if faults.malformed_after == index:
            await response.write(b'data: {"id": "chatcmpl-broken", "choices": [\n\n')
        if faults.hold_after == index:
            await asyncio.Event().wait()  # until the client hangs up and we are cancelled
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


async def _send(response: web.StreamResponse, chunk: dict[str, Any]) -> None:
    await response.write(f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode())


def _error(status: int, message: str, type_: str, code: str | None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return web.json_response(body, status=status)


async def start_fake_openai(api_key: str = "test-key") -> FakeOpenAI:
    """Start a fake on 127.0.0.1 with a free port; ``await fake.close()`` when done (or use
    ``async with await start_fake_openai() as fake``)."""
    return await FakeOpenAI(api_key).start()
