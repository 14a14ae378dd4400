"""``voicebus bench turns``' replay of the end-of-turn rule, on hand-made utterances (the VAD
and the recogniser are the real ones in the bench)."""

from __future__ import annotations

from services.stt.endpoint import EndOfTurnHolds
from voicebus.bench.turns import Utterance, answered

HOLDS = EndOfTurnHolds(question_ms=0, statement_ms=100, incomplete_ms=1500, brief_ms=300)


def utterance(started: int, last_speech: int, silence: int = 200) -> Utterance:
    return Utterance(started, last_speech, last_speech + silence + 20, b"")


def test_a_pause_shorter_than_the_hold_keeps_one_turn() -> None:
    # "Yes." ends at 1000 (edge 1220, brief hold until 1520); the rest starts at 1400.
    turns = answered([utterance(300, 1000), utterance(1400, 2500)],
                     ["Yes.", "please call my mother"], HOLDS)
    assert turns == [(2720 + 100, "Yes. please call my mother", 2500)]


def test_a_pause_longer_than_the_hold_is_a_cut_off() -> None:
    # A statement's hold (100 ms) is over at 1320; the rest starts at 1400: two answers.
    turns = answered([utterance(300, 1000), utterance(1400, 2500)],
                     ["turn off the lights", "then lock the door"], HOLDS)
    assert [text for _, text, _ in turns] == ["turn off the lights", "then lock the door"]


def test_a_turn_that_opens_by_counting_waits_for_its_second_part() -> None:
    turns = answered([utterance(300, 1000), utterance(1400, 2500)],
                     ["first turn off the lights", "then lock the door"], HOLDS)
    assert [text for _, text, _ in turns] == ["first turn off the lights then lock the door"]


def test_a_phrase_left_hanging_waits_and_words_decide_the_last_hold() -> None:
    turns = answered([utterance(300, 1000), utterance(2000, 3000)],
                     ["I want to", "book a table"], HOLDS)
    assert turns == [(3220 + 100, "I want to book a table", 3000)]
    question = answered([utterance(300, 1000)], ["what time is it"], HOLDS)
    assert question == [(1220, "what time is it", 1000)]


def test_utterances_without_words_answer_nothing() -> None:
    assert answered([utterance(300, 500)], [""], HOLDS) == []
