"""The benchmarks' arithmetic, on hand-made events (the measuring is the bench's job)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from proto import events as ev
from voicebus.bench import bargein, livekit
from voicebus.call import Turn
from voicebus.bench.pipeline import (call_minutes, gc_between, gc_figures, sessions_per_core,
                                     stats, summarise)
from voicebus.client import Tap

MS = 1_000_000


def tap_with(*events: ev.Event) -> Tap:
    tap = Tap(nc=None)  # type: ignore[arg-type]
    tap.events = [("voice.x.y.z", e) for e in events]
    return tap


def one_turn(session: str, turn: int, t0: int, frames_dropped: int = 0) -> list[ev.Event]:
    """Last speech at t0; end of speech 320 ms later; final after 15 ms of STT; first audio
    after 1 ms LLM + 100 ms TTS + 4 ms of bus."""
    return [
        ev.SpeechEnded(session=session, ts_ns=t0 + 320 * MS, pts_ms=0,
                       timing=ev.Timing(last_speech_ts_ns=t0)),
        ev.Transcript(session=session, ts_ns=t0 + 337 * MS, turn=turn, text="hi", final=True,
                      frames_dropped=frames_dropped, timing=ev.Timing(compute_ms=15.0)),
        ev.SynthesisDone(session=session, turn=turn, frames=50,
                         timing=ev.Timing(first_frame_ts_ns=t0 + 442 * MS, llm_ms=1.0,
                                          tts_ms=100.0)),
        ev.Playback(session=session, turn=turn, played_ms=1000, final=True),
    ]


def test_overhead_is_v2v_minus_window_and_compute() -> None:
    tap = tap_with(*one_turn("a", 1, 10_000 * MS), *one_turn("a", 2, 20_000 * MS, 2))
    result = summarise(tap, ["a"], turns=2)
    assert result["turns_completed"] == 2 and result["frames_dropped"] == 2
    assert result["v2v_ms"]["p50"] == 442.0
    assert result["eos_ms"]["p50"] == 320.0
    assert result["overhead_ms"]["p50"] == 442.0 - 320.0 - 15.0 - 1.0 - 100.0
    split = result["overhead_split_ms"]
    assert split["to_final"]["p50"] == 2.0 and split["after_final"]["p50"] == 4.0


def test_turns_without_audio_or_playback_do_not_count() -> None:
    events = one_turn("a", 1, 10_000 * MS)[:-1]  # never played
    result = summarise(tap_with(*events), ["a"], turns=1)
    assert result["turns_completed"] == 0 and result["v2v_ms"]["n"] == 0


def test_call_minutes_run_from_the_first_speech_to_the_last_reply_played() -> None:
    start = 10_000 * MS
    tap = tap_with(ev.SpeechStarted(session="a", ts_ns=start, pts_ms=0),
                   ev.Playback(session="a", ts_ns=start + 30_000 * MS, turn=1, final=True),
                   ev.Playback(session="a", ts_ns=start + 5_000 * MS, turn=1),  # not final
                   ev.SpeechStarted(session="b", ts_ns=start, pts_ms=0),
                   ev.Playback(session="b", ts_ns=start + 60_000 * MS, turn=1, final=True))
    assert call_minutes(tap, ["a", "b", "never-started"]) == 1.5


def test_sessions_per_core_is_call_seconds_per_cpu_second_with_replicas_summed() -> None:
    # 10 minutes of calls; ingress's two replicas spent 15 + 15 s of CPU: 20 calls a core.
    cpu = {"ingress": 15.0, "ingress1": 15.0, "stt": 60.0, "nats": 0.0}
    assert sessions_per_core(cpu, 10.0) == {"ingress": 20.0, "nats": None, "stt": 10.0}


def test_stats_report_percentiles() -> None:
    assert stats([float(i) for i in range(1, 101)]) == {"p50": 50.5, "p95": 95.05, "n": 100}


def test_livekit_bench_has_the_pipeline_keys_and_splits_off_transport() -> None:
    t0 = 10_000 * MS
    silent, voiced = bytes(640), (b"\x00\x40" * 320)  # 20 ms at 16 kHz: quiet, then loud
    events = [*one_turn("r", 1, t0),
              ev.AudioFrame(session="r", ts_ns=t0 + 442 * MS, pcm=silent, sample_rate=16000, turn=1),
              # Published in the same burst, but 20 ms later on the audio's clock: the onset.
              ev.AudioFrame(session="r", ts_ns=t0 + 443 * MS, pcm=voiced, sample_rate=16000,
                            turn=1, pts_ms=20),
              ev.Playback(session="r", ts_ns=t0 + 450 * MS, turn=1, played_ms=20),
              ev.StageError(session="r", stage="tts", turn=1, message="late")]
    tap = tap_with(*events)
    # The user's last sample left the microphone 30 ms before ingress published it; the first
    # audible sample reached the user 700 ms after it.
    heard = Turn(speech_end=1.0, speech_end_wall_ns=t0 - 30 * MS, first_sound=1.7,
                 first_sound_wall_ns=t0 + 670 * MS)
    bus = livekit._bus_view(tap, "r", speech_end_ns=heard.speech_end_wall_ns)
    assert bus is not None and bus["v2v"] == 442.0 and bus["onset"] == 20.0
    row = livekit.heard_row(bus, heard)
    assert round(row["v2v"], 6) == 700.0 and row["pipeline_v2v"] == 442.0
    assert round(row["transport"], 6) == 700.0 - 442.0 - 20.0
    # The legs: microphone → ingress, bus → egress's track, track → ear (less the onset).
    assert (row["in"], row["to_track"], row["out"]) == (30.0, 8.0, 200.0)

    result = livekit.summarise(tap, "r", 1, [row], failures=[])
    pipeline = summarise(tap_with(*one_turn("r", 1, t0)), ["r"], turns=1)
    assert set(pipeline) <= set(result)
    assert result["v2v_ms"]["p50"] == 700.0 and result["transport_ms"]["p50"] == 238.0
    assert result["legs_ms"]["out"]["p50"] == 200.0
    assert result["overhead_ms"] == pipeline["overhead_ms"] and result["errors"] == 1


# ---- bench barge-in -------------------------------------------------------------------------------

def test_barge_in_silence_is_onset_to_the_last_loud_frame_before_the_answer() -> None:
    onset, answer = 10.0, 12.0
    frames = [9.90, 9.95, 10.01, 10.12, 10.18, 12.3, 12.4]  # reply, pause at 10.18, answer
    assert round(bargein.silence_after_onset_ms(onset, frames, until=answer), 6) == 180.0
    # the agent already silent when the user began: 0, not the answer's start
    assert bargein.silence_after_onset_ms(onset, [9.5, 9.6, 12.3], until=answer) == 0.0
    assert bargein.silence_after_onset_ms(onset, [], until=answer) == 0.0


def test_barge_in_wall_clock_to_the_callers_clock() -> None:
    ref = (100.0, 1_700_000_000 * 10**9)  # one moment on both clocks
    assert bargein.to_monotonic(ref[1] + 250 * MS, ref) == 100.25
    assert bargein.to_monotonic(ref[1] - 500 * MS, ref) == 99.5


def test_barge_in_stale_frames_are_those_between_cancel_and_the_next_reply() -> None:
    cancel, answer = 10_000 * MS, 11_000 * MS
    arrivals = [9_990 * MS, 10_000 * MS, 10_020 * MS, 10_900 * MS, 11_000 * MS, 11_010 * MS]
    assert bargein.stale_frames(arrivals, cancel, answer) == 2
    assert bargein.stale_frames([9_000 * MS, 11_500 * MS], cancel, answer) == 0


def test_barge_in_answer_holds_the_questions_words_in_order() -> None:
    assert bargein.heard_in("What time is it?", "what time is it... Let me think.")
    assert not bargein.heard_in("What time is it?", "it is time... what")
    assert not bargein.heard_in("", "anything")


def test_barge_in_reply_cut_by_cancel_or_interrupted_playback() -> None:
    tap = tap_with(ev.Cancel(session="r", turn=2, reason="barge-in"),
                   ev.Playback(session="r", turn=3, final=True, interrupted=True),
                   ev.Playback(session="r", turn=4, final=True))
    assert bargein.reply_cut(tap, "r", 2) and bargein.reply_cut(tap, "r", 3)
    assert not bargein.reply_cut(tap, "r", 4) and not bargein.reply_cut(tap, "r", 1)


def test_barge_in_finds_the_cancel_and_the_answers_speaking_state() -> None:
    t0 = 10_000 * MS
    tap = tap_with(ev.AgentState(session="r", ts_ns=t0 - 900 * MS, state="speaking", turn=1),
                   ev.AgentState(session="r", ts_ns=t0 + 150 * MS, state="listening", turn=1),
                   ev.AgentState(session="r", ts_ns=t0 + 200 * MS, state="speaking", turn=1),
                   ev.Cancel(session="r", ts_ns=t0 + 600 * MS, turn=1, reason="barge-in"),
                   ev.AgentState(session="r", ts_ns=t0 + 1500 * MS, state="speaking", turn=2))
    assert bargein.first_cancel(tap, "r", turn=1, after_ns=t0).ts_ns == t0 + 600 * MS
    assert bargein.first_cancel(tap, "r", turn=2, after_ns=t0) is None
    assert bargein.next_speaking(tap, "r", t0, after_turn=1).turn == 2  # a resume is not it
    assert bargein.next_speaking(tap, "r", t0 - 1000 * MS).turn == 1


def test_barge_in_settles_only_when_every_owed_reply_is_played_or_cut() -> None:
    t0 = 10_000 * MS
    started = ev.SpeechStarted(session="r", ts_ns=t0, pts_ms=0)
    ended = ev.SpeechEnded(session="r", ts_ns=t0 + 900 * MS, pts_ms=900)
    heard = ev.Transcript(session="r", ts_ns=t0 + 950 * MS, turn=1, text="what time is it",
                          final=True)
    verdict = ev.Verdict(session="r", turn=1, action="answer", text="what time is it")
    answer = ev.ReplyDone(session="r", turn=1, text="what time is it... ok")
    played = ev.Playback(session="r", turn=1, final=True)
    assert bargein.pending(tap_with(started), "r") == ["a final transcript of the user's speech"]
    assert bargein.pending(tap_with(started, ended), "r") == \
        ["a final transcript of the user's speech"]
    assert bargein.pending(tap_with(started, ended, heard), "r") == ["a verdict on turn 1"]
    assert bargein.pending(tap_with(started, ended, heard, verdict), "r") == \
        ["an answer to turn 1"]
    assert bargein.pending(tap_with(started, ended, heard, verdict, answer), "r") == \
        ["the playout of turn 1"]
    assert bargein.pending(tap_with(started, ended, heard, verdict, answer, played), "r") == []
    cut = ev.Cancel(session="r", turn=1, reason="barge-in")
    assert bargein.pending(tap_with(started, ended, heard, verdict, answer, cut), "r") == []
    # a backchannel over the reply: the judge ignores it, which owes nothing more
    again = [ev.SpeechStarted(session="r", ts_ns=t0 + 2000 * MS, pts_ms=2000),
             ev.SpeechEnded(session="r", ts_ns=t0 + 2300 * MS, pts_ms=2300)]
    okay = ev.Transcript(session="r", ts_ns=t0 + 2500 * MS, turn=2, text="okay", final=True)
    ignored = ev.Verdict(session="r", turn=2, action="ignore", reason="backchannel")
    assert bargein.pending(tap_with(heard, verdict, answer, *again), "r") == \
        ["a final transcript of the user's speech", "the playout of turn 1"]
    assert bargein.pending(tap_with(heard, verdict, answer, played, *again, okay), "r") == \
        ["a verdict on turn 2"]
    assert bargein.pending(tap_with(heard, verdict, answer, played, *again, okay, ignored),
                           "r") == []
    # a cough: a final with no words is ignored too
    cough = ev.Transcript(session="r", ts_ns=t0 + 2500 * MS, turn=2, text="", final=True)
    assert bargein.pending(tap_with(heard, verdict, answer, played, *again, cough, ignored),
                           "r") == []


def test_barge_in_names_what_stt_made_of_a_sound() -> None:
    t0 = 10_000 * MS
    old = ev.Transcript(session="r", ts_ns=t0 - MS, turn=1, text="tell me", final=True)
    partial = ev.Transcript(session="r", ts_ns=t0 + 300 * MS, turn=2, text="a")
    final = ev.Transcript(session="r", ts_ns=t0 + 700 * MS, turn=2, text="a ha", final=True)
    again = ev.Transcript(session="r", ts_ns=t0 + 400 * MS, turn=2, text="a")
    other = ev.Transcript(session="r", ts_ns=t0 + 500 * MS, turn=2, text="i")
    assert bargein.transcribed(tap_with(old, partial, again, other, final), "r", t0) == \
        "partials 'a', 'i'; final 'a ha'"
    assert bargein.transcribed(tap_with(old, final), "r", t0) == "final 'a ha'"
    assert bargein.transcribed(tap_with(old, partial), "r", t0) == "partials 'a'"
    assert bargein.transcribed(tap_with(old), "r", t0) == "nothing"


def test_barge_in_summary() -> None:
    results = bargein.Results(
        interruptions=[bargein.Interruption(120.0, 450.0, 0, True),
                       bargein.Interruption(200.0, 550.0, 0, True),
                       bargein.Interruption(900.0, None, None, False)],
        quiet_cases=[bargein.QuietCase("trial 1 cough", False),
                     bargein.QuietCase("trial 1 Uh-huh.", True, "final 'a ha'"),
                     bargein.QuietCase("trial 2 cough", False),
                     bargein.QuietCase("trial 2 Okay.", False)],
        failures=["trial 3 interrupt: no Cancel of reply 7"])
    result = bargein.summarise(results, trials=3)
    assert result["trials"] == 3
    assert result["silence_after_onset_ms"] == {"p50": 200.0, "p95": 830.0, "n": 3, "max": 900.0}
    assert result["cancel_ms"] == {"p50": 500.0, "p95": 545.0, "n": 2}
    assert result["stale_frames"] == 0 and result["stale_frames_counted_in"] == 2
    assert result["interrupts_heard"] == 2 and result["interrupts_measured"] == 3
    assert result["false_interruptions"] == 1 and result["no_interrupt_cases"] == 4
    assert result["falsely_cut"] == ["trial 1 Uh-huh. (heard: final 'a ha')"]
    assert result["failures"] == ["trial 3 interrupt: no Cancel of reply 7"]
    empty = bargein.summarise(bargein.Results(), trials=0)
    assert empty["silence_after_onset_ms"]["n"] == 0 and empty["false_interruptions"] == 0


def test_barge_in_cough_is_a_short_loud_seeded_burst() -> None:
    one = bargein.cough(np.random.default_rng(7))
    assert one == bargein.cough(np.random.default_rng(7))
    assert one != bargein.cough(np.random.default_rng(8))
    samples = np.frombuffer(one, dtype=np.int16).astype(np.int32)
    assert len(samples) == bargein.COUGH_RATE * 150 // 1000
    assert 15000 < np.abs(samples).max() <= 16384
    assert np.abs(samples[:16]).max() < np.abs(samples).max() / 2  # attack, not a click
    assert np.abs(samples[-40:]).max() < 1000  # decayed by the end


def test_caller_finds_the_first_loud_sample() -> None:
    from voicebus.call import first_loud_sample

    frame = np.zeros(480, dtype=np.int16)
    frame[37] = 900
    frame[100] = 30000
    assert first_loud_sample(frame.tobytes()) == 37
    assert first_loud_sample(bytes(960)) == 0


def test_stt_bench_scores_words_with_numbers_as_words() -> None:
    from voicebus.bench.stt import wer, words

    assert words("Set an alarm for 7, please!") == ["set", "an", "alarm", "for", "seven", "please"]
    assert wer(words("set an alarm for seven"), words("set an alarm for 7")) == 0
    assert wer(words("a b c"), words("a x c d")) == 2 / 3  # one substitution, one insertion
    assert wer(words("a b"), []) == 1.0


async def test_stt_bench_counts_drafts_thrown_and_how_early_the_kept_one_came() -> None:
    from services.stt.provider import SttResult
    from voicebus.bench.stt import _measure

    class Scripted:
        """Stable words after a pause, then the speech goes on: the first draft is thrown."""

        async def stream(self, frames, *, partials=None):
            n = 0
            async for _ in frames:
                n += 1
                if n == 2:
                    yield SttResult("tell me", stable=True)
                if n == 4:
                    yield SttResult("tell me a story", stable=True)
            yield SttResult("tell me a story", final=True)

    clip = ("a voice", "tell me a story", ("story",), bytes(640 * 6))
    result = await _measure(Scripted(), [clip], pace=0, quiet_ms=0)
    assert result["drafts_thrown"] == 1 and result["keywords_kept"] == 1.0
    # The kept draft came before the last frame (the edge): a lead, not a delay.
    assert result["stable_before_edge_ms"]["n"] == 1
    assert result["stable_before_edge_ms"]["p50"] >= 0


def test_a_drafted_turn_is_ready_at_its_confirmation_and_only_unhidden_compute_counts() -> None:
    t0 = 10_000 * MS
    # Last speech at t0, end edge at 320, settled words and the draft at 335, the reply's first
    # frame at 435 (1 ms LLM + 99 ms TTS), the final (200 ms hold) at 535 and its verdict at 536.
    events = [
        ev.SpeechEnded(session="d", ts_ns=t0 + 320 * MS, pts_ms=0,
                       timing=ev.Timing(last_speech_ts_ns=t0)),
        ev.Verdict(session="d", ts_ns=t0 + 335 * MS, turn=1, action="answer", text="hi",
                   draft=True),
        ev.Transcript(session="d", ts_ns=t0 + 535 * MS, turn=1, text="hi", final=True,
                      timing=ev.Timing(compute_ms=15.0, hold_ms=200)),
        ev.Verdict(session="d", ts_ns=t0 + 536 * MS, turn=1, action="answer", text="hi"),
        ev.SynthesisDone(session="d", turn=1, frames=50,
                         timing=ev.Timing(first_frame_ts_ns=t0 + 435 * MS, llm_ms=1.0,
                                          tts_ms=99.0)),
        ev.Playback(session="d", turn=1, played_ms=1000, final=True),
    ]
    result = summarise(tap_with(*events), ["d"], turns=1)
    assert result["drafted"] == 1
    assert result["v2v_ms"]["p50"] == 536.0  # the confirmation, not the first frame (435)
    assert result["compute_ms"]["llm"]["p50"] == 0.0 and result["compute_ms"]["tts"]["p50"] == 0.0
    assert result["overhead_ms"]["p50"] == 536.0 - 320.0 - 200.0 - 15.0


def test_bench_json_has_null_where_a_percentile_had_no_values() -> None:
    """`voicebus bench … --json` prints one JSON object that any parser reads: a percentile of
    no values (NaN in Python) is null."""
    from voicebus.cli import finite

    result = {"stable_ms": {"p50": float("nan"), "p95": float("inf"), "n": 0},
              "per_turn": [{"v2v": 412.5, "in": float("-inf")}], "runs": (1, 2.5), "ok": True}
    printed = json.dumps(finite(result), allow_nan=False)
    assert json.loads(printed) == {"stable_ms": {"p50": None, "p95": None, "n": 0},
                                   "per_turn": [{"v2v": 412.5, "in": None}], "runs": [1, 2.5],
                                   "ok": True}


def test_the_garbage_collections_of_a_run_are_read_from_a_stages_metrics() -> None:
    registry = CollectorRegistry()
    pauses = Histogram("voicebus_gc_pause_seconds", "", ["stage", "generation"],
                       registry=registry, buckets=(0.001, 0.01, 0.1))
    for generation, seconds in (("0", 0.0004), ("0", 0.0006), ("1", 0.02)):
        pauses.labels("stt", generation).observe(seconds)
    before = gc_figures(generate_latest(registry).decode())
    assert before == {"collections": 3, "full": 0, "full_ms": 0, "over_10ms": 1,
                      "ms": pytest.approx(21)}
    pauses.labels("stt", "2").observe(0.05)
    pauses.labels("stt", "0").observe(0.002)
    after = gc_figures(generate_latest(registry).decode())
    assert gc_between({"stt": before}, {"stt": after}) == {"stt": {
        "collections": 2, "full": 1, "full_ms": 50.0, "over_10ms": 1, "ms": 52.0}}
