"""A half-open connection with a real nats-server (services/runtime/bus.py, ``HalfOpen``).

nats-server sends a PING of its own two seconds after a client's CONNECT. A client whose own
PING comes later than that (a process stalled on a loaded machine) reads the server's PING where
it waits for the PONG. Here a proxy between nats-py and the server holds the client's first PING
of the first connection until the server's PING has passed, which is that stall, made certain."""

from __future__ import annotations

import asyncio
import contextlib

import nats

from proto.permissions import inbox_prefix
from services.runtime import bus


class StallingProxy:
    """TCP proxy to nats-server. On its first connection, the client's first PING is held
    until the server has sent a PING of its own."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"nats://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *_exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        stall = self.connections == 0
        self.connections += 1
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
            if stall:
                while (line := await client_r.readline()) and line != b"PING\r\n":
                    server_w.write(line)
                    await server_w.drain()
                await server_pinged.wait()
                server_w.write(line)
            while data := await client_r.read(65536):
                server_w.write(data)
                await server_w.drain()
            server_w.close()

        for pump in (down(), up()):
            task = asyncio.create_task(pump)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)


async def _quiet(_exc: Exception) -> None:
    return None


def _options(stack) -> dict:
    # connect_timeout: nats-py's wait for the handshake's answer must outlast the server's 2 s
    return {"nkeys_seed": str(stack.seed_file("operator")), "inbox_prefix": inbox_prefix("operator"),
            "allow_reconnect": False, "connect_timeout": 10, "error_cb": _quiet}


async def test_a_stalled_handshake_leaves_nats_py_not_connected(bare_stack) -> None:
    """The premise, with the real server: if this fails, nats-py or nats-server changed."""
    stack, _, _ = bare_stack
    async with StallingProxy(stack.nats_port) as url:
        nc = await nats.connect(url, **_options(stack))
        try:
            assert not nc.is_connected
        finally:
            await nc.close()


async def test_a_stalled_handshake_is_made_again_and_the_connection_carries(bare_stack) -> None:
    stack, watcher, _ = bare_stack
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_msg(msg) -> None:
        await got.put(msg.data)

    await watcher.subscribe("voice.s1.stt.final", cb=on_msg)
    await watcher.flush()
    proxy = StallingProxy(stack.nats_port)
    async with proxy as url:
        nc = await bus.connect(url, **_options(stack))
        try:
            assert nc.is_connected and proxy.connections == 2
            await nc.publish("voice.s1.stt.final", b"heard")
            assert await asyncio.wait_for(got.get(), 10) == b"heard"
        finally:
            with contextlib.suppress(Exception):
                await nc.close()
