"""The turn ledger: one stage's book of a session's turns, the same for every stage.

A turn is opened once, in increasing order, and closed once: work for a turn that is older than
the newest one seen, cut, or implausibly far ahead never starts. ``cancel`` cuts every turn up
to one, for good. ``settled`` is set while no turn is in flight: a replica hands a session over
only then.

Turn numbers are bounded: a turn may open at most ``MAX_AHEAD`` past the newest one the ledger
knows, and a cancel may reach no further. A forged or corrupt turn number (``turn=1000000``)
is refused instead of making every genuine turn after it look stale. A new replica seeds its
ledger from the judge's ``FloorRecord`` in KV, so the bound holds across handovers too.
"""

from __future__ import annotations

import asyncio

import msgspec

# Turns that may open past the newest one known: finals lost on the way, never a leap.
MAX_AHEAD = 8
# Where the judge keeps its record: the session state bucket, key "<session>.floor".
STATE_BUCKET = "voicebus_sessions"


class FloorRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the judge of turn-taking knows, kept in KV after every decision so that another
    replica can carry the session on: the newest turn judged, the newest cut, whether the
    greeting is over, the reply holding the floor (-1: none), the goodbye that ends the
    session once heard (-1: none), and the answer being prepared before its turn is certain
    (its turn, -1: none, and the words it answers)."""

    judged: int = -1
    cut: int = -1
    greeted: bool = False
    reply: int = -1
    goodbye: int = -1
    # Why the goodbye ends the session: the user stayed silent (empty), or the agent hung up.
    goodbye_reason: str = ""
    draft: int = -1
    draft_text: str = ""
    # In a room where only turns addressed to the agent are answered: the person it answers or
    # answered last, and the ms left of their follow-up when written (-1: still answering), so
    # the conversation goes on without the name across a handover. ``written_ms``: when the
    # record was written (wall clock, ms since the epoch), for the time run on since.
    partner: str = ""
    follow_up_ms: int = -1
    written_ms: int = 0


def aged(record: FloorRecord, now_ms: int) -> FloorRecord:
    """``record`` as it stands at ``now_ms`` (wall clock): the follow-up time it kept has run
    on since it was written."""
    if record.follow_up_ms <= 0 or not record.written_ms:
        return record
    left = max(0, record.follow_up_ms - max(0, now_ms - record.written_ms))
    return msgspec.structs.replace(record, follow_up_ms=left)


def floor_key(session: str) -> str:
    return f"{session}.floor"


RECORD_CODEC = (msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(FloorRecord))


class TurnLedger:
    def __init__(self, newest: int = -1, cut: int = -1) -> None:
        self.newest = newest  # the highest turn opened or passed over
        self.cut = cut  # every turn <= cut is cancelled
        self.open_turns: set[int] = set()
        self.settled = asyncio.Event()
        self.settled.set()

    @classmethod
    def from_record(cls, record: FloorRecord) -> TurnLedger:
        """The judge's own ledger, as it left it."""
        return cls(newest=record.judged, cut=record.cut)

    @classmethod
    def following(cls, record: FloorRecord) -> TurnLedger:
        """The ledger of a stage that acts on the judge's decisions: the newest judged turn may
        still be on its way to this stage, so it can still open."""
        return cls(newest=record.judged - 1, cut=record.cut)

    def admits(self, turn: int) -> bool:
        """Whether ``turn`` is within reach: not beyond ``MAX_AHEAD`` past the newest known."""
        return turn <= max(self.newest, 0) + MAX_AHEAD

    def is_cut(self, turn: int) -> bool:
        return turn <= self.cut

    def is_open(self, turn: int) -> bool:
        return turn in self.open_turns

    def open(self, turn: int) -> bool:
        """Open ``turn`` if it is new, not cut and within reach; False otherwise."""
        if turn <= self.newest or self.is_cut(turn) or not self.admits(turn):
            return False
        self.newest = turn
        self.open_turns.add(turn)
        self.settled.clear()
        return True

    def begin(self, turn: int) -> bool:
        """Whether work of ``turn`` may go on: it is open, or it opens now."""
        return (turn in self.open_turns and not self.is_cut(turn)) or self.open(turn)

    def pass_over(self, turn: int) -> bool:
        """``turn`` has no work here (ignored, or cut before it began): later events of it, or
        of any older turn, are stale. True if this is the first the ledger hears of it (so a
        stage that must still close it knows to do so, once)."""
        if turn <= self.newest or not self.admits(turn):
            return False
        self.newest = turn
        return True

    def close(self, turn: int) -> bool:
        """The turn's work is over (done, failed or cut). True the first time only."""
        if turn not in self.open_turns:
            return False
        self.open_turns.discard(turn)
        if not self.open_turns:
            self.settled.set()
        return True

    def cancel(self, turn: int) -> bool:
        """Cut every turn <= ``turn``; False (nothing changes) if ``turn`` is out of reach."""
        if not self.admits(turn):
            return False
        self.cut = max(self.cut, turn)
        return True

    def __repr__(self) -> str:
        return f"TurnLedger(newest={self.newest}, cut={self.cut}, open={sorted(self.open_turns)})"
