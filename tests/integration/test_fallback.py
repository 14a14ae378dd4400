"""Fallback chains in real stage processes on a real nats-server, with vendor fakes that fail
the way real servers do. Each stage process exposes its own /metrics."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proto import codec
from proto import events as ev
from proto import subjects as sj
from tests.conftest import LogTail
from tests.fakes.cartesia_server import FakeCartesia
from tests.fakes.deepgram_listen import FakeDeepgram, start_fake_deepgram
from tests.fakes.openai_server import FakeOpenAI, start_fake_openai
from voicebus.client import Tap, dispatch
from voicebus.launcher import Stack

KEY = "test-key"
BUDGET = 1.5  # seconds to a first result before the turn moves on
# Probes often, and give up on a stalled one fast, so recovery shows within a test.
CHAIN_ENV = {"VOICEBUS_PROVIDER_PROBE_INTERVAL": "0.2", "VOICEBUS_PROVIDER_PROBE_TIMEOUT": "1"}


@dataclass
class Running:
    stack: Stack
    nc: nats.NATS
    tap: Tap
    logs: LogTail

    def port(self, stage: str) -> int:
        return self.stack.metrics_ports[stage]


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[Running]:
    """nats-server with metrics ports for the stages each test starts."""
    logs = LogTail(tmp_path / "stack.log")
    stack = Stack(tmp_path, sink=logs, metrics=True)
    await stack.start(stages=())
    nc = await stack.connect()
    tap = Tap(nc)
    yield Running(stack, nc, tap, logs)
    await tap.close()
    await nc.close()
    codes = await stack.stop()
    assert all(code == 0 for code in codes.values()), f"{codes}\n{logs.dump()}"


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = await start_fake_openai(api_key=KEY)
    yield server
    await server.close()


# ---- helpers -----------------------------------------------------------------------------


async def metric(port: int, name: str, **labels: str) -> float:
    """One sample of a stage process's /metrics (0 when it was never set)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def recovered(port: int, stage: str, provider: str, timeout: float = 10) -> None:
    """Poll another process's /metrics until a probe brought ``provider`` back: there is no
    event to wait on across processes."""
    deadline = time.monotonic() + timeout
    while await metric(port, "voicebus_provider_available", stage=stage, provider=provider) != 1:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{stage} provider {provider} still unavailable after {timeout}s")
        await asyncio.sleep(0.05)


async def start_llm(run: Running, fake: FakeOpenAI, session: str, providers: str) -> None:
    await run.stack.start_stage(
        "llm", VOICEBUS_LLM_PROVIDERS=providers, OPENAI_API_KEY=KEY,
        OPENAI_BASE_URL=fake.base_url, VOICEBUS_LLM_FIRST_RESULT_TIMEOUT=str(BUDGET),
        VOICEBUS_LLM_RETRY_BACKOFF="0.05", VOICEBUS_LLM_TIMEOUT="5", **CHAIN_ENV)
    await run.stack.wait_ready(("llm",))
    await run.tap.watch(sj.session_all(session))
    await dispatch(run.nc, run.tap, session, stages=("llm",))


async def ask(run: Running, session: str, turn: int, text: str) -> ev.ReplyDone:
    verdict = ev.Verdict(session=session, seq=turn, ts_ns=time.time_ns(), turn=turn,
                         action="answer", text=text)
    await run.nc.publish(sj.FLOOR_VERDICT.subject(session), codec.encode(verdict))
    done = await run.tap.wait_for(lambda: run.tap.of(ev.ReplyDone, session, turn=turn), 15,
                                  f"reply to turn {turn}")
    return done[0]


def llm_requests(outcome: str, provider: str = "openai") -> dict[str, str]:
    return {"stage": "llm", "provider": provider, "outcome": outcome}


# ---- LLM: openai (fake) -> echo ----------------------------------------------------------

FAULTS: list[tuple[str, Callable[[FakeOpenAI], None], str]] = [
    ("server error", lambda f: f.fail_with_status(500), "failure"),
    ("bad key", lambda f: f.fail_with_status(401), "failure"),
    ("stall before the first byte", lambda f: f.stall(30), "timeout"),
    ("disconnect before the first token", lambda f: f.disconnect_after(0), "failure"),
    ("malformed chunk", lambda f: f.malformed_after(0), "failure"),
]


async def test_llm_falls_back_to_echo_on_each_failure_and_returns_to_openai(
        running: Running, fake: FakeOpenAI) -> None:
    run = running
    await start_llm(run, fake, "chain", "openai,echo")
    port = run.port("llm")
    counted: dict[str, int] = {}
    for turn, (what, inject, outcome) in enumerate(FAULTS, start=1):
        inject(fake)
        done = await ask(run, "chain", turn, f"question {turn}")
        # The same turn is answered by echo, within the budget.
        assert (done.provider, done.error) == ("echo", ""), what
        assert done.text == f"Question {turn}... got it.", what
        assert done.timing.compute_ms < (BUDGET + 1.0) * 1000, what
        assert await metric(port, "voicebus_provider_available", stage="llm",
                            provider="openai") == 0, what
        counted[outcome] = counted.get(outcome, 0) + 1
        assert await metric(port, "voicebus_provider_requests_total",
                            **llm_requests(outcome)) == counted[outcome], what
        fake.reset()
        # Healed: a background probe finds out, and openai is used again.
        await recovered(port, "llm", "openai")
        assert await metric(port, "voicebus_provider_probes_total", stage="llm",
                            provider="openai", outcome="success") == turn, what

    tokens = {"name": "voicebus_llm_tokens_total", "provider": "openai", "kind": "completion"}
    before = await metric(port, **tokens)  # probes spend tokens too
    done = await ask(run, "chain", len(FAULTS) + 1, "and now")
    assert (done.provider, done.text, done.error) == ("openai", "You said: and now.", "")
    # Usage from the stream's last chunk (the fake counts words).
    assert await metric(port, **tokens) - before == 4  # "You said: and now."
    assert await metric(port, "voicebus_llm_tokens_total", provider="openai", kind="prompt") > 0
    assert run.stack.procs["llm"].alive

    assert await metric(port, "voicebus_provider_requests_total", **llm_requests("success")) == 1
    assert await metric(port, "voicebus_provider_requests_total",
                        **llm_requests("success", "echo")) == len(FAULTS)
    assert await metric(port, "voicebus_provider_fallbacks_total", stage="llm",
                        from_provider="openai", to_provider="echo") == len(FAULTS)
    assert await metric(port, "voicebus_provider_first_result_seconds_count", stage="llm",
                        provider="openai") == 1
    assert not run.tap.of(ev.StageError, "chain")


async def test_llm_does_not_fall_back_once_a_token_went_out(running: Running,
                                                            fake: FakeOpenAI) -> None:
    run = running
    await start_llm(run, fake, "cut", "openai,echo")
    fake.reply = "One two three four five."
    fake.disconnect_after(2)
    done = await ask(run, "cut", 1, "count")
    # What was said stays said: no second start from echo, the turn ends with an error.
    assert (done.provider, done.text) == ("openai", "One two ")
    assert done.error and [e.turn for e in run.tap.of(ev.StageError, "cut")] == [1]
    assert len(fake.requests) == 1  # no retry after the first token either
    port = run.port("llm")
    assert await metric(port, "voicebus_provider_fallbacks_total", stage="llm",
                        from_provider="openai", to_provider="echo") == 0
    assert await metric(port, "voicebus_provider_requests_total", **llm_requests("failure")) == 1
    fake.reset()
    await recovered(port, "llm", "openai")
    done = await ask(run, "cut", 2, "again")
    assert (done.provider, done.error) == ("openai", "")


async def test_llm_with_every_provider_failing_closes_the_turn_with_an_error(
        running: Running, fake: FakeOpenAI) -> None:
    run = running
    # The LLM stage has one provider that can fail; a one-entry list is still a chain.
    await start_llm(run, fake, "down", "openai")
    fake.fail_with_status(503)
    done = await ask(run, "down", 1, "hello")
    assert done.error.startswith("503") and not done.text and done.provider == "openai"
    (error,) = run.tap.of(ev.StageError, "down")
    assert (error.stage, error.turn, error.retryable) == ("llm", 1, True)
    assert len(fake.requests) == 3  # two retries before the first token, then give up
    fake.reset()
    done = await ask(run, "down", 2, "hello again")
    assert (done.provider, done.error) == ("openai", "")
    assert run.stack.procs["llm"].alive


# ---- STT: deepgram (fake) -> pocketsphinx ------------------------------------------------

DG_KEY = "dg-test-key"
FRAME = bytes(640)  # 20 ms of 16 kHz silence: the fake "hears" its script whatever it gets

STT_FAULTS: list[tuple[str, Callable[[FakeDeepgram], None], str]] = [
    ("handshake refused", lambda f: f.fail_handshake(503), "failure"),
    ("bad key", lambda f: f.fail_handshake(401), "failure"),
    ("silent after the handshake", lambda f: f.stall(30), "timeout"),
    ("disconnect before the first result", lambda f: f.disconnect_after(0), "failure"),
    ("malformed message", lambda f: f.malformed_after(0), "failure"),
]


@pytest.fixture
async def deepgram() -> AsyncIterator[FakeDeepgram]:
    server = await start_fake_deepgram(api_key=DG_KEY)
    yield server
    await server.close()


class Speaker:
    """Publishes utterances as ingress does: VAD edges and 20 ms frames, one seq counter."""

    def __init__(self, run: Running, session: str) -> None:
        self.run, self.session, self.seq = run, session, itertools.count(1)

    def event(self, cls: type[Any], **fields: Any) -> Any:
        return cls(session=self.session, seq=next(self.seq), ts_ns=time.time_ns(), **fields)

    async def publish(self, topic: sj.Topic, cls: type[Any], **fields: Any) -> None:
        await self.run.nc.publish(topic.subject(self.session), codec.encode(self.event(cls, **fields)))

    async def begin(self) -> None:
        self.finals = len(self.run.tap.of(ev.Transcript, self.session, topic=sj.STT_FINAL))
        self.frames = 0
        await self.publish(sj.INGRESS_VAD, ev.SpeechStarted, pts_ms=0)

    async def audio(self, frames: int) -> None:
        for _ in range(frames):
            await self.publish(sj.INGRESS_AUDIO, ev.AudioFrame, pcm=FRAME, sample_rate=16000,
                               pts_ms=20 * self.frames)
            self.frames += 1

    async def end(self) -> ev.Transcript:
        """Ends the utterance; returns its final transcript."""
        ms = 20 * self.frames
        await self.publish(sj.INGRESS_VAD, ev.SpeechEnded, pts_ms=ms, speech_ms=ms)
        got = await self.run.tap.wait_for(
            lambda: self.run.tap.of(ev.Transcript, self.session, topic=sj.STT_FINAL)[self.finals:],
            20, "a final transcript")
        return got[0]

    async def say(self, frames: int = 40) -> ev.Transcript:
        await self.begin()
        await self.audio(frames)
        return await self.end()


async def start_stt(run: Running, fake: FakeDeepgram, session: str) -> Speaker:
    await run.stack.start_stage(
        "stt", VOICEBUS_STT_PROVIDERS="deepgram,pocketsphinx", DEEPGRAM_API_KEY=DG_KEY,
        VOICEBUS_DEEPGRAM_URL=fake.url, VOICEBUS_DEEPGRAM_STT_TIMEOUT="5",
        VOICEBUS_STT_FIRST_RESULT_TIMEOUT=str(BUDGET), VOICEBUS_STT_WARM_DECODERS="1",
        **CHAIN_ENV)
    await run.stack.wait_ready(("stt",))
    await run.tap.watch(sj.session_all(session))
    await dispatch(run.nc, run.tap, session, stages=("stt",))
    return Speaker(run, session)


async def test_stt_falls_back_to_pocketsphinx_with_the_whole_utterance(
        running: Running, deepgram: FakeDeepgram) -> None:
    run = running
    speaker = await start_stt(run, deepgram, "hear")
    port = run.port("stt")
    for what, inject, outcome in STT_FAULTS:
        inject(deepgram)
        final = await speaker.say()
        assert final.provider == "pocketsphinx", what
        assert final.timing.compute_ms < (BUDGET + 1.5) * 1000, what
        assert await metric(port, "voicebus_provider_requests_total", stage="stt",
                            provider="deepgram", outcome=outcome) >= 1, what
        deepgram.reset()  # healed
        await recovered(port, "stt", "deepgram")

    final = await speaker.say()
    assert (final.provider, final.text) == ("deepgram", "what time is it")
    assert await metric(port, "voicebus_provider_fallbacks_total", stage="stt",
                        from_provider="deepgram", to_provider="pocketsphinx") == len(STT_FAULTS)
    assert await metric(port, "voicebus_provider_requests_total", stage="stt",
                        provider="pocketsphinx", outcome="success") == len(STT_FAULTS)
    assert not run.tap.of(ev.StageError, "hear")

    # Partials bind nothing: deepgram dropping the socket, or going quiet, after a partial
    # still hands the whole utterance to pocketsphinx, within the budget after speech ended.
    faults = [("disconnect", deepgram.disconnect_after), ("stall", deepgram.hold_after)]
    for what, inject in faults:
        await speaker.begin()
        await speaker.audio(20)
        turn = final.turn + 1
        await run.tap.wait_for(lambda: run.tap.of(ev.Transcript, "hear", topic=sj.STT_PARTIAL,
                                                  turn=turn), 10, "a partial")
        inject(deepgram.connections[-1].results_sent)  # at its next result
        await speaker.audio(20)
        final = await speaker.end()
        assert final.turn == turn and final.provider == "pocketsphinx", what
        assert final.timing.compute_ms < (BUDGET + 1.5) * 1000, what
        partials = run.tap.of(ev.Transcript, "hear", topic=sj.STT_PARTIAL, turn=turn)
        assert partials[0].provider == "deepgram", what
        deepgram.reset()
        await recovered(port, "stt", "deepgram")
    assert await metric(port, "voicebus_provider_fallbacks_total", stage="stt", from_provider=
                        "deepgram", to_provider="pocketsphinx") == len(STT_FAULTS) + len(faults)
    assert await metric(port, "voicebus_provider_requests_total", stage="stt",
                        provider="deepgram", outcome="timeout") >= 2  # the budget, after a partial
    assert not run.tap.of(ev.StageError, "hear") and run.stack.procs["stt"].alive

    # Once the final went out the turn is done; the next one is deepgram's again.
    final = await speaker.say()
    assert (final.provider, final.text) == ("deepgram", "what time is it")


# ---- TTS: cartesia (fake) -> piper -------------------------------------------------------

TTS_FAULTS: list[tuple[str, Callable[[FakeCartesia], None], str]] = [
    ("handshake refused", lambda f: f.fail_handshake(503), "failure"),
    ("bad key", lambda f: f.fail_handshake(401), "failure"),
    ("no audio after the text", lambda f: f.stall(), "timeout"),
    ("disconnect before the first audio", lambda f: f.disconnect_after(0), "failure"),
    ("an error for the context", lambda f: f.error_after(0, status=500), "failure"),
    ("malformed message", lambda f: f.malformed_after(0), "failure"),
]


@pytest.fixture
async def cartesia() -> AsyncIterator[FakeCartesia]:
    server = await FakeCartesia(api_key=KEY).start()
    yield server
    await server.close()


async def start_tts(run: Running, fake: FakeCartesia, session: str) -> None:
    await run.stack.start_stage(
        "tts", VOICEBUS_TTS_PROVIDERS="cartesia,piper", CARTESIA_API_KEY=KEY,
        VOICEBUS_CARTESIA_URL=fake.url, VOICEBUS_TTS_TIMEOUT="5",
        VOICEBUS_TTS_FIRST_RESULT_TIMEOUT=str(BUDGET), **CHAIN_ENV)
    await run.stack.wait_ready(("tts",))
    await run.tap.watch(sj.session_all(session))
    await dispatch(run.nc, run.tap, session, stages=("tts",))


async def speak(run: Running, session: str, turn: int, text: str) -> ev.SynthesisDone:
    for event in (ev.ReplyDelta(session=session, seq=2 * turn, ts_ns=time.time_ns(), turn=turn,
                                text=text),
                  ev.ReplyDone(session=session, seq=2 * turn + 1, ts_ns=time.time_ns(),
                               turn=turn, text=text)):
        topic = sj.LLM_DELTA if isinstance(event, ev.ReplyDelta) else sj.LLM_DONE
        await run.nc.publish(topic.subject(session), codec.encode(event))
    done = await run.tap.wait_for(lambda: run.tap.of(ev.SynthesisDone, session, turn=turn), 20,
                                  f"speech of turn {turn}")
    return done[0]


async def tts_successes(port: int, provider: str) -> float:
    return await metric(port, "voicebus_provider_requests_total", stage="tts",
                        provider=provider, outcome="success")


@pytest.mark.parametrize(("what", "inject", "outcome"), TTS_FAULTS,
                         ids=[fault[0] for fault in TTS_FAULTS])
async def test_tts_falls_back_to_piper_at_the_chain_rate_and_returns_to_cartesia(
        running: Running, cartesia: FakeCartesia, what: str,
        inject: Callable[[FakeCartesia], None], outcome: str) -> None:
    # A fresh process per fault: the fake counts chunk faults per socket, and the provider
    # keeps sockets open between turns.
    run = running
    await start_tts(run, cartesia, "voice")
    port = run.port("tts")
    inject(cartesia)
    done = await speak(run, "voice", 1, "This is the first answer.")
    assert done.frames > 0 and not done.interrupted
    # Piper times no words, and whatever cartesia timed before it failed was not spoken.
    assert done.words == []
    assert await tts_successes(port, "piper") == 1
    assert await metric(port, "voicebus_provider_requests_total", stage="tts",
                        provider="cartesia", outcome=outcome) == 1
    assert await metric(port, "voicebus_provider_fallbacks_total", stage="tts",
                        from_provider="cartesia", to_provider="piper") == 1
    cartesia.reset()
    await recovered(port, "tts", "cartesia")

    text = "Back to the first voice."
    done = await speak(run, "voice", 2, text)
    assert done.frames > 0 and await tts_successes(port, "cartesia") == 1
    # Cartesia's word timings, placed in the reply, on the clock of the turn's frames.
    assert [text[:w.text_end] for w in done.words] == [
        "Back", "Back to", "Back to the", "Back to the first", text]
    ends = [w.end_ms for w in done.words]
    assert ends == sorted(ends) and 0 < ends[-1] <= done.frames * ev.FRAME_MS
    # One rate for the whole session (cartesia's): piper's turn was resampled to it.
    assert {f.sample_rate for f in run.tap.of(ev.AudioFrame, "voice", topic=sj.TTS_AUDIO)} == {24000}
    assert not run.tap.of(ev.StageError, "voice") and run.stack.procs["tts"].alive


async def test_tts_never_switches_voice_once_audio_went_out(running: Running,
                                                            cartesia: FakeCartesia) -> None:
    run = running
    await start_tts(run, cartesia, "cut")
    cartesia.error_after(1, status=500)
    done = await speak(run, "cut", 1, "A long answer that fails after its first audio.")
    assert done.frames > 0 and [e.turn for e in run.tap.of(ev.StageError, "cut")] == [1]
    assert await tts_successes(run.port("tts"), "piper") == 0
    assert run.stack.procs["tts"].alive
