"""Session leases against a real nats-server: a replica whose own lease lapsed while it was
starved takes it back however the key changed meanwhile, and refuses it only when another
replica's lease is there to see."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from nats.js import api
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError

from services.runtime.bus import Bus
from services.runtime.leases import LEASE_BUCKET, PREFIX, STREAM, Leases

SESSION = "leased"
# The server's expiry markers live this long here (1 s in production, MARKER_TTL): long enough
# for this test to see one on a loaded machine. What a claim does with one is the same.
MARKER_TTL_S = 3


async def _bus(nc) -> Bus:
    bus = Bus(nc, "llm")
    await nc.jetstream().create_key_value(config=api.KeyValueConfig(
        bucket=LEASE_BUCKET, history=1, limit_marker_ttl=MARKER_TTL_S))
    return bus


async def _marker_of(bus: Bus, key: str) -> Any:
    """The server's expiry marker of ``key``, once its 1 s lease has lapsed."""
    async with asyncio.timeout(10):
        while True:
            try:
                last = await bus.js.get_msg(STREAM, subject=PREFIX + key)
            except NotFoundError:
                last = None
            if last is not None and (last.headers or {}).get("Nats-Marker-Reason"):
                return last
            await asyncio.sleep(0.05)


async def test_a_lapsed_lease_is_taken_back_when_its_marker_expires_mid_claim(bare_stack):
    """The replica reads the marker, stalls past the marker's own life, then writes over a
    revision that is gone. Nobody holds the key: the lease is its own again (it used to
    conclude "another replica holds the lease" and drop the session)."""
    _, nc, _ = bare_stack
    bus = await _bus(nc)
    leases = Leases(bus, "llm", "llm-a", ttl=1)
    await leases.open()
    key = leases.key(SESSION)
    revision = await leases.acquire(SESSION)
    marker = await _marker_of(bus, key)  # starved: no renewal came, and the lease lapsed

    publish = bus.js.publish
    stalled = asyncio.Event()

    async def stall_then_publish(subject: str, payload: bytes, **options: Any) -> Any:
        expected = (options.get("headers") or {}).get("Nats-Expected-Last-Subject-Sequence")
        if expected == str(marker.seq):  # about to write over the marker: stalled till it is gone
            async with asyncio.timeout(10):
                while True:
                    try:
                        await bus.js.get_msg(STREAM, subject=PREFIX + key)
                    except NotFoundError:
                        break
                    await asyncio.sleep(0.05)
            stalled.set()
        return await publish(subject, payload, **options)

    bus.js.publish = stall_then_publish  # type: ignore[method-assign]
    with pytest.raises(KeyWrongLastSequenceError):
        await leases.refresh(SESSION, revision)  # the renewal finds the marker, not its lease
    leases.ttl = 30  # what it takes back lives while the test looks at it
    taken = await leases.acquire(SESSION)
    bus.js.publish = publish  # type: ignore[method-assign]
    assert stalled.is_set()  # the claim did write over a marker that was gone
    assert taken > revision
    assert await leases.holder("llm", SESSION) == "llm-a"


async def test_another_replicas_lease_is_refused_and_named(bare_stack):
    _, nc, _ = bare_stack
    bus = await _bus(nc)
    mine, theirs = Leases(bus, "llm", "llm-a", ttl=1), Leases(bus, "llm", "llm-b", ttl=30)
    await mine.open()
    await theirs.open()
    first = await mine.acquire(SESSION)
    await _marker_of(bus, mine.key(SESSION))
    await theirs.acquire(SESSION)  # the heir took it over the marker
    mine.ttl = 30
    with pytest.raises(KeyWrongLastSequenceError, match="held by 'llm-b'"):
        await mine.acquire(SESSION)
    assert await mine.holder("llm", SESSION) == "llm-b"
    held = await theirs.acquire(SESSION)  # its own already: taken as it is, no new revision
    assert held > first and await theirs.acquire(SESSION) == held


async def test_a_late_release_leaves_the_successors_lease_alone(bare_stack):
    """A release held up past its lease's life (a JetStream election; the stage waits for it
    no longer than the TTL) lands after another replica took the key over the marker: it must
    not delete that lease, which would let a third replica take the session too."""
    _, nc, _ = bare_stack
    bus = await _bus(nc)
    mine, theirs = Leases(bus, "llm", "llm-a", ttl=1), Leases(bus, "llm", "llm-b", ttl=30)
    await mine.open()
    await theirs.open()
    await mine.acquire(SESSION)
    await _marker_of(bus, mine.key(SESSION))
    await theirs.acquire(SESSION)
    await mine.release(SESSION)  # late: the session is theirs now
    assert await mine.holder("llm", SESSION) == "llm-b"
    await theirs.release(SESSION)  # their own: deleted
    assert await mine.holder("llm", SESSION) is None
