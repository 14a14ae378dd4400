"""The STT's turn-taking: end-of-turn holds, turns of several utterances, user-idle finals.

The rules alone (``services/stt/endpoint.py``), then the STT worker itself in this process with
a scripted provider and a bus that records what is published, so every ordering of speech,
provider finals and hold timers can be set up exactly (the real process on a real bus is
tests/integration/test_stt_turns.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proto import events as ev
from proto import subjects as sj
from services.runtime.errors import APIConnectionError
from services.stt.config import SttConfig
from services.stt.endpoint import EndOfTurnHolds, IdleWatch, TurnSoFar, joined
from services.stt.provider import SttResult
from services.stt.service import MAX_UTTERANCE_FRAMES, SttFallback, SttWorker
from tests.fakes.bus import FakeBus

HOLDS = EndOfTurnHolds(question_ms=0, statement_ms=200, incomplete_ms=1500, brief_ms=350)
FRAME = bytes(640)


# ---- the rules -----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "hold"), [
    ("what time is it", 0),               # a question
    ("Is it raining?", 0),
    ("I need a taxi", 200),               # a statement
    ("Okay.", 350),                       # a lone answer: more may follow
    ("I want to", 1500),                  # left hanging
    ("book a flight and um", 1500),
    ("", 0),                              # no words: nothing to wait for
    ("   ", 0),
])
def test_the_hold_follows_how_the_words_end(text: str, hold: int) -> None:
    assert HOLDS.hold_ms(text) == hold


def test_the_holds_come_from_the_environment_with_the_documented_defaults() -> None:
    config = SttConfig.from_env({})
    assert (config.stt_eot_question_ms, config.stt_eot_statement_ms, config.stt_eot_brief_ms,
            config.stt_eot_incomplete_ms, config.stt_user_idle_s,
            config.stt_preemptive_max_hold_ms) == (0, 50, 300, 1500, 0.0, 1000)
    config = SttConfig.from_env({"VOICEBUS_STT_EOT_QUESTION_MS": "50",
                                 "VOICEBUS_STT_EOT_STATEMENT_MS": "300",
                                 "VOICEBUS_STT_EOT_BRIEF_MS": "400",
                                 "VOICEBUS_STT_EOT_INCOMPLETE_MS": "900",
                                 "VOICEBUS_STT_USER_IDLE_S": "7.5",
                                 "VOICEBUS_STT_PREEMPTIVE_MAX_HOLD_MS": "0"})
    assert (config.stt_eot_question_ms, config.stt_eot_statement_ms, config.stt_eot_brief_ms,
            config.stt_eot_incomplete_ms, config.stt_user_idle_s,
            config.stt_preemptive_max_hold_ms) == (50, 300, 400, 900, 7.5, 0)
    with pytest.raises(Exception, match="VOICEBUS_STT_EOT_INCOMPLETE_MS"):
        SttConfig.from_env({"VOICEBUS_STT_EOT_INCOMPLETE_MS": "-1"})
    with pytest.raises(Exception, match="VOICEBUS_STT_USER_IDLE_S"):
        SttConfig.from_env({"VOICEBUS_STT_USER_IDLE_S": "soon"})


def test_a_turn_joins_its_utterances_and_sums_their_speech() -> None:
    assert joined("I want to ", " book a flight") == "I want to book a flight"
    assert joined("", "hello") == "hello" and joined("hello", "") == "hello"
    turn = TurnSoFar(3)
    turn.add("I want to", 700, 1, 0.9)
    assert turn.shown("book") == "I want to book"
    turn.add("", 120, 0, 0.0)  # a cough: speech, no words, no say in the confidence
    turn.add("book a flight", 900, 2, 0.6)
    assert (turn.text, turn.speech_ms, turn.frames_dropped, turn.utterances) == (
        "I want to book a flight", 1720, 3, 3)
    assert turn.confidence == 0.6  # the least sure part


def test_user_idle_runs_only_while_listening_and_once_per_listening() -> None:
    idle = IdleWatch()
    assert not idle.may_run(False)                   # no state yet
    idle.agent_state("listening")
    assert idle.may_run(False) and not idle.may_run(True)
    assert idle.fire() == 1
    assert not idle.may_run(False)                   # fired: wait for the next listening
    idle.agent_state("thinking")
    idle.agent_state("speaking")
    assert not idle.may_run(False)
    idle.agent_state("listening")
    assert idle.may_run(False) and idle.fire() == 2  # in a row
    idle.user_spoke()
    idle.agent_state("listening")
    assert idle.fire() == 1


# ---- the worker, in this process -----------------------------------------------------------

class ScriptedStt:
    """Hears the next text of ``script`` in each utterance: one partial (its first word) with
    the first frame, the final once the frames end and ``release`` is set."""

    name = "scripted"

    def __init__(self, *script: str) -> None:
        self.script = list(script)
        self.release = asyncio.Event()
        self.release.set()
        self.fail_next = False

    async def stream(self, frames: AsyncIterator[bytes], *,
                     partials: object = None) -> AsyncIterator[SttResult]:
        text = self.script.pop(0)
        fail, self.fail_next = self.fail_next, False
        first = True
        async for _ in frames:
            if first and text:
                first = False
                yield SttResult(text.split()[0])
        if fail:
            raise APIConnectionError("connection reset", provider="scripted")
        await self.release.wait()
        yield SttResult(text, final=True, confidence=0.8)

    async def aclose(self) -> None:
        pass


class FakeService:
    stage = "stt"

    def __init__(self, provider: ScriptedStt, config: SttConfig) -> None:
        self.provider, self.config, self.bus = provider, config, FakeBus()

    def config_for(self, agent: str) -> SttConfig:  # one agent here: the default
        return self.config

    def provider_for(self, agent: str) -> ScriptedStt:
        return self.provider


class User:
    """Drives one worker as ingress and egress would, and reads what it published."""

    def __init__(self, provider: ScriptedStt, **settings: Any) -> None:
        config = SttConfig(stt_preroll_ms=40, **settings)
        self.service = FakeService(provider, config)
        self.bus = self.service.bus
        self.worker = SttWorker(self.service, ev.SessionStart(session="s"))  # type: ignore[arg-type]
        self.seq = 0

    def send(self, cls: type[Any], **fields: Any) -> None:
        self.seq += 1
        self.worker.handle(cls(session="s", seq=self.seq, **fields))

    def speak(self, frames: int = 10, speaker: str = "") -> None:
        self.send(ev.SpeechStarted, pts_ms=0, speaker=speaker)
        for i in range(frames):
            self.send(ev.AudioFrame, pcm=FRAME, sample_rate=16000, pts_ms=20 * i,
                      speaker=speaker)

    def stop(self, speech_ms: int, speaker: str = "") -> None:
        self.send(ev.SpeechEnded, pts_ms=0, speech_ms=speech_ms, speaker=speaker)

    def state(self, name: str) -> None:
        self.worker.handle(ev.AgentState(session="s", state=name))  # type: ignore[arg-type]

    def of(self, topic: sj.Topic) -> list[ev.Transcript]:
        return [e for t, e in self.bus.published if t is topic]  # type: ignore[misc]

    async def finals(self, count: int, timeout: float = 5.0,
                     topics: tuple[sj.Topic, ...] = (sj.STT_FINAL,)) -> list[Any]:
        """The first ``count`` turns closed on ``topics``, in publish order."""
        def closed() -> list[Any]:
            return [e for t, e in self.bus.published if t in topics]

        async with asyncio.timeout(timeout):
            while len(closed()) < count:
                self.bus.changed.clear()
                await self.bus.changed.wait()
        return closed()

    async def turns(self, count: int) -> list[Any]:
        """Finals and user-idle turns alike."""
        return await self.finals(count, topics=(sj.STT_FINAL, sj.STT_IDLE))

    async def settle(self) -> None:
        for _ in range(20):  # let every ready task run (no time passes)
            await asyncio.sleep(0)


@pytest.fixture
async def started() -> Any:
    users: list[User] = []

    async def make(provider: ScriptedStt, **settings: Any) -> User:
        user = User(provider, **settings)
        await user.worker.subscribe_inputs()
        users.append(user)
        return user

    yield make
    for user in users:
        await user.worker.close()


async def test_speech_during_the_hold_continues_the_turn_in_one_final(started: Any) -> None:
    user = await started(ScriptedStt("I want to", "book a flight"), stt_eot_incomplete_ms=60_000)
    user.speak()
    user.stop(700)
    await user.settle()
    assert not user.worker.ledger.settled.is_set()  # a held final is a turn in flight
    assert user.worker.open_turns.get("") is not None and user.worker.open_turns[""].so_far.text == "I want to"
    user.speak()                          # within the hold: the same turn
    await user.settle()
    user.stop(900)
    # "book a flight" is a statement: published after the (default) 50 ms hold.
    (final,) = await user.finals(1)
    assert (final.turn, final.text, final.speech_ms) == (1, "I want to book a flight", 1600)
    partials = [p for p in user.of(sj.STT_PARTIAL) if not p.settled]
    assert [p.text for p in partials] == ["I", "I want to book"]
    assert {p.turn for p in user.of(sj.STT_PARTIAL)} == {1}
    # "I want to" waited 60 s: too long to prepare an answer for; the statement did not.
    assert [p.text for p in user.of(sj.STT_PARTIAL) if p.settled] == ["I want to book a flight"]
    # The provider's time: a script's, which answers at once, so only the stage's bookkeeping
    # (the hold is reported apart, below).
    assert final.timing.compute_ms < 500
    # The hold counts from the end of speech: what the final's decode took is not waited again.
    assert 0 <= final.timing.hold_ms <= 50
    await user.settle()
    assert user.worker.ledger.settled.is_set() and user.bus.kv.data["s.turn"] == b"1"
    # After the final, speech opens the next turn.
    user.speak()
    user.stop(300)
    (_, final2) = await user.finals(2)
    assert final2.turn == 2


async def test_a_statement_is_settled_before_its_hold_and_final_after_it(started: Any) -> None:
    user = await started(ScriptedStt("please call my mother"), stt_eot_statement_ms=150)
    user.speak()
    user.stop(900)
    (final,) = await user.finals(1)
    (settled,) = [p for p in user.of(sj.STT_PARTIAL) if p.settled]
    assert (settled.turn, settled.text, settled.timing.hold_ms) == (1, final.text, 150)
    assert not settled.final and not final.continued and final.turn == 1
    # Published in that order, the hold between them (the answer is prepared meanwhile).
    assert settled.seq < final.seq
    assert user.bus.published.index((sj.STT_PARTIAL, settled)) < \
        user.bus.published.index((sj.STT_FINAL, final))


async def test_a_final_decoded_past_the_hold_goes_out_without_waiting_it_again(
        started: Any) -> None:
    provider = ScriptedStt("please call my mother")
    user = await started(provider, stt_eot_statement_ms=50)
    provider.release.clear()  # the decode outlasts the hold
    user.speak()
    user.stop(900)
    await asyncio.sleep(0.08)  # the provider's decode after the end of speech: 80 ms
    provider.release.set()
    (final,) = await user.finals(1)
    # Speech resuming during the decode would be in the turn already: the hold has passed.
    assert final.timing.compute_ms >= 75 and final.timing.hold_ms == 0


async def test_speech_after_a_settled_transcript_ends_the_turn_and_the_next_carries_it_on(
        started: Any) -> None:
    user = await started(ScriptedStt("please call my mother", "and tell her I am late"),
                         stt_eot_statement_ms=60_000, stt_preemptive_max_hold_ms=60_000)
    user.speak()
    user.stop(900)
    await user.settle()
    (settled,) = [p for p in user.of(sj.STT_PARTIAL) if p.settled]
    assert (settled.turn, settled.text) == (1, "please call my mother")
    user.speak()                          # within the hold, after the words went out settled
    (ended,) = await user.finals(1)
    assert (ended.turn, ended.text, ended.continued) == (1, "please call my mother", True)
    user.stop(700)
    await user.settle()
    # The next turn shows, and ends with, all the words (the statement hold is 60 s here:
    # its settled transcript is the proof that the utterance was heard).
    shown = [p for p in user.of(sj.STT_PARTIAL) if p.turn == 2]
    assert shown and shown[0].text.startswith("please call my mother and")
    assert shown[-1].settled and shown[-1].text == "please call my mother and tell her I am late"
    assert user.bus.kv.data["s.turn"] == b"2"


async def test_no_settled_transcripts_when_preemptive_replies_are_off(started: Any) -> None:
    user = await started(ScriptedStt("please call my mother"), stt_eot_statement_ms=50,
                         stt_preemptive_max_hold_ms=0)
    user.speak()
    user.stop(900)
    await user.finals(1)
    assert not [p for p in user.of(sj.STT_PARTIAL) if p.settled]


async def test_speech_before_the_provider_final_also_continues_the_turn(started: Any) -> None:
    provider = ScriptedStt("what time is it", "in Lisbon")
    user = await started(provider)
    provider.release.clear()              # the provider is slow with its final
    user.speak()
    user.stop(800)
    await user.settle()
    user.speak()                          # the user goes on before the first final arrives
    user.stop(500)
    await user.settle()
    assert not user.of(sj.STT_FINAL)
    provider.release.set()
    (final,) = await user.finals(1)
    assert (final.turn, final.text, final.speech_ms) == (1, "what time is it in Lisbon", 1300)


async def test_a_question_goes_out_without_a_hold_and_the_next_speech_is_a_new_turn(
        started: Any) -> None:
    user = await started(ScriptedStt("what time is it", "thanks"), stt_eot_statement_ms=60_000,
                         stt_eot_incomplete_ms=60_000)
    user.speak()
    user.stop(800)
    (final,) = await user.finals(1)       # no hold: a 60 s statement hold would time out here
    assert (final.turn, final.text, final.speech_ms) == (1, "what time is it", 800)
    user.speak()
    user.stop(300)
    await user.settle()
    assert user.worker.open_turns.get("") is not None and user.worker.open_turns[""].so_far.turn == 2


class EarlyStt:
    """Knows each utterance's words early: a stable partial (``early``) with its first frame,
    then the final (``final``) once the frames end, like whisper's final decoded ahead."""

    name = "early"

    def __init__(self, *script: tuple[str, str]) -> None:
        self.script = list(script)

    async def stream(self, frames: AsyncIterator[bytes], *,
                     partials: object = None) -> AsyncIterator[SttResult]:
        early, final = self.script.pop(0)
        first = True
        async for _ in frames:
            if first:
                first = False
                yield SttResult(early, stable=True)
        yield SttResult(final, final=True, confidence=0.8)

    async def aclose(self) -> None:
        pass


async def test_words_known_before_the_end_of_speech_go_out_settled_at_once(
        started: Any) -> None:
    user = await started(EarlyStt(("what time is it", "what time is it")))
    user.state("listening")
    user.speak()
    await user.settle()
    # Before the VAD's end edge: the agent prepares its answer during the silence window, a
    # question's too (it has no hold of its own to prepare it in).
    (settled,) = [p for p in user.of(sj.STT_PARTIAL) if p.settled]
    assert (settled.turn, settled.text, settled.timing.hold_ms) == (1, "what time is it", 0)
    assert not user.of(sj.STT_FINAL)
    user.stop(800)
    (final,) = await user.finals(1)
    # The final agrees: the draft stands (one settled transcript, no continued turn).
    assert (final.turn, final.text, final.continued) == (1, "what time is it", False)
    assert len([p for p in user.of(sj.STT_PARTIAL) if p.settled]) == 1


async def test_early_words_the_speech_then_changed_end_their_turn_and_the_next_answers(
        started: Any) -> None:
    user = await started(EarlyStt(("please call my mother", "please call my mother at work")),
                         stt_eot_statement_ms=50)
    user.state("listening")
    user.speak()
    await user.settle()
    user.stop(1200)
    ended, final = await user.finals(2)
    # The draft for the early words is dropped (continued), and the words as they are now are
    # the next turn's, settled and then final after the statement's hold.
    assert (ended.turn, ended.text, ended.continued) == (1, "please call my mother at work", True)
    assert (final.turn, final.text, final.continued) == (2, "please call my mother at work", False)
    settled = [(p.turn, p.text) for p in user.of(sj.STT_PARTIAL) if p.settled]
    assert settled == [(1, "please call my mother"), (2, "please call my mother at work")]
    assert user.bus.kv.data["s.turn"] == b"2"


async def test_early_words_a_statement_held_back_are_settled_once(started: Any) -> None:
    user = await started(EarlyStt(("please call my mother", "please call my mother")),
                         stt_eot_statement_ms=50)
    user.state("listening")
    user.speak()
    user.stop(900)
    (final,) = await user.finals(1)
    # The statement's hold, counted from the end of speech: a loaded machine spends some of it
    # before the wait begins (CI once saw 49).
    assert 0 <= final.timing.hold_ms <= 50 and not final.continued
    assert [p.text for p in user.of(sj.STT_PARTIAL) if p.settled] == ["please call my mother"]


async def test_no_early_settled_transcript_over_the_agents_reply(started: Any) -> None:
    user = await started(EarlyStt(("stop please", "stop please")), stt_eot_statement_ms=50)
    user.state("speaking")
    user.speak()
    await user.settle()
    assert not [p for p in user.of(sj.STT_PARTIAL) if p.settled]
    user.stop(800)
    (final,) = await user.finals(1)  # one turn, its words as heard: the judge decides
    assert (final.turn, final.text, final.continued) == (1, "stop please", False)


@pytest.mark.parametrize("settings", [{"stt_early_drafts": False},
                                      {"stt_preemptive_max_hold_ms": 0}])
async def test_no_early_settled_transcripts_when_switched_off(started: Any,
                                                            settings: dict[str, Any]) -> None:
    user = await started(EarlyStt(("what time is it", "what time is it")), **settings)
    user.state("listening")
    user.speak()
    await user.settle()
    assert not [p for p in user.of(sj.STT_PARTIAL) if p.settled]
    user.stop(800)
    (final,) = await user.finals(1)
    assert final.text == "what time is it"
    assert not [p for p in user.of(sj.STT_PARTIAL) if p.settled]  # a question: no hold


async def test_a_failed_utterance_closes_the_turn_at_once_with_what_was_heard(
        started: Any) -> None:
    provider = ScriptedStt("I want to", "book a flight")
    user = await started(provider, stt_eot_incomplete_ms=60_000)
    user.speak()
    user.stop(700)
    await user.settle()
    provider.fail_next = True
    user.speak()
    user.stop(400)
    (final,) = await user.finals(1)
    assert (final.turn, final.text, final.speech_ms) == (1, "I want to", 1100)
    errors = user.of(sj.ERROR["stt"])
    assert [e.turn for e in errors] == [1]  # type: ignore[attr-defined]


class UnfinishedStt(ScriptedStt):
    """Hears the utterance to its end, then never gives a final."""

    name = "unfinished"

    def __init__(self) -> None:
        super().__init__()
        self.heard = asyncio.Event()

    async def stream(self, frames: AsyncIterator[bytes], *,
                     partials: object = None) -> AsyncIterator[SttResult]:
        async for _ in frames:
            pass
        self.heard.set()
        await asyncio.Future()  # until cancelled
        yield SttResult("", final=True)


async def test_a_turn_cut_by_the_sessions_end_still_reports_the_audio_heard(
        started: Any) -> None:
    provider = UnfinishedStt()
    chain = SttFallback([provider], first_result_timeout=60, probe_interval=60)
    user = await started(chain)  # through the chain, which charges each attempt to the turn
    user.speak(10)
    user.stop(200)
    await asyncio.wait_for(provider.heard.wait(), 5)
    await user.worker.close()  # the session ends: the turn's task is cancelled
    assert user.of(sj.STT_FINAL) == []
    (used,) = user.of(sj.USAGE["stt"])
    assert (used.turn, used.provider, used.requests, used.interrupted) == (
        1, "unfinished", 1, True)
    assert used.audio_in_s == pytest.approx(0.2)  # 10 frames
    await chain.aclose()


async def test_a_turn_whose_counter_was_not_saved_still_reports_its_usage(
        started: Any) -> None:
    chain = SttFallback([ScriptedStt("what time is it")], first_result_timeout=5,
                        probe_interval=60)
    user = await started(chain)

    async def unsaved(key: str, value: bytes) -> int:
        raise ConnectionError("KV unreachable")

    user.bus.kv.put = unsaved  # type: ignore[method-assign]
    user.speak(10)
    user.stop(200)
    (final, used) = await user.finals(2, topics=(sj.STT_FINAL, sj.USAGE["stt"]))
    assert final.text == "what time is it"
    assert (used.turn, used.provider, used.interrupted) == (1, "scripted", False)
    assert used.audio_in_s == pytest.approx(0.2)
    await user.settle()
    assert user.worker.ledger.settled.is_set()  # and the turn closed all the same
    await chain.aclose()


async def test_an_utterance_cut_at_the_length_limit_counts_its_frames(started: Any) -> None:
    user = await started(ScriptedStt("go on and on"), stt_eot_incomplete_ms=0)
    for _ in range(2):                    # two frames of pre-roll (not speech)…
        user.send(ev.AudioFrame, pcm=FRAME, sample_rate=16000, pts_ms=0)
    user.speak(MAX_UTTERANCE_FRAMES)      # …then speech past the limit, and no SpeechEnded
    assert "" not in user.worker.utterances
    (final,) = await user.finals(1)
    assert final.speech_ms == (MAX_UTTERANCE_FRAMES - 2) * 20


async def test_user_idle_turns_count_up_once_per_listening_and_stop_while_speaking(
        started: Any) -> None:
    user = await started(ScriptedStt("hello there"), stt_user_idle_s=0.05)
    await asyncio.sleep(0.1)
    assert not user.of(sj.STT_IDLE)       # no state yet: not listening
    user.state("listening")
    (first,) = await user.turns(1)
    assert isinstance(first, ev.UserIdle) and (first.turn, first.count) == (1, 1)
    await asyncio.sleep(0.1)
    assert len(user.of(sj.STT_IDLE)) == 1  # once per listening
    user.state("thinking")
    user.state("speaking")
    await asyncio.sleep(0.1)
    assert len(user.of(sj.STT_IDLE)) == 1  # not while the agent speaks
    user.state("listening")
    (_, second) = await user.turns(2)
    assert (second.turn, second.count) == (2, 2)
    assert user.bus.kv.data["s.turn"] == b"2"
    user.state("listening")
    user.speak()                          # the user speaks: no timer, and the count restarts
    await asyncio.sleep(0.1)
    assert len(user.of(sj.STT_IDLE)) == 2
    user.stop(400)
    (_, _, spoken, third) = await user.turns(4)
    assert isinstance(spoken, ev.Transcript) and (spoken.turn, spoken.text) == (3, "hello there")
    # The agent's state stayed "listening" (say the reply was ignored): timed from the turn end.
    assert isinstance(third, ev.UserIdle) and (third.turn, third.count) == (4, 1)
    assert user.worker.ledger.settled.is_set()
    assert all(final.text for final in user.of(sj.STT_FINAL))  # silence is never a final


async def test_the_idle_timer_is_off_by_default_and_gone_on_close(started: Any) -> None:
    user = await started(ScriptedStt(), stt_early_drafts=False)
    assert sj.FLOOR_STATE.subject("s") not in user.bus.handlers  # nothing needs the state
    early = await started(ScriptedStt())
    assert sj.FLOOR_STATE.subject("s") in early.bus.handlers  # early drafts: while listening
    user.worker.handle(ev.AgentState(session="s", state="listening"))
    assert user.worker.idle_timer is None
    timed = await started(ScriptedStt(), stt_user_idle_s=30)
    timed.state("listening")
    timer = timed.worker.idle_timer
    assert timer is not None and not timer.done()
    await timed.worker.close()
    assert timer.cancelled()


# ---- a meeting: each speaker's speech is a turn of its own -----------------------------------


async def test_two_speakers_at_once_are_two_turns_labelled_and_closed_in_order(
        started: Any) -> None:
    # Alice starts first and goes on longer; Bob's words are ready first but his final waits
    # for hers, so the judge gets turn 1 before turn 2.
    user = await started(ScriptedStt("what time is it", "where is the station"),
                         stt_eot_statement_ms=0, stt_eot_question_ms=0,
                         stt_eot_incomplete_ms=0)
    user.speak(speaker="alice")
    user.speak(speaker="bob")
    user.stop(600, speaker="bob")
    await user.settle()
    assert user.of(sj.STT_FINAL) == []       # Bob's turn is later than Alice's open one
    partials = user.of(sj.STT_PARTIAL)
    assert {(p.turn, p.speaker) for p in partials} == {(1, "alice"), (2, "bob")}
    user.stop(900, speaker="alice")
    first, second = await user.finals(2)
    assert (first.turn, first.speaker, first.text) == (1, "alice", "what time is it")
    assert (second.turn, second.speaker, second.text) == (2, "bob", "where is the station")


async def test_one_speakers_held_turn_does_not_take_anothers_speech(started: Any) -> None:
    user = await started(ScriptedStt("I want to", "hello there", "book a flight"),
                         stt_eot_incomplete_ms=60_000, stt_eot_statement_ms=0)
    user.speak(speaker="alice")
    user.stop(700, speaker="alice")          # "I want to": held for more
    await user.settle()
    user.speak(speaker="bob")                # Bob speaks meanwhile: his own turn, 2
    user.stop(500, speaker="bob")
    await user.settle()
    assert user.of(sj.STT_FINAL) == []       # waiting for Alice's turn 1
    user.speak(speaker="alice")              # Alice goes on: still turn 1
    user.stop(800, speaker="alice")
    first, second = await user.finals(2)
    assert (first.turn, first.speaker, first.text) == (1, "alice", "I want to book a flight")
    assert (second.turn, second.speaker, second.text) == (2, "bob", "hello there")


async def test_a_typed_message_is_its_typists_turn(started: Any) -> None:
    user = await started(ScriptedStt())
    user.send(ev.UserText, text="hi from chat", participant="carol", speaker="carol")
    (final,) = await user.finals(1)
    assert (final.speaker, final.typed, final.text) == ("carol", True, "hi from chat")


async def test_a_speaker_whose_microphone_goes_away_mid_sentence_holds_nobody_up(
        started: Any) -> None:
    user = await started(ScriptedStt("so what I", "where is the station"),
                         stt_eot_statement_ms=0, stt_eot_question_ms=0,
                         stt_eot_incomplete_ms=0)
    user.speak(speaker="alice")              # …and her SpeechEnded never comes
    user.speak(speaker="bob")
    user.stop(600, speaker="bob")
    await user.settle()
    assert user.of(sj.STT_FINAL) == []
    user.send(ev.InputTrack, participant="alice", track_sid="TR_a", active=False,
              speaker="alice")
    first, second = await user.finals(2)
    assert (first.speaker, second.speaker) == ("alice", "bob")
