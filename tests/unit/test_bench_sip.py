"""``bench sip``'s arithmetic on hand-made events and phone lines (the calls are
tests/integration/test_bench_sip.py's)."""

from __future__ import annotations

from pathlib import Path

from proto import events as ev
from voicebus.bench.sip import capacity, gateway_drops, sessions_of, summarise
from voicebus.client import Tap

MS = 1_000_000
T0 = 10_000 * MS  # the bus's last speech frame of the question


def tap_with(*events: ev.Event) -> Tap:
    tap = Tap(nc=None)  # type: ignore[arg-type]
    tap.events = [("voice.x.y.z", e) for e in events]
    return tap


def answered_call(session: str = "call-a", caller: str = "r0c0") -> list[ev.Event]:
    """The gateway's session for ``caller``; a question whose last speech frame ingress
    published at T0, its end 200 ms later, the final 1 ms after, the reply's first frame at
    T0 + 205 ms, played."""
    return [
        ev.PhoneSessionStart(session=session, caller=caller),
        ev.SpeechEnded(session=session, ts_ns=T0 + 200 * MS, pts_ms=0,
                       timing=ev.Timing(last_speech_ts_ns=T0)),
        ev.Transcript(session=session, ts_ns=T0 + 201 * MS, turn=1, text="hi", final=True,
                      timing=ev.Timing(compute_ms=0.5)),
        ev.SynthesisDone(session=session, turn=1, frames=50,
                         timing=ev.Timing(first_frame_ts_ns=T0 + 205 * MS, llm_ms=1.0,
                                          tts_ms=1.0)),
        ev.Playback(session=session, turn=1, played_ms=1000, final=True),
    ]


def phone_turn(speech_end_ns: int, first_voice_ns: int, caller: str = "r0c0") -> dict:
    return {"type": "turn", "call": 0, "from": caller, "turn": 1, "ok": True,
            "speech_end_ns": speech_end_ns, "first_voice_ns": first_voice_ns,
            "v2v_ms": (first_voice_ns - speech_end_ns) / MS, "reply_ms": 900.0}


def phone_call(caller: str = "r0c0", **fields) -> dict:
    return {"type": "call", "from": caller, "answered": True, "greeted": True, "setup_ms": 2.0,
            "hangup": "bye", **fields}


def test_the_legs_add_up_to_the_phones_v2v() -> None:
    # The phone sent its last speech 30 ms before ingress published it, and heard the reply's
    # voice 100 ms after the reply was ready.
    lines = [phone_turn(T0 - 30 * MS, T0 + 305 * MS), phone_call()]
    tap = tap_with(*answered_call())
    result = summarise(tap, lines, sessions_of(tap, ["r0c0"]), calls=1, turns=1)
    assert result["turns_completed"] == 1 and result["failures"] == []
    assert result["v2v_ms"]["p50"] == 335.0
    assert result["pipeline_v2v_ms"]["p50"] == 205.0
    assert result["legs_ms"]["in"]["p50"] == 30.0 and result["legs_ms"]["out"]["p50"] == 100.0
    assert result["hangups"] == {"bye": 1, "remote": 0} and result["greetings_missed"] == 0


def test_a_call_the_agent_did_not_greet_is_named_and_its_turns_still_count() -> None:
    lines = [phone_turn(T0 - 30 * MS, T0 + 305 * MS), phone_call(greeted=False)]
    tap = tap_with(*answered_call())
    result = summarise(tap, lines, sessions_of(tap, ["r0c0"]), calls=1, turns=1)
    assert result["greetings_missed"] == 1 and result["ungreeted_sessions"] == ["call-a"]
    assert result["turns_completed"] == 1 and result["failures"] == []


def test_voice_heard_before_the_reply_was_ready_is_not_its_answer() -> None:
    lines = [phone_turn(T0 - 30 * MS, T0 + 150 * MS), phone_call()]
    tap = tap_with(*answered_call())
    result = summarise(tap, lines, sessions_of(tap, ["r0c0"]), calls=1, turns=1)
    assert result["turns_completed"] == 0
    assert result["failures"] == ["r0c0 turn 1: voice heard 55 ms before the reply was ready "
                                  "on the bus"]


def test_a_call_the_gateway_never_answered_counts_as_failed() -> None:
    lines = [{"type": "call", "from": "r0c0", "answered": False, "error": "INVITE: timeout"}]
    result = summarise(tap_with(), lines, {}, calls=2, turns=1)
    assert (result["calls_answered"], result["calls_failed"]) == (0, 2)  # one silent, one lost
    assert result["turns_expected"] == 2 and result["turns_completed"] == 0
    assert result["failures"] == ["r0c0: INVITE: timeout"]


def run(calls: int, p95: float, carried: bool = True) -> dict:
    return {"calls": calls, "carried": carried, "v2v_ms": {"p50": p95, "p95": p95, "n": 1}}


def test_capacity_is_the_largest_count_carried_within_one_and_a_half_times_the_first() -> None:
    ladder = [run(1, 400), run(10, 450), run(20, 590), run(50, 610), run(100, 500, False)]
    assert capacity(ladder)["calls"] == 20
    assert capacity([run(1, 400, False)])["calls"] == 0


def test_gateway_drops_are_read_per_session_from_its_log(tmp_path: Path) -> None:
    log = tmp_path / "stack.log"
    log.write_text('sip     | time=x level=INFO msg="call ended" session=call-a frames_dropped=3\n'
                   'sip     | time=x level=INFO msg="call ended" session=call-b frames_dropped=4\n'
                   'sip     | time=x level=INFO msg="call ended" session=call-c\n')
    assert gateway_drops(log, {"call-a", "call-c"}) == 3
