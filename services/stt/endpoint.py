"""When the user's turn is over, and when the user has been silent too long: the STT stage's
turn-taking decisions as pure logic (the timers live in ``services/stt/service.py``).

End of turn: the VAD's silence window ends an *utterance*; the turn's final transcript is then
held back for a time that depends on how the words end (``turns.end_of_turn``): a question is
over at once, a statement after a short pause, a phrase left hanging ("I want to…") after a long
one. Speech that starts before the turn's final went out continues the same turn.

User idle: while the agent listens and the user says nothing for a while, the STT opens a turn
with no speech (``UserIdle``), and the judge has the agent prompt the user or say goodbye.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.runtime.turns import end_of_turn, words


@dataclass(frozen=True, slots=True)
class EndOfTurnHolds:
    """How long (ms) a turn's final waits for more speech, by how its transcript ends."""

    question_ms: int = 0
    statement_ms: int = 50
    incomplete_ms: int = 1500
    brief_ms: int = 300

    def hold_ms(self, text: str) -> int:
        if not words(text):  # nothing was said (a cough, a failure): nothing to wait for
            return 0
        verdict = end_of_turn(text)
        if verdict == "question":
            return self.question_ms
        if verdict == "incomplete":
            return self.incomplete_ms
        if verdict == "brief":
            return self.brief_ms
        return self.statement_ms


def joined(before: str, after: str) -> str:
    """Two utterances' text as one ("I want to" + "book a flight")."""
    return " ".join(part for part in (before.strip(), after.strip()) if part)


@dataclass(slots=True)
class TurnSoFar:
    """What the utterances of one open turn have said, in order."""

    turn: int
    text: str = ""
    speech_ms: int = 0
    frames_dropped: int = 0
    confidence: float = 0.0
    utterances: int = 0

    def shown(self, partial: str) -> str:
        """The turn's text with the current utterance's partial appended."""
        return joined(self.text, partial)

    def add(self, text: str, speech_ms: int, frames_dropped: int, confidence: float) -> None:
        """One more utterance, transcribed. The turn's confidence is its least sure part."""
        if words(text):
            self.confidence = confidence if not words(self.text) else min(self.confidence,
                                                                          confidence)
            self.text = joined(self.text, text)
        self.speech_ms += speech_ms
        self.frames_dropped += frames_dropped
        self.utterances += 1


class IdleWatch:
    """When the user-idle timer may run: the agent's last state is ``listening``, the user is
    not speaking and no turn of theirs is open, and the timer has not fired since the agent last
    began to listen. ``count`` is the number of user-idle turns in a row."""

    def __init__(self) -> None:
        self.listening = False
        self.fired_since_listening = False
        self.count = 0

    def agent_state(self, state: str) -> None:
        self.listening = state == "listening"
        if self.listening:
            self.fired_since_listening = False

    def user_spoke(self) -> None:
        self.count = 0

    def may_run(self, user_busy: bool) -> bool:
        return self.listening and not self.fired_since_listening and not user_busy

    def fire(self) -> int:
        """The timer fired: returns the count of the user-idle turn to open."""
        self.fired_since_listening = True
        self.count += 1
        return self.count
