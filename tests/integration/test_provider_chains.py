"""The design's chains in real stage processes on a real nats-server, each vendor a local fake
that fails on demand: LLM openai → anthropic → groq, STT deepgram → openai (Whisper).

Each test runs its scenarios in one stage process, in order; between them the fakes are healed
and the test waits until the stage's probe has brought the provider back (its /metrics)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proto import events as ev
from proto import subjects as sj
from tests.fakes.anthropic_server import FakeAnthropic, start_fake_anthropic
from tests.fakes.deepgram_listen import FakeDeepgram, start_fake_deepgram
from tests.fakes.openai_server import FakeOpenAI, start_fake_openai
from tests.fakes.openai_transcribe import FakeTranscribe, start_fake_transcribe
from tests.integration import test_fallback as chains
from tests.integration.test_fallback import (
    BUDGET,
    CHAIN_ENV,
    DG_KEY,
    Running,
    Speaker,
    ask,
    metric,
    recovered,
)
from voicebus.client import dispatch

running = chains.running  # the fixture: nats-server, and the stages each test starts

KEYS = {"OPENAI_API_KEY": "sk-chain-openai-key", "ANTHROPIC_API_KEY": "sk-ant-chain-key",
        "GROQ_API_KEY": "gsk_chain-groq-key"}
# Upper bounds on a turn's compute time: generous (a loaded 2-core machine is slow, and the time
# includes the whole reply), yet under the providers' own 5 s timeout (the stages' settings
# below): the turn moved on at the budget, not when the primary timed out.
WITHIN_MS = 5000


def requests_of(fake: FakeOpenAI | FakeAnthropic, text: str) -> int:
    """How many requests asked ``fake`` to answer the user's ``text`` (probes ask other things)."""
    return sum(text in json.dumps(body["messages"][-1]) for body in fake.requests)


def secrets_logged(run: Running, keys: list[str]) -> list[str]:
    log = Path(run.logs.file.name).read_text()
    return [key for key in keys if key in log]


# ---- LLM: openai → anthropic → groq ------------------------------------------------------------

@pytest.fixture
async def vendors() -> AsyncIterator[tuple[FakeOpenAI, FakeAnthropic, FakeOpenAI]]:
    """OpenAI, Claude and Groq (the Chat Completions fake again, on its own port and path)."""
    openai = await start_fake_openai(api_key=KEYS["OPENAI_API_KEY"])
    claude = await start_fake_anthropic(api_key=KEYS["ANTHROPIC_API_KEY"])
    groq = await FakeOpenAI(KEYS["GROQ_API_KEY"], path="/openai/v1", dialect="groq").start()
    yield openai, claude, groq
    for fake in (openai, claude, groq):
        await fake.close()


async def test_llm_chain_openai_claude_groq(
        running: Running, vendors: tuple[FakeOpenAI, FakeAnthropic, FakeOpenAI]) -> None:
    run, (openai, claude, groq) = running, vendors
    await run.stack.start_stage(
        "llm", VOICEBUS_LLM_PROVIDERS="openai,anthropic,groq", **KEYS,
        OPENAI_BASE_URL=openai.base_url, ANTHROPIC_BASE_URL=claude.base_url,
        VOICEBUS_GROQ_BASE_URL=groq.base_url, VOICEBUS_LLM_FIRST_RESULT_TIMEOUT=str(BUDGET),
        VOICEBUS_LLM_RETRY_BACKOFF="0.05", VOICEBUS_LLM_TIMEOUT="5", **CHAIN_ENV)
    await run.stack.wait_ready(("llm",))
    await run.tap.watch(sj.session_all("chain"))
    await dispatch(run.nc, run.tap, "chain", stages=("llm",))
    port = run.port("llm")

    async def counted(name: str, **labels: str) -> float:
        return await metric(port, f"voicebus_provider_{name}", stage="llm", **labels)

    async def heal(fake: FakeOpenAI | FakeAnthropic, provider: str) -> None:
        fake.reset()
        await recovered(port, "llm", provider)

    # 1. OpenAI down (503, retried twice before the first token, then given up): Claude
    # answers the same turn.
    openai.fail_with_status(503)
    done = await ask(run, "chain", 1, "question one")
    assert (done.provider, done.text, done.error) == ("anthropic", "You said: question one.", "")
    assert requests_of(openai, "question one") == 3 and requests_of(groq, "question one") == 0
    assert await counted("requests_total", provider="openai", outcome="failure") == 1
    await heal(openai, "openai")

    # 2. OpenAI slow to its first token (the stream opened, no token): past the budget the turn
    # goes to Claude, and it is answered within the budget and a little.
    openai.slow_first_token()
    done = await ask(run, "chain", 2, "question two")
    assert (done.provider, done.text, done.error) == ("anthropic", "You said: question two.", "")
    assert done.timing is not None and done.timing.compute_ms < WITHIN_MS
    assert await counted("requests_total", provider="openai", outcome="timeout") == 1
    assert await counted("fallbacks_total", from_provider="openai", to_provider="anthropic") == 2
    await heal(openai, "openai")

    # 3. OpenAI failing mid-stream, after words went out: no switch (the user would hear a
    # second start); the turn ends with what was said, and an error.
    openai.reply = "One two three four five."
    openai.disconnect_after(2)
    done = await ask(run, "chain", 3, "question three")
    assert (done.provider, done.text) == ("openai", "One two ") and done.error
    assert [error.turn for error in run.tap.of(ev.StageError, "chain")] == [3]
    assert requests_of(claude, "question three") == requests_of(groq, "question three") == 0
    assert await counted("fallbacks_total", from_provider="openai", to_provider="anthropic") == 2
    openai.reply = None
    await heal(openai, "openai")

    # 4. OpenAI refusing connections and Claude overloaded (529, retried, given up): Groq
    # answers, with its own key at its own path.
    await openai.close()
    claude.fail_with_status(529)
    done = await ask(run, "chain", 4, "question four")
    assert (done.provider, done.text, done.error) == ("groq", "You said: question four.", "")
    assert requests_of(claude, "question four") == 3 and requests_of(groq, "question four") == 1
    assert groq.headers[-1]["Authorization"] == f"Bearer {KEYS['GROQ_API_KEY']}"
    assert await counted("fallbacks_total", from_provider="anthropic", to_provider="groq") == 1
    assert await counted("requests_total", provider="groq", outcome="success") == 1
    # Groq's usage (x_groq.usage on its last chunk) counted under its name.
    assert await metric(port, "voicebus_llm_tokens_total", provider="groq",
                        kind="completion") >= 4

    # 5. Both still marked unavailable: the next turn goes straight to Groq; once a probe finds
    # Claude healed, Claude answers again while OpenAI stays down.
    done = await ask(run, "chain", 5, "question five")
    assert (done.provider, done.error) == ("groq", "")
    assert await counted("fallbacks_total", from_provider="anthropic", to_provider="groq") == 1
    await heal(claude, "anthropic")
    done = await ask(run, "chain", 6, "question six")
    assert (done.provider, done.error) == ("anthropic", "")
    assert await counted("available", provider="openai") == 0

    assert [error.turn for error in run.tap.of(ev.StageError, "chain")] == [3]
    assert run.stack.procs["llm"].alive
    assert secrets_logged(run, list(KEYS.values())) == []


# ---- STT: deepgram → openai (Whisper) ----------------------------------------------------------

WHISPER_TEXT = "whisper heard the whole thing"
FRAMES = 40  # a 0.8 s utterance
SAMPLES_PER_FRAME = 320  # 20 ms at 16 kHz


@pytest.fixture
async def ears() -> AsyncIterator[tuple[FakeDeepgram, FakeTranscribe]]:
    deepgram = await start_fake_deepgram(api_key=DG_KEY)
    whisper = await start_fake_transcribe(api_key=KEYS["OPENAI_API_KEY"])
    whisper.transcript = WHISPER_TEXT
    yield deepgram, whisper
    for fake in (deepgram, whisper):
        await fake.close()


async def test_stt_chain_deepgram_whisper(
        running: Running, ears: tuple[FakeDeepgram, FakeTranscribe]) -> None:
    run, (deepgram, whisper) = running, ears
    await run.stack.start_stage(
        "stt", VOICEBUS_STT_PROVIDERS="deepgram,openai", DEEPGRAM_API_KEY=DG_KEY,
        VOICEBUS_DEEPGRAM_URL=deepgram.url, VOICEBUS_DEEPGRAM_STT_TIMEOUT="5",
        OPENAI_API_KEY=KEYS["OPENAI_API_KEY"], OPENAI_BASE_URL=whisper.base_url,
        VOICEBUS_OPENAI_STT_TIMEOUT="5", VOICEBUS_STT_FIRST_RESULT_TIMEOUT=str(BUDGET),
        **CHAIN_ENV)
    await run.stack.wait_ready(("stt",))
    await run.tap.watch(sj.session_all("ears"))
    await dispatch(run.nc, run.tap, "ears", stages=("stt",))
    speaker = Speaker(run, "ears")
    port = run.port("stt")

    async def counted(name: str, **labels: str) -> float:
        return await metric(port, f"voicebus_provider_{name}", stage="stt", **labels)

    async def by_whisper(final: ev.Transcript, what: str) -> None:
        """Whisper gave the final, from the whole utterance, within the budget after speech."""
        assert (final.provider, final.text) == ("openai", WHISPER_TEXT), what
        assert whisper.uploads[-1].frames == FRAMES * SAMPLES_PER_FRAME, what
        assert final.timing is not None, what
        assert final.timing.compute_ms < WITHIN_MS, what

    # Healthy: Deepgram hears it, Whisper is not asked.
    final = await speaker.say(FRAMES)
    assert (final.provider, final.text) == ("deepgram", "what time is it")
    assert whisper.requests == 0

    # 1. Deepgram down (its handshake refused with 503).
    deepgram.fail_handshake(503)
    final = await speaker.say(FRAMES)
    await by_whisper(final, "handshake refused")
    assert await counted("requests_total", provider="deepgram", outcome="failure") == 1
    deepgram.reset()
    await recovered(port, "stt", "deepgram")

    # 2. Deepgram slow to its first result (connected, silent): from the end of speech the
    # budget runs out and Whisper gets the utterance.
    deepgram.stall(30)
    final = await speaker.say(FRAMES)
    await by_whisper(final, "silent")
    assert await counted("requests_total", provider="deepgram", outcome="timeout") == 1
    deepgram.reset()
    await recovered(port, "stt", "deepgram")

    # 3. Deepgram failing mid-stream, after partials went out (it drops the connection, or goes
    # quiet): partials bind nothing, so Whisper gets the whole utterance, the audio before the
    # failure included, and its final replaces Deepgram's partials.
    for what, inject in (("disconnect", deepgram.disconnect_after),
                         ("quiet", deepgram.hold_after)):
        turn = final.turn + 1
        await speaker.begin()
        await speaker.audio(FRAMES // 2)
        await run.tap.wait_for(lambda: run.tap.of(ev.Transcript, "ears", topic=sj.STT_PARTIAL,
                                                  turn=turn), 10, "a partial")
        inject(deepgram.connections[-1].results_sent)  # at its next result
        await speaker.audio(FRAMES // 2)
        final = await speaker.end()
        assert final.turn == turn, what
        await by_whisper(final, what)
        partials = run.tap.of(ev.Transcript, "ears", topic=sj.STT_PARTIAL, turn=turn)
        # Deepgram's, as the user spoke (the settled one after the end is Whisper's words).
        assert [p.provider for p in partials if not p.settled][:1] == ["deepgram"], what
        deepgram.reset()
        await recovered(port, "stt", "deepgram")
    assert await counted("fallbacks_total", from_provider="deepgram", to_provider="openai") == 4

    # Back on Deepgram; then Deepgram refusing connections altogether.
    final = await speaker.say(FRAMES)
    assert (final.provider, final.text) == ("deepgram", "what time is it")
    await deepgram.close()
    await by_whisper(await speaker.say(FRAMES), "connection refused")
    assert whisper.requests == 5
    assert await counted("fallbacks_total", from_provider="deepgram", to_provider="openai") == 5
    assert await counted("requests_total", provider="openai", outcome="success") == 5
    assert not run.tap.of(ev.StageError, "ears") and run.stack.procs["stt"].alive
    assert secrets_logged(run, [DG_KEY, KEYS["OPENAI_API_KEY"]]) == []
