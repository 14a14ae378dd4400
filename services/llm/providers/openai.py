"""Streaming chat completions through the official ``openai`` SDK.

Works with any OpenAI-compatible server (``OPENAI_BASE_URL``: Ollama, vLLM…); Groq and Gemini
have named providers on top of it (``groq.py``, ``gemini.py``) with settings of their own. The
SDK's own retries are off because it would retry at any point; ours happen only before the
first token (a retry after it would make the user hear the start of the reply twice), and only
for failures a second try can fix. Past that, which provider to try is the fallback chain's call.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, Self

import httpx
import openai
from openai.types.chat import ChatCompletionChunk

from services.llm.config import LlmConfig
from proto.tools import ToolSpec
from services.llm.provider import ChatMessage, ToolCall
from services.runtime import metrics
from services.runtime.config import require_key
from services.runtime.errors import APIConnectionError, APIStatusError, ProviderError
from services.runtime.openai_api import make_client, map_openai_error
from services.runtime.retry import before_first
from services.runtime.usage import report_tokens

log = logging.getLogger(__name__)
# Calls whose extra fields (Gemini's thought signature) are kept to be sent back with them.
_KEPT_CALLS = 1024


class OpenAILlm:
    name = "openai"

    def __init__(self, client: openai.AsyncOpenAI, *, model: str, retries: int = 2,
                 retry_backoff: float = 0.25, stream_usage: bool = True) -> None:
        self._client = client
        self.model = model
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.stream_usage = stream_usage
        # Token usage of the last finished completion, as the API reported it.
        self.last_usage: dict[str, Any] | None = None
        # What a server attached to a tool call besides id, name and arguments, by call id,
        # to go back with the call in later requests (Gemini wants its thought signatures).
        self._call_extras: dict[str, dict[str, Any]] = {}
        self._log_extra = {"stage": "llm", "provider": self.name}

    @classmethod
    def from_config(cls, cfg: LlmConfig) -> OpenAILlm:
        return cls.for_account(cfg, model=cfg.llm_model)

    @classmethod
    def for_account(cls, cfg: LlmConfig, *, model: str) -> Self:
        """The provider on the account of the config's ``<name>_api_key`` and
        ``<name>_base_url``, with the shared timeouts and retries."""
        key = getattr(cfg, f"{cls.name}_api_key")
        require_key(key, provider=cls.name, stage="llm",
                    variable=cfg.env_name(f"{cls.name}_api_key"))
        client = make_client(key, getattr(cfg, f"{cls.name}_base_url"),
                             httpx.Timeout(cfg.llm_timeout, connect=cfg.llm_connect_timeout))
        return cls(client, model=model, retries=cfg.llm_retries,
                   retry_backoff=cfg.llm_retry_backoff, stream_usage=cfg.llm_stream_usage)

    async def complete(self, messages: Sequence[ChatMessage],
                       tools: Sequence[ToolSpec] = ()) -> AsyncIterator[str | ToolCall]:
        self.last_usage = None
        request: dict[str, Any] = {
            "model": self.model, "messages": [self._wire(m) for m in messages], "stream": True,
        }
        if tools:
            request["tools"] = [_wire_tool(tool) for tool in tools]
        if self.stream_usage:
            request["stream_options"] = {"include_usage": True}
        usage: dict[str, Any] = {}  # per call: one provider serves many sessions at once
        calls: dict[int, dict[str, Any]] = {}  # the tool calls, by index, as they stream in
        stream, first = await self._first_delta(request, usage, calls)
        # Leaving this block early (the turn was cancelled, aclose()) closes the HTTP response,
        # which is what tells the server to stop generating.
        async with stream:
            if first is not None:
                yield first
                while (chunk := await self._next_chunk(stream)) is not None:
                    if text := _read(chunk, usage, calls):
                        yield text
        self._count_usage(usage)
        # Only a stream read to its end gives calls: a cut one decided nothing.
        for index in sorted(calls):
            call = calls[index]
            self._keep_extras(call)
            yield ToolCall(id=call["id"] or f"call_{index}", name=call["name"],
                           arguments=call["arguments"] or "{}")

    async def _first_delta(self, request: dict[str, Any], usage: dict[str, Any],
                           calls: dict[int, dict[str, Any]]
                           ) -> tuple[openai.AsyncStream[ChatCompletionChunk], str | None]:
        """Open the stream and read up to its first text delta (None: it ended without one,
        e.g. only tool calls), retrying transient failures: until then nothing reached the
        user, and nothing was decided."""
        async def attempt() -> tuple[openai.AsyncStream[ChatCompletionChunk], str | None]:
            calls.clear()
            stream = await self._open(request)
            try:
                while (chunk := await self._next_chunk(stream)) is not None:
                    if text := _read(chunk, usage, calls):
                        return stream, text
                return stream, None
            except BaseException:  # a failure, or cancelled: the connection must not linger
                await stream.close()
                raise

        return await before_first(attempt, retries=self.retries, backoff=self.retry_backoff,
                                  transient=_transient, log=log, extra=self._log_extra)

    async def _open(self, request: dict[str, Any]) -> openai.AsyncStream[ChatCompletionChunk]:
        try:
            return await self._client.chat.completions.create(**request)
        except Exception as exc:
            raise self._map_error(exc) from exc

    def _count_usage(self, usage: dict[str, Any]) -> None:
        self.last_usage = usage or None
        report_tokens(self.name, usage)  # to the turn being metered
        for kind in ("prompt", "completion"):
            if isinstance(tokens := usage.get(f"{kind}_tokens"), int):
                metrics.LLM_TOKENS.labels(self.name, kind).inc(tokens)
        log.debug("completion usage: %s", self.last_usage, extra=self._log_extra)

    async def _next_chunk(self, stream: openai.AsyncStream[ChatCompletionChunk]) -> ChatCompletionChunk | None:
        # Error mapping lives here, not around the ``yield``, so an exception the consumer
        # throws into the generator is never mistaken for a provider failure.
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            return None
        except Exception as exc:
            raise self._map_error(exc) from exc

    def _map_error(self, exc: Exception) -> ProviderError:
        return map_openai_error(exc, provider=self.name, client=self._client)

    def _wire(self, message: ChatMessage) -> dict[str, Any]:
        wired = _wire_message(message)
        for call in wired.get("tool_calls", ()):
            if (extra := self._call_extras.get(call["id"])) is not None:
                call.update(extra)
        return wired

    def _keep_extras(self, call: dict[str, Any]) -> None:
        if call["id"] and (extra := call.get("extra")):
            self._call_extras[call["id"]] = extra
            if len(self._call_extras) > _KEPT_CALLS:  # the oldest go: their turns are long past
                del self._call_extras[next(iter(self._call_extras))]

    async def aclose(self) -> None:
        await self._client.close()


def _wire_message(message: ChatMessage) -> dict[str, Any]:
    # ``interrupted`` stays off the wire: Chat Completions has no such field (strict
    # OpenAI-compatible servers reject unknown keys), and writing a marker into the content
    # teaches the model to say the marker itself.
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    if message.tool_calls:
        return {"role": "assistant", "content": message.content or None,
                "tool_calls": [{"id": call.id, "type": "function",
                                "function": {"name": call.name, "arguments": call.arguments}}
                               for call in message.tool_calls]}
    return {"role": message.role, "content": message.content}


def _wire_tool(tool: ToolSpec) -> dict[str, Any]:
    return {"type": "function", "function": {"name": tool.name, "description": tool.description,
                                             "parameters": tool.parameters}}


def _transient(exc: ProviderError) -> bool:
    """Worth a second try at once: the connection broke or timed out, or the server erred.
    A 429 is not: retrying a rate-limited key right away makes it worse."""
    if isinstance(exc, APIStatusError):
        return exc.status >= 500
    return isinstance(exc, APIConnectionError)


def _read(chunk: ChatCompletionChunk, usage: dict[str, Any],
          calls: dict[int, dict[str, Any]]) -> str:
    """The chunk's text; adds its pieces of tool calls to ``calls`` and notes the token usage
    the last chunk carries."""
    if (reported := _usage_of(chunk)) is not None:
        usage.update(reported)
    if not chunk.choices:
        return ""
    delta = chunk.choices[0].delta
    for piece in delta.tool_calls or ():
        index = piece.index if piece.index is not None else _unindexed(piece.id, calls)
        call = calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
        if piece.id:
            call["id"] = piece.id
        if piece.function is not None:
            call["name"] += piece.function.name or ""
            call["arguments"] += piece.function.arguments or ""
        # Gemini's extension (its thought signature): kept, to be sent back with the call.
        if (extra := (piece.model_extra or {}).get("extra_content")) is not None:
            call["extra"] = {"extra_content": extra}
    return delta.content or ""


def _unindexed(call_id: str | None, calls: dict[int, dict[str, Any]]) -> int:
    """The index of a piece that has none (Gemini sends each call whole, without one): a new
    id starts the next call, anything else continues the last."""
    last = max(calls, default=-1)
    if last < 0 or (call_id and call_id != calls[last]["id"]):
        return last + 1
    return last


def _usage_of(chunk: ChatCompletionChunk) -> dict[str, Any] | None:
    if chunk.usage is not None:
        return chunk.usage.model_dump(exclude_none=True)
    # Groq puts it under its own key on the last chunk.
    groq = (chunk.model_extra or {}).get("x_groq")
    if isinstance(groq, dict) and isinstance(groq.get("usage"), dict):
        return groq["usage"]
    return None
