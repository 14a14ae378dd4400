"""Placing a TTS provider's timed words in the reply text."""

from __future__ import annotations

from proto import events as ev
from services.tts.provider import WordTiming, word_marks


def timed(*words: str, step: float = 0.25) -> list[WordTiming]:
    return [WordTiming(w, i * step, (i + 1) * step) for i, w in enumerate(words)]


def test_each_word_ends_where_it_ends_in_the_text() -> None:
    text = "Hello there. How are you?"
    marks = word_marks(text, timed("Hello", "there.", "How", "are", "you?"))
    assert [text[:m.text_end] for m in marks] == [
        "Hello", "Hello there.", "Hello there. How", "Hello there. How are", text]
    assert [m.end_ms for m in marks] == [250, 500, 750, 1000, 1250]


def test_words_spoken_differently_are_skipped_not_guessed() -> None:
    text = "It costs **12** dollars, as a rule."
    marks = word_marks(text, timed("It", "costs", "twelve", "dollars,", "as", "a", "rule."))
    assert [text[:m.text_end] for m in marks] == [
        "It", "It costs", "It costs **12** dollars,", "It costs **12** dollars, as",
        "It costs **12** dollars, as a", text]
    # The skipped word's time is not lost: the next mark still ends at its own time.
    assert marks[2].end_ms == 1000


def test_a_short_word_is_matched_whole_and_in_order() -> None:
    # "a" must not match inside "What" or "an", and case does not matter.
    text = "What an idea: a plan."
    marks = word_marks(text, timed("what", "an", "idea", "a", "plan"))
    assert [text[:m.text_end] for m in marks] == [
        "What", "What an", "What an idea", "What an idea: a", "What an idea: a plan"]


def test_times_never_go_backwards_and_blank_words_are_ignored() -> None:
    words = [WordTiming("one", 0.0, 0.4), WordTiming(" ", 0.4, 0.5), WordTiming("two", 0.2, 0.3)]
    assert word_marks("one two", words) == [ev.WordMark(end_ms=400, text_end=3),
                                            ev.WordMark(end_ms=400, text_end=7)]
