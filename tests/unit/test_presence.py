"""When an empty room ends its session: after the join grace if no user ever came, after the
empty grace once the last user left, never while a user is back in time, and only once."""

from __future__ import annotations

import asyncio

from services.egress.presence import Presence


class Ends:
    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.changed = asyncio.Event()

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)
        self.changed.set()


async def test_a_session_nobody_joins_ends_after_the_join_grace() -> None:
    ends = Ends()
    presence = Presence(join_grace=0.05, empty_grace=30, end=ends)
    started = asyncio.get_running_loop().time()
    presence.update(0)
    presence.update(0)  # repeated news of an empty room does not restart the grace
    await asyncio.wait_for(ends.changed.wait(), 5)
    assert ends.reasons == ["nobody joined"]
    assert asyncio.get_running_loop().time() - started >= 0.05
    presence.update(0)
    presence.update(1)
    presence.update(0)
    assert presence.ended and presence._timer is None  # ended once, for good


async def test_a_departure_ends_after_the_empty_grace_unless_a_user_is_back() -> None:
    ends = Ends()
    presence = Presence(join_grace=30, empty_grace=0.05, end=ends)
    presence.update(0)  # waiting for the first user, with a long grace…
    presence.update(1)  # …who comes: that wait is over
    presence.update(0)
    presence.update(1)  # back within the grace (a reload)
    await asyncio.sleep(0.1)  # past that grace: nothing may have ended
    assert ends.reasons == []
    presence.update(0)
    await asyncio.wait_for(ends.changed.wait(), 5)
    assert ends.reasons == ["room empty"]


async def test_an_heir_that_knows_a_user_was_here_counts_an_empty_room_as_a_departure() -> None:
    ends = Ends()
    presence = Presence(join_grace=30, empty_grace=0.01, end=ends, seen=True)
    presence.update(0)
    await asyncio.wait_for(ends.changed.wait(), 5)
    assert ends.reasons == ["room empty"]
    presence.cancel()
