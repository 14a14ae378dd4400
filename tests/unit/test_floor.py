"""The one judge of turn-taking: utterance x floor state -> verdict, the orderings NATS may
deliver across subjects, the greeting, user idle, bounded turn numbers and the kept record."""

from __future__ import annotations

import msgspec
import pytest

from services.egress.floor import Floor
from services.egress.service import EgressConfig
from services.runtime.ledger import MAX_AHEAD, FloorRecord, TurnLedger, aged
from services.runtime.turns import Addressing, TurnRules


class Actions:
    """What the judge asked for, in order."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.verdicts: list[tuple[int, str, str]] = []
        self.speakers: list[str] = []  # of each verdict
        self.states: list[str] = []
        self.ends: list[str] = []
        self.records: list[FloorRecord] = []

    def pause(self) -> None:
        self.log.append("pause")

    def resume(self) -> None:
        self.log.append("resume")

    def interrupt(self, turn: int, reason: str = "barge-in") -> None:
        self.log.append(f"cut {turn}" if reason == "barge-in" else f"cut {turn} ({reason})")

    def verdict(self, turn: int, action: str, text: str, reason: str,
                speaker: str = "") -> None:
        self.verdicts.append((turn, action, reason))
        self.speakers.append(speaker)

    def draft(self, turn: int, text: str, speaker: str = "") -> None:
        self.log.append(f"draft {turn}: {text}")

    def withdraw(self, turn: int, reason: str) -> None:
        self.log.append(f"withdraw {turn} ({reason})")

    def show(self, state: str, turn: int) -> None:
        self.states.append(state)

    def end_session(self, reason: str) -> None:
        self.ends.append(reason)

    def record(self, record: FloorRecord) -> None:
        self.records.append(record)


def judge(*, greeting: bool = False, rules: TurnRules | None = None,
          record: FloorRecord | None = None,
          addressing: Addressing | None = None) -> tuple[Floor, Actions]:
    actions = Actions()
    record = record or FloorRecord()
    floor = Floor(rules or EgressConfig().turn_rules(), actions, TurnLedger.from_record(record),
                  greeting=greeting, record=record, addressing=addressing)
    floor.refresh()
    floor.user_track(True)
    return floor, actions


def in_state(state: str) -> tuple[Floor, Actions]:
    """A judge whose floor is in ``state``, reply 1 holding it (but for "listening")."""
    floor, actions = judge()
    floor.final_transcript(1, "tell me a story", 900)
    if state in ("speaking", "paused"):
        floor.playing(1)
    if state == "paused":
        floor.speech_started(10.0)
    if state == "listening":
        floor.played(1, interrupted=False)
    actions.log.clear()
    actions.verdicts.clear()
    return floor, actions


QUESTION = ("what time is it", 900)
BACKCHANNEL = ("uh-huh", 450)
COUGH = ("", 150)
SHORT = ("what", 120)
TWO_BACKCHANNELS = ("okay i see", 800)

# utterance x floor state -> (verdict on turn 2, what happened to reply 1)
TABLE = [
    (QUESTION, "listening", ("answer", ""), []),
    (BACKCHANNEL, "listening", ("answer", ""), []),  # nobody else speaks: it is a turn
    (COUGH, "listening", ("ignore", "no words"), []),
    (QUESTION, "thinking", ("answer", ""), ["cut 1"]),
    (BACKCHANNEL, "thinking", ("ignore", "backchannel"), []),
    (COUGH, "thinking", ("ignore", "no words"), []),
    (QUESTION, "speaking", ("answer", ""), ["cut 1"]),
    (SHORT, "speaking", ("ignore", "too short"), []),
    (TWO_BACKCHANNELS, "speaking", ("ignore", "backchannel"), []),
    (QUESTION, "paused", ("answer", ""), ["cut 1", "resume"]),
    (BACKCHANNEL, "paused", ("ignore", "backchannel"), ["resume"]),
    (COUGH, "paused", ("ignore", "no words"), ["resume"]),
    (SHORT, "paused", ("ignore", "too short"), ["resume"]),
]


@pytest.mark.parametrize(("utterance", "state", "verdict", "reply"), TABLE,
                         ids=[f"{u[0] or 'cough'}-{s}" for u, s, _, _ in TABLE])
def test_the_verdict_on_an_utterance_depends_on_the_floor(
        utterance: tuple[str, int], state: str, verdict: tuple[str, str],
        reply: list[str]) -> None:
    floor, actions = in_state(state)
    floor.speech_ended()
    floor.final_transcript(2, *utterance)
    assert actions.verdicts == [(2, *verdict)]
    assert actions.log == reply
    cut = "cut 1" in reply
    # An answer takes the floor; an ignored utterance leaves the reply holding it.
    assert floor.reply == (2 if verdict[0] == "answer" else None if state == "listening" else 1)
    assert floor.ledger.cut == (1 if cut else -1)
    assert floor.ledger.newest == 2 and floor.ledger.is_open(2) == (verdict[0] == "answer")


def test_a_reply_goes_thinking_speaking_listening() -> None:
    floor, actions = judge()
    floor.final_transcript(1, "tell me a story", 900)
    floor.playing(1)
    floor.played(1, interrupted=False)
    assert actions.states == ["initializing", "listening", "thinking", "speaking", "listening"]
    assert actions.verdicts == [(1, "answer", "")]


def test_a_real_question_pauses_at_once_then_cuts_the_reply_on_its_words() -> None:
    floor, actions = in_state("speaking")
    floor.speech_started(10.0)
    assert actions.log == ["pause"] and actions.states[-1] == "listening"
    floor.partial_transcript("what time", 10.1)  # two words, but only 100 ms: not yet
    floor.partial_transcript("what", 10.3)  # a partial needs two words
    assert actions.log == ["pause"]
    floor.partial_transcript("what time", 10.3)
    assert actions.log == ["pause", "cut 1", "resume"]
    floor.speech_ended()
    floor.final_transcript(2, "what time is it", 700)
    floor.played(1, interrupted=True)  # the cut reply's final report arrives late: no change
    assert floor.reply == 2 and actions.states[-1] == "thinking"
    assert actions.log.count("cut 1") == 1 and actions.verdicts == [(2, "answer", "")]


def test_duration_alone_with_min_words_zero() -> None:
    floor, actions = in_state("speaking")
    floor.rules = TurnRules.parse(200, 0, "")
    floor.speech_started(1.0)
    floor.check(1.1)
    assert actions.log == ["pause"]
    floor.check(1.25)
    assert actions.log == ["pause", "cut 1", "resume"]


# ---- the orderings NATS may deliver across subjects ----------------------------------------------


def test_the_final_before_the_vad_end_gets_the_same_verdict() -> None:
    # stt.final and ingress.vad are different subjects: the final may overtake SpeechEnded.
    floor, actions = in_state("speaking")
    floor.speech_started(1.0)
    floor.final_transcript(2, "uh-huh", 450)
    assert actions.verdicts == [(2, "ignore", "backchannel")] and floor.reply == 1
    floor.speech_ended()  # late: changes nothing, and gives up no pause
    floor.give_up_pause()
    assert actions.log == ["pause", "resume"] and actions.states[-1] == "speaking"


def test_a_late_partial_of_an_answered_turn_does_not_cut_its_reply() -> None:
    floor, actions = in_state("listening")
    floor.speech_started(1.0)
    floor.speech_ended()
    floor.final_transcript(2, "what time is it", 800)
    floor.partial_transcript("what time is", 2.0)  # a straggler on stt.partial
    assert actions.log == [] and floor.reply == 2


def test_repeated_and_overtaken_finals_are_judged_once() -> None:
    floor, actions = in_state("listening")
    floor.final_transcript(3, "and the weather", 800)  # turn 2's final was lost or is late
    floor.final_transcript(3, "and the weather", 800)  # a redelivery
    floor.final_transcript(2, "what time is it", 800)  # the late one: a newer turn was judged
    assert actions.verdicts == [(3, "answer", "")]


def test_a_playback_of_an_older_reply_after_a_new_verdict_changes_nothing() -> None:
    floor, actions = in_state("speaking")
    floor.speech_started(1.0)
    floor.speech_ended()
    floor.final_transcript(2, "what time is it", 900)
    floor.playing(1)  # a progress report of the cut reply, still on its way
    floor.played(1, interrupted=True)
    assert floor.reply == 2 and actions.states[-1] == "thinking"


def test_a_reply_due_while_the_user_already_speaks_again_waits() -> None:
    floor, actions = in_state("listening")
    floor.speech_started(1.0)  # the next utterance began before the last one's final came
    floor.final_transcript(2, "what time is it", 800)
    assert actions.log == ["pause"] and actions.states[-1] == "listening"
    floor.partial_transcript("and the date", 1.5)
    assert actions.log == ["pause", "cut 2", "resume"]


def test_speech_during_thinking_holds_the_reply_back_and_a_real_turn_supersedes_it() -> None:
    floor, actions = judge()
    floor.final_transcript(1, "I want", 400)
    floor.speech_started(2.0)  # the user goes on before the agent spoke a word
    assert actions.log == ["pause"]
    floor.speech_ended()
    floor.final_transcript(2, "to book a flight", 900)
    assert actions.log == ["pause", "cut 1", "resume"] and floor.reply == 2


def test_a_pause_without_a_verdict_is_given_up() -> None:
    floor, actions = in_state("speaking")
    floor.speech_started(1.0)
    floor.give_up_pause()  # still speaking: nothing to give up yet
    floor.speech_ended()
    floor.give_up_pause()  # the final never came
    assert actions.log == ["pause", "resume"] and actions.states[-1] == "speaking"


# ---- turn numbers are bounded ---------------------------------------------------------------------


def test_a_turn_from_the_future_is_refused_and_the_session_goes_on() -> None:
    floor, actions = in_state("listening")
    floor.final_transcript(1_000_000, "forged words", 900)
    floor.user_idle(2 + MAX_AHEAD + 1, 1)
    assert actions.verdicts == [(1_000_000, "ignore", "out of reach"),
                                (2 + MAX_AHEAD + 1, "ignore", "out of reach")]
    assert floor.ledger.newest == 1 and floor.ledger.cut == -1
    floor.final_transcript(2, "what time is it", 900)  # the genuine next turn is answered
    assert actions.verdicts[-1] == (2, "answer", "")


def test_the_record_rebuilds_the_judge_in_a_new_replica() -> None:
    record = FloorRecord(judged=5, cut=3, greeted=True)
    floor, actions = judge(greeting=True, record=record)
    assert actions.verdicts == []  # greeted already: no second greeting after a failover
    floor.final_transcript(5, "a repeat", 900)
    floor.final_transcript(6, "what time is it", 900)
    floor.final_transcript(6 + MAX_AHEAD + 1, "too far", 900)
    assert actions.verdicts == [(6, "answer", ""), (15, "ignore", "out of reach")]
    assert actions.records[-1] == FloorRecord(judged=6, cut=3, greeted=True, reply=6)
    restored, _ = judge(record=FloorRecord(judged=6, cut=3, greeted=True, reply=6))
    assert restored.reply == 6  # who holds the floor survives the replica


# ---- the turns the agent takes on its own ---------------------------------------------------------


def test_the_greeting_is_given_once_and_keeps_initializing_until_it_is_played() -> None:
    floor, actions = judge(greeting=True)
    floor.user_track(True)  # a reconnect: no second greeting
    assert actions.verdicts == [(0, "greet", "")]
    floor.playing(0)
    floor.played(0, interrupted=False)
    assert actions.states == ["initializing", "thinking", "speaking", "listening"]
    assert actions.records[-1].greeted


def test_an_interrupted_greeting_lets_the_user_in() -> None:
    floor, actions = judge(greeting=True)
    floor.playing(0)
    floor.speech_started(1.0)
    floor.speech_ended()
    floor.final_transcript(1, "what time is it", 800)
    assert actions.log == ["pause", "cut 0", "resume"]
    assert actions.states[-1] == "thinking" and not floor.greeting


def test_no_greeting_when_the_user_spoke_first() -> None:
    actions = Actions()
    floor = Floor(EgressConfig().turn_rules(), actions, TurnLedger(), greeting=True)
    floor.final_transcript(1, "hello", 500)
    floor.user_track(True)
    assert actions.verdicts == [(1, "answer", "")]


def test_user_idle_prompts_then_says_goodbye_and_ends_the_session_once_heard() -> None:
    floor, actions = in_state("listening")
    floor.user_idle(2, 1)
    floor.played(2, interrupted=False)
    floor.user_idle(3, 2)
    assert actions.verdicts == [(2, "prompt", ""), (3, "goodbye", "")]
    assert actions.ends == [] and floor.reply == 3 and actions.states[-1] == "thinking"
    floor.played(3, interrupted=False)
    assert actions.ends == ["user idle"]


def test_a_goodbye_cut_by_the_user_does_not_end_the_session() -> None:
    floor, actions = in_state("listening")
    floor.user_idle(2, 2)
    floor.playing(2)
    floor.speech_started(1.0)
    floor.partial_transcript("wait a second", 1.5)
    floor.played(2, interrupted=True)
    assert actions.log == ["pause", "cut 2", "resume"] and actions.ends == []


def test_end_call_ends_the_session_once_its_reply_is_heard_in_full() -> None:
    floor, actions = in_state("listening")
    floor.final_transcript(2, "that is all, goodbye", 900)
    floor.end_call(2)  # the reply that called end_call is done
    assert actions.ends == []
    floor.played(2, interrupted=False)
    assert actions.ends == ["the agent ended the call"]


def test_end_call_from_a_reply_the_user_cut_ends_nothing() -> None:
    floor, actions = in_state("listening")
    floor.final_transcript(2, "that is all, goodbye", 900)
    floor.end_call(2)
    floor.playing(2)
    floor.speech_started(1.0)
    floor.partial_transcript("no wait one more thing", 1.5)
    floor.played(2, interrupted=True)
    floor.end_call(1)  # a stale reply's end_call: not the one holding the floor
    floor.final_transcript(3, "what is my balance", 900)
    floor.played(3, interrupted=False)
    assert actions.ends == []


def test_an_end_call_survives_a_new_judge() -> None:
    """The judge's record keeps the pending hang-up and why: a replica that takes over ends
    the call once the goodbye has been heard, with the agent's reason."""
    floor, actions = in_state("listening")
    floor.final_transcript(2, "goodbye", 900)
    floor.end_call(2)
    heir, heirs_actions = judge(record=actions.records[-1])
    heir.played(2, interrupted=False)
    assert heirs_actions.ends == ["the agent ended the call"]


def test_a_user_idle_turn_while_the_user_speaks_is_ignored() -> None:
    floor, actions = in_state("listening")
    floor.speech_started(1.0)
    floor.user_idle(2, 1)
    assert actions.verdicts == [(2, "ignore", "not idle")] and floor.reply is None


def test_a_reply_whose_audio_died_with_a_replica_is_cut_and_the_agent_listens() -> None:
    floor, actions = judge(record=FloorRecord(judged=3, greeted=True, reply=3))
    assert floor.reply == 3
    floor.abandon_reply("replica lost")
    assert actions.log == ["cut 3 (replica lost)"] and floor.reply is None
    assert floor.ledger.cut == 3 and actions.states[-1] == "listening"
    floor.final_transcript(4, "are you there", 900)
    assert actions.verdicts == [(4, "answer", "")]


# ---- drafts: answers prepared before the turn is certain -------------------------------------------

def test_a_settled_statement_is_drafted_and_its_final_confirms_it() -> None:
    floor, actions = judge()
    floor.speech_started(1.0)
    floor.speech_ended()
    floor.settled_transcript(1, "please call my mother")
    assert actions.log == ["draft 1: please call my mother"] and not actions.verdicts
    assert actions.states[-1] == "listening"  # nothing is said, so nothing shows
    assert actions.records[-1].draft == 1
    floor.final_transcript(1, "please call my mother", 900)
    assert actions.verdicts == [(1, "answer", "")]
    assert actions.states[-1] == "thinking" and actions.records[-1].draft == -1
    floor.playing(1)
    floor.played(1, interrupted=False)
    assert actions.states[-2:] == ["speaking", "listening"]


def test_a_continued_turn_drops_its_draft_and_the_next_turn_is_answered() -> None:
    floor, actions = judge()
    floor.settled_transcript(1, "please call my mother")
    floor.speech_started(2.0)              # the user goes on within the hold
    floor.final_transcript(1, "please call my mother", 900, continued=True)
    assert actions.log[-1] == "withdraw 1 (continued)" and not actions.verdicts
    floor.speech_ended()
    floor.final_transcript(2, "please call my mother and tell her I am late", 1900)
    assert actions.verdicts == [(2, "answer", "")]


def test_a_final_with_other_words_than_the_draft_drops_it() -> None:
    floor, actions = judge()
    floor.settled_transcript(1, "call my mother")
    floor.final_transcript(1, "call my brother", 900)
    assert actions.log[-1] == "withdraw 1 (words changed)" and not actions.verdicts
    floor.final_transcript(2, "call my brother", 900)  # the session goes on
    assert actions.verdicts == [(2, "answer", "")]


def test_no_draft_while_the_agent_speaks_and_a_continued_turn_keeps_the_pause() -> None:
    floor, actions = in_state("paused")
    floor.speech_ended()
    floor.settled_transcript(2, "wait a second")
    assert not [e for e in actions.log if e.startswith("draft")]
    floor.final_transcript(2, "wait a second", 900, continued=True)
    assert actions.verdicts == [(2, "ignore", "continued")]
    assert "resume" not in actions.log and floor.paused  # the next turn decides
    floor.final_transcript(3, "wait a second please stop", 1500)
    assert "cut 1" in actions.log and actions.verdicts[-1] == (3, "answer", "")


def test_a_draft_survives_a_replica_change_through_the_record() -> None:
    floor, actions = judge()
    floor.settled_transcript(1, "please call my mother")
    heir, heir_actions = judge(record=actions.records[-1])
    heir.final_transcript(1, "please call my mother", 900)
    assert heir_actions.verdicts == [(1, "answer", "")]


def test_the_greeting_waits_until_the_agent_can_speak() -> None:
    """A phone session's microphone is heard at once, maybe before the LLM and TTS have the
    session: a greet verdict then would reach nobody. It goes once they are ready."""
    actions = Actions()
    floor = Floor(EgressConfig().turn_rules(), actions, TurnLedger(), greeting=True, ready=False)
    floor.user_track(True)
    assert actions.verdicts == [] and floor.user_heard
    floor.agent_ready()
    assert actions.verdicts == [(0, "greet", "")]
    floor.agent_ready()  # once only
    assert actions.verdicts == [(0, "greet", "")]


def test_a_user_who_spoke_before_the_agent_was_ready_is_answered_not_greeted() -> None:
    actions = Actions()
    floor = Floor(EgressConfig().turn_rules(), actions, TurnLedger(), greeting=True, ready=False)
    floor.user_track(True)
    floor.final_transcript(1, "hello there", 600)
    floor.agent_ready()
    assert actions.verdicts == [(1, "answer", "")]


# ---- a meeting: several speakers, whom the agent answers ------------------------------------


def test_anyone_speaking_over_the_reply_pauses_and_cuts_it_for_everyone() -> None:
    floor, actions = judge()
    floor.final_transcript(1, "tell me a story", 900, speaker="alice")
    floor.playing(1)
    floor.speech_started(10.0, "bob")          # Bob talks over the reply Alice asked for
    floor.speech_started(10.1, "carol")
    floor.speech_ended("carol")                # Bob still speaks: still paused
    assert floor.speaking_since == 10.0 and actions.log == ["pause"]
    floor.check(10.5)                           # Bob's speech is long enough, but no words yet
    floor.partial_transcript("wait a moment", 10.6)
    assert actions.log == ["pause", "cut 1", "resume"]
    floor.speech_ended("bob")
    floor.final_transcript(2, "wait a moment please", 800, speaker="bob")
    assert actions.verdicts[-1] == (2, "answer", "") and actions.speakers[-1] == "bob"


def test_when_only_addressed_the_agent_answers_its_name_and_the_follow_up() -> None:
    floor, actions = judge(addressing=Addressing("addressed", "Nova, hey computer", 5.0))
    floor.final_transcript(1, "did you see the game", 900, speaker="alice", now=1.0)
    floor.final_transcript(2, "Nova, what time is it?", 900, speaker="bob", now=2.0)
    assert actions.verdicts == [(1, "ignore", "not addressed"), (2, "answer", "")]
    floor.playing(2)
    floor.played(2, interrupted=False, now=3.0)
    floor.final_transcript(3, "and the date", 800, speaker="bob", now=4.0)     # follow-up
    floor.played(3, interrupted=False, now=5.0)
    floor.final_transcript(4, "what about me", 800, speaker="alice", now=6.0)  # not Bob
    floor.final_transcript(5, "one more thing", 800, speaker="bob", now=20.0)  # too late
    floor.final_transcript(6, "hey computer tell me a joke", 900, speaker="alice", now=21.0)
    assert actions.verdicts[2:] == [(3, "answer", ""), (4, "ignore", "not addressed"),
                                    (5, "ignore", "not addressed"), (6, "answer", "")]
    assert actions.speakers == ["alice", "bob", "bob", "alice", "bob", "alice"]


def test_the_follow_up_goes_on_in_a_new_replica_for_the_time_it_had_left() -> None:
    floor, actions = judge(addressing=Addressing("addressed", "nova", 5.0))
    floor.final_transcript(1, "Nova, what time is it?", 900, speaker="bob", now=1.0)
    assert (actions.records[-1].partner, actions.records[-1].follow_up_ms) == ("bob", -1)
    floor.playing(1)
    floor.played(1, interrupted=False, now=3.0)
    record = actions.records[-1]
    assert (record.partner, record.follow_up_ms) == ("bob", 5000)
    # Written at 1 000 000 ms, read 2 s later by an heir whose monotonic clock says 50.
    record = aged(msgspec.structs.replace(record, written_ms=1_000_000), 1_002_000)
    assert record.follow_up_ms == 3000
    heir = Floor(EgressConfig().turn_rules(), actions, TurnLedger.from_record(record),
                 greeting=False, record=record, addressing=Addressing("addressed", "nova", 5.0),
                 now=50.0)
    heir.refresh()
    heir.user_track(True)
    heir.final_transcript(2, "and the date", 800, speaker="bob", now=52.5)  # within 3 s
    heir.played(2, interrupted=False, now=53.0)
    heir.final_transcript(3, "what about me", 800, speaker="alice", now=53.5)
    heir.final_transcript(4, "one more thing", 800, speaker="bob", now=60.0)  # 5 s after 53
    assert actions.verdicts[1:] == [(2, "answer", ""), (3, "ignore", "not addressed"),
                                    (4, "ignore", "not addressed")]


def test_a_reply_the_dead_replica_was_playing_starts_the_follow_up_in_the_heir() -> None:
    record = FloorRecord(judged=1, greeted=True, reply=1, partner="bob")  # still answering
    heir = Floor(EgressConfig().turn_rules(), Actions(), TurnLedger.from_record(record),
                 greeting=False, record=record, addressing=Addressing("addressed", "nova", 5.0),
                 now=50.0)
    heir.abandon_reply("replica lost")
    assert heir.addressing.follow_up(51.0) == ("bob", 4.0)


def test_a_turn_not_addressed_still_cuts_the_reply_it_talks_over() -> None:
    floor, actions = judge(addressing=Addressing("addressed", "nova"))
    floor.final_transcript(1, "nova tell me a story", 900, speaker="alice")
    floor.playing(1)
    floor.speech_started(10.0, "bob")
    floor.speech_ended("bob")
    floor.final_transcript(2, "can we move on to the budget", 1200, speaker="bob")
    assert actions.log == ["pause", "cut 1", "resume"]
    assert actions.verdicts[-1] == (2, "ignore", "not addressed")


def test_no_draft_is_prepared_for_a_turn_not_addressed() -> None:
    floor, actions = judge(addressing=Addressing("addressed", "nova"))
    floor.settled_transcript(1, "I think so", speaker="alice")
    floor.settled_transcript(2, "Nova, I think so", speaker="bob")
    assert actions.log == ["draft 2: Nova, I think so"]


def test_names_match_whole_words_only() -> None:
    addressing = Addressing("addressed", "Al, Nova")
    assert addressing.addressed("x", "hi, AL!", 0.0)
    assert not addressing.addressed("x", "always novas", 0.0)
    assert Addressing().addressed("x", "anything", 0.0)


def test_the_person_being_answered_may_go_on_unnamed() -> None:
    floor, actions = judge(addressing=Addressing("addressed", "nova"))
    floor.final_transcript(1, "nova", 400, speaker="alice")               # a pause after the name
    floor.final_transcript(2, "what time is it", 700, speaker="alice")
    # Someone else, unnamed: not answered, though talking over the agent still cuts it.
    floor.final_transcript(3, "what about lunch", 700, speaker="bob")
    assert actions.verdicts == [(1, "answer", ""), (2, "answer", ""),
                                (3, "ignore", "not addressed")]
    assert actions.log == ["cut 1", "cut 2"]


def test_the_person_who_cuts_their_own_answer_short_is_still_answered() -> None:
    floor, actions = judge(addressing=Addressing("addressed", "nova", 5.0))
    floor.final_transcript(1, "nova tell me a story", 900, speaker="alice", now=1.0)
    floor.playing(1)
    floor.speech_started(2.0, "alice")
    floor.partial_transcript("actually make it", 2.5)   # cut before the reply was over
    floor.speech_ended("alice")
    floor.final_transcript(2, "actually make it a short one", 900, speaker="alice", now=3.0)
    floor.played(1, interrupted=True, now=3.1)          # the cut reply's last report
    floor.playing(2)
    floor.played(2, interrupted=False, now=4.0)
    floor.final_transcript(3, "and funny", 500, speaker="alice", now=20.0)  # long after
    assert actions.verdicts == [(1, "answer", ""), (2, "answer", ""),
                                (3, "ignore", "not addressed")]


def test_a_reply_cut_while_thinking_starts_the_follow_up_time() -> None:
    floor, actions = judge(addressing=Addressing("addressed", "nova", 5.0))
    floor.final_transcript(1, "nova tell me a story", 900, speaker="alice", now=1.0)
    floor.speech_started(2.0, "bob")                    # cut before any audio: no Playback
    floor.partial_transcript("hold on everyone", 2.5)
    floor.speech_ended("bob")
    floor.final_transcript(2, "hold on everyone", 900, speaker="bob", now=3.0)
    floor.final_transcript(3, "so about that story", 900, speaker="alice", now=60.0)
    assert actions.verdicts == [(1, "answer", ""), (2, "ignore", "not addressed"),
                                (3, "ignore", "not addressed")]


def test_people_typing_to_each_other_do_not_cut_the_reply() -> None:
    floor, actions = judge(addressing=Addressing("addressed", "nova"))
    floor.final_transcript(1, "nova tell me a story", 900, speaker="alice")
    floor.playing(1)
    floor.final_transcript(2, "brb coffee", 0, typed=True, speaker="bob")
    floor.final_transcript(3, "nova stop", 0, typed=True, speaker="bob")
    assert actions.verdicts[1:] == [(2, "ignore", "not addressed"), (3, "answer", "")]
    assert actions.log == ["cut 1 (typed)"]


def test_keys_pressed_in_a_meeting_are_for_the_agent() -> None:
    floor, actions = judge(addressing=Addressing("addressed", "nova"))
    floor.final_transcript(1, "(keypad: 1)", 600)
    assert actions.verdicts == [(1, "answer", "")]


def test_someone_whose_end_of_speech_never_came_stops_counting_as_speaking() -> None:
    floor, actions = judge()
    floor.speech_started(1.0, "alice")                  # her SpeechEnded is lost
    floor.speech_started(100.0, "bob")
    floor.speech_ended("bob")
    assert floor.speaking_since is None
