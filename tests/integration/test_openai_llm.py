"""OpenAILlm through the real ``openai`` SDK against a local fake of the Chat Completions API."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import pytest

from services.llm.config import LlmConfig
from proto.tools import ToolSpec
from services.llm.provider import ChatMessage, ToolCall
from services.llm.providers.openai import OpenAILlm
from services.runtime.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ConfigError,
    ProviderError,
)
from tests.fakes.openai_server import FakeOpenAI, start_fake_openai

KEY = "test-key"
SYSTEM = "You are a terse test assistant."
HISTORY = [
    ChatMessage("system", SYSTEM),
    ChatMessage("user", "what is the capital of france"),
    ChatMessage("assistant", "Paris.", interrupted=True),
    ChatMessage("user", "and of italy"),
]
# A reply long enough that faults injected after two chunks land mid-stream.
LONG_REPLY = "Rome is the capital of Italy, and it has been for a long time."


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = await start_fake_openai(api_key=KEY)
    yield server
    await server.close()


@pytest.fixture
async def llm(fake: FakeOpenAI) -> AsyncIterator[OpenAILlm]:
    provider = OpenAILlm.from_config(_config(fake))
    yield provider
    await provider.aclose()


def _config(fake: FakeOpenAI, **overrides: object) -> LlmConfig:
    settings: dict[str, object] = {
        "openai_api_key": KEY, "openai_base_url": fake.base_url, "llm_provider": "openai",
        "llm_timeout": 5.0,
    }
    settings.update(overrides)
    return LlmConfig(**settings)  # type: ignore[arg-type]


async def _collect(llm: OpenAILlm, got: list[str]) -> None:
    async for delta in llm.complete(HISTORY):
        got.append(delta)


async def test_streams_deltas_that_join_to_the_reply(fake: FakeOpenAI, llm: OpenAILlm) -> None:
    got: list[str] = []
    await _collect(llm, got)
    assert len(got) > 1
    assert "".join(got) == "You said: and of italy."
    assert fake.streams_completed == 1


async def test_sends_system_prompt_and_history(fake: FakeOpenAI, llm: OpenAILlm) -> None:
    await _collect(llm, [])
    (body,) = fake.requests
    assert body["model"] == "gpt-4o-mini"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    # The interrupted flag is ours, not the API's: it must not reach the wire.
    assert body["messages"] == [{"role": m.role, "content": m.content} for m in HISTORY]


async def test_records_token_usage(fake: FakeOpenAI, llm: OpenAILlm) -> None:
    assert llm.last_usage is None
    await _collect(llm, [])
    assert llm.last_usage is not None
    assert llm.last_usage["completion_tokens"] == 5  # "You said: and of italy." in 5 chunks
    assert llm.last_usage["total_tokens"] == llm.last_usage["prompt_tokens"] + 5


async def test_server_error_is_a_retryable_status_error(fake: FakeOpenAI, llm: OpenAILlm) -> None:
    fake.fail_with_status(500)
    with pytest.raises(APIStatusError) as caught:
        await _collect(llm, [])
    assert caught.value.status == 500
    assert caught.value.retryable
    assert caught.value.provider == "openai"


async def test_rate_limit_is_retryable(fake: FakeOpenAI, llm: OpenAILlm) -> None:
    fake.fail_with_status(429, times=1)
    with pytest.raises(APIStatusError) as caught:
        await _collect(llm, [])
    assert (caught.value.status, caught.value.retryable) == (429, True)
    got: list[str] = []
    await _collect(llm, got)  # the fault was one-shot
    assert "".join(got) == "You said: and of italy."


async def test_wrong_key_is_a_status_error_that_is_not_retryable(fake: FakeOpenAI) -> None:
    llm = OpenAILlm.from_config(_config(fake, openai_api_key="sk-wrong-key-1234"))
    try:
        with pytest.raises(APIStatusError) as caught:
            await _collect(llm, [])
    finally:
        await llm.aclose()
    assert (caught.value.status, caught.value.retryable) == (401, False)
    assert "sk-wrong-key-1234" not in str(caught.value)


async def test_stall_before_first_byte_times_out(fake: FakeOpenAI) -> None:
    fake.stall(30)
    llm = OpenAILlm.from_config(_config(fake, llm_timeout=0.3))
    try:
        with pytest.raises(APITimeoutError) as caught:
            await _collect(llm, [])
    finally:
        await llm.aclose()
    assert caught.value.retryable


async def test_disconnect_mid_stream_fails_after_some_deltas(fake: FakeOpenAI, llm: OpenAILlm) -> None:
    fake.reply = LONG_REPLY
    fake.disconnect_after(2)
    got: list[str] = []
    with pytest.raises(APIConnectionError):
        await _collect(llm, got)
    assert got == ["Rome ", "is "]


async def test_malformed_stream_data_is_a_provider_error(fake: FakeOpenAI, llm: OpenAILlm) -> None:
    fake.reply = LONG_REPLY
    fake.malformed_after(1)
    got: list[str] = []
    with pytest.raises(ProviderError) as caught:
        await _collect(llm, got)
    assert type(caught.value) is ProviderError
    assert got == ["Rome "]


async def test_closing_the_generator_early_closes_the_stream(fake: FakeOpenAI, llm: OpenAILlm) -> None:
    fake.reply = LONG_REPLY
    fake.hold_after(2)  # the fake keeps the stream open until the client hangs up
    stream = llm.complete(HISTORY)
    assert [await anext(stream), await anext(stream)] == ["Rome ", "is "]
    await stream.aclose()
    await asyncio.wait_for(fake.stopped.wait(), timeout=5)
    assert fake.streams_completed == 0


async def test_missing_key_is_a_config_error_naming_the_variable(
    fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A key in the environment must neither be picked up behind the config's back nor shown.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")
    with pytest.raises(ConfigError) as caught:
        OpenAILlm.from_config(_config(fake, openai_api_key=""))
    message = str(caught.value)
    assert "OPENAI_API_KEY" in message
    assert "sk-from-the-environment" not in message and KEY not in message


async def test_the_key_never_reaches_the_logs(
    fake: FakeOpenAI, llm: OpenAILlm, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await _collect(llm, [])
    fake.fail_with_status(500)
    with pytest.raises(APIStatusError):
        await _collect(llm, [])
    assert any("completion usage" in r.getMessage() for r in caplog.records)
    assert KEY not in caplog.text


# ---- tool calls ------------------------------------------------------------------------------

CLOCK = ToolSpec(name="get_time", description="The time now.",
                 parameters={"type": "object", "properties": {"zone": {"type": "string"}}})
BANK = ToolSpec(name="get_balance", description="An account's balance.")


async def test_streamed_tool_calls_come_whole_after_the_text(fake: FakeOpenAI,
                                                             llm: OpenAILlm) -> None:
    """The API streams each call as pieces (id and name, then the arguments in parts): the
    provider yields the words first, then each call once, assembled, in the model's order."""
    fake.reply = "Let me look."
    fake.tool_calls = [{"name": "get_time", "arguments": '{"zone": "Europe/Paris"}'},
                       {"name": "get_balance", "arguments": '{"account": "savings"}'}]
    got = [item async for item in llm.complete(HISTORY, [CLOCK, BANK])]
    text = "".join(item for item in got if isinstance(item, str))
    calls = [item for item in got if isinstance(item, ToolCall)]
    assert text == "Let me look."
    assert isinstance(got[-1], ToolCall) and isinstance(got[-2], ToolCall)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_time", {"zone": "Europe/Paris"}), ("get_balance", {"account": "savings"})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    (body,) = fake.requests
    assert [t["function"]["name"] for t in body["tools"]] == ["get_time", "get_balance"]
    assert body["tools"][0]["function"]["parameters"] == CLOCK.parameters


async def test_only_a_call_and_no_words(fake: FakeOpenAI, llm: OpenAILlm) -> None:
    fake.tool_calls = [{"name": "get_time", "arguments": "{}"}]
    got = [item async for item in llm.complete(HISTORY, [CLOCK])]
    assert len(got) == 1 and isinstance(got[0], ToolCall) and got[0].name == "get_time"


async def test_a_stream_cut_before_its_end_decides_nothing(fake: FakeOpenAI,
                                                           llm: OpenAILlm) -> None:
    """The connection breaks after the words, before the calls arrive: no call is yielded
    (a half-streamed call must never run)."""
    fake.reply = "Let me look."
    fake.tool_calls = [{"name": "get_time", "arguments": '{"zone": "UTC"}'}]
    fake.disconnect_after(3)  # the three words went out; the call's pieces never do
    got: list[object] = []
    with pytest.raises(ProviderError):
        async for item in llm.complete(HISTORY, [CLOCK]):
            got.append(item)
    assert got and not any(isinstance(item, ToolCall) for item in got)


async def test_a_conversation_with_calls_goes_on_the_wire_as_the_api_wants(
        fake: FakeOpenAI, llm: OpenAILlm) -> None:
    call = ToolCall(id="call_7", name="get_time", arguments='{"zone": "UTC"}')
    history = [*HISTORY, ChatMessage("assistant", "", tool_calls=(call,)),
               ChatMessage("tool", '{"time": "12:00"}', tool_call_id="call_7", name="get_time")]
    got = "".join([item async for item in llm.complete(history, [CLOCK])])
    assert got == 'The tools said: {"time": "12:00"}.'
    (body,) = fake.requests
    assert body["messages"][-2] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_7", "type": "function",
         "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}]}
    assert body["messages"][-1] == {"role": "tool", "tool_call_id": "call_7",
                                    "content": '{"time": "12:00"}'}
