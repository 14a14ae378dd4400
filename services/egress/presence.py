"""Who is in the room: a session nobody joined, or whose last user left, ends.

The agent in the room sees users come and go as facts (livekit-server tells every participant),
so the judge in egress decides the end of an empty session, and its lease carries that duty
over a crash like any other. The token service keeps no timers: a token replica that dies
loses nothing.

A token dispatches the agent before the user joins, so a session first waits
``join_grace`` seconds for a user ("nobody joined"). A user who leaves may be reloading the
page or crossing a network blip, so the session then waits ``empty_grace`` seconds for a user
to be back ("room empty").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Presence:
    """Counts the users present and ends the session when the room stays without one."""

    def __init__(self, join_grace: float, empty_grace: float, end: Callable[[str], None], *,
                 seen: bool = False) -> None:
        self.join_grace = join_grace
        self.empty_grace = empty_grace
        self.end = end
        self.seen = seen  # a user was here once (so a departure is "room empty")
        self.ended = False
        self._timer: asyncio.TimerHandle | None = None

    def update(self, users: int) -> None:
        """The room now holds ``users`` users (the agent and ingress not counted)."""
        if self.ended:
            return
        if users:
            self.seen = True
            self.cancel()
        elif self._timer is None:
            grace, reason = ((self.empty_grace, "room empty") if self.seen
                             else (self.join_grace, "nobody joined"))
            self._timer = asyncio.get_running_loop().call_later(grace, self._expire, reason)

    def _expire(self, reason: str) -> None:
        self._timer = None
        self.ended = True
        self.end(reason)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
