"""``voicebus bench chaos``: the kill plan and the arithmetic of its report."""

from __future__ import annotations

import random
import signal

from voicebus.bench.chaos import Chaos, Kill, plan, summarise, waiting

STAGES = ["ingress", "stt", "llm", "tts", "egress"]


def test_kills_are_spread_over_calls_questions_and_stages() -> None:
    kills = plan(calls=10, turns=3, kills=20, stages=STAGES, rng=random.Random(1))
    assert len(kills) == 20
    assert [k.stage for k in kills] == STAGES * 4  # every stage in turn
    slots = {(k.call, k.turn) for k in kills}
    assert len(slots) == 20  # never two kills around one question while there is room
    assert {k.call for k in kills} == set(range(10))
    assert all(0.0 <= k.delay_s <= 1.5 for k in kills)
    assert plan(10, 3, 20, STAGES, random.Random(1)) == kills  # seeded: the same plan again


def test_more_kills_than_questions_wrap_around() -> None:
    kills = plan(calls=1, turns=2, kills=5, stages=["stt"], rng=random.Random(3))
    per_question = sorted(sum(1 for k in kills if k.turn == t) for t in (0, 1))
    assert per_question == [2, 3] and {k.call for k in kills} == {0}


def test_the_report_counts_lost_turns_recovery_and_the_kills_that_cost_a_turn() -> None:
    chaos = Chaos(stack=None, tap=None, sig=signal.SIGKILL, timeout=20)  # type: ignore[arg-type]
    chaos.kills = [
        Kill("stt", 0, 0, 0.5, "stt", at_ns=1, recovery_ms=900.0, cost_the_turn=True),
        Kill("stt", 1, 1, 0.2, "stt1", at_ns=2, recovery_ms=1100.0),
        Kill("tts", 1, 2, 0.1, "tts", at_ns=3, recovery_ms=None),
        Kill("llm", 2, 0, 0.3),  # never made: no owner was alive
    ]
    report = summarise(chaos, calls=3, turns=3, answered=8, stale=0, sig="KILL", stage="all")
    assert (report["kills"], report["turns_expected"], report["turns_lost"]) == (3, 9, 1)
    assert report["recovery_ms"]["n"] == 2 and report["not_recovered"] == 1
    assert report["per_stage"]["stt"] == {
        "kills": 2, "turns_lost": 1, "not_recovered": 0,
        "recovery_ms": {"p50": 1000.0, "p95": 1090.0, "n": 2}}
    assert report["per_stage"]["tts"]["not_recovered"] == 1 and "llm" not in report["per_stage"]


def test_the_wait_a_kill_added_is_measured_against_the_calm_answers() -> None:
    waits = [(600.0, False), (800.0, False), (700.0, False), (1000.0, True), (650.0, True)]
    report = waiting(waits)
    assert report["v2v_ms"]["calm"]["p50"] == 700.0 and report["v2v_ms"]["calm"]["n"] == 3
    assert report["v2v_ms"]["killed"]["n"] == 2
    assert report["added_silence_ms"]["p50"] == 125.0  # (300 + -50) / 2
    assert waiting([(900.0, True)])["added_silence_ms"]["n"] == 0  # no calm answer to compare
