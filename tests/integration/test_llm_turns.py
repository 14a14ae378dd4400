"""The LLM and TTS stages' side of turn-taking, each a real process on a real nats-server,
driven through the bus: the greeting, backchannels that are not answered, the history cut to
what the user heard, idle re-prompts and the goodbye that ends the session, and an empty
reply that leaves the reply being spoken alone."""

from __future__ import annotations

import itertools
import time

import msgspec

from proto import events as ev
from proto import subjects as sj
from services.llm.provider import ChatMessage
from tests.integration.test_stage_processes import publish
from voicebus.client import dispatch

SESSION = "manners"
seq = itertools.count(1)


def _event(cls: type[ev.Event], **fields) -> ev.Event:
    return cls(session=SESSION, seq=next(seq), ts_ns=time.time_ns(), **fields)


def _final(turn: int, text: str, speech_ms: int = 0, idle: int = 0) -> ev.Transcript:
    return _event(ev.Transcript, turn=turn, text=text, final=True, speech_ms=speech_ms,
                  idle=idle)


def _played(turn: int, text_offset: int = 0, interrupted: bool = False) -> ev.Playback:
    return _event(ev.Playback, turn=turn, final=True, text_offset=text_offset,
                  interrupted=interrupted)


async def test_llm_greets_ignores_backchannels_cuts_history_and_says_goodbye(bare_stack):
    stack, nc, tap = bare_stack
    await stack.start_stage("llm", VOICEBUS_ECHO_ACK="got it, and here is more.")
    await stack.wait_ready(("llm",))
    await tap.watch(sj.session_all(SESSION))
    await dispatch(nc, tap, SESSION, stages=("llm",), greeting="Hi there.")

    async def reply(turn: int) -> ev.ReplyDone:
        done = await tap.wait_for(lambda: tap.of(ev.ReplyDone, SESSION, turn=turn), 10,
                                  f"the reply to turn {turn}")
        return done[0]

    track = _event(ev.InputTrack, participant="user", track_sid="TR_1", active=True)
    await publish(nc, sj.INGRESS_TRACK, track)
    await publish(nc, sj.INGRESS_TRACK, track)  # a reconnect: no second greeting
    assert (await reply(0)).text == "Hi there."
    # Over the greeting (not played out yet): a backchannel is not a turn to answer.
    await publish(nc, sj.STT_FINAL, _final(1, "uh-huh", speech_ms=400))
    assert (await reply(1)).ignored
    await publish(nc, sj.EGRESS_PLAYBACK, _played(0))
    await publish(nc, sj.STT_FINAL, _final(2, "tell me about the weather", speech_ms=900))
    answer = await reply(2)
    assert answer.text.startswith("Tell me about the weather") and not answer.ignored
    await publish(nc, sj.EGRESS_PLAYBACK, _played(2, text_offset=11, interrupted=True))
    await publish(nc, sj.STT_FINAL, _final(3, "", idle=1))
    prompt = await reply(3)
    await publish(nc, sj.STT_FINAL, _final(4, "", idle=2))
    goodbye = await reply(4)
    assert (prompt.text, prompt.end_session) == ("Are you still there?", False)
    assert goodbye.end_session and goodbye.text
    assert tap.of(ev.SessionEnd, SESSION) == []  # not before the goodbye was heard
    await publish(nc, sj.EGRESS_PLAYBACK, _played(4))
    end = await tap.wait_for(lambda: tap.of(ev.SessionEnd, SESSION), 10, "the session's end")

    assert end[0].reason == "user idle"
    assert len(tap.of(ev.ReplyDone, SESSION, turn=0)) == 1
    entry = await (await nc.jetstream().key_value("voicebus_history")).get(SESSION)
    history = msgspec.msgpack.decode(entry.value, type=list[ChatMessage])
    assert history == [
        ChatMessage("assistant", "Hi there.", turn=0),
        ChatMessage("user", "tell me about the weather", turn=2),
        ChatMessage("assistant", answer.text[:11].rstrip(), interrupted=True, turn=2),
        ChatMessage("assistant", "Are you still there?", turn=3),
        ChatMessage("assistant", goodbye.text, turn=4),
    ]


async def test_tts_keeps_speaking_through_an_empty_or_ignored_reply(bare_stack):
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
    await publish(nc, sj.LLM_DONE, _event(ev.ReplyDone, turn=2, ignored=True))
    await publish(nc, sj.LLM_DONE, _event(ev.ReplyDone, turn=3))
    first = await tap.wait_for(lambda: tap.of(ev.SpeechDone, SESSION, turn=1), 30, "turn 1")
    skipped = [tap.of(ev.SpeechDone, SESSION, turn=t) for t in (2, 3)]

    assert not first[0].interrupted and first[0].text == text and first[0].frames > 100
    assert all(len(done) == 1 and done[0].frames == 0 and not done[0].interrupted
               for done in skipped), skipped
