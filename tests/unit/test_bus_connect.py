"""A connection is whole before anyone uses it (services/runtime/bus.py, ``HalfOpen``).

When the server's PING reaches nats-py before the PONG it waits for (tests/fakes/nats_wire.py
says when), nats-py returns a connection it never marks connected and holds everything sent on
it. The server here speaks NATS's client protocol with those two lines in the order the test
chooses; tests/integration/test_bus_handshake.py does it with a real nats-server."""

from __future__ import annotations

import asyncio

import nats
import pytest

from services.runtime import bus
from services.runtime.bus import Bus, HalfOpen
from tests.fakes.nats_wire import HandshakeServer


async def _quiet(_exc: Exception) -> None:
    return None


OPTIONS = {"allow_reconnect": False, "connect_timeout": 2, "error_cb": _quiet}


async def test_nats_py_alone_returns_a_connection_it_never_marks_connected() -> None:
    """Why the guard exists: if this starts failing, nats-py has fixed its handshake."""
    async with HandshakeServer(early=1) as url:
        nc = await nats.connect(url, **OPTIONS)
        try:
            assert not nc.is_connected
        finally:
            await nc.close()


async def test_a_half_open_connection_is_closed_and_made_again() -> None:
    fake = HandshakeServer(early=1)
    async with fake as url:
        nc = await bus.connect(url, **OPTIONS)
        try:
            assert nc.is_connected
            await nc.publish("voice.s1.stt.final", b"x")
            await asyncio.wait_for(fake.heard.wait(), 10)
            await asyncio.wait_for(fake.closed[0].wait(), 10)  # the half-open one, closed
            assert fake.connections == 2
            assert "PUB" in fake.lines[1] and "PUB" not in fake.lines[0]
        finally:
            await nc.close()


async def test_a_stage_never_starts_on_a_half_open_connection() -> None:
    fake = HandshakeServer(early=1)
    async with fake as url:
        stage_bus = await Bus.connect(url, "stt", "voicebus-test")
        try:
            assert stage_bus.nc.is_connected
            await stage_bus.nc.subscribe("voice.*.ingress.audio")
            await asyncio.wait_for(fake.heard.wait(), 10)
            assert fake.connections == 2 and "SUB" in fake.lines[1]
        finally:
            await stage_bus.nc.close()


async def test_a_server_that_always_pings_first_is_an_error_not_a_silent_connection() -> None:
    fake = HandshakeServer(early=99)
    async with fake as url:
        with pytest.raises(HalfOpen, match="PING came before its PONG"):
            await bus.connect(url, attempts=2, **OPTIONS)
        assert fake.connections == 2
        await asyncio.wait_for(asyncio.gather(*(c.wait() for c in fake.closed)), 10)
