"""Egress turn-taking: when the agent pauses, resumes or gives up the floor, and its state."""

from __future__ import annotations

from services.egress.floor import Floor
from services.runtime.config import BaseConfig
from services.runtime.turns import TurnRules


class Actions:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.states: list[str] = []

    def pause(self) -> None:
        self.log.append("pause")

    def resume(self) -> None:
        self.log.append("resume")

    def interrupt(self, turn: int) -> None:
        self.log.append(f"cut {turn}")

    def show(self, state: str, turn: int) -> None:
        self.states.append(state)


def speaking_floor(rules: TurnRules | None = None, greeting: bool = False) -> tuple[Floor, Actions]:
    actions = Actions()
    floor = Floor(rules or BaseConfig().turn_rules(), actions, greeting=greeting)
    floor.refresh()
    floor.user_track(True)
    floor.final_transcript(1, "tell me a story", 900, 0)
    floor.reply_text(1)
    floor.playing(1)
    return floor, actions


def test_a_reply_goes_thinking_speaking_listening() -> None:
    floor, actions = speaking_floor()
    floor.played(1)
    assert actions.states == ["initializing", "listening", "thinking", "speaking", "listening"]
    assert actions.log == []


def test_a_real_question_pauses_at_once_then_cuts_the_reply_on_its_words() -> None:
    floor, actions = speaking_floor()
    floor.speech_started(10.0)
    assert actions.log == ["pause"] and actions.states[-1] == "listening"
    floor.partial_transcript(2, "what time", 10.1)  # two words, but only 100 ms: not yet
    assert actions.log == ["pause"]
    floor.partial_transcript(2, "what", 10.3)  # a partial needs two words
    assert actions.log == ["pause"]
    floor.partial_transcript(2, "what time", 10.3)
    assert actions.log == ["pause", "cut 1", "resume"]
    floor.speech_ended()  # (the VAD's end always comes before the STT's final)
    floor.final_transcript(2, "what time is it", 700, 0)
    floor.played(1)  # the cut reply's final report arrives late: it changes nothing
    assert floor.reply == 2 and actions.states[-1] == "thinking"
    assert actions.log.count("cut 1") == 1


def test_a_backchannel_or_a_cough_resumes_the_same_reply() -> None:
    floor, actions = speaking_floor()
    for text, speech_ms in (("uh-huh", 450), ("", 150), ("what", 120)):
        floor.speech_started(1.0)
        floor.partial_transcript(2, text, 1.1)
        floor.speech_ended()
        floor.final_transcript(2, text, speech_ms, 0)
    assert actions.log == ["pause", "resume"] * 3
    assert floor.reply == 1 and actions.states[-1] == "speaking"
    floor.played(2)  # the ignored final's empty turn closes: the reply still holds the floor
    assert floor.reply == 1


def test_speech_during_thinking_holds_the_reply_back_and_a_real_turn_supersedes_it() -> None:
    actions = Actions()
    floor = Floor(BaseConfig().turn_rules(), actions, greeting=False)
    floor.user_track(True)
    floor.final_transcript(1, "I want", 400, 0)
    floor.speech_started(2.0)  # the user goes on before the agent spoke a word
    assert actions.log == ["pause"]
    floor.speech_ended()
    floor.final_transcript(2, "to book a flight", 900, 0)
    assert actions.log == ["pause", "cut 1", "resume"] and floor.reply == 2


def test_duration_alone_with_min_words_zero() -> None:
    floor, actions = speaking_floor(TurnRules.parse(200, 0, ""))
    floor.speech_started(1.0)
    floor.check(1.1)
    assert actions.log == ["pause"]
    floor.check(1.25)
    assert actions.log == ["pause", "cut 1", "resume"]


def test_the_greeting_keeps_initializing_until_it_is_played() -> None:
    actions = Actions()
    floor = Floor(BaseConfig().turn_rules(), actions, greeting=True)
    floor.refresh()
    floor.user_track(True)
    assert actions.states == ["initializing"]
    floor.reply_text(0)
    floor.playing(0)
    floor.played(0)
    assert actions.states == ["initializing", "thinking", "speaking", "listening"]


def test_an_interrupted_greeting_lets_the_user_in() -> None:
    actions = Actions()
    floor = Floor(BaseConfig().turn_rules(), actions, greeting=True)
    floor.user_track(True)
    floor.reply_text(0)
    floor.playing(0)
    floor.speech_started(1.0)
    floor.speech_ended()
    floor.final_transcript(1, "what time is it", 800, 0)
    assert actions.log == ["pause", "cut 0", "resume"]
    assert actions.states[-1] == "thinking" and not floor.greeting_due


def test_an_idle_final_takes_the_floor_for_the_re_prompt() -> None:
    floor, actions = speaking_floor()
    floor.played(1)
    floor.final_transcript(2, "", 0, 1)
    assert floor.reply == 2 and actions.states[-1] == "thinking"


def test_a_reply_due_while_the_user_already_speaks_again_waits() -> None:
    actions = Actions()
    floor = Floor(BaseConfig().turn_rules(), actions, greeting=False)
    floor.user_track(True)
    floor.speech_started(1.0)  # the next utterance began before the last one's final came
    floor.final_transcript(1, "what time is it", 800, 0)
    assert actions.log == ["pause"] and actions.states[-1] == "listening"
    floor.partial_transcript(2, "and the date", 1.5)
    assert actions.log == ["pause", "cut 1", "resume"]


def test_a_pause_without_a_verdict_is_given_up() -> None:
    floor, actions = speaking_floor()
    floor.speech_started(1.0)
    floor.give_up_pause()  # still speaking: nothing to give up yet
    floor.speech_ended()
    floor.give_up_pause()  # the final never came
    assert actions.log == ["pause", "resume"] and actions.states[-1] == "speaking"
