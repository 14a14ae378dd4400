"""AnthropicLlm through the real ``anthropic`` SDK against a local fake of the Messages API."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import pytest

from proto.tools import ToolSpec
from services.llm.config import LlmConfig
from services.llm.provider import ChatMessage, ToolCall
from services.llm.providers.anthropic import OPENING, AnthropicLlm
from services.runtime import metrics
from services.runtime.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ConfigError,
    ProviderError,
)
from tests.fakes.anthropic_server import FakeAnthropic, start_fake_anthropic

KEY = "test-key"
SYSTEM = "You are a terse test assistant."
HISTORY = [
    ChatMessage("system", SYSTEM),
    ChatMessage("user", "what is the capital of france"),
    ChatMessage("assistant", "Paris.", interrupted=True),
    ChatMessage("user", "and of italy"),
]
LONG_REPLY = "Rome is the capital of Italy, and it has been for a long time."
CLOCK = ToolSpec(name="get_time", description="The time now.",
                 parameters={"type": "object", "properties": {"zone": {"type": "string"}}})
BANK = ToolSpec(name="get_balance", description="An account's balance.")


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    server = await start_fake_anthropic(api_key=KEY)
    yield server
    await server.close()


@pytest.fixture
async def llm(fake: FakeAnthropic) -> AsyncIterator[AnthropicLlm]:
    provider = AnthropicLlm.from_config(_config(fake))
    yield provider
    await provider.aclose()


def _config(fake: FakeAnthropic, **overrides: object) -> LlmConfig:
    settings: dict[str, object] = {
        "anthropic_api_key": KEY, "anthropic_base_url": fake.base_url,
        "llm_provider": "anthropic", "llm_timeout": 5.0, "llm_retry_backoff": 0.01,
    }
    settings.update(overrides)
    return LlmConfig(**settings)  # type: ignore[arg-type]


async def _collect(llm: AnthropicLlm, got: list[str | ToolCall],
                   history: list[ChatMessage] = HISTORY, tools: list[ToolSpec] = []) -> None:
    async for item in llm.complete(history, tools):
        got.append(item)


def _text(turn: str) -> list[dict[str, str]]:
    return [{"type": "text", "text": turn}]


async def test_streams_deltas_that_join_to_the_reply(fake: FakeAnthropic,
                                                     llm: AnthropicLlm) -> None:
    got: list[str | ToolCall] = []
    await _collect(llm, got)
    assert len(got) > 1 and all(isinstance(item, str) for item in got)
    assert "".join(got) == "You said: and of italy."  # type: ignore[arg-type]
    assert fake.streams_completed == 1


async def test_sends_system_prompt_and_history(fake: FakeAnthropic, llm: AnthropicLlm) -> None:
    await _collect(llm, [])
    (body,) = fake.requests
    assert body["model"] == "claude-haiku-5-5" and body["max_tokens"] == 1024
    assert body["stream"] is True
    assert body["system"] == SYSTEM
    # The interrupted flag is ours, not the API's: it must not reach the wire.
    assert body["messages"] == [
        {"role": "user", "content": _text("what is the capital of france")},
        {"role": "assistant", "content": _text("Paris.")},
        {"role": "user", "content": _text("and of italy")},
    ]
    assert fake.headers[0]["Authorization"] == f"Bearer {KEY}"
    assert "anthropic-version" in fake.headers[0]


async def test_turns_are_merged_and_open_with_the_user(fake: FakeAnthropic,
                                                       llm: AnthropicLlm) -> None:
    """The greeting comes first and a user may speak twice in a row: the API wants strictly
    alternating turns that open with the user's, and refuses empty text."""
    history = [ChatMessage("system", SYSTEM), ChatMessage("assistant", "Hi, how can I help?"),
               ChatMessage("user", "hello"), ChatMessage("user", "are you there"),
               ChatMessage("assistant", ""), ChatMessage("user", "hm")]
    got: list[str | ToolCall] = []
    await _collect(llm, got, history)
    assert "".join(got) == "You said: hello are you there hm."  # type: ignore[arg-type]
    (body,) = fake.requests
    assert body["messages"] == [
        {"role": "user", "content": _text(OPENING)},
        {"role": "assistant", "content": _text("Hi, how can I help?")},
        {"role": "user", "content": [*_text("hello"), *_text("are you there"), *_text("hm")]},
    ]


async def test_records_token_usage(fake: FakeAnthropic, llm: AnthropicLlm) -> None:
    assert llm.last_usage is None
    completion = metrics.LLM_TOKENS.labels("anthropic", "completion")
    before = completion._value.get()
    await _collect(llm, [])
    assert completion._value.get() - before == 5
    assert llm.last_usage is not None
    assert llm.last_usage["output_tokens"] == 5  # "You said: and of italy." in 5 pieces
    assert llm.last_usage["input_tokens"] == sum(len(m.content.split()) for m in HISTORY)


# ---- tools -----------------------------------------------------------------------------------

async def test_tools_offered_natively_and_streamed_calls_assembled(
        fake: FakeAnthropic, llm: AnthropicLlm) -> None:
    fake.reply = "Let me look."
    fake.tool_calls = [{"name": "get_time", "arguments": '{"zone": "Europe/Paris"}'},
                       {"name": "get_balance", "arguments": '{"account": "savings"}'}]
    got: list[str | ToolCall] = []
    await _collect(llm, got, tools=[CLOCK, BANK])
    text = "".join(item for item in got if isinstance(item, str))
    calls = [item for item in got if isinstance(item, ToolCall)]
    assert text == "Let me look."
    assert isinstance(got[-1], ToolCall) and isinstance(got[-2], ToolCall)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_time", {"zone": "Europe/Paris"}), ("get_balance", {"account": "savings"})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("toolu_") for c in calls)
    (body,) = fake.requests
    assert body["tools"] == [
        {"name": "get_time", "description": "The time now.", "input_schema": CLOCK.parameters},
        {"name": "get_balance", "description": "An account's balance.",
         "input_schema": BANK.parameters}]


async def test_only_a_call_and_no_words(fake: FakeAnthropic, llm: AnthropicLlm) -> None:
    fake.tool_calls = [{"name": "get_time", "arguments": ""}]  # a call without arguments
    got: list[str | ToolCall] = []
    await _collect(llm, got, tools=[CLOCK])
    assert len(got) == 1 and isinstance(got[0], ToolCall)
    assert (got[0].name, got[0].arguments) == ("get_time", "{}")


async def test_tool_results_go_back_in_one_user_turn(fake: FakeAnthropic,
                                                     llm: AnthropicLlm) -> None:
    clock = ToolCall(id="toolu_7", name="get_time", arguments='{"zone": "UTC"}')
    bank = ToolCall(id="call_8", name="get_balance", arguments="{}")  # an OpenAI id: still fine
    history = [*HISTORY, ChatMessage("assistant", "Let me look.", tool_calls=(clock, bank)),
               ChatMessage("tool", '{"time": "12:00"}', tool_call_id="toolu_7", name="get_time"),
               ChatMessage("tool", '{"eur": 3}', tool_call_id="call_8", name="get_balance")]
    got: list[str | ToolCall] = []
    await _collect(llm, got, history, [CLOCK, BANK])
    assert "".join(got) == 'The tools said: {"time": "12:00"}; {"eur": 3}.'  # type: ignore[arg-type]
    (body,) = fake.requests
    assert body["messages"][-2] == {"role": "assistant", "content": [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "toolu_7", "name": "get_time", "input": {"zone": "UTC"}},
        {"type": "tool_use", "id": "call_8", "name": "get_balance", "input": {}}]}
    assert body["messages"][-1] == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_7", "content": '{"time": "12:00"}'},
        {"type": "tool_result", "tool_use_id": "call_8", "content": '{"eur": 3}'}]}


async def test_without_tools_earlier_calls_are_told_as_words(fake: FakeAnthropic,
                                                             llm: AnthropicLlm) -> None:
    """The API refuses tool blocks in a request that offers no tools (an agent whose tool is
    not running now): the history's calls and answers go as text instead."""
    clock = ToolCall(id="toolu_7", name="get_time", arguments='{"zone": "UTC"}')
    history = [*HISTORY, ChatMessage("assistant", "Let me look.", tool_calls=(clock,)),
               ChatMessage("tool", '{"time": "12:00"}', tool_call_id="toolu_7", name="get_time"),
               ChatMessage("user", "and now?")]
    fake.reply = "Still noon."
    got: list[str | ToolCall] = []
    await _collect(llm, got, history, [])
    assert "".join(got) == "Still noon."  # type: ignore[arg-type]
    (body,) = fake.requests
    assert "tools" not in body
    blocks = [b for m in body["messages"] for b in m["content"]]
    assert all(b["type"] == "text" for b in blocks)
    assert body["messages"][-2]["content"] == [
        {"type": "text", "text": 'Let me look. (called get_time with {"zone": "UTC"})'}]
    assert body["messages"][-1]["content"][0]["text"] == '(get_time answered: {"time": "12:00"})'


async def test_a_stream_cut_before_its_end_decides_nothing(fake: FakeAnthropic,
                                                           llm: AnthropicLlm) -> None:
    fake.reply = "Let me look."
    fake.tool_calls = [{"name": "get_time", "arguments": '{"zone": "UTC"}'}]
    fake.disconnect_after(4)  # the words and the call went out; message_stop never does
    got: list[str | ToolCall] = []
    with pytest.raises(APIConnectionError):
        await _collect(llm, got, tools=[CLOCK])
    assert "".join(got) == "Let me look."  # type: ignore[arg-type]
    assert not any(isinstance(item, ToolCall) for item in got)


# ---- failures ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "retryable"), [(401, False), (403, False), (429, True),
                                                   (529, True)])
async def test_error_statuses_are_mapped(fake: FakeAnthropic, llm: AnthropicLlm,
                                         status: int, retryable: bool) -> None:
    fake.fail_with_status(status)
    with pytest.raises(APIStatusError) as caught:
        await _collect(llm, [])
    assert (caught.value.status, caught.value.retryable) == (status, retryable)
    assert caught.value.provider == "anthropic"
    # 529 and 5xx are retried before the first token; 401, 403 and 429 are not.
    assert len(fake.requests) == (3 if status >= 500 else 1)


async def test_wrong_key_is_not_retryable_and_not_shown(fake: FakeAnthropic) -> None:
    llm = AnthropicLlm.from_config(_config(fake, anthropic_api_key="sk-ant-wrong-1234"))
    try:
        with pytest.raises(APIStatusError) as caught:
            await _collect(llm, [])
    finally:
        await llm.aclose()
    assert (caught.value.status, caught.value.retryable) == (401, False)
    assert "invalid x-api-key" in str(caught.value)
    assert "sk-ant-wrong-1234" not in str(caught.value)


async def test_transient_failures_are_retried_before_the_first_token(
        fake: FakeAnthropic, llm: AnthropicLlm) -> None:
    fake.fail_with_status(529, times=2)
    got: list[str | ToolCall] = []
    await _collect(llm, got)
    assert "".join(got) == "You said: and of italy."  # type: ignore[arg-type]
    assert len(fake.requests) == 3


async def test_an_overloaded_event_before_the_first_token_is_retried(
        fake: FakeAnthropic, llm: AnthropicLlm) -> None:
    fake.error_after(0)
    got: list[str | ToolCall] = []
    with pytest.raises(APIStatusError) as caught:
        await _collect(llm, got)
    assert (caught.value.status, caught.value.retryable) == (529, True)
    assert got == [] and len(fake.requests) == 3


async def test_no_retry_after_the_first_token(fake: FakeAnthropic, llm: AnthropicLlm) -> None:
    fake.reply = LONG_REPLY
    fake.error_after(2)
    got: list[str | ToolCall] = []
    with pytest.raises(APIStatusError) as caught:
        await _collect(llm, got)
    assert caught.value.status == 529 and "Overloaded" in str(caught.value)
    assert got == ["Rome ", "is "] and len(fake.requests) == 1


async def test_stall_before_first_byte_times_out(fake: FakeAnthropic) -> None:
    fake.stall(30)
    llm = AnthropicLlm.from_config(_config(fake, llm_timeout=0.3, llm_retries=0))
    try:
        with pytest.raises(APITimeoutError) as caught:
            await _collect(llm, [])
    finally:
        await llm.aclose()
    assert caught.value.retryable


async def test_disconnect_mid_stream_fails_after_some_deltas(fake: FakeAnthropic,
                                                             llm: AnthropicLlm) -> None:
    fake.reply = LONG_REPLY
    fake.disconnect_after(2)
    got: list[str | ToolCall] = []
    with pytest.raises(APIConnectionError):
        await _collect(llm, got)
    assert got == ["Rome ", "is "]


async def test_malformed_stream_data_is_a_provider_error(fake: FakeAnthropic,
                                                         llm: AnthropicLlm) -> None:
    fake.reply = LONG_REPLY
    fake.malformed_after(1)
    got: list[str | ToolCall] = []
    with pytest.raises(ProviderError) as caught:
        await _collect(llm, got)
    assert type(caught.value) is ProviderError
    assert got == ["Rome "]


async def test_closing_the_generator_early_closes_the_stream(fake: FakeAnthropic,
                                                            llm: AnthropicLlm) -> None:
    fake.reply = LONG_REPLY
    fake.hold_after(2)  # the fake keeps the stream open until the client hangs up
    stream = llm.complete(HISTORY)
    assert [await anext(stream), await anext(stream)] == ["Rome ", "is "]
    await stream.aclose()
    await asyncio.wait_for(fake.stopped.wait(), timeout=5)
    assert fake.streams_completed == 0


async def test_missing_key_is_a_config_error_naming_the_variable(
        fake: FakeAnthropic, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-from-the-environment")
    with pytest.raises(ConfigError) as caught:
        AnthropicLlm.from_config(_config(fake, anthropic_api_key=""))
    message = str(caught.value)
    assert "ANTHROPIC_API_KEY" in message
    assert "sk-ant-from-the-environment" not in message


def test_the_key_is_a_secret_read_from_the_vendors_variable() -> None:
    cfg = LlmConfig.from_env({"ANTHROPIC_API_KEY": "sk-ant-secret",
                              "ANTHROPIC_BASE_URL": "http://x"})
    assert (cfg.anthropic_api_key, cfg.anthropic_base_url) == ("sk-ant-secret", "http://x")
    assert "sk-ant-secret" not in str(cfg.redacted())


async def test_the_key_never_reaches_the_logs(fake: FakeAnthropic, llm: AnthropicLlm,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await _collect(llm, [])
    fake.fail_with_status(500)
    with pytest.raises(APIStatusError):
        await _collect(llm, [])
    assert any("completion usage" in r.getMessage() for r in caplog.records)
    assert KEY not in caplog.text
