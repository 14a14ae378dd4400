"""Session leases against a real nats-server: a replica whose own lease lapsed while it was
starved takes it back however the key changed meanwhile, and refuses it only when another
replica's lease is there to see."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError

from services.runtime.bus import Bus
from services.runtime.leases import PREFIX, STREAM, Leases

SESSION = "leased"


async def _marker_of(bus: Bus, key: str) -> Any:
    """The server's expiry marker of ``key``, once its lease has lapsed (a lease lives 1 s)."""
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
    """The replica reads the marker, stalls past the marker's own second of life, then writes
    over a revision that is gone. Nobody holds the key: the lease is its own again (it used to
    conclude "another replica holds the lease" and drop the session)."""
    _, nc, _ = bare_stack
    bus = Bus(nc, "llm")
    leases = Leases(bus, "llm", "llm-a", ttl=1)
    await leases.open()
    key = leases.key(SESSION)
    revision = await leases.acquire(SESSION)
    marker = await _marker_of(bus, key)  # starved: no renewal came, and the lease lapsed

    publish = bus.js.publish

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
        return await publish(subject, payload, **options)

    bus.js.publish = stall_then_publish  # type: ignore[method-assign]
    with pytest.raises(KeyWrongLastSequenceError):
        await leases.refresh(SESSION, revision)  # the renewal finds the marker, not its lease
    taken = await leases.acquire(SESSION)
    bus.js.publish = publish  # type: ignore[method-assign]
    assert taken > revision
    assert await leases.holder("llm", SESSION) == "llm-a"


async def test_another_replicas_lease_is_refused_and_named(bare_stack):
    _, nc, _ = bare_stack
    bus = Bus(nc, "llm")
    mine, theirs = Leases(bus, "llm", "llm-a", ttl=1), Leases(bus, "llm", "llm-b", ttl=1)
    await mine.open()
    await theirs.open()
    first = await mine.acquire(SESSION)
    assert await mine.acquire(SESSION) == first  # ours already: taken as it is
    await _marker_of(bus, mine.key(SESSION))
    await theirs.acquire(SESSION)  # the heir took it over the marker
    with pytest.raises(KeyWrongLastSequenceError, match="held by 'llm-b'"):
        await mine.acquire(SESSION)
    assert await mine.holder("llm", SESSION) == "llm-b"
