"""Groq and Gemini, the openai provider under names of their own, through the real ``openai`` SDK
against the Chat Completions fake serving each vendor's path and dialect."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from proto.tools import ToolSpec
from services.llm.config import LlmConfig
from services.llm.provider import PROVIDERS, ChatMessage, ToolCall
from services.llm.providers.gemini import STAND_IN_SIGNATURE
from services.llm.providers.openai import OpenAILlm
from services.runtime import metrics
from services.runtime.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ConfigError,
)
from services.runtime.providers import load_provider
from tests.fakes.openai_server import FakeOpenAI

HISTORY = [
    ChatMessage("system", "You are a terse test assistant."),
    ChatMessage("user", "what is the capital of france"),
    ChatMessage("assistant", "Paris.", interrupted=True),
    ChatMessage("user", "and of italy"),
]
LONG_REPLY = "Rome is the capital of Italy, and it has been for a long time."
CLOCK = ToolSpec(name="get_time", description="The time now.",
                 parameters={"type": "object", "properties": {"zone": {"type": "string"}}})
BANK = ToolSpec(name="get_balance", description="An account's balance.")


@dataclass(frozen=True)
class Vendor:
    name: str
    key: str  # the vendor's own variable
    path: str  # where the vendor serves chat/completions
    base_url: str  # our default
    model: str  # our default
    bad_key_status: int

    @property
    def variable(self) -> str:
        return f"{self.name.upper()}_API_KEY"


GROQ = Vendor("groq", "gsk_test-groq-key-1234", "/openai/v1",
              "https://api.groq.com/openai/v1", "llama-3.3-70b-versatile", 401)
GEMINI = Vendor("gemini", "AIza-test-gemini-key-5678", "/v1beta/openai",
                "https://generativelanguage.googleapis.com/v1beta/openai/", "gemini-2.5-flash", 400)
OPENAI_KEY = "sk-test-openai-key-0000"


@pytest.fixture(params=[GROQ, GEMINI], ids=lambda vendor: vendor.name)
def vendor(request: pytest.FixtureRequest) -> Vendor:
    return request.param


@pytest.fixture
async def fake(vendor: Vendor) -> AsyncIterator[FakeOpenAI]:
    server = await FakeOpenAI(vendor.key, path=vendor.path, dialect=vendor.name).start()
    yield server
    await server.close()


def _environ(vendor: Vendor, fake: FakeOpenAI, **extra: str) -> dict[str, str]:
    """The stage's environment as an operator writes it (the vendor's base URL with the
    trailing slash Google's documentation shows, for Gemini)."""
    return {vendor.variable: vendor.key, "OPENAI_API_KEY": OPENAI_KEY,
            f"VOICEBUS_{vendor.name.upper()}_BASE_URL": fake.base_url + "/",
            "VOICEBUS_LLM_TIMEOUT": "5", "VOICEBUS_LLM_RETRY_BACKOFF": "0.01", **extra}


def _load(vendor: Vendor, fake: FakeOpenAI, **extra: str) -> OpenAILlm:
    config = LlmConfig.from_env(_environ(vendor, fake, **extra))
    return load_provider("llm", PROVIDERS, vendor.name, config)


@pytest.fixture
async def llm(vendor: Vendor, fake: FakeOpenAI) -> AsyncIterator[OpenAILlm]:
    provider = _load(vendor, fake)
    yield provider
    await provider.aclose()


async def _collect(llm: OpenAILlm, history: list[ChatMessage] = HISTORY,
                   tools: list[ToolSpec] | None = None) -> list[str | ToolCall]:
    return [item async for item in llm.complete(history, tools or [])]


def _text(items: list[str | ToolCall]) -> str:
    return "".join(item for item in items if isinstance(item, str))


# ---- settings ----------------------------------------------------------------------------------

def test_defaults_are_each_vendors_endpoint_and_a_current_model(vendor: Vendor) -> None:
    config = LlmConfig()
    assert getattr(config, f"{vendor.name}_base_url") == vendor.base_url
    assert getattr(config, f"{vendor.name}_model") == vendor.model
    assert LlmConfig.env_name(f"{vendor.name}_api_key") == vendor.variable
    # A secret: a log line of the settings shows only whether it is set.
    shown = LlmConfig.from_env({vendor.variable: vendor.key}).redacted()
    assert shown[f"{vendor.name}_api_key"] == "<set>" and vendor.key not in str(shown)


async def test_the_default_endpoint_is_where_the_client_goes(vendor: Vendor) -> None:
    provider = load_provider("llm", PROVIDERS, vendor.name,
                             LlmConfig.from_env({vendor.variable: vendor.key}))
    try:
        assert provider.name == vendor.name and provider.model == vendor.model
        assert str(provider._client.base_url).rstrip("/") == vendor.base_url.rstrip("/")
        assert provider._client.api_key == vendor.key  # its own key, not OPENAI_API_KEY
    finally:
        await provider.aclose()


def test_a_missing_key_names_the_vendors_variable(vendor: Vendor) -> None:
    # Another vendor's key in the environment is neither used nor shown.
    with pytest.raises(ConfigError) as caught:
        load_provider("llm", PROVIDERS, vendor.name,
                      LlmConfig.from_env({"OPENAI_API_KEY": OPENAI_KEY}))
    assert vendor.variable in str(caught.value) and OPENAI_KEY not in str(caught.value)


# ---- streaming ---------------------------------------------------------------------------------

async def test_streams_text_from_the_vendors_path_with_its_key_as_bearer(
        vendor: Vendor, fake: FakeOpenAI, llm: OpenAILlm) -> None:
    got = await _collect(llm)
    assert len(got) > 1 and _text(got) == "You said: and of italy."
    # The fake serves only the vendor's path: an answer at all shows the base URL's path used.
    assert fake.streams_completed == 1
    assert fake.headers[0]["Authorization"] == f"Bearer {vendor.key}"
    (body,) = fake.requests
    assert body["model"] == vendor.model and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    # Nothing the vendors refuse (Groq: messages[].name) or that is ours alone (interrupted).
    assert body["messages"] == [{"role": m.role, "content": m.content} for m in HISTORY]


async def test_token_usage_is_counted_under_the_vendors_name(vendor: Vendor,
                                                             llm: OpenAILlm) -> None:
    # Groq reports it as x_groq.usage on the last chunk, Gemini as OpenAI does.
    completion = metrics.LLM_TOKENS.labels(vendor.name, "completion")
    before = completion._value.get()
    await _collect(llm)
    assert llm.last_usage is not None and llm.last_usage["completion_tokens"] == 5
    assert completion._value.get() - before == 5


async def test_closing_early_closes_the_stream(fake: FakeOpenAI, llm: OpenAILlm) -> None:
    fake.reply = LONG_REPLY
    fake.hold_after(2)
    stream = llm.complete(HISTORY)
    assert [await anext(stream), await anext(stream)] == ["Rome ", "is "]
    await stream.aclose()
    await asyncio.wait_for(fake.stopped.wait(), 5)  # the fake saw the client hang up
    assert fake.streams_completed == 0


# ---- tools -------------------------------------------------------------------------------------

async def test_streamed_tool_calls_come_whole_and_apart(vendor: Vendor, fake: FakeOpenAI,
                                                        llm: OpenAILlm) -> None:
    """Groq streams each call in indexed pieces as OpenAI does; Gemini sends each call whole,
    without an index: either way two calls come out, each with its own id and arguments."""
    fake.reply = "Let me look."
    fake.tool_calls = [{"name": "get_time", "arguments": '{"zone": "Europe/Paris"}'},
                       {"name": "get_balance", "arguments": '{"account": "savings"}'}]
    got = await _collect(llm, tools=[CLOCK, BANK])
    calls = [item for item in got if isinstance(item, ToolCall)]
    assert _text(got) == "Let me look." and got[-2:] == calls
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_time", {"zone": "Europe/Paris"}), ("get_balance", {"account": "savings"})]
    assert len({c.id for c in calls}) == 2
    assert [t["function"]["name"] for t in fake.requests[0]["tools"]] == ["get_time", "get_balance"]


async def test_a_decision_and_its_answers_go_back_as_the_vendor_wants(
        vendor: Vendor, fake: FakeOpenAI, llm: OpenAILlm) -> None:
    """The model's calls, then their answers: Gemini gets each decision's thought signature
    back (its fake, like Gemini 3, refuses a call without one); Groq gets no ``name``."""
    fake.tool_calls = [{"name": "get_time", "arguments": '{"zone": "UTC"}'}]
    (call,) = await _collect(llm, tools=[CLOCK])
    assert isinstance(call, ToolCall)
    history = [*HISTORY, ChatMessage("assistant", "", tool_calls=(call,)),
               ChatMessage("tool", '{"time": "12:00"}', tool_call_id=call.id, name=call.name)]
    got = await _collect(llm, history, [CLOCK])
    assert _text(got) == 'The tools said: {"time": "12:00"}.'
    wired = fake.requests[-1]["messages"][-2]["tool_calls"][0]
    assert wired["id"] == call.id and wired["function"]["name"] == "get_time"
    if vendor is GEMINI:
        assert wired["extra_content"] == {"google": {"thought_signature": "sig-0"}}
    else:
        assert "extra_content" not in wired
    assert all("name" not in m for m in fake.requests[-1]["messages"])


@pytest.mark.parametrize("vendor", [GEMINI], indirect=True, ids=["gemini"])
async def test_gemini_gets_a_stand_in_for_a_call_it_did_not_make(fake: FakeOpenAI,
                                                                  llm: OpenAILlm) -> None:
    """A call made by another provider of the chain (or remembered by another replica) has no
    signature: Gemini gets the one Google documents for such histories, not a 400."""
    calls = (ToolCall(id="call_7", name="get_time", arguments='{"zone": "UTC"}'),
             ToolCall(id="call_8", name="get_balance", arguments="{}"))
    history = [*HISTORY, ChatMessage("assistant", "Let me look.", tool_calls=calls),
               ChatMessage("tool", '{"time": "12:00"}', tool_call_id="call_7", name="get_time"),
               ChatMessage("tool", '{"eur": 3}', tool_call_id="call_8", name="get_balance")]
    got = await _collect(llm, history, [CLOCK, BANK])
    assert _text(got) == 'The tools said: {"time": "12:00"}; {"eur": 3}.'
    wired = fake.requests[0]["messages"][-3]["tool_calls"]
    # One signature per decision, on its first call.
    assert wired[0]["extra_content"] == {"google": {"thought_signature": STAND_IN_SIGNATURE}}
    assert "extra_content" not in wired[1]


# ---- failures ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "retryable", "attempts"),
                         [(500, True, 3), (503, True, 3), (429, True, 1)])
async def test_error_statuses_are_mapped_and_retried_before_the_first_token(
        vendor: Vendor, fake: FakeOpenAI, llm: OpenAILlm, status: int, retryable: bool,
        attempts: int) -> None:
    fake.fail_with_status(status)
    with pytest.raises(APIStatusError) as caught:
        await _collect(llm)
    error = caught.value
    assert (error.status, error.retryable, error.provider) == (status, retryable, vendor.name)
    assert len(fake.requests) == attempts  # 5xx retried twice; a 429 goes to the chain at once
    assert "Error code" not in str(error)  # the vendor's own message (Gemini's: unwrapped)


async def test_a_wrong_key_is_final_and_never_shown(vendor: Vendor, fake: FakeOpenAI) -> None:
    llm = _load(vendor, fake, **{vendor.variable: "wrong-key-98765"})
    try:
        with pytest.raises(APIStatusError) as caught:
            await _collect(llm)
    finally:
        await llm.aclose()
    # Gemini says so with a 400, Groq with a 401: neither is worth a retry.
    assert (caught.value.status, caught.value.retryable) == (vendor.bad_key_status, False)
    assert len(fake.requests) == 1 and "wrong-key-98765" not in str(caught.value)
    if vendor is GEMINI:
        assert str(caught.value) == "400: API key not valid. Please pass a valid API key."


async def test_a_broken_stream_fails_after_what_was_said(fake: FakeOpenAI,
                                                         llm: OpenAILlm) -> None:
    fake.reply = LONG_REPLY
    fake.disconnect_after(2)
    got: list[str | ToolCall] = []
    with pytest.raises(APIConnectionError):
        async for item in llm.complete(HISTORY):
            got.append(item)
    assert got == ["Rome ", "is "] and len(fake.requests) == 1  # no retry after a token


async def test_a_stall_is_a_timeout(vendor: Vendor, fake: FakeOpenAI) -> None:
    fake.slow_first_token()
    llm = _load(vendor, fake, VOICEBUS_LLM_TIMEOUT="0.3", VOICEBUS_LLM_RETRIES="0")
    try:
        with pytest.raises(APITimeoutError) as caught:
            await _collect(llm)
    finally:
        await llm.aclose()
    assert caught.value.retryable and caught.value.provider == vendor.name


async def test_the_key_never_reaches_the_logs(vendor: Vendor, fake: FakeOpenAI,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    llm = _load(vendor, fake)
    try:
        logging.getLogger("test").info("settings: %s", llm_settings(vendor, fake))
        await _collect(llm)
        fake.fail_with_status(500)  # retried: a log line per retry, with the server's message
        with pytest.raises(APIStatusError):
            await _collect(llm)
    finally:
        await llm.aclose()
    retries = [r for r in caplog.records if r.getMessage().startswith("retrying")]
    assert len(retries) == 2 and all(r.provider == vendor.name for r in retries)
    assert any("completion usage" in r.getMessage() for r in caplog.records)
    assert vendor.key not in caplog.text and OPENAI_KEY not in caplog.text


def llm_settings(vendor: Vendor, fake: FakeOpenAI) -> dict[str, object]:
    """What the stage logs of its settings at start-up."""
    return LlmConfig.from_env(_environ(vendor, fake)).redacted()
