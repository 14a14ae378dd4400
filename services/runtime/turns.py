"""Turn-taking rules: what the user's words and speech say about who holds the floor.

The interruption rule (``TurnRules``) is applied by one judge only, in egress
(``services/egress/floor.py``), configured by ``VOICEBUS_INTERRUPT_*`` and
``VOICEBUS_BACKCHANNEL_WORDS``; every other stage acts on its verdicts. The end-of-turn rule
(``end_of_turn``) is the STT stage's.

An utterance over the agent's reply **interrupts** it when the user spoke for at least
``min_speech_ms`` and the transcript holds at least ``min_words`` words that are not a
backchannel ("uh-huh", "yeah", "okay"…); a partial transcript needs one such word more, as the
STT still revises it. With ``min_words`` = 0 duration alone decides (the reply is cut before any
transcript exists), except that a final with no words never does.
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

# Acknowledgements and fillers: said over someone's speech, they mean "go on", not "stop".
DEFAULT_BACKCHANNEL = (
    "ah,aha,alright,hm,hmm,huh,mhm,mm,mmhmm,mm-hmm,mm-hm,oh,ok,okay,right,sure,uh,uh-huh,um,"
    "yeah,yep,yes,yup,i see,got it,go on"
)
# A final that ends on one of these is most likely not the end of the user's turn.
_CONTINUES = frozenset(
    # conjunctions and fillers
    "and but or so because cause then um uh er erm like if that which who when while although "
    # prepositions and articles
    "to of in on at for with from by about into onto over under after before between through "
    "the a an my your our their his her its this these those some any "
    # auxiliaries left hanging ("I want to", "can you")
    "is are was were am be can could would should will i'm i've i'd we're you're".split()
)
# Said alone, these open what the user is about to say ("Well, …", "First, …"); at the end of
# a longer phrase they are complete ("I'm well", "you go first"), so only a lone one waits.
_OPENS = frozenset("well first now actually anyway basically also firstly secondly".split())
# A lone answer: complete, but often the start of more ("Yes, please call my mother").
_BRIEF = frozenset("yes no yeah yep nope okay ok sure right alright fine".split())
# A turn that opens by counting announces a second part ("First turn off the lights, then lock
# the door"): its first sentence is complete, but the user is not done.
_COUNTS_ON = frozenset("first firstly".split())
# How a speech recogniser that punctuates marks words trailing off: "Well...", "So, -".
_TRAILS_OFF = ("...", "…", ",", "-", "—")
_QUESTION_START = frozenset(
    "what when where who whom whose why how which is are am was were do does did can could "
    "would will should shall may might have has had isn't aren't don't doesn't didn't can't "
    "won't wouldn't couldn't shouldn't what's where's who's how's".split()
)
_WORD = re.compile(r"[a-z0-9']+(?:-[a-z0-9']+)*")

EndOfTurn = Literal["question", "statement", "brief", "incomplete"]


def words(text: str) -> list[str]:
    """Lower-case words of ``text``, punctuation dropped ("Uh-huh, OK." → ["uh-huh", "ok"])."""
    return _WORD.findall(text.lower())


def end_of_turn(text: str) -> EndOfTurn:
    """How a final transcript ends: ``incomplete`` when its last word leaves the phrase open
    ("and", "um", "to", "the"), when it is a lone opener ("Well", "First") or trails off
    ("So...", "Yes,"), ``question`` when it opens like a question and ends complete, ``brief``
    when it is a lone answer ("Yes.", "Okay") or opens by counting ("First turn off the
    lights."), else ``statement``."""
    said = words(text)
    if not said:
        return "statement"
    if said[-1] in _CONTINUES or (len(said) == 1 and said[0] in _OPENS) or \
            text.rstrip().endswith(_TRAILS_OFF):
        return "incomplete"
    if (len(said) == 1 and said[0] in _BRIEF) or said[0] in _COUNTS_ON:
        return "brief"
    if text.rstrip().endswith("?") or said[0] in _QUESTION_START:
        return "question"
    return "statement"


class TurnRules(msgspec.Struct, frozen=True):
    min_speech_ms: int = 200
    min_words: int = 1
    backchannel: frozenset[str] = frozenset()

    @classmethod
    def parse(cls, min_speech_ms: int, min_words: int, backchannel: str) -> TurnRules:
        phrases = (" ".join(words(p)) for p in backchannel.split(","))
        return cls(min_speech_ms, min_words, frozenset(p for p in phrases if p))

    def substantive(self, text: str) -> list[str]:
        """The words of ``text`` that are not backchannel (single words or whole phrases)."""
        said = words(text)
        kept: list[str] = []
        i = 0
        while i < len(said):
            if i + 1 < len(said) and f"{said[i]} {said[i + 1]}" in self.backchannel:
                i += 2
                continue
            if said[i] not in self.backchannel:
                kept.append(said[i])
            i += 1
        return kept

    def interrupts(self, text: str, speech_ms: float, *, final: bool) -> bool:
        """Whether an utterance heard over the agent's reply takes the floor: ``text`` is its
        transcript so far (``final`` when complete), ``speech_ms`` how long the user spoke
        (0: not measured, as from a producer older than the field)."""
        if 0 < speech_ms < self.min_speech_ms:
            return False
        if final and not words(text):
            return False
        # A partial is a guess the STT still revises (its first word for a hum or a cough is
        # often a stray "i" or "the"): it must carry one real word more than a final.
        needed = self.min_words if final or not self.min_words else self.min_words + 1
        return len(self.substantive(text)) >= needed


AnswerMode = Literal["everyone", "addressed"]


class Addressing:
    """Whom the agent answers in a room where everyone is heard (``VOICEBUS_ANSWER``).

    ``everyone``: every turn with words. ``addressed``: a turn that names the agent (any of
    ``names``, as whole words: "Nova, what time is it?"), or one from the person the agent is
    answering — while it answers them and for ``follow_up_s`` after that reply is over (played
    or cut): the conversation goes on without a name in every sentence, as between people
    ("Nova…" then "what time is it?" in a second breath). Other turns are heard but left
    unanswered (the model still sees them: a meeting's context). Pure logic; time comes in as
    ``now``."""

    def __init__(self, mode: AnswerMode = "everyone", names: str = "",
                 follow_up_s: float = 0.0) -> None:
        self.mode = mode
        self.names = [tuple(words(name)) for name in names.split(",") if words(name)]
        self.follow_up_s = follow_up_s
        self._partner = ""  # whom the agent answers, or answered last
        self._until: float | None = None  # end of their follow-up (None: still answering)

    def addressed(self, speaker: str, text: str, now: float) -> bool:
        if self.mode == "everyone" or not speaker:
            return True  # a turn of nobody in the crowd: keys pressed on a phone
        said = words(text)
        for name in self.names:
            if any(tuple(said[i:i + len(name)]) == name for i in range(len(said))):
                return True
        return bool(self._partner) and self._partner == speaker and (
            self._until is None or now <= self._until)

    def answering(self, speaker: str) -> None:
        """The agent takes a turn of ``speaker``'s: the conversation is with them now."""
        self._partner, self._until = speaker, None

    def reply_over(self, now: float) -> None:
        """The reply to the partner is over (heard, or cut): the follow-up time starts."""
        if self._partner and self._until is None:
            self._until = now + self.follow_up_s

    def follow_up(self, now: float) -> tuple[str, float | None]:
        """Whom the agent answers or answered last ("": nobody yet), and the seconds left of
        their follow-up (None: the agent still answers them): for the judge's record."""
        if not self._partner or self._until is None:
            return self._partner, None
        return self._partner, max(0.0, self._until - now)

    def resume(self, partner: str, left_s: float | None, now: float) -> None:
        """Carry on a conversation that a replica which died had begun (``follow_up``'s)."""
        self._partner = partner
        self._until = None if left_s is None else now + left_s
