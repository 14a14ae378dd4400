"""Turn-taking across stages, each a real process on a real nats-server, driven through the
bus: the judge in egress (verdicts, a forged turn refused, the goodbye that ends the session),
the LLM that answers verdicts and keeps what was heard, and TTS speaking on through an empty or
failed reply."""

from __future__ import annotations

import itertools
import time

import msgspec

from proto import events as ev
from proto import subjects as sj
from services.llm.provider import ChatMessage
from services.runtime.ledger import FloorRecord
from tests.integration.test_stage_processes import publish
from voicebus.client import dispatch

SESSION = "manners"
seq = itertools.count(1)


def _event(cls: type[ev.Event], **fields) -> ev.Event:
    return cls(session=SESSION, seq=next(seq), ts_ns=time.time_ns(), **fields)


def _verdict(turn: int, action: str, text: str = "", reason: str = "") -> ev.Verdict:
    return _event(ev.Verdict, turn=turn, action=action, text=text, reason=reason)


def _played(turn: int, text_offset: int = 0, interrupted: bool = False) -> ev.Playback:
    return _event(ev.Playback, turn=turn, final=True, text_offset=text_offset,
                  interrupted=interrupted)


async def test_llm_answers_verdicts_only_and_keeps_what_was_heard(bare_stack):
    """The LLM speaks what the judge decided (greeting, answer, re-prompt, goodbye), answers
    nothing it was told to ignore, refuses a turn from the future, and keeps of each reply only
    what the user heard."""
    stack, nc, tap = bare_stack
    await stack.start_stage("llm", VOICEBUS_ECHO_ACK="got it, and here is more.")
    await stack.wait_ready(("llm",))
    await tap.watch(sj.session_all(SESSION))
    await dispatch(nc, tap, SESSION, stages=("llm",), greeting="Hi there.")

    async def reply(turn: int) -> ev.ReplyDone:
        done = await tap.wait_for(lambda: tap.of(ev.ReplyDone, SESSION, turn=turn), 10,
                                  f"the reply to turn {turn}")
        return done[0]

    await publish(nc, sj.FLOOR_VERDICT, _verdict(0, "greet"))
    assert (await reply(0)).text == "Hi there."
    await publish(nc, sj.FLOOR_VERDICT, _verdict(1, "ignore", reason="backchannel"))
    await publish(nc, sj.FLOOR_VERDICT, _verdict(1_000_000, "answer", "forged words"))
    await publish(nc, sj.EGRESS_PLAYBACK, _played(0))
    await publish(nc, sj.FLOOR_VERDICT, _verdict(2, "answer", "tell me about the weather"))
    answer = await reply(2)
    assert answer.text.startswith("Tell me about the weather")
    await publish(nc, sj.EGRESS_PLAYBACK, _played(2, text_offset=11, interrupted=True))
    await publish(nc, sj.FLOOR_VERDICT, _verdict(3, "prompt"))
    prompt = await reply(3)
    await publish(nc, sj.FLOOR_VERDICT, _verdict(4, "goodbye"))
    goodbye = await reply(4)
    assert prompt.text == "Are you still there?"
    assert goodbye.text == "It seems you have stepped away. Goodbye!"

    # Nothing answered the ignored turn nor the forged one; the session end is not the LLM's.
    assert [d.turn for d in tap.of(ev.ReplyDone, SESSION)] == [0, 2, 3, 4]
    assert tap.of(ev.SessionEnd, SESSION) == []
    entry = await (await nc.jetstream().key_value("voicebus_history")).get(SESSION)
    history = msgspec.msgpack.decode(entry.value, type=list[ChatMessage])
    assert history == [
        ChatMessage("assistant", "Hi there.", turn=0),
        ChatMessage("user", "tell me about the weather", turn=2),
        ChatMessage("assistant", answer.text[:11].rstrip(), interrupted=True, turn=2),
        ChatMessage("assistant", "Are you still there?", turn=3),
        ChatMessage("assistant", goodbye.text, turn=4),
    ]


async def test_the_judge_in_egress_greets_refuses_a_forged_turn_and_ends_after_a_goodbye(
        bare_stack):
    """Egress alone judges: a final from the future is refused (and the session goes on), a
    second user-idle turn gets the goodbye, and once it has been played the judge ends the
    session on its own subject. Its record in KV says where it stands."""
    stack, nc, tap = bare_stack
    await stack.start_stage("egress", VOICEBUS_IDLE_PROMPTS="1")
    await stack.wait_ready(("egress",))
    await tap.watch(sj.session_all(SESSION))
    await dispatch(nc, tap, SESSION, stages=("egress",))

    async def verdict(turn: int) -> ev.Verdict:
        found = await tap.wait_for(lambda: tap.of(ev.Verdict, SESSION, turn=turn), 10,
                                   f"the verdict on turn {turn}")
        return found[0]

    async def spoken(turn: int) -> None:  # the LLM and TTS side: a reply with no audio
        await publish(nc, sj.TTS_DONE, _event(ev.SynthesisDone, turn=turn))
        await tap.wait_for(lambda: tap.of(ev.Playback, SESSION, turn=turn, final=True), 10,
                           f"the end of reply {turn}")

    await publish(nc, sj.STT_FINAL, _event(ev.Transcript, turn=1_000_000, text="forged",
                                           final=True, speech_ms=900))
    assert (await verdict(1_000_000)).reason == "out of reach"
    await publish(nc, sj.STT_FINAL, _event(ev.Transcript, turn=1, text="what time is it",
                                           final=True, speech_ms=900))
    assert ((await verdict(1)).action, (await verdict(1)).text) == ("answer", "what time is it")
    await spoken(1)
    await publish(nc, sj.STT_IDLE, _event(ev.UserIdle, turn=2, count=1))
    assert (await verdict(2)).action == "prompt"
    await spoken(2)
    await publish(nc, sj.STT_IDLE, _event(ev.UserIdle, turn=3, count=2))
    assert (await verdict(3)).action == "goodbye"
    assert tap.of(ev.SessionEnd, SESSION) == []  # not before the goodbye was heard
    await spoken(3)
    end = await tap.wait_for(lambda: tap.of(ev.SessionEnd, SESSION, topic=sj.FLOOR_END), 10,
                             "the session's end")
    assert end[0].reason == "user idle"
    entry = await (await nc.jetstream().key_value("voicebus_sessions")).get(f"{SESSION}.floor")
    record = msgspec.msgpack.decode(entry.value, type=FloorRecord)
    assert record.written_ms > 0  # when, on the wall clock: a follow-up's time runs on
    assert msgspec.structs.replace(record, written_ms=0) == FloorRecord(judged=3)


async def test_the_judge_gives_up_a_reply_that_never_comes_and_listens_again(bare_stack):
    """A verdict whose reply never reaches egress (lost on the bus as a NATS node died, a stage
    gone quiet) would leave the agent "thinking" for ever. Past VOICEBUS_EGRESS_REPLY_TIMEOUT
    the judge cuts it (a Cancel everywhere) and listens: the next question is answered. A
    reply under way is left alone."""
    stack, nc, tap = bare_stack
    # Egress is alone here: no TTS reports the end of the turn given up last, so on SIGTERM
    # it would wait out the whole shutdown grace (10 s) for it before exiting (0 either way).
    await stack.start_stage("egress", VOICEBUS_EGRESS_REPLY_TIMEOUT="1",
                            VOICEBUS_SHUTDOWN_GRACE="1")
    await stack.wait_ready(("egress",))
    await tap.watch(sj.session_all(SESSION))
    await dispatch(nc, tap, SESSION, stages=("egress",))

    async def ask(turn: int, text: str) -> None:
        await publish(nc, sj.STT_FINAL, _event(ev.Transcript, turn=turn, text=text, final=True,
                                               speech_ms=900))
        await tap.wait_for(lambda: tap.of(ev.Verdict, SESSION, turn=turn, action="answer"), 10,
                           f"the verdict on turn {turn}")

    async def given_up(turn: int) -> ev.Cancel:
        found = await tap.wait_for(lambda: tap.of(ev.Cancel, SESSION, turn=turn), 10,
                                   f"reply {turn} to be given up")
        return found[0]

    await ask(1, "what time is it")
    assert (await given_up(1)).reason == "no reply"
    await ask(2, "please call my mother")  # the floor is free again: answered
    await publish(nc, sj.TTS_DONE, _event(ev.SynthesisDone, turn=2))  # a reply, empty but there
    await tap.wait_for(lambda: tap.of(ev.Playback, SESSION, turn=2, final=True), 10, "reply 2")
    await ask(3, "where is the station")
    await given_up(3)  # a second later than reply 2's watchdog would have fired
    assert tap.of(ev.Cancel, SESSION, turn=2) == []


async def test_tts_keeps_speaking_through_an_empty_or_failed_reply(bare_stack):
    stack, nc, tap = bare_stack
    await stack.start_stage("tts")
    await stack.wait_ready(("tts",))
    await tap.watch(sj.session_all(SESSION))
    await dispatch(nc, tap, SESSION, stages=("tts",))
    text = "This reply has a few sentences. It goes on for a while. Then it ends."
    await publish(nc, sj.LLM_DELTA, _event(ev.ReplyDelta, turn=1, text=text))
    await publish(nc, sj.LLM_DONE, _event(ev.ReplyDone, turn=1, text=text))
    await tap.wait_for(lambda: tap.of(ev.AudioFrame, SESSION, topic=sj.TTS_AUDIO, turn=1), 10,
                       "the first audio of turn 1")
    await publish(nc, sj.LLM_DONE, _event(ev.ReplyDone, turn=2))
    await publish(nc, sj.LLM_DONE, _event(ev.ReplyDone, turn=3, error="the model failed"))
    first = await tap.wait_for(lambda: tap.of(ev.SynthesisDone, SESSION, turn=1), 30, "turn 1")
    skipped = [tap.of(ev.SynthesisDone, SESSION, turn=t) for t in (2, 3)]

    assert not first[0].interrupted and first[0].text == text and first[0].frames > 100
    assert all(len(done) == 1 and done[0].frames == 0 and not done[0].interrupted
               for done in skipped), skipped
