"""Serve tools on the bus (the contract: ``proto/tools.py``; the guide: ``docs/tools.md``).

``serve(nc, group, tools)`` adds one nats.micro service, ``voicebus-tools-<group>``, with one
endpoint per tool on ``tools.<name>`` in the queue group ``tools`` and the tool's spec as the
endpoint's metadata: ``$SRV.INFO`` then tells the LLM stage everything it needs. A handler
takes the ``ToolRequest`` and returns any JSON value; it fails with ``ToolError`` (a message
the model hears, and a code), and anything else it raises is a 500 whose traceback stays in
this process's log.

Every call runs in a task of its own: nats-py gives a subscription's messages to its callback
one at a time, so a handler awaited there would make one slow call hold up every other call of
that tool on this replica.

``ToolProcess`` is the rest of a tool process, the stages' skeleton in small: configuration
from the environment, logs, metrics, the bus as the role ``tool``, and on SIGTERM stop taking
calls, let the calls under way end, ``drain()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from nats import micro
from nats.aio.client import Client
from prometheus_client import Counter, Histogram

import proto
from proto import tools as tl
from services.runtime import metrics
from services.runtime.bus import Bus, Stopped
from services.runtime.config import BaseConfig
from services.runtime.errors import ConfigError
from services.runtime.logs import Throttle, held_back, setup_logging

log = logging.getLogger("voicebus.tools")

VERSION = "0.1.0"
ROLE = "tool"  # the bus role of every tool process, and its label in metrics and logs

# The serving side's numbers (the LLM stage counts its calls as voicebus_tool_calls).
TOOL_ANSWERS = Counter("voicebus_tool_answers", "Calls a tool process answered, by outcome (ok, "
                       "error: the tool said no, failed: a bug, timeout, cancelled)",
                       ["tool", "outcome"])
TOOL_SECONDS = Histogram("voicebus_tool_answer_seconds", "Time a tool took to answer a call",
                         ["tool"],
                         buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))

_throttle = Throttle()


class ToolError(Exception):
    """A failure the model should hear about: ``message`` goes to the caller as it is (short,
    in words, no secrets), with micro's error ``code`` (400 bad arguments, 404 not found, 503
    unavailable…)."""

    def __init__(self, message: str, code: int = 400) -> None:
        super().__init__(message)
        self.code = code


Handler = Callable[[tl.ToolRequest], Awaitable[Any]]


@dataclass(frozen=True)
class Tool:
    """A tool: what the model is told (``spec``) and what runs (``handler``). A handler
    usually starts with ``msgspec.convert(request.arguments, MyArguments)``: arguments that do
    not fit become a 400 with msgspec's words for what is wrong."""

    spec: tl.ToolSpec
    handler: Handler


def _one_line(text: str, limit: int = 400) -> str:
    """Error text for a header: one line (a newline would break NATS's header block), bounded."""
    return " ".join(text.split())[:limit] or "error"


class ToolServer:
    """The running micro service of one process; ``stop`` ends it gracefully."""

    def __init__(self, service: micro.Service) -> None:
        self.service = service
        self._calls: set[asyncio.Task[None]] = set()

    def endpoint(self, tool: Tool) -> micro.Handler:
        async def on_request(request: micro.Request) -> None:
            task = asyncio.create_task(self._answer(tool, request),
                                       name=f"tool:{tool.spec.name}")
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

        return on_request

    async def _answer(self, tool: Tool, request: micro.Request) -> None:
        name = tool.spec.name
        try:
            call = msgspec.json.decode(request.data, type=tl.ToolRequest)
        except msgspec.ValidationError as exc:  # (a DecodeError too: first)
            await self._refuse(request, name, "bad_request", f"not a tool request: {exc}")
            return
        except msgspec.DecodeError as exc:
            await self._refuse(request, name, "bad_json", f"the request is not JSON: {exc}")
            return
        started = time.perf_counter()
        try:
            body = await self._run(tool, call)
        except ToolError as exc:
            TOOL_ANSWERS.labels(name, _outcome(exc.code)).inc()
            await _reply_error(request, exc.code, str(exc))
        except asyncio.CancelledError:  # stopped after the grace: the caller hears it now
            TOOL_ANSWERS.labels(name, "cancelled").inc()
            await _reply_error(request, 503, f"{name} was stopped before it finished")
            raise
        else:
            TOOL_ANSWERS.labels(name, "ok").inc()
            await _reply(request, body)
        finally:
            TOOL_SECONDS.labels(name).observe(time.perf_counter() - started)

    async def _run(self, tool: Tool, call: tl.ToolRequest) -> bytes:
        """The handler's result as JSON, or ``ToolError`` for every way it can fail."""
        name, limit_ms = tool.spec.name, tool.spec.timeout_ms
        context = {"stage": ROLE, "session": call.session}
        timeout = asyncio.timeout(limit_ms / 1000)
        try:
            async with timeout:
                result = await tool.handler(call)
            return msgspec.json.encode(result)
        except ToolError as exc:
            log.info("%s (call %s): %s %s", name, call.call_id, exc.code, _one_line(str(exc)),
                     extra=context)
            raise
        except msgspec.ValidationError as exc:
            log.info("%s (call %s): bad arguments: %s", name, call.call_id, exc, extra=context)
            raise ToolError(f"bad arguments: {exc}", 400) from None
        except TimeoutError:
            if not timeout.expired():  # the tool's own (a backend it waited for), not ours
                log.exception("%s (call %s) failed", name, call.call_id, extra=context)
                raise ToolError(f"{name} failed (a timeout inside the tool)", 500) from None
            log.warning("%s (call %s) overran its %d ms: cancelled", name, call.call_id,
                        limit_ms, extra=context)
            raise ToolError(f"{name} took longer than {limit_ms} ms", 504) from None
        except Exception as exc:  # a bug or an outage: details in our log, not to the model
            log.exception("%s (call %s) failed", name, call.call_id, extra=context)
            raise ToolError(f"{name} failed ({type(exc).__name__})", 500) from None

    async def _refuse(self, request: micro.Request, name: str, reason: str, detail: str) -> None:
        """A request that is not a call: counted, logged once per burst, answered with 400."""
        metrics.REJECTED.labels(ROLE, reason).inc()
        held = _throttle.allow(reason)
        if held is not None:
            log.warning("refused a call of %s: %s%s", name, detail[:200], held_back(held),
                        extra={"stage": ROLE})
        await _reply_error(request, 400, detail)

    async def stop(self, grace: float) -> None:
        """Stop taking calls (the endpoints and discovery go), then give the calls under way
        ``grace`` seconds to answer; those still running are cancelled, and say so."""
        await self.service.stop()
        if self._calls:
            log.info("waiting for %d call(s) under way", len(self._calls), extra={"stage": ROLE})
            _done, running = await asyncio.wait(set(self._calls), timeout=grace)
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)


def _outcome(code: int) -> str:
    return {500: "failed", 504: "timeout"}.get(code, "error")


async def _reply(request: micro.Request, body: bytes) -> None:
    try:
        await request.respond(body)
    except Exception as exc:  # no reply subject, or the connection is gone: nobody to tell
        _throttle_warn("reply", f"could not answer a call: {exc!r}")


async def _reply_error(request: micro.Request, code: int, message: str) -> None:
    try:
        await request.respond_error(str(code), _one_line(message))
    except Exception as exc:
        _throttle_warn("reply", f"could not answer a call: {exc!r}")


def _throttle_warn(key: str, message: str) -> None:
    if _throttle.allow(key) is not None:
        log.warning("%s", message, extra={"stage": ROLE})


async def serve(nc: Client, group: str, tools: Sequence[Tool], *, replica: str = "",
                description: str = "") -> ToolServer:
    """Announce and serve ``tools`` as the micro service ``voicebus-tools-<group>``."""
    names = [tool.spec.name for tool in tools]
    if len(set(names)) != len(names):
        raise ValueError(f"tool names must be unique in one service: {names}")
    service = await micro.add_service(
        nc, name=f"voicebus-tools-{group}", version=VERSION,
        description=description or f"voicebus tools: {', '.join(names)}",
        metadata={"replica": replica or f"{socket.gethostname()}-{os.getpid()}",
                  "contract": str(proto.CONTRACT_VERSION)})
    server = ToolServer(service)
    for tool in tools:
        await service.add_endpoint(name=tool.spec.name, subject=tl.subject(tool.spec.name),
                                   queue_group=tl.QUEUE, metadata=tool.spec.metadata(),
                                   handler=server.endpoint(tool))
    return server


class ToolsConfig(BaseConfig, frozen=True, kw_only=True):
    """A tool process reads only the settings every service shares (the bus, logs, metrics,
    ``VOICEBUS_SHUTDOWN_GRACE``)."""


class ToolProcess:
    """One tool process: ``ToolProcess(group)`` reads its configuration (a bad one exits),
    sets up logs and metrics and catches SIGTERM; ``await run(tools)`` serves until SIGTERM
    (exit code 0) or until ``failed`` is set (1: what the tools depend on is gone, and a
    supervisor should start the process again)."""

    def __init__(self, group: str) -> None:
        if not micro.service.NAME_REGEX.match(group):
            raise SystemExit(f"voicebus tools: bad group name {group!r}")
        try:
            self.config = ToolsConfig.from_env()
        except ConfigError as exc:
            raise SystemExit(f"voicebus tools-{group}: configuration error: {exc}") from None
        self.group = group
        self.replica = re.sub(r"[^A-Za-z0-9_-]", "_", self.config.replica or
                              f"{socket.gethostname()}-{os.getpid()}")
        setup_logging(self.config.log_format, self.config.log_level)
        metrics.serve(self.config.metrics_port, self.config.metrics_addr)
        self.stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)

    async def run(self, tools: Sequence[Tool], failed: asyncio.Event | None = None,
                  description: str = "") -> int:
        try:
            access = self.config.nats_options(ROLE)
            bus = await Bus.connect(self.config.nats_url, ROLE, f"voicebus-tools-{self.group}",
                                    self.stop, **access)
        except ConfigError as exc:
            raise SystemExit(f"voicebus tools-{self.group}: configuration error: {exc}") from None
        except Stopped:
            return 0
        server = await serve(bus.nc, self.group, tools, replica=self.replica,
                             description=description)
        log.info("serving %s", ", ".join(tl.subject(t.spec.name) for t in tools),
                 extra={"stage": ROLE, "replica": self.replica})
        metrics.READY.labels(ROLE).set(1)
        metrics.set_readiness(lambda: not self.stop.is_set() and bus.nc.is_connected)
        code = await self._until_stopped(failed)
        metrics.READY.labels(ROLE).set(0)
        await server.stop(self.config.shutdown_grace)
        await bus.drain()
        return code

    async def _until_stopped(self, failed: asyncio.Event | None) -> int:
        waits = {asyncio.ensure_future(self.stop.wait())}
        if failed is not None:
            waits.add(asyncio.ensure_future(failed.wait()))
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await wait
        return 1 if failed is not None and failed.is_set() else 0
