"""A recorded session as the session page shows it (voicebus/timeline.py), from events encoded
exactly as they cross the bus: who spoke when, what was said, what the user heard of each reply,
the interruptions, and each turn's latency waterfall."""

from __future__ import annotations

from pathlib import Path

import msgspec

from proto import codec
from proto import events as ev
from proto import subjects as sj
from voicebus import record
from voicebus.record import Entry
from voicebus.timeline import WATERFALL, build

# A session the stack recorded (tests/sessions/README.md): two questions, two whole answers.
RECORDED = Path(__file__).resolve().parents[1] / "sessions" / "two-questions.vbus"

S = "call-1"
T0 = 1_800_000_000_000_000_000  # the session's first event, ns
GREETING = "Hello! How can I help?"
REPLY = "What time is it... got it."
FRAME = bytes(640)


class Capture:
    """Events of one session in capture order, each stamped ``ms`` after T0."""

    def __init__(self, session: str = S) -> None:
        self.session = session
        self.entries: list[Entry] = []

    def add(self, topic: sj.Topic, cls: type[ev.Event], ms: float, **fields) -> Capture:
        event = cls(session=self.session, seq=len(self.entries) + 1, ts_ns=at(ms), **fields)
        self.entries.append(Entry(topic.subject(self.session), at(ms) + 300_000,
                                  codec.encode(event)))
        return self


def at(ms: float) -> int:
    return T0 + round(ms * 1_000_000)


def greeted(capture: Capture) -> Capture:
    """A room session: the agent greets (turn 0) and the greeting is heard whole."""
    return (capture
            .add(sj.CTL_START, ev.SessionStart, 0, room=S, greeting=GREETING)
            .add(sj.INGRESS_TRACK, ev.InputTrack, 5, participant="alice", active=True)
            .add(sj.FLOOR_VERDICT, ev.Verdict, 10, turn=0, action="greet", text=GREETING)
            .add(sj.LLM_DELTA, ev.ReplyDelta, 12, turn=0, text=GREETING)
            .add(sj.LLM_DONE, ev.ReplyDone, 13, turn=0, text=GREETING)
            .add(sj.TTS_AUDIO, ev.AudioFrame, 60, pcm=FRAME, sample_rate=16000, turn=0)
            .add(sj.FLOOR_STATE, ev.AgentState, 100, state="speaking", turn=0)
            .add(sj.EGRESS_PLAYBACK, ev.Playback, 120, turn=0, played_ms=20)
            .add(sj.EGRESS_PLAYBACK, ev.Playback, 1400, turn=0, played_ms=1300,
                 text_offset=len(GREETING), final=True)
            .add(sj.FLOOR_STATE, ev.AgentState, 1401, state="listening", turn=0))


def asked(capture: Capture) -> Capture:
    """The user asks (turn 1): speech from 1 820 ms to its last sample at 2 620 ms (the VAD's
    end is published 280 ms later), then the answer starts playing at 3 120 ms (egress reports
    its first frame as it writes it)."""
    return (capture
            .add(sj.INGRESS_AUDIO, ev.AudioFrame, 1900, pcm=FRAME, sample_rate=16000)
            .add(sj.INGRESS_VAD, ev.SpeechStarted, 2000, pts_ms=1900)
            .add(sj.STT_PARTIAL, ev.Transcript, 2200, turn=1, text="what")
            .add(sj.STT_PARTIAL, ev.Transcript, 2400, turn=1, text="what time")
            .add(sj.INGRESS_VAD, ev.SpeechEnded, 2900, pts_ms=2700, speech_ms=800,
                 timing=ev.Timing(last_speech_ts_ns=at(2620)))
            .add(sj.STT_FINAL, ev.Transcript, 2950, turn=1, text="what time is it", final=True,
                 speech_ms=800, timing=ev.Timing(compute_ms=12.54))
            .add(sj.FLOOR_VERDICT, ev.Verdict, 2952, turn=1, action="answer",
                 text="what time is it")
            .add(sj.LLM_DELTA, ev.ReplyDelta, 2960, turn=1, text="What time ")
            .add(sj.LLM_DELTA, ev.ReplyDelta, 2961, turn=1, text="is it... got it.", index=1)
            .add(sj.LLM_DONE, ev.ReplyDone, 2962, turn=1, text=REPLY)
            .add(sj.TTS_AUDIO, ev.AudioFrame, 3040, pcm=FRAME, sample_rate=16000, turn=1)
            .add(sj.TTS_AUDIO, ev.AudioFrame, 3060, pcm=FRAME, sample_rate=16000, turn=1)
            .add(sj.EGRESS_PLAYBACK, ev.Playback, 3120, turn=1, played_ms=20))


def test_a_whole_conversation_says_who_spoke_when_and_what_was_heard() -> None:
    capture = asked(greeted(Capture()))
    capture.add(sj.EGRESS_PLAYBACK, ev.Playback, 4700, turn=1, played_ms=1560,
                text_offset=len(REPLY), final=True)
    capture.add(sj.CTL_END, ev.SessionEnd, 5000, reason="room finished")
    t = build(S, capture.entries)

    assert (t.session, t.start_ns, t.duration_ms, t.ended) == (S, T0, 5000.0, "room finished")
    assert (t.messages, t.rejected) == (len(capture.entries), 0)
    # The user's utterance ends at its last sample and lasts what the VAD measured; the
    # agent's replies run from where their first report says they began.
    assert [(s.who, s.turn, s.start_ms, s.end_ms, s.interrupted) for s in t.spans] == [
        ("agent", 0, 120.0, 1400.0, False), ("user", 1, 1820.0, 2620.0, False),
        ("agent", 1, 3120.0, 4700.0, False)]
    greeting, question = t.turns
    assert (greeting.turn, greeting.kind, greeting.said, greeting.reply) == \
        (0, "greeting", "", GREETING)
    assert (question.kind, question.said, question.speech_ms, question.stt_compute_ms) == \
        ("user", "what time is it", 800, 12.5)
    assert [(p.at_ms, p.text) for p in question.partials] == [(2200.0, "what"),
                                                             (2400.0, "what time")]
    assert (question.verdict, question.reply, question.interrupted) == ("answer", REPLY, False)
    assert question.heard is not None
    assert (question.heard.text, question.heard.unheard, question.heard.played_ms) == \
        (REPLY, "", 1560)
    assert [s.state for s in t.states] == ["speaking", "listening"]


def test_each_turn_has_its_latency_waterfall() -> None:
    capture = asked(greeted(Capture()))
    greeting, question = build(S, capture.entries).turns
    # end of speech → STT final → verdict → first delta → first TTS frame → playback start
    assert [(s.name, s.at_ms, s.delta_ms, s.since_ms) for s in question.waterfall] == [
        ("end of speech", 2620.0, 0.0, 0.0), ("STT final", 2950.0, 330.0, 330.0),
        ("verdict", 2952.0, 2.0, 332.0), ("LLM first delta", 2960.0, 8.0, 340.0),
        ("TTS first audio", 3040.0, 80.0, 420.0), ("playback start", 3120.0, 80.0, 500.0)]
    assert tuple(s.name for s in question.waterfall) == WATERFALL
    # The agent's own turn has no user speech: it starts at the judge's verdict.
    assert [(s.name, s.since_ms) for s in greeting.waterfall] == [
        ("verdict", 0.0), ("LLM first delta", 2.0), ("TTS first audio", 50.0),
        ("playback start", 110.0)]


def test_a_barge_in_shows_what_was_heard_before_the_cut() -> None:
    capture = asked(greeted(Capture()))
    heard = 13  # "What time is "
    (capture
     .add(sj.EGRESS_PLAYBACK, ev.Playback, 3370, turn=1, played_ms=270, text_offset=5)
     .add(sj.INGRESS_VAD, ev.SpeechStarted, 3600, pts_ms=3500)
     .add(sj.STT_PARTIAL, ev.Transcript, 3800, turn=2, text="stop")
     .add(sj.FLOOR_CANCEL, ev.Cancel, 3850, turn=1, reason="barge-in")
     .add(sj.EGRESS_PLAYBACK, ev.Playback, 3860, turn=1, played_ms=740, text_offset=heard,
          final=True, interrupted=True)
     .add(sj.INGRESS_VAD, ev.SpeechEnded, 4300, pts_ms=4200, speech_ms=700,
          timing=ev.Timing(last_speech_ts_ns=at(4220)))
     .add(sj.STT_FINAL, ev.Transcript, 4400, turn=2, text="stop please", final=True)
     .add(sj.FLOOR_VERDICT, ev.Verdict, 4401, turn=2, action="answer", text="stop please"))
    t = build(S, capture.entries)

    cut = t.turns[1]
    assert cut.interrupted and cut.cancelled_ms == 3850.0
    assert cut.heard is not None and cut.heard.interrupted and cut.heard.final
    assert (cut.heard.text, cut.heard.unheard) == (REPLY[:heard], REPLY[heard:])
    assert cut.heard.played_ms == 740
    spans = [(s.who, s.turn, s.start_ms, s.end_ms, s.interrupted) for s in t.spans]
    assert ("agent", 1, 3120.0, 3860.0, True) in spans
    # The user talking over the reply is turn 2's speech, not turn 1's.
    assert ("user", 2, 3520.0, 4220.0, False) in spans
    assert t.turns[2].said == "stop please" and not t.turns[2].interrupted
    assert [(m.source, m.turn, m.detail) for m in t.marks if m.kind == "Cancel"] == \
        [("floor.cancel", 1, "cut: barge-in")]


def test_a_reply_cut_before_it_played_was_never_heard() -> None:
    capture = asked(greeted(Capture()))
    (capture
     .add(sj.STT_FINAL, ev.Transcript, 5000, turn=2, text="tell me a story", final=True)
     .add(sj.FLOOR_VERDICT, ev.Verdict, 5001, turn=2, action="answer", text="tell me a story")
     .add(sj.LLM_DELTA, ev.ReplyDelta, 5010, turn=2, text="Once upon ")
     .add(sj.FLOOR_CANCEL, ev.Cancel, 5020, turn=2, reason="barge-in")
     .add(sj.LLM_DONE, ev.ReplyDone, 5021, turn=2, text="Once upon ", interrupted=True))
    story = build(S, capture.entries).turns[2]
    assert story.heard is None and story.interrupted and story.reply == "Once upon "
    assert [s.name for s in story.waterfall] == ["STT final", "verdict", "LLM first delta"]


def test_the_agents_own_turns_and_ignored_utterances_are_named() -> None:
    capture = (Capture()
               .add(sj.STT_FINAL, ev.Transcript, 100, turn=1, text="uh-huh", final=True)
               .add(sj.FLOOR_VERDICT, ev.Verdict, 101, turn=1, action="ignore",
                    reason="backchannel")
               .add(sj.STT_IDLE, ev.UserIdle, 9000, turn=2, count=1)
               .add(sj.FLOOR_VERDICT, ev.Verdict, 9001, turn=2, action="prompt")
               .add(sj.STT_IDLE, ev.UserIdle, 18000, turn=3, count=2)
               .add(sj.FLOOR_VERDICT, ev.Verdict, 18001, turn=3, action="goodbye")
               .add(sj.STT_IDLE, ev.UserIdle, 27000, turn=4, count=3))
    turns = build(S, capture.entries).turns
    assert [(t.turn, t.kind, t.verdict, t.reason) for t in turns] == [
        (1, "user", "ignore", "backchannel"), (2, "prompt", "prompt", ""),
        (3, "goodbye", "goodbye", ""), (4, "idle", "", "")]


def test_without_audio_in_the_capture_the_first_tts_frame_comes_from_its_timing() -> None:
    """VOICEBUS_RECORD=events keeps no frames: SynthesisDone says when the first went out."""
    capture = asked(greeted(Capture()))
    capture.entries = [e for e in capture.entries if not e.subject.endswith(".tts.audio")]
    capture.add(sj.TTS_DONE, ev.SynthesisDone, 3500, turn=1, frames=78, text=REPLY,
                timing=ev.Timing(first_frame_ts_ns=at(3050)))
    question = build(S, capture.entries).turns[1]
    assert ("TTS first audio", 3050.0) in [(s.name, s.at_ms) for s in question.waterfall]


def test_bad_messages_are_counted_and_left_out_and_file_paths_never_shown() -> None:
    capture = (Capture()
               .add(sj.CTL_START, ev.FileSessionStart, 0, wav_in=("/home/alice/secret.wav",),
                    wav_out="/home/alice/out.wav")
               .add(sj.INGRESS_VAD, ev.SpeechStarted, 500, pts_ms=400))
    other = ev.Transcript(session="someone-else", turn=1, text="not ours", final=True, ts_ns=at(1))
    misplaced = ev.Transcript(session=S, turn=1, text="not a reply", ts_ns=at(2))
    capture.entries += [Entry(sj.STT_FINAL.subject(S), at(1), codec.encode(other)),
                        Entry(sj.LLM_DELTA.subject(S), at(2), codec.encode(misplaced)),
                        Entry(sj.STT_FINAL.subject(S), at(3), b"\xc1 not msgpack")]
    capture.add(sj.STT_PARTIAL, ev.Transcript, 900, turn=1, text="hello")
    t = build(S, capture.entries)
    assert (t.messages, t.rejected) == (6, 3)
    assert [turn.partials[0].text for turn in t.turns] == ["hello"]
    # The session ended (the capture did) while the user was speaking: their span runs to it.
    assert [(s.who, s.turn, s.start_ms, s.end_ms) for s in t.spans] == [
        ("user", 1, 500.0, 900.0)]
    text = msgspec.json.encode(t).decode()
    assert "alice" not in text and "not ours" not in text and "not a reply" not in text
    assert "development file session" in text


def test_an_offset_past_the_reply_is_held_to_it_and_an_empty_capture_is_empty() -> None:
    capture = (Capture()
               .add(sj.LLM_DONE, ev.ReplyDone, 10, turn=1, text="short")
               .add(sj.EGRESS_PLAYBACK, ev.Playback, 500, turn=1, played_ms=480,
                    text_offset=99))
    t = build(S, capture.entries)
    turn = t.turns[0]
    assert turn.heard is not None
    assert (turn.heard.text, turn.heard.unheard, turn.heard.final) == ("short", "", False)
    # Its first report came 480 ms in (the first ones were lost): it began 460 ms before
    # (the session's clock starts at the reply's end, 10 ms).
    assert [(s.who, s.start_ms, s.end_ms) for s in t.spans] == [("agent", 30.0, 490.0)]
    empty = build(S, [])
    assert (empty.messages, empty.turns, empty.spans, empty.duration_ms) == (0, [], [], 0.0)


def test_a_session_the_stack_recorded_reads_as_its_two_turns() -> None:
    recording = record.read_file(RECORDED)
    events = [e for _, _, e in recording.events()]
    t = build(recording.header.session, recording.entries)
    assert (t.messages, t.rejected) == (len(recording.entries), 0)
    finals = [e for e in events if isinstance(e, ev.Transcript) and e.final]
    assert [(turn.turn, turn.said) for turn in t.turns] == [(f.turn, f.text) for f in finals]
    assert len(t.turns) == 2
    for turn in t.turns:
        (done,) = [e for e in events if isinstance(e, ev.ReplyDone) and e.turn == turn.turn]
        assert turn.reply == done.text and not turn.interrupted
        assert turn.heard is not None and (turn.heard.text, turn.heard.unheard) == (done.text, "")
        # Every step, each after the one before (one machine's clock).
        assert tuple(s.name for s in turn.waterfall) == WATERFALL
        assert all(s.delta_ms >= 0 for s in turn.waterfall), turn.waterfall
    assert [(s.who, s.turn) for s in t.spans] == [("user", 1), ("agent", 1), ("user", 2),
                                                  ("agent", 2)]


def test_a_drafted_turn_shows_its_reply_prepared_during_the_hold_in_time_order() -> None:
    text = "please call my mother"
    capture = (Capture()
               .add(sj.CTL_START, ev.SessionStart, 0, room=S)
               .add(sj.INGRESS_VAD, ev.SpeechStarted, 100, pts_ms=0)
               .add(sj.INGRESS_VAD, ev.SpeechEnded, 1420, pts_ms=1100, speech_ms=1000,
                    timing=ev.Timing(last_speech_ts_ns=at(1100)))
               .add(sj.STT_PARTIAL, ev.Transcript, 1440, turn=1, text=text, settled=True)
               .add(sj.FLOOR_VERDICT, ev.Verdict, 1442, turn=1, action="answer", text=text,
                    draft=True)
               .add(sj.LLM_DELTA, ev.ReplyDelta, 1444, turn=1, text="Calling her.")
               .add(sj.TTS_AUDIO, ev.AudioFrame, 1530, pcm=FRAME, sample_rate=16000, turn=1)
               .add(sj.STT_FINAL, ev.Transcript, 1640, turn=1, text=text, final=True)
               .add(sj.FLOOR_VERDICT, ev.Verdict, 1641, turn=1, action="answer", text=text)
               .add(sj.EGRESS_PLAYBACK, ev.Playback, 1662, turn=1, played_ms=20))
    (turn,) = build(S, capture.entries).turns
    assert turn.verdict == "answer" and turn.said == text
    steps = [(s.name, s.at_ms) for s in turn.waterfall]
    assert steps == [("end of speech", 1100.0), ("words settled", 1440.0), ("draft", 1442.0),
                     ("LLM first delta", 1444.0), ("TTS first audio", 1530.0),
                     ("STT final", 1640.0), ("verdict", 1641.0), ("playback start", 1662.0)]
