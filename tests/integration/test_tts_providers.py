"""The cloud TTS providers through their real SDKs, against local fakes of the vendors' APIs.

Every provider passes the conformance checks the offline Piper passes (audio per chunk, in order,
whole samples, early close stops the work, empty input is silent) and maps each injected failure
onto our error taxonomy within bounded time. Providers are built the way the stage builds them:
from the environment, through the ``PROVIDERS`` registry.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest

from services.runtime import agents
from services.runtime.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ConfigError,
    ProviderError,
)
from services.runtime.providers import load_provider
from services.tts.config import TtsConfig
from services.tts.provider import PROVIDERS, SpokenAudio
from tests.fakes.cartesia_server import FakeCartesia
from tests.fakes.deepgram_speak import FakeDeepgramSpeak
from tests.fakes.elevenlabs_server import FakeElevenLabs
from tests.fakes.openai_speech import FakeOpenAISpeech, tone_pcm
from tests.fakes.sarvam_server import FakeSarvam

KEY = "test-key-5f3a9c"
BOUND = 10.0  # no call in these tests may take longer, whatever the fault
LONG = "This sentence is long enough to come back in several pieces of audio."


@dataclass
class Case:
    name: str
    key_env: str
    url_env: str
    fake_type: Callable[..., Any]

    def url(self, fake: Any) -> str:
        return fake.url if self.name in ("cartesia", "elevenlabs") else fake.base_url

    def fail(self, fake: Any, status: int) -> None:
        if self.name in ("cartesia", "elevenlabs"):
            fake.fail_handshake(status)
        else:
            fake.fail_with_status(status)

    def malformed(self, fake: Any) -> None:
        if self.name in ("cartesia", "elevenlabs"):
            fake.malformed_after(1)
        else:
            fake.malformed()


CASES = [
    Case("cartesia", "CARTESIA_API_KEY", "VOICEBUS_CARTESIA_URL", FakeCartesia),
    Case("openai", "OPENAI_API_KEY", "OPENAI_BASE_URL", FakeOpenAISpeech),
    Case("deepgram", "DEEPGRAM_API_KEY", "VOICEBUS_DEEPGRAM_URL", FakeDeepgramSpeak),
    # FakeSarvam's base_url is an http:// origin, which VOICEBUS_SARVAM_URL takes as well.
    Case("sarvam", "SARVAM_API_KEY", "VOICEBUS_SARVAM_URL", FakeSarvam),
    Case("elevenlabs", "ELEVENLABS_API_KEY", "VOICEBUS_ELEVENLABS_URL", FakeElevenLabs),
]


@pytest.fixture(params=CASES, ids=lambda case: case.name)
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


@pytest.fixture
async def fake(case: Case) -> AsyncIterator[Any]:
    server = await case.fake_type(api_key=KEY).start()
    yield server
    await server.close()


Build = Callable[..., Awaitable[Any]]


@pytest.fixture
async def build(case: Case, fake: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Build]:
    """Makes a provider from the environment, as the stage does; ``key`` and ``timeout`` vary it."""
    made: list[Any] = []

    async def make(key: str = KEY, timeout: float = 5.0, agent: str = "") -> Any:
        """``agent``: an agent's profile in TOML, its tables named ``[agent]`` and
        ``[agent.tts]``; the stage takes its settings, as for a session of that agent."""
        monkeypatch.setenv(case.key_env, key)
        monkeypatch.setenv(case.url_env, case.url(fake))
        monkeypatch.setenv("VOICEBUS_TTS_TIMEOUT", str(timeout))
        stage = msgspec.structs.replace(TtsConfig.from_env(), tts_provider=case.name)
        if agent:
            profile = agents.parse(agent.replace("[agent", "[agents.x"))["x"]
            stage = agents.stage_config(stage, profile, "tts", "x")
        provider = load_provider("tts", PROVIDERS, case.name, stage)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.aclose()


async def texts_in(items: Iterable[str]) -> AsyncIterator[str]:
    for text in items:
        yield text


async def speak(tts: Any, *chunks: str, got: list[SpokenAudio] | None = None,
                **options: Any) -> list[SpokenAudio]:
    got = [] if got is None else got

    async def run() -> None:
        async with aclosing(tts.synthesize(texts_in(chunks), **options)) as audio:
            async for piece in audio:
                got.append(piece)

    await asyncio.wait_for(run(), BOUND)
    return got


def audio_of(pieces: list[SpokenAudio], chunk: int) -> bytes:
    return b"".join(p.pcm for p in pieces if p.chunk == chunk)


# -- conformance: what every TTS provider does ----------------------------------------------------


async def test_speaks_each_chunk_in_order(build: Build) -> None:
    tts = await build()
    chunks = ["Hello there.", LONG, "Bye."]
    pieces = await speak(tts, *chunks)
    indices = [p.chunk for p in pieces]
    assert indices == sorted(indices) and set(indices) == {0, 1, 2}
    assert all(p.pcm and len(p.pcm) % 2 == 0 for p in pieces)
    for index, text in enumerate(chunks):
        assert audio_of(pieces, index) == tone_pcm(text, tts.sample_rate)
    assert sum(p.chunk == 1 for p in pieces) > 1  # streamed, not one blob per chunk


async def test_unspeakable_chunks_are_skipped_but_keep_their_index(build: Build) -> None:
    pieces = await speak(await build(), "Hello.", " ... ", "Goodbye.")
    assert sorted({p.chunk for p in pieces}) == [0, 2]


async def test_empty_input_gives_no_audio(build: Build, fake: Any) -> None:
    tts = await build()
    assert await speak(tts) == []
    assert await speak(tts, " ", "?!") == []
    assert fake.requests == []  # nothing to say means nothing asked


@pytest.mark.parametrize("how", ["aclose", "cancel"])
async def test_closing_early_stops_the_work(build: Build, fake: Any, how: str) -> None:
    fake.hold_after(1)  # the fake stops sending and waits for the client to give up
    tts = await build()
    llm_thinking = asyncio.Event()  # never set: more text is still to come

    async def chunks() -> AsyncIterator[str]:
        yield LONG
        await llm_thinking.wait()

    first: asyncio.Future[SpokenAudio] = asyncio.get_running_loop().create_future()

    async def consume() -> None:
        async with aclosing(tts.synthesize(chunks())) as audio:
            async for piece in audio:
                if not first.done():
                    first.set_result(piece)
                if how == "aclose":
                    return

    task = asyncio.create_task(consume())
    assert (await asyncio.wait_for(first, BOUND)).chunk == 0
    if how == "cancel":
        task.cancel()  # what a barge-in does to the stage's speaking task
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.wait_for(fake.stopped.wait(), BOUND)
    fake.reset()
    assert [p.chunk for p in await speak(tts, "Still here.")][:1] == [0]


@pytest.mark.parametrize(("status", "retryable"), [(401, False), (429, True), (500, True),
                                                    (503, True)])
async def test_error_status_maps_to_status_error(case: Case, fake: Any, build: Build,
                                                 status: int, retryable: bool) -> None:
    case.fail(fake, status)
    with pytest.raises(APIStatusError) as caught:
        await speak(await build(), "Hello.")
    assert (caught.value.status, caught.value.retryable) == (status, retryable)
    assert caught.value.provider == case.name


async def test_wrong_key_is_not_retryable_and_never_shown(build: Build) -> None:
    with pytest.raises(APIStatusError) as caught:
        await speak(await build(key="sk-wrong-key-1234"), "Hello.")
    assert (caught.value.status, caught.value.retryable) == (401, False)
    assert "sk-wrong-key-1234" not in str(caught.value)


async def test_stall_before_first_audio_times_out(build: Build, fake: Any) -> None:
    fake.stall()
    tts = await build(timeout=0.3)
    started = time.perf_counter()
    with pytest.raises(APITimeoutError) as caught:
        await speak(tts, "Hello.")
    assert caught.value.retryable
    assert time.perf_counter() - started < 3.0
    await asyncio.wait_for(fake.stopped.wait(), BOUND)  # and the client let go


async def test_disconnect_mid_stream_is_a_connection_error(build: Build, fake: Any) -> None:
    fake.disconnect_after(2)
    got: list[SpokenAudio] = []
    with pytest.raises(APIConnectionError) as caught:
        await speak(await build(), LONG, got=got)
    assert caught.value.retryable
    assert all(p.chunk == 0 and len(p.pcm) % 2 == 0 for p in got)
    assert len(audio_of(got, 0)) < len(tone_pcm(LONG, 24000))


async def test_malformed_response_is_a_provider_error(case: Case, build: Build, fake: Any) -> None:
    case.malformed(fake)
    with pytest.raises(ProviderError) as caught:
        await speak(await build(), LONG)
    assert type(caught.value) is ProviderError
    assert caught.value.provider == case.name


async def test_works_again_after_a_failure(build: Build, fake: Any) -> None:
    tts = await build()
    fake.disconnect_after(1)
    with pytest.raises(APIConnectionError):
        await speak(tts, LONG)
    fake.reset()
    pieces = await speak(tts, "Hello again.")
    assert audio_of(pieces, 0) == tone_pcm("Hello again.", tts.sample_rate)


async def test_an_error_from_the_input_passes_through(build: Build) -> None:
    async def chunks() -> AsyncIterator[str]:
        yield "Hello."
        raise RuntimeError("the LLM stream broke")

    tts = await build()
    with pytest.raises(RuntimeError, match="LLM stream broke"):
        await asyncio.wait_for(_drain(tts.synthesize(chunks())), BOUND)


async def _drain(audio: AsyncIterator[SpokenAudio]) -> None:
    async with aclosing(audio):  # type: ignore[type-var]
        async for _ in audio:
            pass


async def test_missing_key_is_a_config_error_naming_the_variable(
        case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(case.key_env, raising=False)
    with pytest.raises(ConfigError, match=case.key_env):
        load_provider("tts", PROVIDERS, case.name, TtsConfig(tts_provider=case.name))


async def test_the_key_never_reaches_the_logs(case: Case, build: Build, fake: Any,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    tts = await build()
    await speak(tts, "Hello.")
    fake.disconnect_after(0)
    with pytest.raises(ProviderError):
        await speak(tts, "Hello.")
    assert any(r.name.startswith(("services.tts", "websockets", "httpx", "openai"))
               for r in caplog.records)
    assert KEY not in caplog.text


# -- what each vendor's wire protocol looks like --------------------------------------------------

cartesia_only = pytest.mark.parametrize("case", [CASES[0]], indirect=True, ids=["cartesia"])
openai_only = pytest.mark.parametrize("case", [CASES[1]], indirect=True, ids=["openai"])
deepgram_only = pytest.mark.parametrize("case", [CASES[2]], indirect=True, ids=["deepgram"])


@cartesia_only
async def test_cartesia_turn_is_one_context_streamed_and_flushed(build: Build, fake: Any) -> None:
    await speak(await build(), "Hello there.", "How are you?")
    (headers,) = fake.handshakes
    assert headers["authorization"] == f"Bearer {KEY}" and headers["cartesia-version"]
    assert len({r["context_id"] for r in fake.requests}) == 1
    # Each chunk goes out as it comes, then a flush (its audio gets its own flush id); an
    # empty non-continued request ends the context.
    assert [(r["transcript"], r["continue"], r.get("flush", False)) for r in fake.requests] == [
        ("Hello there.", True, False), ("", True, True),
        ("How are you?", True, False), ("", True, True), ("", False, False)]
    fmt = {"container": "raw", "encoding": "pcm_s16le", "sample_rate": 24000}
    assert all(r["output_format"] == fmt and r["add_timestamps"] for r in fake.requests)
    assert fake.contexts_done == 1


@cartesia_only
async def test_cartesia_an_agents_voice_and_language_reach_the_wire(build: Build,
                                                                    fake: Any) -> None:
    await speak(await build(agent='[agent]\nlanguage = "hi-IN"\n'
                                  '[agent.tts]\ncartesia_tts_voice = "voice-hi"\n'), "Namaste.")
    assert {(r["voice"]["id"], r["language"]) for r in fake.requests} == {("voice-hi", "hi")}


@cartesia_only
async def test_cartesia_word_timestamps_follow_the_turns_audio(build: Build) -> None:
    from services.tts.provider import WordTiming

    words: list[WordTiming] = []
    pieces = await speak(await build(), "Hello there.", "How are you?", words=words)
    assert [w.word for w in words] == ["Hello", "there.", "How", "are", "you?"]
    assert all(a.end <= b.start for a, b in zip(words, words[1:], strict=False))
    seconds = sum(len(p.pcm) for p in pieces) / 2 / 24000
    assert words[-1].end == pytest.approx(seconds)  # the same clock as the turn's audio


@cartesia_only
async def test_cartesia_early_close_cancels_the_context(build: Build, fake: Any) -> None:
    fake.hold_after(1)
    tts = await build()
    async with aclosing(tts.synthesize(texts_in([LONG]))) as audio:
        await asyncio.wait_for(anext(audio), BOUND)
    await asyncio.wait_for(fake.stopped.wait(), BOUND)
    assert fake.cancelled == [fake.requests[0]["context_id"]]


@cartesia_only
async def test_cartesia_keeps_sockets_for_later_turns(build: Build, fake: Any) -> None:
    tts = await build()
    await asyncio.gather(speak(tts, "One."), speak(tts, "Two."))
    assert len(fake.handshakes) == 2  # turns in flight never share a socket
    await speak(tts, "Three.")
    assert len(fake.handshakes) == 2


@cartesia_only
@pytest.mark.parametrize(("status", "retryable"), [(400, False), (429, True), (500, True)])
async def test_cartesia_error_message_mid_turn(build: Build, fake: Any, status: int,
                                               retryable: bool) -> None:
    fake.error_after(1, status=status)
    got: list[SpokenAudio] = []
    with pytest.raises(APIStatusError) as caught:
        await speak(await build(), LONG, got=got)
    assert (caught.value.status, caught.value.retryable) == (status, retryable)
    assert got  # after audio went out: the fallback chain must not retry this turn


@cartesia_only
async def test_cartesia_handshake_stall_times_out(build: Build, fake: Any) -> None:
    fake.stall_handshake()
    with pytest.raises(APITimeoutError):
        await speak(await build(timeout=0.3), "Hello.")


@cartesia_only
async def test_cartesia_unsupported_rate_fails_at_start(build: Build,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICEBUS_CARTESIA_TTS_SAMPLE_RATE", "12345")
    with pytest.raises(ConfigError, match="VOICEBUS_CARTESIA_TTS_SAMPLE_RATE"):
        await build()


@openai_only
async def test_openai_asks_for_raw_pcm(build: Build, fake: Any) -> None:
    await speak(await build(), "Hello.")
    (request,) = fake.requests
    assert request["body"] == {"model": "gpt-4o-mini-tts", "voice": "alloy", "input": "Hello.",
                               "response_format": "pcm"}
    assert request["headers"]["authorization"] == f"Bearer {KEY}"


@deepgram_only
async def test_deepgram_asks_for_raw_linear16_at_the_configured_rate(
        build: Build, fake: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICEBUS_DEEPGRAM_TTS_SAMPLE_RATE", "16000")
    tts = await build()
    pieces = await speak(tts, "Hello.")
    assert tts.sample_rate == 16000
    assert audio_of(pieces, 0) == tone_pcm("Hello.", 16000)
    (request,) = fake.requests
    assert request["body"] == {"text": "Hello."}
    assert request["query"] == {"model": "aura-2-thalia-en", "encoding": "linear16",
                                "container": "none", "sample_rate": "16000"}
    assert request["headers"]["authorization"] == f"Token {KEY}"


# -- elevenlabs: the stream-input WebSocket -------------------------------------------------------

elevenlabs_only = pytest.mark.parametrize(
    "case", [c for c in CASES if c.name == "elevenlabs"], indirect=True, ids=["elevenlabs"])


@elevenlabs_only
async def test_elevenlabs_turn_is_one_socket_of_flushed_chunks(build: Build, fake: Any) -> None:
    await speak(await build(), "Hello there.", " How are you?")
    (headers,) = fake.handshakes
    assert headers["xi-api-key"] == KEY and headers["user-agent"].startswith("elevenlabs/")
    assert fake.queries == [{"model_id": "eleven_flash_v2_5", "output_format": "pcm_24000",
                             "sync_alignment": "true", "inactivity_timeout": "60"}]
    assert fake.voices == ["JBFqnCBsd6RMkjVDRZzb"]
    # The opening message (the key is in the header, not here), each chunk the moment it came,
    # flushed and ending in one space, then the empty text that ends the input.
    assert fake.requests == [{"text": " "}, {"text": "Hello there. ", "flush": True},
                             {"text": "How are you? ", "flush": True}, {"text": ""}]
    assert fake.finals == 1


@elevenlabs_only
async def test_elevenlabs_settings_reach_the_wire(build: Build, fake: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in [("SAMPLE_RATE", "16000"), ("LANGUAGE", "de"), ("STABILITY", "0.4"),
                        ("SPEED", "1.1"), ("VOICE", "voice-1"), ("MODEL", "eleven_turbo_v2_5")]:
        monkeypatch.setenv(f"VOICEBUS_ELEVENLABS_TTS_{name}", value)
    tts = await build()
    pieces = await speak(tts, "Hallo.")
    assert tts.sample_rate == 16000 and audio_of(pieces, 0) == tone_pcm("Hallo.", 16000)
    assert fake.voices == ["voice-1"]
    (query,) = fake.queries
    assert (query["model_id"], query["output_format"], query["language_code"]) == (
        "eleven_turbo_v2_5", "pcm_16000", "de")
    assert fake.requests[0] == {"text": " ", "voice_settings": {"stability": 0.4, "speed": 1.1}}


@elevenlabs_only
async def test_elevenlabs_an_agents_voice_reaches_the_wire(build: Build, fake: Any) -> None:
    await speak(await build(agent='[agent.tts]\nelevenlabs_tts_voice = "voice-ana"\n'
                                  'elevenlabs_tts_speed = 0.9\n'), "Hello.")
    assert fake.voices == ["voice-ana"]
    assert fake.requests[0] == {"text": " ", "voice_settings": {"speed": 0.9}}


@elevenlabs_only
async def test_elevenlabs_alignments_become_word_timings_on_the_turns_clock(build: Build) -> None:
    from services.tts.provider import WordTiming

    chunks = ["Hello there.", LONG, "Bye now."]
    # The fake speaks 10 characters per 100 ms message: "This sente|nce is lon|g enough…",
    # so words are cut between messages and must come out whole.
    words: list[WordTiming] = []
    pieces = await speak(await build(), *chunks, words=words)
    expected, offset = [], 0.0
    for text in chunks:  # each character lasts 10 ms; a chunk starts where the one before ended
        expected += [(m.group(), offset + m.start() / 100, offset + m.end() / 100)
                     for m in re.finditer(r"\S+", text)]
        offset += len(text) / 100
    # The text as sent (``alignment``), not as normalized (the fake lower-cases that one).
    assert [w.word for w in words] == [word for word, _, _ in expected]
    assert [t for w in words for t in (w.start, w.end)] == pytest.approx(
        [t for _, start, end in expected for t in (start, end)])
    seconds = sum(len(p.pcm) for p in pieces) / 2 / 24000
    assert words[-1].end == pytest.approx(seconds)  # the same clock as the turn's audio
    for index, text in enumerate(chunks):  # and the characters put each message in its chunk
        assert audio_of(pieces, index) == tone_pcm(text, 24000)


@elevenlabs_only
async def test_elevenlabs_early_close_closes_the_socket(build: Build, fake: Any) -> None:
    fake.hold_after(1)
    tts = await build()
    async with aclosing(tts.synthesize(texts_in([LONG, "And more."]))) as audio:
        await asyncio.wait_for(anext(audio), BOUND)
    await asyncio.wait_for(fake.stopped.wait(), BOUND)
    assert (fake.audio_messages, fake.finals) == (1, 0)


@elevenlabs_only
@pytest.mark.parametrize(("error", "status", "retryable"), [
    ("system_busy", 503, True), ("too_many_concurrent_requests", 429, True),
    ("internal_error", 500, True), ("quota_exceeded", 402, False)])
async def test_elevenlabs_error_message_mid_turn(build: Build, fake: Any, error: str,
                                                 status: int, retryable: bool) -> None:
    fake.error_after(2, error)
    got: list[SpokenAudio] = []
    with pytest.raises(APIStatusError) as caught:
        await speak(await build(), LONG, got=got)
    assert (caught.value.status, caught.value.retryable) == (status, retryable)
    assert len(got) == 2  # after audio went out: the fallback chain must not retry this turn


@elevenlabs_only
@pytest.mark.parametrize(("code", "reason", "status"), [
    (1011, "", 500), (1013, "", 503), (1008, "Invalid API key", 401), (1000, "", None)])
async def test_elevenlabs_close_without_a_message(build: Build, fake: Any, code: int,
                                                  reason: str, status: int | None) -> None:
    fake.close_after(1, code, reason)
    with pytest.raises(ProviderError) as caught:
        await speak(await build(), LONG)
    if status is None:  # a normal close before isFinal: the speech was cut
        assert type(caught.value) is APIConnectionError
    else:
        assert isinstance(caught.value, APIStatusError) and caught.value.status == status


@elevenlabs_only
async def test_elevenlabs_wrong_key_is_refused_on_the_open_socket(build: Build, fake: Any) -> None:
    with pytest.raises(APIStatusError) as caught:
        await speak(await build(key="sk-wrong-key-1234"), "Hello.")
    assert (caught.value.status, caught.value.retryable) == (401, False)
    assert len(fake.handshakes) == 1 and fake.audio_messages == 0  # upgraded, then refused


@elevenlabs_only
async def test_elevenlabs_key_never_logged_nor_shown(build: Build, fake: Any,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    tts = await build()
    await speak(tts, "Hello.")
    assert "xi-api-key: <redacted>" in caplog.text  # the upgrade's headers were logged...
    fake.close_after(0, 1008, f"Invalid API key {KEY}")  # a server that echoes the key
    with pytest.raises(APIStatusError) as caught:
        await speak(tts, "Hello.")
    assert caught.value.status == 401 and "<redacted>" in str(caught.value)
    assert KEY not in str(caught.value) and KEY not in caplog.text  # ...never the key


@elevenlabs_only
async def test_elevenlabs_connection_refused_and_handshake_stall(build: Build, fake: Any) -> None:
    tts = await build(timeout=0.3)
    await fake.refuse_connections()
    with pytest.raises(APIConnectionError) as refused:
        await speak(tts, "Hello.")
    assert type(refused.value) is APIConnectionError and refused.value.retryable
    await fake.accept_connections()
    fake.stall_handshake()
    with pytest.raises(APITimeoutError):
        await speak(tts, "Hello.")
    fake.reset()
    # Healed: a provider with the default timeout (0.3 s for a handshake and the first audio
    # would flake on a loaded machine).
    assert audio_of(await speak(await build(), "Hello."), 0) == tone_pcm("Hello.", 24000)


@elevenlabs_only
@pytest.mark.parametrize(("variable", "value"), [
    ("VOICEBUS_ELEVENLABS_TTS_SAMPLE_RATE", "48000"),
    ("VOICEBUS_ELEVENLABS_TTS_INACTIVITY_TIMEOUT", "600"),
    ("VOICEBUS_ELEVENLABS_URL", "api.elevenlabs.io")])
async def test_elevenlabs_bad_settings_fail_at_start(case: Case, monkeypatch: pytest.MonkeyPatch,
                                                     variable: str, value: str) -> None:
    monkeypatch.setenv("ELEVENLABS_API_KEY", KEY)
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable):
        load_provider("tts", PROVIDERS, "elevenlabs", TtsConfig(tts_provider="elevenlabs"))


# -- Sarvam ---------------------------------------------------------------------------------------

sarvam_only = pytest.mark.parametrize("case", [c for c in CASES if c.name == "sarvam"],
                                      indirect=True, ids=["sarvam"])


async def _sarvam(build: Build, **settings: Any) -> Any:
    """A Sarvam provider with stage settings of its own (the environment as ``build`` sets it)."""
    await build()
    # Nothing to close after: its sockets live only as long as their turn.
    return load_provider("tts", PROVIDERS, "sarvam", TtsConfig(**settings))


@sarvam_only
async def test_sarvam_turn_is_one_socket_config_then_each_chunk_flushed(build: Build,
                                                                        fake: Any) -> None:
    tts = await _sarvam(build, sarvam_tts_language="hi-in", sarvam_tts_speaker="ritu")
    pieces = await speak(tts, "नमस्ते।", "How are you?")
    assert audio_of(pieces, 0) == tone_pcm("नमस्ते।", 22050)
    (sock,) = fake.tts_sockets
    assert sock.query == {"model": "bulbul:v3", "send_completion_event": "true"}
    assert fake.headers[0]["api-subscription-key"] == KEY
    config, *rest = sock.messages
    assert config["type"] == "config"
    assert {k: config["data"][k] for k in ("language_code", "speaker", "speech_sample_rate",
                                           "output_audio_codec")} == {
        "language_code": "hi-IN", "speaker": "ritu", "speech_sample_rate": 22050,
        "output_audio_codec": "linear16"}
    # One chunk at a time: the next text goes out once the previous one is spoken.
    assert rest == [{"type": "text", "data": {"text": "नमस्ते।"}}, {"type": "flush"},
                    {"type": "text", "data": {"text": "How are you?"}}, {"type": "flush"}]
    assert not getattr(tts, "word_timestamps", False)  # the WebSocket gives no word timings


@sarvam_only
async def test_sarvam_agent_language_reaches_the_wire(build: Build, fake: Any) -> None:
    await speak(await build(agent='[agent]\nlanguage = "te-IN"\n'), "Hello.")
    assert fake.tts_sockets[0].config["language_code"] == "te-IN"


@sarvam_only
async def test_sarvam_speaks_at_the_configured_rate(build: Build, fake: Any) -> None:
    tts = await _sarvam(build, sarvam_tts_sample_rate=16000)
    assert tts.sample_rate == 16000
    assert audio_of(await speak(tts, "Hello."), 0) == tone_pcm("Hello.", 16000)
    assert fake.tts_sockets[0].config["speech_sample_rate"] == 16000
    with pytest.raises(ConfigError, match="VOICEBUS_SARVAM_TTS_SAMPLE_RATE"):
        await _sarvam(build, sarvam_tts_sample_rate=44100)


@sarvam_only
@pytest.mark.parametrize(("status", "retryable"), [(400, False), (429, True), (500, True)])
async def test_sarvam_error_message_mid_turn(build: Build, fake: Any, status: int,
                                             retryable: bool) -> None:
    fake.error_after(1, status=status)
    got: list[SpokenAudio] = []
    with pytest.raises(APIStatusError) as caught:
        await speak(await build(), LONG, got=got)
    assert (caught.value.status, caught.value.retryable) == (status, retryable)
    assert got  # after audio went out: the fallback chain must not retry this turn


@sarvam_only
async def test_sarvam_refused_config_is_a_400(build: Build, fake: Any) -> None:
    tts = await _sarvam(build, sarvam_tts_language="xx-IN")
    with pytest.raises(APIStatusError) as caught:
        await speak(tts, "Hello.")
    assert (caught.value.status, caught.value.retryable) == (400, False)
    assert "language_code" in str(caught.value)


@sarvam_only
@pytest.mark.parametrize(("code", "error_type", "status"), [
    (4000, APIStatusError, 400),  # Sarvam rejecting the request (a voice, a parameter)
    (1011, APIConnectionError, None),  # its own failure, said only by the close
])
async def test_sarvam_close_without_an_error_message(build: Build, fake: Any, code: int,
                                                     error_type: type, status: int | None) -> None:
    fake.close_after(1, code=code)
    got: list[SpokenAudio] = []
    with pytest.raises(ProviderError) as caught:
        await speak(await build(), LONG, got=got)
    error = caught.value
    assert type(error) is error_type and getattr(error, "status", None) == status
    assert error.retryable is (status is None)  # as Sarvam's STT: no retry helps a 4000
    assert f"code {code}, Fake rejection" in str(error) and len(got) == 1


@sarvam_only
async def test_sarvam_close_reason_never_shows_the_key(build: Build, fake: Any,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fake.close_after(0, code=4000, reason=f"Invalid key {KEY}")  # a server that echoes the key
    with pytest.raises(APIStatusError) as caught:
        await speak(await build(), "Hello.")
    assert caught.value.status == 400 and "Invalid key <redacted>" in str(caught.value)
    assert KEY not in str(caught.value) and KEY not in caplog.text


@sarvam_only
async def test_sarvam_handshake_stall_times_out(build: Build, fake: Any) -> None:
    fake.stall_handshake()
    started = time.perf_counter()
    with pytest.raises(APITimeoutError):
        await speak(await build(timeout=0.3), "Hello.")
    assert time.perf_counter() - started < 3.0


@sarvam_only
async def test_sarvam_in_a_chain_hands_a_failed_turn_on(build: Build, fake: Any) -> None:
    from services.tts.service import TtsFallback

    await build()
    config = TtsConfig(tts_providers="sarvam,instant", provider_probe_interval=60.0)
    chain = TtsFallback.from_config(
        [load_provider("tts", PROVIDERS, name, config) for name in ("sarvam", "instant")], config)
    fake.fail_handshake(503)
    try:
        pieces = await speak(chain, "Hello there.")
    finally:
        await chain.aclose()
    assert chain.sample_rate == 22050  # the first provider's rate: instant's tone is resampled
    assert pieces and {p.chunk for p in pieces} == {0}
    assert fake.tts_sockets == []  # Sarvam refused the upgrade; the turn was spoken anyway
