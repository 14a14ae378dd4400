"""Where an agent transcript in step with the voice may stop: after whole words only."""

from services.egress.agent import word_boundary

TEXT = "Hello! How can I help you today?"


def test_a_word_being_spoken_is_not_yet_heard():
    assert word_boundary(TEXT, 8) == 6  # in "How": up to "Hello!"
    assert TEXT[:word_boundary(TEXT, 12)] == "Hello! How"  # in "can"


def test_a_word_that_ended_is_heard_with_its_punctuation_after():
    assert TEXT[:word_boundary(TEXT, 5)] == "Hello"  # "!" not yet, the word is whole
    assert TEXT[:word_boundary(TEXT, 6)] == "Hello!"
    assert TEXT[:word_boundary(TEXT, 7)] == "Hello!"  # never ends in a space


def test_the_ends():
    assert word_boundary(TEXT, 0) == 0 and word_boundary(TEXT, 3) == 0
    assert word_boundary(TEXT, len(TEXT)) == len(TEXT)
    assert word_boundary(TEXT, len(TEXT) + 40) == len(TEXT)
    assert word_boundary("", 5) == 0
