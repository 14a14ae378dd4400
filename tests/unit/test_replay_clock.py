"""A replayed event is re-stamped as sent now, and the clock readings it carries move with it;
what a stage replayed alone is fed."""

import time

from proto import events as ev
from voicebus import replay
from voicebus.replay import _moved


def test_the_clock_readings_of_a_replayed_event_shift_with_its_send_time():
    day = 86_400 * 10**9
    sent = time.time_ns() - day
    end = ev.SpeechEnded(session="old", seq=3, ts_ns=sent, pts_ms=900,
                         timing=ev.Timing(last_speech_ts_ns=sent - 300_000_000, compute_ms=5.0))
    moved = _moved(end, "new")
    assert moved.session == "new" and moved.seq == 3 and moved.pts_ms == 900
    assert abs(moved.ts_ns - time.time_ns()) < day // 1000
    assert moved.ts_ns - moved.timing.last_speech_ts_ns == 300_000_000  # the gap is kept
    assert moved.timing.compute_ms == 5.0 and moved.timing.first_frame_ts_ns == 0  # unset stays


def test_an_event_without_timing_is_only_re_stamped():
    frame = ev.AudioFrame(session="old", seq=1, ts_ns=1, pcm=bytes(640), sample_rate=16000)
    moved = _moved(frame, "new")
    assert moved.session == "new" and moved.ts_ns > 1 and moved.pcm == frame.pcm


def test_a_judge_replayed_alone_is_fed_the_claims_it_waits_for() -> None:
    """Into egress: the LLM's and the TTS's StageReady are replayed too (the greeting waits for
    them); no stage is fed a claim it does not wait for, nor its own."""
    readies = {into: {producer for producer, kind in replay.inputs_of(replay.stages_of(into))
                      if kind == "ready"} for into in replay.TARGETS}
    assert readies == {"stt": set(), "llm": set(), "tts": set(), "egress": {"llm", "tts"},
                       "all": set()}
