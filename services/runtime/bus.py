"""The NATS connection every service shares: endless reconnect, typed publish, guarded subscribe.

A subscription callback decodes with the one codec and checks the event belongs on its subject;
anything malformed is counted, logged once per burst and dropped, never raised into nats-py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError, NoStreamResponseError, ServiceUnavailableError
from nats.js.kv import KeyValue

from proto import codec
from proto import events as ev
from proto.subjects import Topic
from services.runtime import metrics, tracing
from services.runtime.config import nats_servers
from services.runtime.logs import Throttle, held_back

T = TypeVar("T")
# How long a JetStream request is tried again while its stream has no leader (a node died).
# nats-server's Raft followers wait 4-9 s without a leader before they campaign (its
# minElectionTimeoutDefault and maxElectionTimeoutDefault); a vote split between the two nodes
# left starts that wait again. 20 s covers a second round: at 10 s, a turn counter's write
# could fail, and its turn with it, when the first round did not elect (a loaded machine saw
# the KV streams without a leader for over 5 s).
JS_ELECTION_S = 20.0
_NO_LEADER = (NoStreamResponseError, ServiceUnavailableError, nats.errors.NoRespondersError,
              nats.errors.TimeoutError)

log = logging.getLogger(__name__)

Handler = Callable[[Any], Awaitable[None] | None]


class Stopped(Exception):
    """The service was told to stop before it could connect."""


async def _unless_stopped(stop: asyncio.Event, work: Awaitable[T]) -> T:
    """Await ``work``; if ``stop`` is set first, cancel it and raise ``Stopped``."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise Stopped("stopped before NATS was reachable")
    return task.result()


class HalfOpen(nats.errors.Error):
    """nats-py finished connecting on a line that was not the server's PONG.

    A client sends CONNECT and PING and takes the next line as the answer. nats-server sends a
    PING of its own two seconds after a client's CONNECT (to measure the round trip); when the
    client's PING reaches it later than that (a process stalled on a loaded machine), the
    server's PING comes first. nats-py then returns a connection it never marks connected, and
    holds every later SUB and PUB in its buffer: a stage that hears nothing and says nothing,
    with no error, until the server drops it as stale minutes later. (A reconnection marks
    itself connected, so only the first connection is affected.)"""

    def __str__(self) -> str:
        return ("nats: the server's PING came before its PONG while connecting, and nats-py "
                "would send nothing on this connection")


async def _refuse_half_open(nc: Client) -> None:
    if not nc.is_connected:
        await nc.close()
        raise HalfOpen()


async def connect(servers: str | list[str], attempts: int = 3, **options: Any) -> Client:
    """``nats.connect``, but never a half-open connection (``HalfOpen``): that one is closed
    and the connection made again, up to ``attempts`` times. For tools, the launcher and tests;
    a stage connects with ``Bus.connect``, which does the same."""
    for _ in range(attempts - 1):
        nc = await nats.connect(servers, **options)
        if nc.is_connected:
            return nc
        await nc.close()
        log.warning("%s; connecting again", HalfOpen())
    nc = await nats.connect(servers, **options)
    await _refuse_half_open(nc)
    return nc


class Bus:
    def __init__(self, nc: Client, stage: str) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.stage = stage
        self.replicas = 1  # copies of the KV buckets this process creates
        self._throttle = Throttle()

    @classmethod
    async def connect(cls, url: str, stage: str, name: str, stop: asyncio.Event | None = None,
                      **options: Any) -> Bus:
        """Connect, retrying the first connection with backoff until it works. Raises
        ``Stopped`` if ``stop`` is set first (SIGTERM while nats-server is unreachable).
        ``options`` go to ``nats.connect`` (credentials, inbox prefix, TLS)."""
        delay = 0.05
        stop = stop or asyncio.Event()
        while True:
            nc = Client()

            async def on_disconnected(nc: Client = nc) -> None:
                if not (nc.is_draining or nc.is_closed):  # a drain on shutdown is no news
                    log.warning("NATS disconnected; reconnecting")

            try:
                # nats-py keeps trying inside connect() (endless reconnects apply to the first
                # connection too), so the stop signal has to be raced against it.
                await _unless_stopped(stop, nc.connect(
                    nats_servers(url),
                    name=name,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    connect_timeout=2,
                    drain_timeout=5,  # shutdown must fit in an orchestrator's grace period
                    error_cb=_on_error,
                    disconnected_cb=on_disconnected,
                    reconnected_cb=_on_reconnected,
                    **options,
                ))
                await _refuse_half_open(nc)
                return cls(nc, stage)
            except Stopped:
                await nc.close()
                raise
            except (OSError, nats.errors.Error, asyncio.TimeoutError) as exc:
                log.warning("NATS at %s not reachable (%s); retrying in %.1fs", url, exc, delay)
                with contextlib.suppress(Stopped):
                    await _unless_stopped(stop, asyncio.sleep(delay))
                if stop.is_set():
                    raise Stopped("stopped before NATS was reachable") from None
                delay = min(delay * 2, 5.0)

    async def publish(self, topic: Topic, event: ev.Event, subject: str = "",
                      headers: dict[str, str] | None = None) -> None:
        """Publish ``event`` on ``topic`` (``subject``: the topic's subject, if known;
        ``headers``: a turn's trace context, ``services.runtime.tracing``).

        While NATS is away nats-py buffers what we publish; once that buffer is full the event
        is dropped and counted rather than raised: a stage keeps running through an outage."""
        try:
            await self.nc.publish(subject or topic.subject(event.session), codec.encode(event),
                                  headers=headers)
        except (nats.errors.OutboundBufferLimitError, nats.errors.ConnectionClosedError) as exc:
            metrics.PUBLISH_DROPPED.labels(self.stage).inc()
            held = self._throttle.allow("publish")
            if held is not None:
                log.warning("dropped %s while NATS is unreachable (%s; +%d more)",
                            type(event).__name__, type(exc).__name__, held,
                            extra={"stage": self.stage, "session": event.session})

    async def subscribe(self, subject: str, handler: Handler, queue: str = "") -> Subscription:
        async def on_msg(msg: Msg) -> None:
            try:
                event = codec.decode_on(msg.subject, msg.data)
            except codec.Rejected as exc:
                self.reject(exc.reason, exc.detail, msg.subject)
                return
            carried = tracing.CARRIED.set(msg.headers) if msg.headers else None
            try:
                result = handler(event)
                if result is not None:
                    await result
            except Exception:
                metrics.HANDLER_ERRORS.labels(self.stage).inc()
                log.exception("error handling %s", type(event).__name__,
                              extra={"stage": self.stage, "session": event.session})
            finally:
                if carried is not None:
                    tracing.CARRIED.reset(carried)

        return await self.nc.subscribe(subject, queue=queue, cb=on_msg)

    def reject(self, reason: str, detail: str, subject: str) -> None:
        metrics.REJECTED.labels(self.stage, reason).inc()
        held = self._throttle.allow(reason)
        if held is not None:
            log.warning("rejected message on %s: %s: %s%s", subject[:120], reason, detail[:200],
                        held_back(held), extra={"stage": self.stage})

    async def key_value(self, bucket: str, ttl: float = 0.0, history: int = 1) -> KeyValue:
        """Open a JetStream KV bucket, creating it on first use (``replicas`` copies)."""
        try:
            return await self.jetstream(lambda: self.js.key_value(bucket))
        except BucketNotFoundError:
            config = KeyValueConfig(bucket=bucket, history=history, ttl=ttl or None,
                                    replicas=self.replicas)
            return await self.js.create_key_value(config=config)

    async def get(self, kv: KeyValue, key: str) -> KeyValue.Entry:
        """``kv.get``, waiting out a JetStream leader election (``jetstream``)."""
        return await self.jetstream(lambda: kv.get(key))

    async def put(self, kv: KeyValue, key: str, value: bytes) -> int:
        """``kv.put``, waiting out a JetStream leader election (``jetstream``)."""
        return await self.jetstream(lambda: kv.put(key, value))

    @staticmethod
    async def jetstream(call: Callable[[], Awaitable[T]], within: float = JS_ELECTION_S) -> T:
        """``call`` (a JetStream request), tried again while nothing answers it: when a cluster
        node dies, the streams it led have no leader for a few seconds, and requests to them
        meet no responder or time out. Any other error, or still none after ``within``
        seconds, is raised."""
        deadline = time.monotonic() + within
        delay = 0.05
        while True:
            try:
                return await call()
            except _NO_LEADER:
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def drain(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()


async def _on_error(exc: Exception) -> None:
    log.warning("NATS error: %s", exc)


async def _on_reconnected() -> None:
    log.info("NATS reconnected")


async def replicas_of(nc: Client, service: str, window: float = 0.3) -> set[str]:
    """The replicas of a nats.micro service that answer ``$SRV.PING`` within ``window`` s
    (named by their ``replica`` metadata, else their instance id)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    names: set[str] = set()
    try:
        await nc.publish(f"$SRV.PING.{service}", b"", reply=inbox)
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(window):
                async for msg in sub.messages:
                    with contextlib.suppress(ValueError, AttributeError):
                        info = json.loads(msg.data)
                        names.add((info.get("metadata") or {}).get("replica") or info["id"])
        return names
    finally:
        await sub.unsubscribe()


class SeqGaps:
    """Counts events lost between one producer and us, from the producer's per-session ``seq``.

    Feed it every event of the producer's subscription (``producer_all``): ``seq`` counts all of
    a producer's events in a session, not only one kind.
    """

    def __init__(self) -> None:
        self.last = 0

    def lost(self, event: ev.Event) -> int:
        missing = event.seq - self.last - 1 if self.last and event.seq > self.last else 0
        self.last = max(self.last, event.seq)
        return missing
