"""NATS's client protocol, on the wire, for the handshake tests (services/runtime/bus.py,
``HalfOpen``): a server that answers the handshake in an order chosen by the test, and a proxy to
a real nats-server that holds the client's PING until the server's own has passed.

nats-server sends a PING of its own two seconds after a client's CONNECT. When the client's PING
comes later than that (a stalled process on a loaded machine), the server's PING reaches the
client before the PONG it waits for."""

from __future__ import annotations

import asyncio
import json
from typing import Any

INFO = {"server_id": "FAKE", "version": "2.12.0", "proto": 1, "headers": True,
        "max_payload": 1 << 20}


class _Listener:
    """A TCP server on a free local port, as an async context giving its nats:// URL."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return f"nats://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *_exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        await self.serve(index, reader, writer)

    def spawn(self, work: Any) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def serve(self, index: int, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class HandshakeServer(_Listener):
    """Answers the handshake of the first ``early`` connections with its PING before its
    PONG, and the others in the usual order; records what each connection sends."""

    def __init__(self, early: int) -> None:
        super().__init__()
        self.early = early
        self.lines: list[list[str]] = []  # per connection: the protocol lines it sent
        self.closed: list[asyncio.Event] = []
        self.heard = asyncio.Event()  # a PUB or SUB after the handshake

    async def serve(self, index: int, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
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


class StallingProxy(_Listener):
    """TCP proxy to the nats-server on ``port``. On its first connection, the client's first
    PING is held until the server has sent a PING of its own: that stall, made certain."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port

    async def serve(self, index: int, client_r: asyncio.StreamReader,
                    client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.port)
        server_pinged = asyncio.Event()

        async def down() -> None:  # server to client, as it comes
            while data := await server_r.read(65536):
                if b"PING\r\n" in data:
                    server_pinged.set()
                client_w.write(data)
                await client_w.drain()
            client_w.close()

        async def up() -> None:  # client to server; the handshake's PING may wait
            if index == 0:
                while (line := await client_r.readline()) and line != b"PING\r\n":
                    server_w.write(line)
                    await server_w.drain()
                await server_pinged.wait()
                server_w.write(line)
            while data := await client_r.read(65536):
                server_w.write(data)
                await server_w.drain()
            server_w.close()

        self.spawn(down())
        self.spawn(up())
