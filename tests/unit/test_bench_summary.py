"""The pipeline benchmark's arithmetic, on hand-made events (the measuring is the bench's job)."""

from __future__ import annotations

from proto import events as ev
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
