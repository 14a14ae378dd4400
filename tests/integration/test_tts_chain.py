"""The design's TTS chain, ElevenLabs → OpenAI (``VOICEBUS_TTS_PROVIDERS=elevenlabs,openai``), in
a real TTS stage process on a real nats-server, with faults injected in the vendors' fakes
(``tests/fakes/elevenlabs_server.py``, ``tests/fakes/openai_speech.py``). The fixtures and
helpers are ``test_fallback.py``'s.

Both voices speak 24 kHz, so no turn here is resampled: the frames of a turn show, by their
count, whose audio they are.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from proto import events as ev
from proto import subjects as sj
from tests.fakes.elevenlabs_server import FakeElevenLabs
from tests.fakes.openai_speech import MS_PER_CHAR, FakeOpenAISpeech
from tests.integration.test_fallback import (
    CHAIN_ENV,
    KEY,
    Running,
    metric,
    recovered,
    running,
    speak,
    tts_successes,
)
from voicebus.client import dispatch

__all__ = ["running"]  # test_fallback's fixture, used here

BUDGET = 1.0  # seconds from the first text chunk to ElevenLabs' first audio
# Upper bounds on a turn's timing: generous (a loaded 2-core machine is slow), yet under the
# providers' own timeout (VOICEBUS_TTS_TIMEOUT below): the turn moved on at the budget, or at
# once, not when the primary's own timeout ran out.
WITHIN_MS = 5000


@pytest.fixture
async def elevenlabs() -> AsyncIterator[FakeElevenLabs]:
    server = await FakeElevenLabs(api_key=KEY).start()
    yield server
    await server.close()


@pytest.fixture
async def openai() -> AsyncIterator[FakeOpenAISpeech]:
    server = await FakeOpenAISpeech(api_key=KEY).start()
    yield server
    await server.close()


async def start_chain(run: Running, elevenlabs: FakeElevenLabs, openai: FakeOpenAISpeech,
                      session: str) -> int:
    """The TTS stage on the chain, serving ``session``; returns its metrics port."""
    await run.stack.start_stage(
        "tts", VOICEBUS_TTS_PROVIDERS="elevenlabs,openai",
        ELEVENLABS_API_KEY=KEY, VOICEBUS_ELEVENLABS_URL=elevenlabs.url,
        OPENAI_API_KEY=KEY, OPENAI_BASE_URL=openai.base_url,
        VOICEBUS_TTS_TIMEOUT=str(WITHIN_MS / 1000),
        VOICEBUS_TTS_FIRST_RESULT_TIMEOUT=str(BUDGET), **CHAIN_ENV)
    await run.stack.wait_ready(("tts",))
    await run.tap.watch(sj.session_all(session))
    await dispatch(run.nc, run.tap, session, stages=("tts",))
    return run.port("tts")


async def requests(port: int, provider: str, outcome: str) -> float:
    return await metric(port, "voicebus_provider_requests_total", stage="tts",
                        provider=provider, outcome=outcome)


async def fallbacks(port: int) -> float:
    return await metric(port, "voicebus_provider_fallbacks_total", stage="tts",
                        from_provider="elevenlabs", to_provider="openai")


def frames_of(text: str) -> int:
    """The 20 ms frames a fake speaks ``text`` in (both fakes: ``MS_PER_CHAR`` a character)."""
    return -(-len(text) * MS_PER_CHAR // ev.FRAME_MS)


async def back_to_elevenlabs(run: Running, port: int, session: str, turn: int) -> None:
    """ElevenLabs speaks the next turn again, with its word timings placed in the reply."""
    await recovered(port, "tts", "elevenlabs")
    text = "Back to the first voice."
    done = await speak(run, session, turn, text)
    assert done.frames == frames_of(text) and await tts_successes(port, "elevenlabs") == 1
    # What was heard, to the word, from ElevenLabs' character alignments: egress reports it.
    assert [text[:w.text_end] for w in done.words] == [
        "Back", "Back to", "Back to the", "Back to the first", text]
    ends = [w.end_ms for w in done.words]
    assert ends == sorted(ends) and ends[-1] == len(text) * MS_PER_CHAR
    assert not run.tap.of(ev.StageError, session) and run.stack.procs["tts"].alive


async def refuse_upgrades(fake: FakeElevenLabs) -> None:
    fake.fail_handshake(503)


async def heal(fake: FakeElevenLabs) -> None:
    fake.reset()


Fault = Callable[[FakeElevenLabs], Awaitable[None]]
# (what, inject, heal)
DOWN: list[tuple[str, Fault, Fault]] = [
    ("connection refused", FakeElevenLabs.refuse_connections, FakeElevenLabs.accept_connections),
    ("503 at the handshake", refuse_upgrades, heal),
]


async def test_primary_down_openai_speaks_the_turn_and_elevenlabs_comes_back(
        running: Running, elevenlabs: FakeElevenLabs, openai: FakeOpenAISpeech) -> None:
    run = running
    port = await start_chain(run, elevenlabs, openai, "down")
    for turn, (what, inject, healed) in enumerate(DOWN, start=1):
        await inject(elevenlabs)
        heard = len(elevenlabs.requests)  # the probes' so far
        text = f"This is answer number {turn}."
        done = await speak(run, "down", turn, text)
        # The same turn, whole, in OpenAI's voice; OpenAI times no words.
        assert openai.requests[-1]["body"]["input"] == text, what
        assert done.frames == frames_of(text) and done.words == [], what
        assert done.timing.tts_ms < WITHIN_MS, what
        assert await requests(port, "elevenlabs", "failure") == turn, what
        assert await fallbacks(port) == turn and await tts_successes(port, "openai") == turn
        assert len(elevenlabs.requests) == heard, what  # nothing reached it
        await healed(elevenlabs)
        await recovered(port, "tts", "elevenlabs")

    await back_to_elevenlabs(run, port, "down", len(DOWN) + 1)
    assert len(openai.requests) == len(DOWN)
    assert {f.sample_rate for f in run.tap.of(ev.AudioFrame, "down", topic=sj.TTS_AUDIO)} == {24000}


async def test_primary_slow_to_first_audio_the_turn_moves_on_at_the_budget(
        running: Running, elevenlabs: FakeElevenLabs, openai: FakeOpenAISpeech) -> None:
    run = running
    port = await start_chain(run, elevenlabs, openai, "slow")
    elevenlabs.delay_first_audio(BUDGET + 3)  # slow, not dead: it would answer, too late
    text = "An answer that cannot wait."
    done = await speak(run, "slow", 1, text)
    assert [r["body"]["input"] for r in openai.requests] == [text]
    assert done.frames == frames_of(text) and done.words == []
    # ElevenLabs had the text and was given the budget, no more: the first audio is OpenAI's,
    # just after the budget ran out.
    assert elevenlabs.requests[:2] == [{"text": " "}, {"text": f"{text} ", "flush": True}]
    assert BUDGET * 1000 <= done.timing.tts_ms < WITHIN_MS
    assert await requests(port, "elevenlabs", "timeout") == 1 and await fallbacks(port) == 1
    assert elevenlabs.audio_messages == 0
    # The abandoned socket was closed, which stops its generation.
    await asyncio.wait_for(elevenlabs.stopped.wait(), 10)

    elevenlabs.reset()
    await back_to_elevenlabs(run, port, "slow", 2)


CUT: list[tuple[str, Callable[[FakeElevenLabs], None]]] = [
    # Retryable (a 503), and still not retried: audio went out.
    ("error message", lambda f: f.error_after(1, "system_busy")),
    ("disconnect", lambda f: f.disconnect_after(1)),
]


async def test_primary_failing_after_audio_went_out_never_switches_voice(
        running: Running, elevenlabs: FakeElevenLabs, openai: FakeOpenAISpeech) -> None:
    run = running
    port = await start_chain(run, elevenlabs, openai, "cut")
    for turn, (what, inject) in enumerate(CUT, start=1):
        inject(elevenlabs)
        done = await speak(run, "cut", turn, "A long answer that fails after its first audio.")
        # The first 100 ms message of ElevenLabs' audio went out, and nothing else: no second
        # voice starting the reply over. The turn ends with an error; the process stays up.
        assert done.frames == 100 // ev.FRAME_MS and not done.interrupted, what
        assert [e.turn for e in run.tap.of(ev.StageError, "cut")][-1] == turn, what
        assert await requests(port, "elevenlabs", "failure") == turn, what
        elevenlabs.reset()
        await recovered(port, "tts", "elevenlabs")
    assert openai.requests == [] and await tts_successes(port, "openai") == 0
    assert await fallbacks(port) == 0

    text = "And the next turn is whole."
    done = await speak(run, "cut", len(CUT) + 1, text)
    assert done.frames == frames_of(text) and await tts_successes(port, "elevenlabs") == 1
    assert len(run.tap.of(ev.StageError, "cut")) == len(CUT) and run.stack.procs["tts"].alive
