"""Turn-taking in the STT stage as a real process on a real nats-server: the end-of-turn hold,
a turn of two utterances, and user-idle turns.

The test plays ingress: Piper speaks the user's words (deterministic), pocketsphinx in the STT
process hears them, and the VAD edges are published with the frames as ingress would. Hold
times are read from the events themselves: a final's ``ts_ns`` minus its ``SpeechEnded``'s,
minus the provider time it reports (``compute_ms``), is how long it was held (plus a hop).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio

from proto import codec
from proto import events as ev
from proto import subjects as sj
from services.ingress.audio import FRAME_BYTES, Resampler, read_wav
from services.tts.config import TtsConfig
from services.tts.providers.piper import PiperTts
from tests.conftest import LogTail
from voicebus.client import Tap, dispatch
from voicebus.launcher import Stack
from voicebus.speech import say_to_wav

pytestmark = pytest.mark.asyncio(loop_scope="module")

STATEMENT_MS = 800
# Far longer than any gap these tests leave between two utterances, so whether a phrase left
# hanging is continued never depends on how fast this machine is.
INCOMPLETE_MS = 5000
IDLE_S = 0.4
SILENCE = bytes(FRAME_BYTES)
PHRASES = ("I want to", "see the menu", "what time is it", "tomorrow morning")


@dataclass
class Bus:
    stack: Stack
    nc: nats.NATS
    tap: Tap


async def synthesize(folder: Path) -> dict[str, list[bytes]]:
    """Each phrase as 16 kHz frames, spoken by Piper."""
    tts = PiperTts.from_config(TtsConfig.from_env())
    out: dict[str, list[bytes]] = {}
    try:
        for i, text in enumerate(PHRASES):
            path = await say_to_wav(text, folder / f"{i}.wav", lead_ms=0, tts=tts)
            pcm, rate, channels = read_wav(path)
            resampler = Resampler(rate, channels)
            audio = resampler.process(pcm) + resampler.flush()
            out[text] = [audio[j:j + FRAME_BYTES]
                         for j in range(0, len(audio) - FRAME_BYTES + 1, FRAME_BYTES)]
    finally:
        await tts.aclose()
    return out


async def start_bus(workdir: Path, **env: str) -> Bus:
    """nats-server and one STT process configured by ``env``."""
    logs = LogTail(workdir / "stack.log")
    stack = Stack(workdir, sink=logs)
    stack.logs = logs  # type: ignore[attr-defined]
    try:
        await stack.start(stages=())
        await stack.start_stage("stt", VOICEBUS_STT_WARM_DECODERS="1", **env)
        await stack.wait_ready(("stt",))
    except BaseException:
        await stack.stop()
        raise
    nc = await stack.connect()
    return Bus(stack, nc, Tap(nc))


async def stop_bus(bus: Bus) -> None:
    await bus.tap.close()
    await bus.nc.close()
    codes = await bus.stack.stop()
    # The STT must exit cleanly on SIGTERM (its timers cancelled, drained).
    assert all(code == 0 for code in codes.values()), \
        f"{codes}\n{bus.stack.logs.dump()}"  # type: ignore[attr-defined]


@dataclass
class Setup:
    speech: dict[str, list[bytes]]
    eot: Bus   # default question hold (0), a long statement hold, user idle off
    idle: Bus  # an idle turn after IDLE_S of silence while the agent listens


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def setup(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Setup]:
    """Both STT processes and the user's speech, made side by side."""
    made = await asyncio.gather(
        start_bus(tmp_path_factory.mktemp("eot"), VOICEBUS_STT_EOT_STATEMENT_MS=str(STATEMENT_MS),
                  VOICEBUS_STT_EOT_INCOMPLETE_MS=str(INCOMPLETE_MS)),
        start_bus(tmp_path_factory.mktemp("idle"), VOICEBUS_STT_USER_IDLE_S=str(IDLE_S)),
        synthesize(tmp_path_factory.mktemp("speech")),
        return_exceptions=True)
    buses = [bus for bus in made[:2] if isinstance(bus, Bus)]
    if failed := [item for item in made if isinstance(item, BaseException)]:
        for bus in buses:
            await stop_bus(bus)
        raise failed[0]
    eot, idle, speech = made
    yield Setup(speech, eot, idle)  # type: ignore[arg-type]
    for bus in buses:
        await stop_bus(bus)


class User:
    """Ingress and egress for one session: 20 ms frames, VAD edges (one seq counter, as ingress
    keeps), the agent's state."""

    def __init__(self, setup: Setup, bus: Bus, session: str) -> None:
        self.bus, self.session, self.speech = bus, session, setup.speech
        self.seq = itertools.count(1)
        self.pts = 0

    async def join(self) -> User:
        await self.bus.tap.watch(sj.session_all(self.session))
        await dispatch(self.bus.nc, self.bus.tap, self.session, stages=("stt",))
        return self

    async def publish(self, topic: sj.Topic, cls: type[Any], **fields: Any) -> Any:
        event = cls(session=self.session, seq=next(self.seq), ts_ns=time.time_ns(), **fields)
        await self.bus.nc.publish(topic.subject(self.session), codec.encode(event))
        return event

    async def frame(self, pcm: bytes) -> None:
        await self.publish(sj.INGRESS_AUDIO, ev.AudioFrame, pcm=pcm, sample_rate=16000,
                           pts_ms=self.pts)
        self.pts += 20

    async def say(self, text: str, *, paced: bool = False
                  ) -> tuple[ev.SpeechStarted, ev.SpeechEnded]:
        """Silence (the STT's pre-roll), the speech edge, the words, the end edge; ``paced``:
        a frame each 20 ms, as a microphone gives them (a provider that decodes as the words
        come, Whisper, is heard as in a call)."""
        started_at = time.monotonic()

        async def frame(n: int, pcm: bytes) -> None:
            await self.frame(pcm)
            if paced:
                await asyncio.sleep(max(0.0, started_at + (n + 1) * 0.02 - time.monotonic()))

        for n in range(15):
            await frame(n, SILENCE)
        started = await self.publish(sj.INGRESS_VAD, ev.SpeechStarted, pts_ms=self.pts)
        frames = self.speech[text]
        for n, pcm in enumerate(frames, start=15):
            await frame(n, pcm)
        ended = await self.publish(sj.INGRESS_VAD, ev.SpeechEnded, pts_ms=self.pts,
                                   speech_ms=20 * len(frames))
        await self.bus.nc.flush()
        return started, ended

    async def pause(self, ms: int) -> None:
        """A gap in the user's speech, in real time, as ingress would stream it."""
        for _ in range(ms // 20):
            await self.frame(SILENCE)
            await asyncio.sleep(0.02)

    async def agent(self, state: str) -> ev.AgentState:
        event = await self.publish(sj.FLOOR_STATE, ev.AgentState, state=state)
        await self.bus.nc.flush()
        return event

    def finals(self) -> list[ev.Transcript | ev.UserIdle]:
        """The turns the STT closed, in arrival order: final transcripts and user-idle turns."""
        closing = {sj.STT_FINAL.subject(self.session), sj.STT_IDLE.subject(self.session)}
        return [e for subject, e in self.bus.tap.events if subject in closing]

    def partials(self) -> list[ev.Transcript]:
        return self.bus.tap.of(ev.Transcript, self.session, topic=sj.STT_PARTIAL)

    async def final(self, count: int, timeout: float = 15) -> Any:
        """The ``count``-th turn the STT closed (1-based), once it is there."""
        got = await self.bus.tap.wait_for(lambda: len(self.finals()) >= count and self.finals(),
                                          timeout, f"final #{count}")
        return got[count - 1]

    def position(self, event: ev.Event) -> int:
        """Where ``event`` is in the tap's record (arrival order)."""
        return next(i for i, (_, e) in enumerate(self.bus.tap.events) if e == event)


def held_ms(final: ev.Transcript, ended: ev.SpeechEnded) -> float:
    """How long a final was held back after its provider final (plus one bus hop)."""
    return (final.ts_ns - ended.ts_ns) / 1e6 - final.timing.compute_ms


def waited_ms(final: ev.Transcript, ended: ev.SpeechEnded) -> float:
    """How long after the end of speech a final went out: the hold counts from there, the
    provider's decode included (speech during it would be in the turn already)."""
    return (final.ts_ns - ended.ts_ns) / 1e6


# ---- end of turn ---------------------------------------------------------------------------

async def test_a_phrase_left_hanging_is_continued_by_the_next_utterance_in_one_final(
        setup: Setup) -> None:
    user = await User(setup, setup.eot, "hanging").join()
    _, end1 = await user.say("I want to")
    await user.pause(300)             # the user draws breath; the STT holds "i want to"
    _, end2 = await user.say("see the menu")
    final = await user.final(1)

    assert (final.turn, final.text) == (1, "i want to see the menu")
    assert final.speech_ms == end1.speech_ms + end2.speech_ms
    # The decode after the end of speech, a part of the wait for the final (however slow).
    assert final.provider == "pocketsphinx"
    assert 0 < final.timing.compute_ms <= waited_ms(final, end2) + 1
    # The second utterance's partials carry the turn's words so far, under the same turn:
    # after the first utterance's own partials, every partial starts with "i want to ".
    partials = user.partials()
    assert {p.turn for p in partials} == {1}
    combined = [i for i, p in enumerate(partials) if p.text.startswith("i want to ")]
    assert combined and combined == list(range(combined[0], len(partials))), partials
    # Judged again as a whole: a statement, held STATEMENT_MS after its end of speech.
    assert waited_ms(final, end2) >= STATEMENT_MS - 5
    # The session's only final: nothing was published for "i want to" on its own.
    await user.say("what time is it")
    question = await user.final(2)
    assert question.turn == 2 and [f.turn for f in user.finals()] == [1, 2]


async def test_a_question_goes_out_at_once_and_a_statement_after_its_hold(
        setup: Setup) -> None:
    user = await User(setup, setup.eot, "asking").join()
    _, end = await user.say("what time is it")
    question = await user.final(1)
    assert (question.turn, question.text) == (1, "what time is it")
    assert question.speech_ms == end.speech_ms
    # No hold, only the bus hop: the STT says so, and a statement's hold (800 ms) was not waited.
    assert question.timing.hold_ms == 0 and held_ms(question, end) < STATEMENT_MS

    # Speech after a published final opens the next turn.
    start, end = await user.say("tomorrow morning")
    statement = await user.final(2)
    assert user.position(question) < user.position(start)
    assert (statement.turn, statement.text) == (2, "tomorrow morning")
    assert waited_ms(statement, end) >= STATEMENT_MS - 5
    assert [f.turn for f in user.finals()] == [1, 2]


async def test_no_user_idle_turns_when_user_idle_is_off(setup: Setup) -> None:
    user = await User(setup, setup.eot, "quiet").join()
    await user.agent("listening")
    # Absence can only be shown by waiting: well beyond the idle time the other STT uses.
    await asyncio.sleep(IDLE_S * 3)
    assert not user.finals()


# ---- user idle -----------------------------------------------------------------------------

async def test_user_idle_turns_count_up_per_listening_and_never_while_the_agent_speaks(
        setup: Setup) -> None:
    user = await User(setup, setup.idle, "idle").join()
    listening = await user.agent("listening")
    first = await user.final(1)
    assert isinstance(first, ev.UserIdle) and (first.turn, first.count) == (1, 1)
    assert (first.ts_ns - listening.ts_ns) / 1e6 >= IDLE_S * 1000 - 5

    # The agent answers the idle turn: no timer while it thinks and speaks, however long.
    await user.agent("thinking")
    speaking = await user.agent("speaking")
    await asyncio.sleep(IDLE_S * 2.5)
    listening = await user.agent("listening")
    second = await user.final(2)
    assert user.position(second) > user.position(listening) > user.position(speaking)
    assert isinstance(second, ev.UserIdle) and (second.turn, second.count) == (2, 2)
    assert (second.ts_ns - listening.ts_ns) / 1e6 >= IDLE_S * 1000 - 5
    js = setup.idle.nc.jetstream()
    entry = await (await js.key_value("voicebus_sessions")).get("idle.turn")
    assert entry.value == b"2"  # an idle turn is a turn like any other

    # The user speaks: a real turn, and the idle count starts again. The agent's state stays
    # "listening" here (say it let a backchannel pass), so the next idle turn counts from the
    # later of the turn's end and that state. It is said once the user's speech has begun:
    # said before, a stall of the test of IDLE_S before the speech edge would rightly make
    # turn 3 an idle one. (A timer armed before speech and cancelled by it: test_stt_endpoint.)
    saying = asyncio.create_task(user.say("what time is it"))
    await user.bus.tap.wait_for(lambda: user.bus.tap.of(ev.SpeechStarted, user.session),
                                10, "the speech edge")
    await user.agent("listening")
    await saying
    spoken = await user.final(3)
    assert isinstance(spoken, ev.Transcript)
    assert (spoken.turn, spoken.text) == (3, "what time is it")
    third = await user.final(4)
    assert isinstance(third, ev.UserIdle) and (third.turn, third.count) == (4, 1)
    assert (third.ts_ns - spoken.ts_ns) / 1e6 >= IDLE_S * 1000 - 5


async def test_one_user_idle_turn_per_listening(setup: Setup) -> None:
    user = await User(setup, setup.idle, "once").join()
    await user.agent("listening")
    await user.final(1)
    # Fired: the STT waits for the agent to listen again (after its re-prompt) before timing.
    await asyncio.sleep(IDLE_S * 2.5)
    assert [(f.turn, f.count) for f in user.finals()] == [(1, 1)]


# ---- the keypad ------------------------------------------------------------------------------

async def test_keys_are_a_turn_after_a_pause_or_at_hash_and_wait_for_speech_in_progress(
        setup: Setup) -> None:
    """Keys end at "#" at once, or after a second without a key; keys pressed while the user
    speaks wait for the spoken turn, then take the next number."""
    user = await User(setup, setup.eot, "keypad").join()
    for digit in "42":
        await user.publish(sj.INGRESS_DTMF, ev.Dtmf, digit=digit)
    pressed = time.monotonic()
    first = await user.final(1)
    assert (first.text, first.provider, first.final) == ("(keypad: 42)", "keypad", True)
    assert time.monotonic() - pressed >= 0.9  # the pause that ends keys without "#"
    await user.publish(sj.INGRESS_VAD, ev.SpeechStarted, pts_ms=user.pts)
    for pcm in setup.speech["what time is it"]:
        await user.frame(pcm)
    await user.publish(sj.INGRESS_DTMF, ev.Dtmf, digit="#")  # during the utterance
    await user.publish(sj.INGRESS_VAD, ev.SpeechEnded, pts_ms=user.pts, speech_ms=900)
    spoken, keys = await user.final(2), await user.final(3)
    assert "time" in spoken.text and keys.text == "(keypad: #)"
    assert keys.turn == spoken.turn + 1 == first.turn + 2


# ---- typed messages --------------------------------------------------------------------------

async def test_a_typed_message_is_a_turn_of_its_own_after_the_spoken_turn_it_cuts_short(
        setup: Setup) -> None:
    """A typed message is a final of its own (``typed``); typed while a spoken turn is still
    open, it waits for that turn's final, which goes out at once instead of after its hold."""
    user = await User(setup, setup.eot, "typed").join()
    await user.publish(sj.INGRESS_TEXT, ev.UserText, text="Book a table for two.",
                       participant="alice")
    first = await user.final(1)
    assert (first.turn, first.text, first.final, first.typed) == \
        (1, "Book a table for two.", True, True)
    assert first.provider == "typed" and not user.partials()  # no speech, so no partials

    # "I want to" is a phrase left hanging: its final would be held INCOMPLETE_MS (5 s).
    _, ended = await user.say("I want to")
    await user.publish(sj.INGRESS_TEXT, ev.UserText, text="a pizza", participant="alice")
    spoken, typed = await user.final(2), await user.final(3)
    assert (spoken.turn, spoken.text, spoken.typed) == (2, "i want to", False)
    assert (typed.turn, typed.text, typed.typed) == (3, "a pizza", True)
    assert user.position(spoken) < user.position(typed)
    assert held_ms(spoken, ended) < INCOMPLETE_MS / 2  # cut short: the user turned to typing
    js = setup.eot.nc.jetstream()
    entry = await (await js.key_value("voicebus_sessions")).get("typed.turn")
    assert entry.value == b"3"  # a typed turn is a turn like any other
