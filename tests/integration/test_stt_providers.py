"""The cloud STT providers through their real SDKs against local fakes of the vendors' APIs.

Deepgram streams over its listen WebSocket (``deepgram-sdk``); OpenAI transcribes each
utterance in one request (``openai``); Sarvam streams over its realtime WebSocket
(``sarvamai``). All must keep the contract the offline provider keeps
(tests/unit/test_offline_providers.py), and fail only with our ``ProviderError`` family.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import pytest

from services.runtime.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ConfigError,
    ProviderError,
)
from services.runtime.providers import load_provider
from services.stt.config import SttConfig
from services.stt.provider import PROVIDERS, SAMPLE_RATE, SttProvider, SttResult
from services.stt.providers.deepgram import DeepgramStt, DeepgramSttConfig
from services.stt.providers.openai import OpenAIStt
from services.stt.providers.sarvam import SarvamStt, SarvamSttConfig
from tests.fakes.deepgram_listen import FakeDeepgram, start_fake_deepgram
from tests.fakes.openai_transcribe import FakeTranscribe, start_fake_transcribe
from tests.fakes.sarvam_server import FakeSarvam

DG_KEY = "dg-test-key-5f3a"
OA_KEY = "sk-test-key-9c1e"
SV_KEY = "sv-test-key-7d2b"
FRAME = bytes(SAMPLE_RATE * 2 // 50)  # 20 ms of s16le
WORDS = "what time is it in lisbon"
BOUND_S = 5.0  # no test outcome may take longer than this


@pytest.fixture
async def dg_fake() -> AsyncIterator[FakeDeepgram]:
    fake = await start_fake_deepgram(api_key=DG_KEY)
    fake.transcript = WORDS
    yield fake
    await fake.close()


@pytest.fixture
async def oa_fake() -> AsyncIterator[FakeTranscribe]:
    fake = await start_fake_transcribe(api_key=OA_KEY)
    fake.transcript = WORDS
    yield fake
    await fake.close()


@pytest.fixture
async def sv_fake() -> AsyncIterator[FakeSarvam]:
    fake = await FakeSarvam(api_key=SV_KEY).start()
    fake.transcript = WORDS
    yield fake
    await fake.close()


@pytest.fixture
def dg_env(dg_fake: FakeDeepgram, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("DEEPGRAM_API_KEY", DG_KEY)
    monkeypatch.setenv("VOICEBUS_DEEPGRAM_URL", dg_fake.url)
    monkeypatch.setenv("VOICEBUS_DEEPGRAM_STT_TIMEOUT", "1.0")
    return monkeypatch


@pytest.fixture
def oa_env(oa_fake: FakeTranscribe, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("OPENAI_API_KEY", OA_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", oa_fake.base_url)
    monkeypatch.setenv("VOICEBUS_OPENAI_STT_TIMEOUT", "1.0")
    return monkeypatch


@pytest.fixture
def sv_env(sv_fake: FakeSarvam, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("SARVAM_API_KEY", SV_KEY)
    monkeypatch.setenv("VOICEBUS_SARVAM_URL", sv_fake.url)
    # Generous: only the stall tests wait it out, and they set their own.
    monkeypatch.setenv("VOICEBUS_SARVAM_STT_TIMEOUT", "5.0")
    return monkeypatch


@pytest.fixture
async def make() -> AsyncIterator[Callable[[str], Any]]:
    """Builds a provider from the environment as the stage does at start-up; closes it after."""
    made: list[Any] = []

    def build(name: str) -> Any:
        made.append(load_provider("stt", PROVIDERS, name, SttConfig()))
        return made[-1]

    yield build
    for provider in made:
        await provider.aclose()


@pytest.fixture
def dg(dg_env: pytest.MonkeyPatch, make: Callable[[str], Any]) -> DeepgramStt:
    return make("deepgram")


@pytest.fixture
def oa(oa_env: pytest.MonkeyPatch, make: Callable[[str], Any]) -> OpenAIStt:
    return make("openai")


@pytest.fixture
def sv(sv_env: pytest.MonkeyPatch, make: Callable[[str], Any]) -> SarvamStt:
    return make("sarvam")


@pytest.fixture(params=["deepgram", "openai", "sarvam"])
def stt(request: pytest.FixtureRequest) -> SttProvider:
    fixture = {"deepgram": "dg", "openai": "oa", "sarvam": "sv"}[request.param]
    return request.getfixturevalue(fixture)


async def frames_of(seconds: float) -> AsyncIterator[bytes]:
    """Audio as after a burst from the bus: every frame available at once."""
    for _ in range(round(seconds * 50)):
        yield FRAME


class LiveMic:
    """Frames of a user who keeps talking: ``seconds`` of audio, then nothing, never an end."""

    def __init__(self, seconds: float) -> None:
        self.frames_left = round(seconds * 50)
        self.stopped = asyncio.Event()

    async def frames(self) -> AsyncIterator[bytes]:
        try:
            while self.frames_left:
                self.frames_left -= 1
                yield FRAME
            await asyncio.Event().wait()
        finally:
            self.stopped.set()


async def transcribe(stt: SttProvider, frames: AsyncIterator[bytes]) -> list[SttResult]:
    async with asyncio.timeout(BOUND_S):
        return [result async for result in stt.stream(frames)]


async def failure(stt: SttProvider, frames: AsyncIterator[bytes],
                  got: list[SttResult] | None = None) -> ProviderError:
    """Run one utterance that must fail; return the error (any other outcome fails the test)."""
    got = [] if got is None else got
    with pytest.raises(ProviderError) as caught:
        async with asyncio.timeout(BOUND_S):  # a TimeoutError here would fail the test
            async for result in stt.stream(frames):
                got.append(result)
    assert caught.value.provider == stt.name
    return caught.value


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the contract, for both providers -------------------------------------------------------


async def test_exactly_one_final_and_it_comes_last(stt: SttProvider) -> None:
    results = await transcribe(stt, frames_of(2.0))
    finals = [r for r in results if r.final]
    assert len(finals) == 1 and results[-1] is finals[0]
    assert finals[0].text == WORDS


async def test_empty_input_gives_an_empty_final(stt: SttProvider) -> None:
    assert await transcribe(stt, frames_of(0)) == [SttResult("", final=True, confidence=0.0)]


async def test_errors_of_the_frames_pass_through(stt: SttProvider) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield FRAME
        raise RuntimeError("ingress broke")

    with pytest.raises(RuntimeError, match="ingress broke"):
        await transcribe(stt, broken())
    assert (await transcribe(stt, frames_of(1.0)))[-1].text == WORDS  # still works


async def test_concurrent_utterances_on_one_provider(stt: SttProvider) -> None:
    first, second = await asyncio.gather(transcribe(stt, frames_of(1.5)),
                                         transcribe(stt, frames_of(2.0)))
    assert first[-1] == second[-1] and first[-1].text == WORDS


@pytest.mark.parametrize(("name", "variable"), [("deepgram", "DEEPGRAM_API_KEY"),
                                                 ("openai", "OPENAI_API_KEY"),
                                                 ("sarvam", "SARVAM_API_KEY")])
async def test_missing_key_fails_at_startup(name: str, variable: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(variable, "")  # set but empty is as good as missing
    with pytest.raises(ConfigError, match=variable):
        load_provider("stt", PROVIDERS, name, SttConfig())


# -- Deepgram -------------------------------------------------------------------------------


async def test_deepgram_partials_grow_before_the_final(dg: DeepgramStt) -> None:
    results = await transcribe(dg, frames_of(2.0))
    partials = [r.text for r in results[:-1]]
    # One word per 0.2 s of audio; a final segment every three words.
    assert partials == ["what", "what time", "what time is", "what time is it",
                        "what time is it in", "what time is it in lisbon"]
    assert results[-1] == SttResult(WORDS, final=True, confidence=pytest.approx(0.9))


async def test_deepgram_sends_the_audio_and_our_settings(dg: DeepgramStt,
                                                         dg_fake: FakeDeepgram) -> None:
    await transcribe(dg, frames_of(1.0))
    (conn,) = dg_fake.connections
    assert conn.audio_bytes == 50 * len(FRAME)
    assert conn.query == {"model": "nova-3", "language": "en-US", "encoding": "linear16",
                          "sample_rate": "16000", "channels": "1", "endpointing": "300",
                          "interim_results": "true", "smart_format": "true"}
    assert conn.controls == ["Finalize", "CloseStream"]
    await asyncio.wait_for(conn.ended.wait(), BOUND_S)
    assert conn.clean


async def test_deepgram_final_also_ends_on_the_close_after_closestream(
        dg: DeepgramStt, dg_fake: FakeDeepgram) -> None:
    dg_fake.ignore_finalize()  # only CloseStream flushes: the socket's close ends the utterance
    results = await transcribe(dg, frames_of(0.5))
    # Two words heard in 0.5 s; CloseStream flushes the rest as one more segment.
    assert results == [SttResult("what"), SttResult("what time"), SttResult(WORDS),
                       SttResult(WORDS, final=True, confidence=pytest.approx(0.9))]


async def test_deepgram_early_close_stops_audio_and_the_connection(
        dg: DeepgramStt, dg_fake: FakeDeepgram) -> None:
    mic = LiveMic(seconds=1.0)
    async with asyncio.timeout(BOUND_S):
        async with aclosing(dg.stream(mic.frames())) as results:
            first = await anext(results)
        assert not first.final
        assert mic.stopped.is_set()  # no more audio is pulled once the consumer has left
        (conn,) = dg_fake.connections
        await conn.ended.wait()
    assert not conn.clean and "Finalize" not in conn.controls


async def test_deepgram_cancelled_turn_stops_audio_and_the_connection(
        dg: DeepgramStt, dg_fake: FakeDeepgram) -> None:
    mic = LiveMic(seconds=1.0)
    got: list[SttResult] = []
    partial = asyncio.Event()

    async def consume() -> None:
        async for result in dg.stream(mic.frames()):
            got.append(result)
            partial.set()

    task = asyncio.create_task(consume())
    async with asyncio.timeout(BOUND_S):
        await partial.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await dg_fake.connections[0].ended.wait()
    assert mic.stopped.is_set() and not any(r.final for r in got)


async def test_deepgram_wrong_key_is_401_not_retryable(dg_env: pytest.MonkeyPatch,
                                                        make: Callable[[str], Any]) -> None:
    dg_env.setenv("DEEPGRAM_API_KEY", "dg-wrong-key-0000")
    error = await failure(make("deepgram"), frames_of(0.5))
    assert isinstance(error, APIStatusError)
    assert (error.status, error.retryable) == (401, False)
    assert "dg-wrong-key-0000" not in str(error)


@pytest.mark.parametrize(("status", "retryable"), [(500, True), (503, True), (429, True),
                                                   (400, False)])
async def test_deepgram_handshake_status(dg: DeepgramStt, dg_fake: FakeDeepgram,
                                         status: int, retryable: bool) -> None:
    dg_fake.fail_handshake(status, times=1)
    error = await failure(dg, frames_of(0.5))
    assert isinstance(error, APIStatusError)
    assert (error.status, error.retryable) == (status, retryable)
    assert (await transcribe(dg, frames_of(1.0)))[-1].text == WORDS  # the fault was one-shot


async def test_deepgram_connection_refused(dg_env: pytest.MonkeyPatch,
                                           make: Callable[[str], Any]) -> None:
    dg_env.setenv("VOICEBUS_DEEPGRAM_URL", f"ws://127.0.0.1:{closed_port()}")
    error = await failure(make("deepgram"), frames_of(0.5))
    assert type(error) is APIConnectionError and error.retryable


@pytest.mark.parametrize("where", ["handshake", "results"])
async def test_deepgram_stall_times_out(dg: DeepgramStt, dg_fake: FakeDeepgram, where: str) -> None:
    # "results": connected, reads the audio, never answers; the clock starts at end of speech.
    (dg_fake.stall_handshake if where == "handshake" else dg_fake.stall)(30)
    started = time.perf_counter()
    error = await failure(dg, frames_of(0.5))
    assert isinstance(error, APITimeoutError) and error.retryable
    assert time.perf_counter() - started < 2.0  # the 1 s timeout, not the stall


async def test_deepgram_disconnect_mid_stream(dg: DeepgramStt, dg_fake: FakeDeepgram) -> None:
    dg_fake.disconnect_after(2)
    got: list[SttResult] = []
    error = await failure(dg, frames_of(2.0), got)
    assert type(error) is APIConnectionError and error.retryable
    assert [r.text for r in got] == ["what", "what time"]


@pytest.mark.parametrize("frame", [None, '{"type": "Results", "is_final": true}'],
                         ids=["not-json", "results-without-fields"])
async def test_deepgram_malformed_message(dg: DeepgramStt, dg_fake: FakeDeepgram,
                                          frame: str | None) -> None:
    dg_fake.malformed_after(1, frame)
    got: list[SttResult] = []
    error = await failure(dg, frames_of(2.0), got)
    assert type(error) is ProviderError and error.retryable  # as the OpenAI providers do
    assert [r.text for r in got] == ["what"]


async def test_deepgram_url_defaults_to_production_and_must_be_an_origin(
        dg_env: pytest.MonkeyPatch) -> None:
    assert DeepgramSttConfig.from_env({}).deepgram_url == "wss://api.deepgram.com"
    dg_env.setenv("VOICEBUS_DEEPGRAM_URL", "https://api.deepgram.com/v1/listen")
    with pytest.raises(ConfigError, match="VOICEBUS_DEEPGRAM_URL"):
        DeepgramStt.from_config(SttConfig())


async def test_deepgram_key_never_reaches_the_logs(
        dg: DeepgramStt, dg_fake: FakeDeepgram, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # websockets logs the handshake headers at DEBUG
    await transcribe(dg, frames_of(0.5))
    dg_fake.fail_handshake(401)
    await failure(dg, frames_of(0.5))
    assert "Authorization" in caplog.text  # the handshake headers were logged…
    assert DG_KEY not in caplog.text  # …without the key


# -- OpenAI ---------------------------------------------------------------------------------


async def test_openai_uploads_one_wav_per_utterance(oa: OpenAIStt, oa_fake: FakeTranscribe) -> None:
    results = await transcribe(oa, frames_of(1.0))
    assert results == [SttResult(WORDS, final=True)]  # batch: no partials
    (upload,) = oa_fake.uploads
    assert (upload.rate, upload.channels, upload.sample_width) == (16000, 1, 2)
    assert upload.frames == SAMPLE_RATE  # every sample of the second we sent
    assert upload.fields == {"model": "gpt-4o-mini-transcribe", "language": "en",
                             "response_format": "json"}


async def test_openai_too_short_audio_makes_no_request(oa: OpenAIStt,
                                                       oa_fake: FakeTranscribe) -> None:
    assert await transcribe(oa, frames_of(0.06)) == [SttResult("", final=True)]
    assert oa_fake.requests == 0


async def test_openai_cancelled_turn_closes_the_request(oa: OpenAIStt,
                                                        oa_fake: FakeTranscribe) -> None:
    oa_fake.stall(30)
    task = asyncio.create_task(transcribe(oa, frames_of(1.0)))
    async with asyncio.timeout(BOUND_S):
        while not oa_fake.uploads:  # wait until the request is being answered
            await asyncio.sleep(0.01)
        task.cancel()
        await oa_fake.stopped.wait()
    assert task.cancelled()


@pytest.mark.parametrize(("status", "retryable"), [(500, True), (503, True), (429, True),
                                                   (400, False)])
async def test_openai_status_errors(oa: OpenAIStt, oa_fake: FakeTranscribe,
                                    status: int, retryable: bool) -> None:
    oa_fake.fail_with_status(status, times=1)
    error = await failure(oa, frames_of(1.0))
    assert isinstance(error, APIStatusError)
    assert (error.status, error.retryable) == (status, retryable)
    assert (await transcribe(oa, frames_of(1.0)))[-1].text == WORDS  # the fault was one-shot


async def test_openai_wrong_key_is_401_not_retryable(oa_env: pytest.MonkeyPatch,
                                                     make: Callable[[str], Any]) -> None:
    oa_env.setenv("OPENAI_API_KEY", "sk-wrong-key-0000")
    error = await failure(make("openai"), frames_of(1.0))
    assert isinstance(error, APIStatusError)
    assert (error.status, error.retryable) == (401, False)
    assert "sk-wrong-key-0000" not in str(error)


async def test_openai_stall_times_out(oa: OpenAIStt, oa_fake: FakeTranscribe) -> None:
    oa_fake.stall(30)
    started = time.perf_counter()
    error = await failure(oa, frames_of(1.0))
    assert isinstance(error, APITimeoutError) and error.retryable
    assert time.perf_counter() - started < 2.5


async def test_openai_malformed_answer(oa: OpenAIStt, oa_fake: FakeTranscribe) -> None:
    oa_fake.malformed()
    error = await failure(oa, frames_of(1.0))
    assert type(error) is ProviderError and error.retryable


async def test_openai_connection_refused(oa_env: pytest.MonkeyPatch,
                                         make: Callable[[str], Any]) -> None:
    oa_env.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{closed_port()}/v1")
    error = await failure(make("openai"), frames_of(1.0))
    assert type(error) is APIConnectionError and error.retryable


# -- Sarvam ---------------------------------------------------------------------------------


async def test_sarvam_partials_grow_before_the_final(sv: SarvamStt) -> None:
    results = await transcribe(sv, frames_of(2.0))
    # One word per 0.2 s of audio, each revealed as a transcript.partial of the whole so far.
    assert [r.text for r in results[:-1]] == ["what", "what time", "what time is",
                                              "what time is it", "what time is it in", WORDS]
    assert results[-1] == SttResult(WORDS, final=True, confidence=0.0)  # Sarvam gives none


async def test_sarvam_language_and_settings_reach_the_wire(sv_env: pytest.MonkeyPatch,
                                                           sv_fake: FakeSarvam) -> None:
    sv_fake.transcript = "अभी कितने बजे हैं"
    config = SttConfig(sarvam_stt_language="hi-in", sarvam_stt_mode="codemix")
    provider = load_provider("stt", PROVIDERS, "sarvam", config)
    try:
        results = await transcribe(provider, frames_of(1.0))
    finally:
        await provider.aclose()
    assert results[-1] == SttResult("अभी कितने बजे हैं", final=True)
    (sock,) = sv_fake.stt_sockets
    assert sock.query == {"language_code": "hi-IN", "model": "saaras:v3-realtime",
                          "mode": "codemix", "endpointing": "manual", "encoding": "linear16",
                          "sample_rate": "16000"}
    assert sv_fake.headers[0]["api-subscription-key"] == SV_KEY
    await asyncio.wait_for(sock.ended.wait(), BOUND_S)
    # Our VAD delimits the utterance; "end" closes the session once the final is in.
    assert sock.events == ["speech_start", "speech_end", "end"] and sock.violations == []
    assert sock.audio_bytes == 50 * len(FRAME)


async def test_sarvam_agent_language_reaches_the_wire(sv_env: pytest.MonkeyPatch,
                                                      sv_fake: FakeSarvam) -> None:
    from services.runtime import agents

    agent = agents.parse('[agents.tamil]\nlanguage = "ta-IN"\n')["tamil"]
    config = agents.stage_config(SttConfig(), agent, "stt", "tamil")
    provider = load_provider("stt", PROVIDERS, "sarvam", config)
    try:
        await transcribe(provider, frames_of(0.5))
    finally:
        await provider.aclose()
    assert sv_fake.stt_sockets[0].query["language_code"] == "ta-IN"


async def test_sarvam_no_audio_asks_nothing(sv: SarvamStt, sv_fake: FakeSarvam) -> None:
    assert await transcribe(sv, frames_of(0)) == [SttResult("", final=True)]
    (sock,) = sv_fake.stt_sockets
    await asyncio.wait_for(sock.ended.wait(), BOUND_S)
    assert sock.events == [] and sock.violations == []


async def test_sarvam_early_close_stops_audio_and_the_connection(
        sv: SarvamStt, sv_fake: FakeSarvam) -> None:
    mic = LiveMic(seconds=1.0)
    async with asyncio.timeout(BOUND_S):
        async with aclosing(sv.stream(mic.frames())) as results:
            first = await anext(results)
        assert not first.final
        assert mic.stopped.is_set()  # no more audio is pulled once the consumer has left
        (sock,) = sv_fake.stt_sockets
        await sock.ended.wait()
    assert sock.events == ["speech_start"]  # neither speech_end nor end: the turn was dropped


async def test_sarvam_cancelled_turn_stops_audio_and_the_connection(
        sv: SarvamStt, sv_fake: FakeSarvam) -> None:
    mic = LiveMic(seconds=1.0)
    partial = asyncio.Event()

    async def consume() -> None:
        async for _ in sv.stream(mic.frames()):
            partial.set()

    task = asyncio.create_task(consume())
    async with asyncio.timeout(BOUND_S):
        await partial.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await sv_fake.stt_sockets[0].ended.wait()
    assert mic.stopped.is_set()


async def test_sarvam_wrong_key_is_401_not_retryable(sv_env: pytest.MonkeyPatch,
                                                      make: Callable[[str], Any]) -> None:
    # The realtime endpoint takes the upgrade, then sends a fatal error and closes with 1003.
    sv_env.setenv("SARVAM_API_KEY", "sv-wrong-key-0000")
    error = await failure(make("sarvam"), frames_of(0.5))
    assert isinstance(error, APIStatusError)
    assert (error.status, error.retryable) == (401, False)
    assert "sv-wrong-key-0000" not in str(error)


@pytest.mark.parametrize(("status", "retryable"), [(500, True), (503, True), (429, True),
                                                   (403, False)])
async def test_sarvam_handshake_status(sv: SarvamStt, sv_fake: FakeSarvam,
                                       status: int, retryable: bool) -> None:
    sv_fake.fail_handshake(status, times=1)
    error = await failure(sv, frames_of(0.5))
    assert isinstance(error, APIStatusError)
    assert (error.status, error.retryable) == (status, retryable)
    assert SV_KEY not in str(error)  # the SDK's error holds the handshake's headers
    assert (await transcribe(sv, frames_of(1.0)))[-1].text == WORDS  # the fault was one-shot


@pytest.mark.parametrize(("status", "retryable"), [(429, True), (500, True), (400, False)])
async def test_sarvam_fatal_error_event_mid_stream(sv: SarvamStt, sv_fake: FakeSarvam,
                                                   status: int, retryable: bool) -> None:
    sv_fake.error_after(2, status=status)
    got: list[SttResult] = []
    error = await failure(sv, frames_of(2.0), got)
    assert isinstance(error, APIStatusError)
    assert (error.status, error.retryable) == (status, retryable)
    assert "Fake failure" in str(error)
    assert [r.text for r in got] == ["what", "what time"]


async def test_sarvam_unsupported_language_is_400_not_retryable(
        sv_env: pytest.MonkeyPatch, sv_fake: FakeSarvam) -> None:
    provider = load_provider("stt", PROVIDERS, "sarvam", SttConfig(sarvam_stt_language="xx-IN"))
    try:
        error = await failure(provider, frames_of(0.5))
    finally:
        await provider.aclose()
    assert isinstance(error, APIStatusError)
    assert (error.status, error.retryable) == (400, False)
    assert "language_code" in str(error)


async def test_sarvam_connection_refused(sv_env: pytest.MonkeyPatch,
                                         make: Callable[[str], Any]) -> None:
    sv_env.setenv("VOICEBUS_SARVAM_URL", f"ws://127.0.0.1:{closed_port()}")
    error = await failure(make("sarvam"), frames_of(0.5))
    assert type(error) is APIConnectionError and error.retryable


@pytest.mark.parametrize("where", ["handshake", "results"])
async def test_sarvam_stall_times_out(sv_env: pytest.MonkeyPatch, sv_fake: FakeSarvam,
                                      make: Callable[[str], Any], where: str) -> None:
    sv_env.setenv("VOICEBUS_SARVAM_STT_TIMEOUT", "1.0")
    sv = make("sarvam")
    # "results": connected, reads the audio, never answers; the clock starts at end of speech.
    (sv_fake.stall_handshake if where == "handshake" else sv_fake.stall)()
    started = time.perf_counter()
    error = await failure(sv, frames_of(0.5))
    assert isinstance(error, APITimeoutError) and error.retryable
    assert time.perf_counter() - started < 2.5  # the 1 s timeout, not the stall


async def test_sarvam_disconnect_mid_stream(sv: SarvamStt, sv_fake: FakeSarvam) -> None:
    sv_fake.disconnect_after(2)
    got: list[SttResult] = []
    error = await failure(sv, frames_of(2.0), got)
    assert type(error) is APIConnectionError and error.retryable
    assert [r.text for r in got] == ["what", "what time"]


@pytest.mark.parametrize("frame", [None, '{"event": "transcript.final", "utterance_idx": 0}'],
                         ids=["not-json", "final-without-text"])
async def test_sarvam_malformed_message(sv: SarvamStt, sv_fake: FakeSarvam,
                                        frame: str | None) -> None:
    sv_fake.malformed_after(1, frame)
    got: list[SttResult] = []
    error = await failure(sv, frames_of(2.0), got)
    assert type(error) is ProviderError and error.retryable
    assert [r.text for r in got] == ["what"]


async def test_sarvam_url_defaults_to_production_and_must_be_an_origin(
        sv_env: pytest.MonkeyPatch) -> None:
    assert SarvamSttConfig.from_env({}).sarvam_url == "wss://api.sarvam.ai"
    sv_env.setenv("VOICEBUS_SARVAM_URL", "https://api.sarvam.ai/speech-to-text-realtime/ws")
    with pytest.raises(ConfigError, match="VOICEBUS_SARVAM_URL"):
        SarvamStt.from_config(SttConfig())


async def test_sarvam_key_never_reaches_the_logs(
        sv: SarvamStt, sv_fake: FakeSarvam, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # websockets logs the handshake headers at DEBUG
    await transcribe(sv, frames_of(0.5))
    sv_fake.fail_handshake(401)
    await failure(sv, frames_of(0.5))
    assert "api-subscription-key" in caplog.text  # the handshake headers were logged…
    assert SV_KEY not in caplog.text  # …without the key


async def test_sarvam_non_fatal_error_event_is_logged_and_the_utterance_goes_on(
        sv: SarvamStt, sv_fake: FakeSarvam, caplog: pytest.LogCaptureFixture) -> None:
    sv_fake.malformed_after(1, '{"event": "error", "code": "invalid_config", '
                               '"is_fatal": false, "message": "stream_type kept"}')
    results = await transcribe(sv, frames_of(1.0))
    assert results[-1] == SttResult(WORDS, final=True)
    assert "stream_type kept (invalid_config)" in caplog.text


async def test_sarvam_in_a_chain_hands_a_failed_utterance_on(sv_env: pytest.MonkeyPatch,
                                                             sv_fake: FakeSarvam) -> None:
    from services.stt.service import SttFallback

    config = SttConfig(stt_providers="sarvam,instant", provider_probe_interval=60.0)
    chain = SttFallback.from_config(
        [load_provider("stt", PROVIDERS, name, config) for name in ("sarvam", "instant")], config)
    sv_fake.disconnect_after(2)  # after two partials, which bind nothing
    try:
        results = await transcribe(chain, frames_of(1.0))
    finally:
        await chain.aclose()
    assert [r.text for r in results[:2]] == ["what", "what time"]  # Sarvam's, shown meanwhile
    assert results[-1] == SttResult(config.stt_instant_text, final=True, confidence=1.0)


@pytest.mark.parametrize(("code", "error_type", "status"), [
    (4000, APIStatusError, 400),  # Sarvam rejecting the request: no retry helps
    (1011, APIConnectionError, None),  # its own failure, said only by the close
])
async def test_sarvam_close_without_an_error_event(sv: SarvamStt, sv_fake: FakeSarvam, code: int,
                                                   error_type: type, status: int | None) -> None:
    sv_fake.close_after(1, code=code)
    error = await failure(sv, frames_of(1.0))
    assert type(error) is error_type and getattr(error, "status", None) == status
    assert error.retryable is (status is None)
    assert f"code {code}, Fake rejection" in str(error)


async def test_sarvam_close_reason_never_shows_the_key(
        sv: SarvamStt, sv_fake: FakeSarvam, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sv_fake.close_after(1, code=4000, reason=f"Invalid key {SV_KEY}")  # a server echoing it
    error = await failure(sv, frames_of(1.0))
    assert isinstance(error, APIStatusError) and error.status == 400
    assert "Invalid key <redacted>" in str(error)
    assert SV_KEY not in str(error) and SV_KEY not in caplog.text
