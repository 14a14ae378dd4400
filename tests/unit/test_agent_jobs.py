"""The agent's room updates go out in order, one at a time; a session's end waits for the last
of them (its goodbye's final transcript) before it takes the agent out of the room."""

import asyncio
import time

from livekit import rtc

from services.egress.agent import AgentParticipant
from services.runtime.livekit import LiveKitConfig


class _Room:
    """What the job queue reads of a room: whether it is connected."""

    def __init__(self) -> None:
        self.connection_state = rtc.ConnectionState.CONN_CONNECTED

    async def disconnect(self) -> None:
        self.connection_state = rtc.ConnectionState.CONN_DISCONNECTED


def _agent() -> AgentParticipant:
    agent = AgentParticipant(LiveKitConfig(), "jobs")
    agent.room = _Room()  # type: ignore[assignment]
    agent._worker = asyncio.create_task(agent._run_jobs())
    return agent


async def test_flush_waits_for_what_was_submitted_before_it():
    agent = _agent()
    release = asyncio.Event()
    done: list[str] = []

    async def slow(name: str) -> None:
        await release.wait()
        done.append(name)

    agent.submit(lambda: slow("goodbye"))
    agent.submit(lambda: slow("final"))
    flushing = asyncio.create_task(agent.flush())
    await asyncio.sleep(0)  # the flush is waiting
    assert not flushing.done() and done == []
    release.set()
    await asyncio.wait_for(flushing, 5)
    assert done == ["goodbye", "final"]
    await agent.aclose()


async def test_flush_is_not_held_by_a_failing_or_skipped_job():
    agent = _agent()

    async def broken() -> None:
        raise RuntimeError("room hiccup")

    for state in (rtc.ConnectionState.CONN_CONNECTED, rtc.ConnectionState.CONN_DISCONNECTED):
        agent.room.connection_state = state  # out of the room, a job is skipped
        agent.submit(broken)
        started = time.monotonic()
        await agent.flush(timeout=10)
        assert time.monotonic() - started < 5  # done, not given up on
    await agent.aclose()


async def test_flush_of_an_agent_never_started_or_closed_returns_at_once():
    agent = AgentParticipant(LiveKitConfig(), "jobs")
    await asyncio.wait_for(agent.flush(), 1)  # no worker: nothing will ever go out
    agent = _agent()
    await agent.aclose()
    agent.submit(lambda: asyncio.sleep(0))  # after the close: nothing will ever run it
    await asyncio.wait_for(agent.flush(), 1)
