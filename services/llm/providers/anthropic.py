"""Streaming Claude replies through the official ``anthropic`` SDK (the Messages API).

The same contract as the openai provider: the SDK's own retries are off, ours happen only
before the first text (after it the user has heard the start of the reply), and tool calls are
yielded only from a stream that reached ``message_stop`` — a cut stream decided nothing.
What differs is the wire: the system prompt is its own field, turns must alternate user /
assistant (ours are merged where they do not), tools are offered as ``input_schema`` and
called with ``tool_use`` blocks, and their answers go back as ``tool_result`` blocks of one
user turn.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anthropic
import httpx2
from anthropic.types import RawMessageStreamEvent

from proto.tools import ToolSpec
from services.llm.config import LlmConfig
from services.llm.provider import ChatMessage, ToolCall
from services.runtime import metrics
from services.runtime.config import require_key
from services.runtime.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ProviderError,
)
from services.runtime.retry import before_first
from services.runtime.usage import report_tokens

log = logging.getLogger(__name__)
_LOG_EXTRA = {"stage": "llm", "provider": "anthropic"}
# An ``error`` event mid-stream arrives on a 200 response: its type says what the status
# would have been (https://docs.anthropic.com/en/api/errors).
_STATUS_OF_TYPE = {
    "invalid_request_error": 400, "authentication_error": 401, "billing_error": 402,
    "permission_error": 403, "not_found_error": 404, "request_too_large": 413,
    "rate_limit_error": 429, "api_error": 500, "timeout_error": 504, "overloaded_error": 529,
}
# The API wants a user turn first; our history may open with the agent's greeting.
OPENING = "(The call starts.)"


class _Reply:
    """What one streamed message says besides its text: tool calls by block index, usage,
    and whether the stream reached its end."""

    def __init__(self) -> None:
        self.calls: dict[int, dict[str, str]] = {}
        self.usage: dict[str, Any] = {}
        self.stopped = False

    def read(self, event: RawMessageStreamEvent) -> str:
        """The event's text, if any; notes everything else."""
        match event.type:
            case "message_start":
                self.usage.update(event.message.usage.model_dump(exclude_none=True))
            case "content_block_start" if event.content_block.type == "tool_use":
                block = event.content_block
                self.calls[event.index] = {"id": block.id, "name": block.name, "arguments": ""}
            case "content_block_delta":
                delta = event.delta
                if delta.type == "text_delta":
                    return delta.text
                if delta.type == "input_json_delta" and event.index in self.calls:
                    self.calls[event.index]["arguments"] += delta.partial_json
            case "message_delta":
                # Counts here are cumulative: they replace those of message_start.
                self.usage.update(event.usage.model_dump(exclude_none=True))
            case "message_stop":
                self.stopped = True
        return ""

    def tool_calls(self) -> list[ToolCall]:
        return [ToolCall(id=call["id"], name=call["name"], arguments=call["arguments"] or "{}")
                for _, call in sorted(self.calls.items())]


class AnthropicLlm:
    name = "anthropic"

    def __init__(self, client: anthropic.AsyncAnthropic, *, model: str, max_tokens: int = 1024,
                 retries: int = 2, retry_backoff: float = 0.25) -> None:
        self._client = client
        self.model = model
        self.max_tokens = max_tokens
        self.retries = retries
        self.retry_backoff = retry_backoff
        # Token usage of the last finished reply, as the API reported it.
        self.last_usage: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, cfg: LlmConfig) -> AnthropicLlm:
        require_key(cfg.anthropic_api_key, provider=cls.name, stage="llm",
                    variable="ANTHROPIC_API_KEY")
        client = anthropic.AsyncAnthropic(
            api_key=cfg.anthropic_api_key,
            base_url=cfg.anthropic_base_url or None,  # None: the SDK's default endpoint
            timeout=httpx2.Timeout(cfg.llm_timeout, connect=cfg.llm_connect_timeout),
            max_retries=0,
        )
        return cls(client, model=cfg.anthropic_model, max_tokens=cfg.anthropic_max_tokens,
                   retries=cfg.llm_retries, retry_backoff=cfg.llm_retry_backoff)

    async def complete(self, messages: Sequence[ChatMessage],
                       tools: Sequence[ToolSpec] = ()) -> AsyncIterator[str | ToolCall]:
        self.last_usage = None
        request = _request(self.model, self.max_tokens, messages, tools)
        stream, first, reply = await self._first_text(request)
        # Leaving this block early (the turn was cancelled, aclose()) closes the HTTP response,
        # which is what tells the server to stop generating.
        async with stream:
            if first is not None:
                yield first
                while (event := await self._next_event(stream)) is not None:
                    if text := reply.read(event):
                        yield text
        if not reply.stopped:
            # The body ended cleanly but early (a proxy cut it): as good as a broken connection.
            raise APIConnectionError("the stream ended before message_stop", provider=self.name)
        self._count_usage(reply.usage)
        for call in reply.tool_calls():
            yield call

    async def _first_text(self, request: dict[str, Any]
                          ) -> tuple[anthropic.AsyncStream[RawMessageStreamEvent], str | None,
                                     _Reply]:
        """Open the stream and read up to its first text (None: it ended without one, e.g.
        only tool calls), retrying transient failures: until then nothing reached the user,
        and nothing was decided."""
        async def attempt() -> tuple[anthropic.AsyncStream[RawMessageStreamEvent], str | None,
                                     _Reply]:
            reply = _Reply()
            stream = await self._open(request)
            try:
                while (event := await self._next_event(stream)) is not None:
                    if text := reply.read(event):
                        return stream, text, reply
                return stream, None, reply
            except BaseException:  # a failure, or cancelled: the connection must not linger
                await stream.close()
                raise

        return await before_first(attempt, retries=self.retries, backoff=self.retry_backoff,
                                  transient=_transient, log=log, extra=_LOG_EXTRA)

    async def _open(self, request: dict[str, Any]) -> anthropic.AsyncStream[RawMessageStreamEvent]:
        try:
            return await self._client.messages.create(**request, stream=True)
        except Exception as exc:
            raise self._map_error(exc) from exc

    async def _next_event(self, stream: anthropic.AsyncStream[RawMessageStreamEvent]
                          ) -> RawMessageStreamEvent | None:
        # Error mapping lives here, not around the ``yield``, so an exception the consumer
        # throws into the generator is never mistaken for a provider failure.
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            return None
        except Exception as exc:
            raise self._map_error(exc) from exc

    def _count_usage(self, usage: dict[str, Any]) -> None:
        self.last_usage = usage or None
        report_tokens(self.name, usage)  # to the turn being metered
        for kind, field in (("prompt", "input_tokens"), ("completion", "output_tokens")):
            if isinstance(tokens := usage.get(field), int):
                metrics.LLM_TOKENS.labels(self.name, kind).inc(tokens)
        log.debug("completion usage: %s", self.last_usage, extra=_LOG_EXTRA)

    def _map_error(self, exc: Exception) -> ProviderError:
        """Into our taxonomy. Broad on purpose: a malformed stream lets JSON errors escape
        unwrapped, and the stage must only ever see ``ProviderError``."""
        message = self._redact(_describe(exc))
        if isinstance(exc, anthropic.APIStatusError):
            status = exc.status_code
            if status < 400:  # an ``error`` event mid-stream
                status = _STATUS_OF_TYPE.get(str(exc.type), 500)
            return APIStatusError(message, status=status, provider=self.name)
        if isinstance(exc, anthropic.APITimeoutError | httpx2.TimeoutException):
            return APITimeoutError(message, provider=self.name)
        if isinstance(exc, anthropic.APIConnectionError | httpx2.TransportError):
            return APIConnectionError(message, provider=self.name)
        return ProviderError(f"{type(exc).__name__}: {message}", provider=self.name)

    def _redact(self, text: str) -> str:
        # Some servers echo the key they rejected; it must never reach a log line.
        key = self._client.api_key
        return text.replace(key, "<redacted>") if key else text

    async def aclose(self) -> None:
        await self._client.close()


def _request(model: str, max_tokens: int, messages: Sequence[ChatMessage],
             tools: Sequence[ToolSpec]) -> dict[str, Any]:
    system = "\n\n".join(m.content for m in messages if m.role == "system" and m.content)
    request: dict[str, Any] = {"model": model, "max_tokens": max_tokens,
                               "messages": _wire_turns(messages, bool(tools))}
    if system:
        request["system"] = system
    if tools:
        request["tools"] = [{"name": t.name, "description": t.description,
                             "input_schema": t.parameters} for t in tools]
    return request


def _wire_turns(messages: Sequence[ChatMessage], tools: bool = True) -> list[dict[str, Any]]:
    """Our history as the API's strictly alternating turns of content blocks: consecutive
    messages of one side merge (so all results of one decision share a user turn), empty
    text is left out (the API refuses it), and a user turn comes first. Without ``tools`` the
    API refuses tool blocks: earlier calls and answers are then told as text."""
    turns: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "system":
            continue
        role = "assistant" if message.role == "assistant" else "user"
        blocks = _blocks(message) if tools else _told(message)
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if not turns or turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": [{"type": "text", "text": OPENING}]})
    return turns


def _blocks(message: ChatMessage) -> list[dict[str, Any]]:
    # ``interrupted`` stays off the wire, as with the openai provider: writing a marker into
    # the content teaches the model to say the marker itself.
    if message.role == "tool":
        return [{"type": "tool_result", "tool_use_id": message.tool_call_id,
                 "content": message.content}]
    blocks: list[dict[str, Any]] = []
    if message.content:
        blocks.append({"type": "text", "text": message.content})
    for call in message.tool_calls:
        blocks.append({"type": "tool_use", "id": call.id, "name": call.name,
                       "input": _arguments(call.arguments)})
    return blocks


def _told(message: ChatMessage) -> list[dict[str, Any]]:
    """A message's tool blocks as words, for a request that offers no tools."""
    if message.role == "tool":
        return [{"type": "text", "text": f"({message.name or 'the tool'} answered: "
                                          f"{message.content})"}]
    text = message.content + "".join(f" (called {call.name} with {call.arguments})"
                                     for call in message.tool_calls)
    return [{"type": "text", "text": text.strip()}] if text.strip() else []


def _arguments(text: str) -> dict[str, Any]:
    # The API wants an object; a call whose JSON was malformed was refused by the stage, and
    # what goes back is what the tool was (not) run with.
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _transient(exc: ProviderError) -> bool:
    """Worth a second try at once: the connection broke or timed out, or the server erred or
    was overloaded (529). A 429 is not: retrying a rate-limited key right away makes it worse."""
    if isinstance(exc, APIStatusError):
        return exc.status >= 500
    return isinstance(exc, APIConnectionError)


def _describe(exc: Exception) -> str:
    # Prefer the API's own error message over the SDK's dump of the body.
    if isinstance(exc, anthropic.APIStatusError) and exc.api_message:
        return exc.api_message
    return str(exc) or type(exc).__name__
