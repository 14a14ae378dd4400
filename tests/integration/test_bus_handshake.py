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
from tests.fakes.nats_wire import StallingProxy


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
