"""The turn-taking rules egress and the LLM share, and the STT's end-of-turn reading."""

from __future__ import annotations

import pytest

from services.egress.service import EgressConfig
from services.runtime.turns import TurnRules, end_of_turn, words

RULES = EgressConfig().turn_rules()


def test_words_drop_punctuation_and_keep_hyphenated_words() -> None:
    assert words("Uh-huh, OK. What's up?") == ["uh-huh", "ok", "what's", "up"]


@pytest.mark.parametrize(("text", "speech_ms", "final", "verdict"), [
    ("what time is it", 600, False, True),      # a question over the reply takes the floor
    ("what", 250, True, True),                  # one real word is enough in a final…
    ("i", 250, False, False),                   # …but a partial needs one more
    ("what time", 250, False, True),
    ("what time is it", 150, True, False),      # too short to be meant
    ("uh-huh", 400, True, False),               # a backchannel
    ("yeah okay", 500, True, False),            # two of them
    ("i see", 400, True, False),                # a backchannel phrase
    ("yeah but wait", 700, False, True),        # a backchannel then a real objection
    ("", 900, True, False),                     # a noise the STT heard no words in
    ("", 900, False, False),                    # no transcript yet: wait for words
])
def test_default_interruption_rule(text: str, speech_ms: int, final: bool, verdict: bool) -> None:
    assert RULES.interrupts(text, speech_ms, final=final) is verdict


def test_min_words_zero_lets_duration_alone_decide_but_not_a_wordless_final() -> None:
    eager = TurnRules.parse(200, 0, "yeah")
    assert eager.interrupts("", 250, final=False)
    assert eager.interrupts("yeah", 250, final=True)
    assert not eager.interrupts("", 250, final=True)
    assert not eager.interrupts("", 150, final=False)


def test_more_words_can_be_required_and_the_vocabulary_is_configurable() -> None:
    strict = TurnRules.parse(200, 2, " Nope , go on ")
    assert strict.backchannel == frozenset({"nope", "go on"})
    assert not strict.interrupts("stop", 500, final=True)
    assert strict.interrupts("stop now", 500, final=True)
    assert not strict.interrupts("nope go on", 500, final=True)
    assert strict.interrupts("uh-huh okay", 500, final=True)  # not backchannel here


@pytest.mark.parametrize(("text", "kind"), [
    ("What time is it?", "question"),
    ("can you call my mother", "question"),
    ("Please call my mother.", "statement"),
    ("I want to", "incomplete"),
    ("call my mother and", "incomplete"),
    ("so um", "incomplete"),
    ("tell me about the", "incomplete"),
    ("Well...", "incomplete"),           # trailing off, as a punctuating recogniser writes it
    ("Yes,", "incomplete"),
    ("First", "incomplete"),             # a lone opener…
    ("you go first", "statement"),       # …but complete at the end of a phrase
    ("I'm well.", "statement"),
    ("Yes.", "brief"),                   # a lone answer: often the start of more
    ("First turn off the lights.", "brief"),  # counting: a second part is coming
    ("Turn off the lights first.", "statement"),
    ("yes please", "statement"),
    ("", "statement"),
])
def test_end_of_turn_reading(text: str, kind: str) -> None:
    assert end_of_turn(text) == kind
