"""The turn ledger every stage keeps: turns open once and in order, cuts are for good, turn
numbers are bounded, and ``settled`` says when no turn is in flight."""

from __future__ import annotations

from services.runtime.ledger import MAX_AHEAD, FloorRecord, TurnLedger


def test_turns_open_once_in_order_and_settle_when_closed() -> None:
    ledger = TurnLedger()
    assert ledger.settled.is_set()
    assert ledger.open(0) and ledger.begin(0) and not ledger.settled.is_set()
    assert not ledger.open(0)  # a repeat
    assert ledger.open(2)
    assert not ledger.open(1)  # older than the newest: stale
    assert ledger.close(0) and not ledger.close(0) and not ledger.settled.is_set()
    assert ledger.close(2) and ledger.settled.is_set()
    assert not ledger.begin(2)  # closed turns never reopen


def test_a_cut_is_for_good_and_stops_work_of_open_turns() -> None:
    ledger = TurnLedger()
    ledger.open(1)
    assert ledger.cancel(1) and ledger.is_cut(1) and not ledger.begin(1)
    assert not ledger.open(1) and ledger.open(2)
    assert ledger.cancel(0) and ledger.cut == 1  # a cut never moves back


def test_turn_numbers_are_bounded_by_the_newest_known() -> None:
    ledger = TurnLedger()
    assert not ledger.open(1_000_000) and not ledger.cancel(1_000_000)
    assert not ledger.pass_over(MAX_AHEAD + 1)
    assert ledger.newest == -1 and ledger.cut == -1
    assert ledger.open(MAX_AHEAD)  # a few lost finals are fine
    assert ledger.open(2 * MAX_AHEAD) and not ledger.open(3 * MAX_AHEAD + 1)


def test_passing_over_a_turn_says_once_that_it_is_new() -> None:
    ledger = TurnLedger()
    assert ledger.pass_over(1) and not ledger.pass_over(1) and not ledger.begin(1)
    assert ledger.settled.is_set()


def test_a_follower_of_the_judge_can_still_open_the_newest_judged_turn() -> None:
    record = FloorRecord(judged=7, cut=4)
    own = TurnLedger.from_record(record)
    follower = TurnLedger.following(record)
    assert not own.open(7) and own.open(8)
    assert follower.open(7) and follower.is_cut(4) and not follower.open(6)
