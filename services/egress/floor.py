"""The one judge of turn-taking: who holds the floor in one session, and what each utterance means.

It runs in egress, beside the agent's voice, because the fastest decision — stop talking the
moment the user talks over the agent — needs no transcript and must not wait for a bus hop.
Every other stage acts on what it publishes and never judges again:

- ``Verdict`` for each user turn (``answer`` / ``ignore``) and for the turns the agent takes on
  its own (``greet``, and ``prompt`` / ``goodbye`` for a user-idle turn);
- ``Cancel`` when an utterance interrupts the reply (the agent's reply turn, and all before it);
- ``AgentState`` as it changes, and ``SessionEnd`` once a goodbye has been heard.

A turn whose words are settled before its final (the STT holds a statement's final back a
moment for more speech) gets a ``draft`` verdict at once: the reply is prepared meanwhile but not
played. The final confirms it (the same words: a plain verdict for the same turn, and the reply
plays from what is ready) or drops it (``continued``: the user spoke again, so the turn is
cancelled and the next one answers all the words). Nothing of a draft is heard before its final.

The agent holds the floor from a verdict that it speaks until that reply's final ``Playback``.
When the user starts speaking over it, the voice pauses at once (no transcript needed). Then the
utterance interrupts (``TurnRules.interrupts``: long enough, with real words, judged on partials
as they come and on the final) and the reply is cut for good; or it ends without interrupting
(a cough, "uh-huh", no words) and the reply resumes where the user stopped hearing it. Those
rules are for speech: a message the user typed is always a turn, and it cuts a reply at once.

In a meeting (several people heard, each turn labelled with its speaker) speech from anyone
pauses and interrupts the reply alike, and ``Addressing`` says which turns are the agent's to
answer (everyone's, or only those that name it and their follow-ups); a turn not addressed is
ignored with the reason "not addressed" and its words, which the LLM keeps as context.

``Floor`` is pure logic: the worker feeds it events in any order NATS delivers them across
subjects and carries out what it asks through ``FloorActions``. Its state is the shared turn
ledger plus a ``FloorRecord`` it hands to ``FloorActions.record`` after each decision, kept in
KV, from which a new replica carries on.
"""

from __future__ import annotations

from typing import Protocol

from proto.events import NOT_ADDRESSED, AgentStateName, VerdictAction
from services.runtime.ledger import FloorRecord, TurnLedger
from services.runtime.turns import Addressing, TurnRules, words


# Seconds after which someone whose end of speech never came no longer counts as speaking: past
# the longest utterance the STT keeps (30 s).
STALE_SPEECH_S = 40.0
# Why a goodbye ends the session (SessionEnd.reason on floor.end).
USER_IDLE = "user idle"
AGENT_HUNG_UP = "the agent ended the call"


class FloorActions(Protocol):
    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def interrupt(self, turn: int, reason: str = "barge-in") -> None:
        """Cut reply ``turn`` (and all before it) for good."""
        ...

    def verdict(self, turn: int, action: VerdictAction, text: str, reason: str,
                speaker: str = "") -> None: ...

    def draft(self, turn: int, text: str, speaker: str = "") -> None:
        """Prepare the answer to ``text`` for ``turn``, unheard until ``verdict`` confirms it."""
        ...

    def withdraw(self, turn: int, reason: str) -> None:
        """Drop the draft of ``turn`` (cancel it everywhere; nothing of it was heard)."""
        ...

    def show(self, state: AgentStateName, turn: int) -> None: ...

    def end_session(self, reason: str) -> None: ...

    def record(self, record: FloorRecord) -> None:
        """Keep the judge's state where a new replica finds it."""
        ...


class Floor:
    def __init__(self, rules: TurnRules, actions: FloorActions, ledger: TurnLedger, *,
                 greeting: bool, idle_prompts: int = 1,
                 record: FloorRecord | None = None, ready: bool = True,
                 addressing: Addressing | None = None, now: float = 0.0) -> None:
        record = record or FloorRecord()
        self.rules = rules
        self.addressing = addressing or Addressing()
        if record.partner:  # a conversation the replica before began
            self.addressing.resume(record.partner, None if record.follow_up_ms < 0
                                   else record.follow_up_ms / 1000, now)
        # The stages that speak (LLM, TTS) have claimed the session: a greeting decided before
        # would reach nobody (a verdict is not kept for a late subscriber).
        self.ready = ready
        self.actions = actions
        self.ledger = ledger  # turns judged (opened when spoken, passed over when ignored), cut
        self.idle_prompts = idle_prompts
        self.reply: int | None = record.reply if record.reply >= 0 else None  # holds the floor
        self.goodbye: int | None = record.goodbye if record.goodbye >= 0 else None
        self.goodbye_reason = record.goodbye_reason or USER_IDLE
        self.greeted = record.greeted
        self.greeting = greeting and not record.greeted  # a greeting is configured and due
        self.audible = False  # the reply is being played
        self.user_heard = False  # the user's microphone reaches the agent
        self.speaking_since: float | None = None  # monotonic s; a user speaks (the first)
        self.speakers: dict[str, float] = {}  # who speaks now, since when
        self.now = now  # the latest time an event brought (for decisions made without one)
        self.reply_speaker = ""  # whom the reply holding the floor answers
        self.paused = False
        self.partial = ""
        self.shown: tuple[AgentStateName, int] | None = None
        # The answer being prepared before its turn is certain: (turn, the words it answers).
        self.drafting: tuple[int, str] | None = \
            (record.draft, record.draft_text) if record.draft >= 0 else None

    # ---- the user ------------------------------------------------------------------------------

    def user_track(self, active: bool) -> None:
        self.user_heard = self.user_heard or active
        if active:
            self._greet_if_due()
        self._show()

    def agent_ready(self) -> None:
        """The LLM and TTS have the session (or waiting for them was given up): a greeting
        held for them goes now."""
        if not self.ready:
            self.ready = True
            if self.user_heard:
                self._greet_if_due()
                self._show()

    def _greet_if_due(self) -> None:
        if self.ready and self.greeting and self.reply is None and self.ledger.newest < 0:
            self._speak(0, "greet")

    def speech_started(self, now: float, speaker: str = "") -> None:
        self.now = now
        # Someone whose end of speech never came (their ingress replica died as they spoke,
        # or they left mid-word) is not still speaking after any utterance could have ended.
        self.speakers = {who: since for who, since in self.speakers.items()
                         if now - since < STALE_SPEECH_S}
        self.speakers[speaker] = now
        self.speaking_since = min(self.speakers.values())
        self.partial = ""
        if self.reply is not None:
            self._pause()

    def speech_ended(self, speaker: str = "") -> None:
        # The final transcript decides what happens to a pause; someone else may speak on.
        self.speakers.pop(speaker, None)
        self.speaking_since = min(self.speakers.values()) if self.speakers else None

    def partial_transcript(self, text: str, now: float) -> None:
        self.now = now
        self.partial = text
        self.check(now)

    def check(self, now: float) -> None:
        """Judge the utterance so far (on a partial, or when its minimum length has passed)."""
        self.now = now
        if self.reply is None or not self.paused or self.speaking_since is None:
            return
        if self.rules.interrupts(self.partial, (now - self.speaking_since) * 1000, final=False):
            self._interrupt()

    def settled_transcript(self, turn: int, text: str, speaker: str = "",
                           now: float = 0.0) -> None:
        """The words of ``turn`` are all there, but the user may still go on: an answer is
        prepared now when one would be given (the agent silent, real words), heard only once
        the final agrees."""
        if (self.reply is not None or self.drafting is not None or not words(text)
                or not self.addressing.addressed(speaker, text, now)
                or not self._judgeable(turn)):
            return
        self.greeting = False  # the user spoke first: no greeting is coming any more
        self.ledger.open(turn)
        self.drafting = (turn, text)
        self.actions.draft(turn, text, speaker)
        self._record()

    def final_transcript(self, turn: int, text: str, speech_ms: int,
                         continued: bool = False, typed: bool = False, speaker: str = "",
                         now: float = 0.0) -> None:
        self.now = now
        if self.drafting is not None and self.drafting[0] == turn:
            self._settle_draft(turn, text, continued, speaker)
            return
        if continued:
            # Not drafted (the agent was speaking): the next turn carries these words on and
            # is judged with them; a paused reply stays paused until then.
            if self._judgeable(turn):
                self.ledger.pass_over(turn)
                self.actions.verdict(turn, "ignore", "", "continued")
                self._record()
            return
        if not self._judgeable(turn):
            return
        # Typed text is words in any script; speech counts the words the recogniser heard.
        said = bool(text.strip()) if typed else bool(words(text))
        addressed = self.addressing.addressed(speaker, text, now)
        # The user spoke first: no greeting is coming any more.
        self.greeting = self.greeting and not said
        # A typed message says the user is there, microphone or not.
        self.user_heard = self.user_heard or typed
        if self.reply is not None and turn > self.reply:
            if typed and said:
                # Typed words are meant: no cough or "uh-huh" to tell apart, so even a typed
                # "ok" asks something new. The reply is cut and the message answered — unless
                # it is people in a meeting writing to each other: the reply goes on.
                if addressed:
                    self._interrupt("typed")
            elif not self.rules.interrupts(text, speech_ms, final=True):
                self._resume()  # a cough, a backchannel: the reply goes on, unanswered
                self._ignore(turn, self._not_a_turn(text, speech_ms))
                return
            else:
                self._interrupt()
        if not said:
            self._ignore(turn, "no words")
        elif not addressed:
            self._ignore(turn, NOT_ADDRESSED, text, speaker)
        else:
            self._speak(turn, "answer", text, speaker)

    def user_idle(self, turn: int, count: int) -> None:
        """The STT opened ``turn`` because the user stayed silent ``count`` times in a row."""
        if not self._judgeable(turn):
            return
        if self.reply is not None or self.speaking_since is not None:
            self._ignore(turn, "not idle")  # the agent took the floor meanwhile
            return
        self._speak(turn, "goodbye" if count > self.idle_prompts else "prompt")

    # ---- the agent -----------------------------------------------------------------------------

    def playing(self, turn: int) -> None:
        if turn == self.reply:
            self.audible = True
            self._show()

    def played(self, turn: int, interrupted: bool, now: float = 0.0) -> None:
        """Reply ``turn`` has its final Playback: played out, cut, or empty."""
        self.now = now
        if turn == 0 and not self.greeted:
            self.greeted, self.greeting = True, False
        if self.reply is None or turn == self.reply:
            self.addressing.reply_over(now)  # played out, or the final report of a cut one
        if turn == self.reply:
            self.reply = None
            self.audible = False
            self._resume()
        if turn == self.goodbye:
            self.goodbye = None
            if not interrupted:
                self.actions.end_session(self.goodbye_reason)
        self._record()
        self._show(turn)

    def end_call(self, turn: int) -> None:
        """The agent decided to hang up in reply ``turn`` (its ``end_call`` tool): the session
        ends once that reply is heard in full, as after an idle goodbye. A reply already cut
        (or superseded) ends nothing."""
        if turn == self.reply:
            self.goodbye, self.goodbye_reason = turn, AGENT_HUNG_UP
            self._record()

    def abandon_reply(self, reason: str) -> None:
        """The reply holding the floor cannot be heard any more (its audio died with a replica):
        cut it, and listen."""
        if self.reply is not None:
            self._interrupt(reason)

    def give_up_pause(self) -> None:
        """No verdict came for the speech that paused the reply (its final was lost): the reply
        goes on rather than leave the user in silence."""
        if self.paused and self.speaking_since is None:
            self._resume()
            self._show()

    def refresh(self) -> None:
        self._show()

    # ---- inside --------------------------------------------------------------------------------

    def _settle_draft(self, turn: int, text: str, continued: bool, speaker: str) -> None:
        """The final of a drafted turn: the draft is the answer if its words are the final's."""
        drafted = self.drafting[1] if self.drafting is not None else ""
        self.drafting = None
        if continued or text != drafted or self.reply is not None:
            self.ledger.cancel(turn)
            self.actions.withdraw(turn, "continued" if continued else "words changed")
            self._record()
            return
        self.reply, self.reply_speaker = turn, speaker
        self.addressing.answering(speaker)
        self.audible = False
        self.actions.verdict(turn, "answer", text, "", speaker)
        if self.speaking_since is not None:
            self._pause()  # the user already speaks again: the reply waits its turn
        self._record()
        self._show()

    def _judgeable(self, turn: int) -> bool:
        """A turn is judged once, in order, and only within reach of the last one judged: a
        repeat or a straggler is dropped (it was judged already, or a newer turn was); a turn
        far ahead (forged, or a counter gone wrong) is refused with a verdict that says so."""
        if turn <= self.ledger.newest:
            return False
        if not self.ledger.admits(turn):
            self.actions.verdict(turn, "ignore", "", "out of reach")
            return False
        return True

    def _not_a_turn(self, text: str, speech_ms: int) -> str:
        """Why an utterance over the agent's reply does not take the floor."""
        if not words(text):
            return "no words"
        if 0 < speech_ms < self.rules.min_speech_ms:
            return "too short"
        return "backchannel"

    def _ignore(self, turn: int, reason: str, text: str = "", speaker: str = "") -> None:
        self.ledger.pass_over(turn)
        self.actions.verdict(turn, "ignore", text, reason, speaker)
        self._record()
        self._show()

    def _speak(self, turn: int, action: VerdictAction, text: str = "",
               speaker: str = "") -> None:
        self.ledger.open(turn)
        self.reply, self.reply_speaker = turn, speaker
        if action == "answer":
            self.addressing.answering(speaker)
        self.audible = False
        if action == "goodbye":
            self.goodbye, self.goodbye_reason = turn, USER_IDLE
        self.actions.verdict(turn, action, text, "", speaker)
        if self.speaking_since is not None:
            self._pause()  # the user already speaks again: the reply waits its turn
        self._record()
        self._show()

    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.actions.pause()
            self._show()

    def _resume(self) -> None:
        if self.paused:
            self.paused = False
            self.actions.resume()

    def _interrupt(self, reason: str = "barge-in") -> None:
        assert self.reply is not None
        turn, self.reply = self.reply, None
        self.addressing.reply_over(self.now)  # a reply cut before any audio has no last report
        self.ledger.cancel(turn)
        self.audible = False
        if turn == 0:
            self.greeting = False
        if turn == self.goodbye:
            self.goodbye = None
        self.actions.interrupt(turn, reason)
        self._resume()  # nothing of the cut turn can play; the next reply must not wait
        self._record()
        self._show()

    def _record(self) -> None:
        partner, left = self.addressing.follow_up(self.now)
        self.actions.record(FloorRecord(
            judged=self.ledger.newest, cut=self.ledger.cut, greeted=self.greeted,
            reply=-1 if self.reply is None else self.reply,
            goodbye=-1 if self.goodbye is None else self.goodbye,
            goodbye_reason="" if self.goodbye_reason == USER_IDLE else self.goodbye_reason,
            draft=-1 if self.drafting is None else self.drafting[0],
            draft_text="" if self.drafting is None else self.drafting[1],
            partner=partner, follow_up_ms=-1 if left is None else round(left * 1000)))

    def _show(self, turn: int | None = None) -> None:
        state: AgentStateName
        if self.reply is not None:
            state = "listening" if self.paused else "speaking" if self.audible else "thinking"
        elif not self.user_heard or self.greeting:
            state = "initializing"
        else:
            state = "listening"
        shown_turn = self.reply if self.reply is not None else (turn or 0)
        if self.shown is None or self.shown[0] != state:
            self.shown = (state, shown_turn)
            self.actions.show(state, shown_turn)
