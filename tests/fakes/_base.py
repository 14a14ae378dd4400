"""What every vendor fake shares: an aiohttp server on a free port, and its failure injection.

A fake subclasses ``FakeServer``, returns its endpoints from ``routes()`` and declares the faults
it can inject as the fields of its own ``Faults`` dataclass (a subclass of ``BaseFaults``), with
what they mean for that vendor. The setters here refuse a fault the fake's ``Faults`` lacks: a
test cannot inject a failure that the fake would silently ignore.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class BaseFaults:
    status: int | None = None
    # How many more requests (or handshakes) get ``status``; None means all of them.
    status_times: int | None = None


class FakeServer:
    Faults: ClassVar[type[BaseFaults]] = BaseFaults

    def __init__(self, api_key: str = "test-key", *, host: str = "127.0.0.1") -> None:
        self.api_key = api_key
        self.host = host
        self.faults = self.Faults()
        self.port = 0
        # Set when a client stopped an answer before its end: it hung up while the answer was
        # still owed (stalled, held or mid-body), or, where the protocol has one, cancelled it.
        self.stopped = asyncio.Event()
        self.streams_completed = 0  # streamed bodies (``_stream``) that reached their end
        self._runner: web.AppRunner | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    def routes(self) -> list[web.RouteDef]:
        raise NotImplementedError

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> Self:
        """Serve on a free port of ``host`` (then in ``port``)."""
        app = web.Application()
        app.add_routes(self.routes())
        # handler_cancellation: a client that hangs up cancels its handler, which is how the
        # fake notices an early close even while it is holding or stalling.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0,
                                     access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, 0).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        # Handlers still holding or stalling would otherwise keep the shutdown waiting.
        for task in list(self._handlers):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return self if self._runner is not None else await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def address(self, scheme: str, path: str = "") -> str:
        return f"{scheme}://{self.host}:{self.port}{path}"

    # -- failure injection ----------------------------------------------------------------------

    def reset(self) -> None:
        """No more faults."""
        self.faults = self.Faults()

    def fail_with_status(self, status: int, *, times: int | None = None) -> None:
        """Refuse the next ``times`` requests (all, if None) with ``status`` and the vendor's
        error JSON, before any answer."""
        self.faults.status, self.faults.status_times = status, times

    def stall(self, seconds: float = math.inf) -> None:
        """Hold the answer back ``seconds`` (by default until the client gives up)."""
        self._set_fault("stall", seconds)

    def stall_handshake(self, seconds: float = math.inf) -> None:
        """Hold the WebSocket upgrade back ``seconds`` (by default until the client gives up)."""
        self._set_fault("stall_handshake", seconds)

    def disconnect_after(self, count: int) -> None:
        """Drop the connection, without ending the answer, after ``count`` of its pieces."""
        self._set_fault("disconnect_after", count)

    def malformed_after(self, count: int) -> None:
        """Send something the vendor's protocol cannot parse after ``count`` pieces."""
        self._set_fault("malformed_after", count)

    def hold_after(self, count: int) -> None:
        """Stop after ``count`` pieces and keep the answer open until the client leaves, so a
        test can prove that closing early really closes the connection."""
        self._set_fault("hold_after", count)

    def malformed(self) -> None:
        """Answer 200 with a body that is not what the client asked for."""
        self._set_fault("malformed", True)

    def _set_fault(self, fault: str, value: object) -> None:
        if not hasattr(self.faults, fault):
            raise TypeError(f"{type(self).__name__} cannot inject {fault}")
        setattr(self.faults, fault, value)

    # -- for the endpoints ----------------------------------------------------------------------

    def _take_status(self) -> int | None:
        """The status this request is to fail with, if any (counting it against ``times``)."""
        faults = self.faults
        if faults.status is None or faults.status_times == 0:
            return None
        if faults.status_times is not None:
            faults.status_times -= 1
        return faults.status

    async def _stream(self, request: web.Request, headers: dict[str, str],
                      write: Callable[[web.StreamResponse], Awaitable[bool]]) -> web.StreamResponse:
        """A streamed answer: ``write`` writes the body (False: a fault cut it short), then the
        body is ended. A client that hangs up mid-body is noted in ``stopped``."""
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        try:
            if await write(response):
                await response.write_eof()
                self.streams_completed += 1
        except ConnectionResetError:
            self.stopped.set()
        return response

    def _watched(self, handler: Handler) -> Handler:
        """``handler``, noting in ``stopped`` a client that hangs up mid-answer (which cancels
        the handler), and cancelled by ``close()`` if still running."""

        async def watched(request: web.Request) -> web.StreamResponse:
            task = asyncio.current_task()
            assert task is not None
            self._handlers.add(task)
            try:
                return await handler(request)
            except asyncio.CancelledError:
                self.stopped.set()
                raise
            finally:
                self._handlers.discard(task)

        return watched


async def pause(seconds: float) -> None:
    """Wait ``seconds``; for ever (until the client hangs up and cancels us) if infinite."""
    if seconds:
        await asyncio.sleep(seconds)


async def hold() -> None:
    """Wait until the client hangs up and the handler is cancelled."""
    await asyncio.Event().wait()


def drop(request: web.Request) -> None:
    """Break the connection mid-answer, without a proper end."""
    assert request.transport is not None
    request.transport.close()  # flushes what was written, then drops the connection
