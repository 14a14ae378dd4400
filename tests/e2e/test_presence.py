"""A session nobody is in ends, decided by the agent in the room (egress), not by a timer in the
token service: so it holds over a crash of the token service and of the egress replica.

Real livekit-server, nats-server, every stage (two egress replicas) and the token service.
Users join with bare LiveKit clients: presence is about being in the room, not speaking."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import pytest_asyncio
from livekit import rtc

from proto import events as ev
from proto import subjects as sj
from tests.conftest import LogTail
from voicebus.client import Tap
from voicebus.launcher import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

JOIN_GRACE_S = 5
# Long enough for a reload (leave, then join again) on a loaded machine: a LiveKit join has
# taken over a second there.
EMPTY_GRACE_S = 4


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def presence_stack(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("presence")
    logs = LogTail(workdir / "stack.log")
    env = {"VOICEBUS_SESSION_JOIN_GRACE": str(JOIN_GRACE_S),
           "VOICEBUS_SESSION_EMPTY_GRACE": str(EMPTY_GRACE_S)}
    stack = Stack(workdir, sink=logs, livekit=True, replicas={"egress": 2}, env=env)
    stack.logs = logs  # type: ignore[attr-defined]
    await stack.start()
    nc = await stack.connect()
    tap = Tap(nc)
    for room in ("reload", "used", "unused"):
        await tap.watch(sj.session_all(room))
    yield stack, tap
    await tap.close()
    await nc.drain()
    await stack.stop()  # (replicas killed by a test exit with -9: not checked here)


async def _token(stack: Stack, room: str, identity: str = "") -> dict[str, str]:
    async with httpx.AsyncClient(base_url=stack.token_url, timeout=10) as http:
        body = {"room": room, "identity": identity} if identity else {"room": room}
        reply = await http.post("/api/token", json=body)
    assert reply.status_code == 200, reply.text
    return reply.json()


async def _join(grant: dict[str, str]) -> rtc.Room:
    room = rtc.Room()
    await room.connect(grant["url"], grant["token"])
    return room


def _ends(tap: Tap, room: str) -> list[ev.SessionEnd]:
    return tap.of(ev.SessionEnd, room)


async def test_the_last_user_leaving_ends_the_session_and_one_back_in_time_keeps_it(
        presence_stack) -> None:
    stack, tap = presence_stack
    alice = await _join(await _token(stack, "reload", "alice"))
    bob = await _join(await _token(stack, "reload", "bob"))
    await tap.wait_for(lambda: tap.of(ev.StageReady, "reload", stage="egress"), 30, "the agent")
    await alice.disconnect()  # bob stays: nothing ends
    again = await _token(stack, "reload", "bob")
    await bob.disconnect()
    bob = await _join(again)  # a reload: back within the grace
    # Absence can only be shown by waiting: twice the empty grace, with bob back in the room.
    await asyncio.sleep(2 * EMPTY_GRACE_S + 0.5)
    assert _ends(tap, "reload") == []
    left_ns = time.time_ns()  # before the leave: the agent cannot see it any sooner
    await bob.disconnect()
    (end,) = await tap.wait_for(lambda: _ends(tap, "reload"), 20, "the end of the empty room")
    assert end.reason == "room empty" and end.ts_ns > left_ns + EMPTY_GRACE_S * 1e9 * 0.99


async def test_a_token_nobody_uses_ends_its_session_though_token_service_and_agent_died(
        presence_stack) -> None:
    """The token service holds no timers, and the judge's duty moves with its lease: a session
    whose token was never used ends, even with the token service and the owning egress replica
    killed. A used token's session, minted before it, goes on."""
    stack, tap = presence_stack
    used = await _join(await _token(stack, "used", "carol"))
    await _token(stack, "unused")
    token = stack.procs["token"].process
    token.kill()
    await token.wait()
    owner = (await tap.wait_for(lambda: tap.of(ev.StageReady, "unused", stage="egress"), 30,
                                "the agent of the unused room"))[0].replica
    killed_ns = time.time_ns()
    stack.procs[owner].process.kill()
    await stack.procs[owner].process.wait()
    try:
        (end,) = await tap.wait_for(lambda: _ends(tap, "unused"), JOIN_GRACE_S + 30,
                                    "the end of the session nobody joined")
        heir = [r.replica for r in tap.of(ev.StageReady, "unused", stage="egress")][-1]
        assert end.reason == "nobody joined" and end.ts_ns > killed_ns and heir != owner
        assert _ends(tap, "used") == []  # its grace ran out first, but carol is in the room
    finally:
        await used.disconnect()
        await stack.start_token()  # as an orchestrator would
