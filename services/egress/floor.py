"""Who holds the floor in one session, as egress sees it: the agent's manners as a listener.

The agent holds the floor from the moment a reply is due (a final transcript it will answer, or
the first text of a reply) until that reply's final ``Playback``. When the user starts speaking
over it, the agent's voice pauses at once (the fast path: no transcript needed). Then:

- the utterance interrupts (``TurnRules.interrupts``: long enough, with real words, judged on
  partials as they come and on the final) → the reply is cut for good: ``Cancel`` on the bus;
- it ends without interrupting (a cough, "uh-huh", no words) → the reply resumes where the
  user stopped hearing it.

The LLM applies the same rule to the same final, so a backchannel is neither answered nor
allowed to supersede the reply. ``Floor`` is pure logic; the worker feeds it events and carries
out what it asks through ``FloorActions``.
"""

from __future__ import annotations

from typing import Protocol

from proto.events import AgentStateName
from services.runtime.turns import TurnRules, words


class FloorActions(Protocol):
    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def interrupt(self, turn: int) -> None:
        """Cut reply ``turn`` (and all before it) for good."""
        ...

    def show(self, state: AgentStateName, turn: int) -> None: ...


class Floor:
    def __init__(self, rules: TurnRules, actions: FloorActions, *, greeting: bool) -> None:
        self.rules = rules
        self.actions = actions
        self.reply: int | None = None  # the agent's turn holding the floor
        self.audible = False  # the reply is being played
        self.user_heard = False  # the user's microphone reaches the agent
        self.greeting_due = greeting
        self.speaking_since: float | None = None  # monotonic s; the user speaks over the reply
        self.paused = False
        self.partial = ""
        self.cut_upto = -1  # highest turn cut by an interruption
        self.shown: tuple[AgentStateName, int] | None = None

    # ---- the user ------------------------------------------------------------------------------

    def user_track(self, active: bool) -> None:
        self.user_heard = self.user_heard or active
        self._show()

    def speech_started(self, now: float) -> None:
        self.speaking_since = now
        self.partial = ""
        if self.reply is not None:
            self._pause()

    def speech_ended(self) -> None:
        self.speaking_since = None  # the final transcript decides what happens to a pause

    def partial_transcript(self, turn: int, text: str, now: float) -> None:
        self.partial = text
        self.check(now)

    def check(self, now: float) -> None:
        """Judge the utterance so far (on a partial, or when its minimum length has passed)."""
        if self.reply is None or not self.paused or self.speaking_since is None:
            return
        if self.rules.interrupts(self.partial, (now - self.speaking_since) * 1000, final=False):
            self._interrupt()

    def final_transcript(self, turn: int, text: str, speech_ms: int, idle: int) -> None:
        # The user's speech has turned into a turn of theirs: no greeting is coming any more.
        self.greeting_due = self.greeting_due and not words(text)
        answered = bool(words(text)) or idle > 0
        if self.reply is not None and turn > self.reply:
            if idle == 0 and not self.rules.interrupts(text, speech_ms, final=True):
                self._resume()  # a cough, a backchannel: the reply goes on, unanswered
                self._show()
                return
            self._interrupt()
        if answered:
            self._hold(turn)
        self._show()

    # ---- the agent -----------------------------------------------------------------------------

    def reply_text(self, turn: int) -> None:
        """Text of reply ``turn`` exists (the greeting, or an answer seen before its final)."""
        self._hold(turn)
        self._show()

    def playing(self, turn: int) -> None:
        if turn == self.reply:
            self.audible = True
            self._show()

    def played(self, turn: int) -> None:
        """Reply ``turn`` has its final Playback: played out, cut, or empty."""
        if turn == 0:
            self.greeting_due = False
        if turn == self.reply:
            self.reply = None
            self.audible = False
            self._resume()
        self._show(turn)

    # ---- inside --------------------------------------------------------------------------------

    def _hold(self, turn: int) -> None:
        if turn > self.cut_upto and (self.reply is None or turn > self.reply):
            self.reply = turn
            self.audible = False
            if self.speaking_since is not None:
                self._pause()  # the user already speaks again: the reply waits its turn

    def give_up_pause(self) -> None:
        """No verdict came for the speech that paused the reply (its final was lost): the reply
        goes on rather than leave the user in silence."""
        if self.paused and self.speaking_since is None:
            self._resume()
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

    def _interrupt(self) -> None:
        assert self.reply is not None
        turn, self.reply = self.reply, None
        self.cut_upto = max(self.cut_upto, turn)
        self.audible = False
        if turn == 0:
            self.greeting_due = False
        self.actions.interrupt(turn)
        self._resume()  # nothing of the cut turn can play; the next reply must not wait
        self._show()

    def refresh(self) -> None:
        self._show()

    def _show(self, turn: int | None = None) -> None:
        state: AgentStateName
        if self.reply is not None:
            state = "listening" if self.paused else "speaking" if self.audible else "thinking"
        elif not self.user_heard or self.greeting_due:
            state = "initializing"
        else:
            state = "listening"
        shown_turn = self.reply if self.reply is not None else (turn or 0)
        if self.shown is None or self.shown[0] != state:
            self.shown = (state, shown_turn)
            self.actions.show(state, shown_turn)
