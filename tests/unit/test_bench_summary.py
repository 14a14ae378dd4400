"""The benchmarks' arithmetic, on hand-made events (the measuring is the bench's job)."""

from __future__ import annotations

from proto import events as ev
from voicebus.bench import livekit
from voicebus.bench.pipeline import stats, summarise
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
        ev.SpeechEnded(session=session, ts_ns=t0 + 320 * MS, pts_ms=0, last_speech_ts_ns=t0),
        ev.Transcript(session=session, ts_ns=t0 + 337 * MS, turn=turn, text="hi", final=True,
                      compute_ms=15.0, frames_dropped=frames_dropped),
        ev.SpeechDone(session=session, turn=turn, frames=50, first_frame_ts_ns=t0 + 442 * MS,
                      llm_ms=1.0, tts_ms=100.0),
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


def test_stats_report_percentiles() -> None:
    assert stats([float(i) for i in range(1, 101)]) == {"p50": 50.5, "p95": 95.05, "n": 100}


def test_livekit_bench_has_the_pipeline_keys_and_splits_off_transport() -> None:
    t0 = 10_000 * MS
    silent, voiced = bytes(640), (b"\x00\x40" * 320)  # 20 ms at 16 kHz: quiet, then loud
    events = [*one_turn("r", 1, t0),
              ev.AudioFrame(session="r", ts_ns=t0 + 442 * MS, pcm=silent, sample_rate=16000, turn=1),
              ev.AudioFrame(session="r", ts_ns=t0 + 462 * MS, pcm=voiced, sample_rate=16000, turn=1),
              ev.StageError(session="r", stage="tts", turn=1, message="late")]
    tap = tap_with(*events)
    bus = livekit._bus_view(tap, "r", speech_end_ns=t0)
    assert bus is not None and bus["v2v"] == 442.0 and bus["onset"] == 20.0
    row = livekit.heard_row(bus, v2v_ms=700.0)  # heard at the user
    assert row["transport"] == 700.0 - 442.0 - 20.0 and row["pipeline_v2v"] == 442.0

    result = livekit.summarise(tap, "r", 1, [row], failures=[])
    pipeline = summarise(tap_with(*one_turn("r", 1, t0)), ["r"], turns=1)
    assert set(pipeline) <= set(result)
    assert result["v2v_ms"]["p50"] == 700.0 and result["transport_ms"]["p50"] == 238.0
    assert result["overhead_ms"] == pipeline["overhead_ms"] and result["errors"] == 1
