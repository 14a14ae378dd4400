"""A connection is whole before anyone uses it (services/runtime/bus.py, ``HalfOpen``).

nats-server sends a PING of its own two seconds after a client's CONNECT. When the client's
PING comes later than that (a stalled process on a loaded machine), the server's PING reaches
nats-py before the PONG it waits for, and nats-py returns a connection it never marks connected
and holds everything sent on it. (A real nats-server does this: send CONNECT, wait 2.6 s, send
PING, and "PING" is the first line back.) The server here is a small fake speaking NATS's client
protocol, so the order of those two lines can be chosen without waiting."""

from __future__ import annotations

import asyncio
import json

import nats
import pytest

from services.runtime import bus
from services.runtime.bus import Bus, HalfOpen

INFO = {"server_id": "FAKE", "version": "2.12.0", "proto": 1, "headers": True,
        "max_payload": 1 << 20}


class FakeServer:
    """Answers the handshake of the first ``early`` connections with its PING before its
    PONG, and the others in the usual order; records what each connection sends."""

    def __init__(self, early: int) -> None:
        self.early = early
        self.connections = 0
        self.lines: list[list[str]] = []  # per connection: the protocol lines it sent
        self.closed: list[asyncio.Event] = []
        self.heard = asyncio.Event()  # a PUB or SUB after the handshake
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"nats://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *_exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        self.lines.append([])
        self.closed.append(asyncio.Event())
        writer.write(f"INFO {json.dumps(INFO)}\r\n".encode())
        handshake = True
        try:
            while line := await reader.readline():
                op, _, args = line.decode().rstrip("\r\n").partition(" ")
                self.lines[index].append(op)
                if op == "PING" and handshake:
                    handshake = False
                    writer.write(b"PING\r\nPONG\r\n" if index < self.early else b"PONG\r\n")
                elif op == "PING":
                    writer.write(b"PONG\r\n")
                elif op in ("PUB", "HPUB"):
                    await reader.readexactly(int(args.split()[-1]) + 2)  # payload and CRLF
                    self.heard.set()
                elif op == "SUB":
                    self.heard.set()
                await writer.drain()
        finally:
            self.closed[index].set()
            writer.close()


async def _quiet(_exc: Exception) -> None:
    return None


OPTIONS = {"allow_reconnect": False, "connect_timeout": 2, "error_cb": _quiet}


async def test_nats_py_alone_returns_a_connection_it_never_marks_connected() -> None:
    """Why the guard exists: if this starts failing, nats-py has fixed its handshake."""
    async with FakeServer(early=1) as url:
        nc = await nats.connect(url, **OPTIONS)
        try:
            assert not nc.is_connected
        finally:
            await nc.close()


async def test_a_half_open_connection_is_closed_and_made_again() -> None:
    fake = FakeServer(early=1)
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
    fake = FakeServer(early=1)
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
    fake = FakeServer(early=99)
    async with fake as url:
        with pytest.raises(HalfOpen, match="PING came before its PONG"):
            await bus.connect(url, attempts=2, **OPTIONS)
        assert fake.connections == 2
        await asyncio.wait_for(asyncio.gather(*(c.wait() for c in fake.closed)), 10)
