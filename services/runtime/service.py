"""The skeleton every stage shares, written once.

config from the environment → connect to NATS (reconnect forever) → claim sessions through a
queue group named after the stage → one ``SessionWorker`` per owned session, whose one verb is
``handle(event)`` → on SIGTERM stop claiming, hand sessions over once the worker's turn ledger is
settled, ``drain()``, exit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import itertools
import json
import logging
import os
import signal
import socket
import re
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, ClassVar, Generic, TypeVar

import msgspec
from nats import micro
from nats.aio.subscription import Subscription
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

import proto
from proto import codec
from proto import events as ev
from proto import subjects as sj
from services.runtime import agents, metrics, tracing, usage
from services.runtime.bus import Bus, Handler, Stopped, replicas_of
from services.runtime.config import BaseConfig
from services.runtime.errors import ConfigError, ProviderError
from services.runtime.fallback import FallbackAdapter, chain_names
from services.runtime.leases import Leases
from services.runtime.ledger import RECORD_CODEC, STATE_BUCKET, FloorRecord, TurnLedger, floor_key
from services.runtime.livekit import exit_process
from services.runtime.logs import Throttle, held_back, setup_logging
from services.runtime.providers import load_provider

log = logging.getLogger(__name__)

C = TypeVar("C", bound=BaseConfig)
E = TypeVar("E", bound=ev.Event)

VERSION = "0.1.0"
T = TypeVar("T")

# How long a thread that wants the GIL waits before the one running Python is asked to give it
# up (CPython's default is 5 ms). A stage's event loop shares the GIL with its own threads that
# run Python: Piper's sentence loop, whisper.cpp's callbacks, the LiveKit SDK's. With the
# default, an event that arrives while one of them runs can wait up to 5 ms before the loop
# gets to it; at 0.5 ms `bench livekit`'s overhead p95 was lower in 15 of 20 paired runs
# (docs/benchmarks.md, "The GIL's switch interval").
GIL_SWITCH_S = 0.0005


async def to_the_end(work: Coroutine[Any, Any, T], grace: float) -> T:
    """Run ``work`` to its end even if this task is cancelled meanwhile, and absorb the cancel.

    For the close of a turn: once its end has been announced, a late cut (a newer turn, a
    barge-in) has nothing left to stop, and stopping the close half way would lose what it
    still had to store, or have the turn announced again by ``spawn_turn``'s fallback. Only
    the cancels that land here are absorbed (one asked before stays asked), and for ``grace``
    seconds at most: past it (a KV write stuck in an outage) the work is cancelled and so is
    this task. Not for use under ``asyncio.timeout`` or in a ``TaskGroup``: their cancel would
    be absorbed too."""
    task = asyncio.current_task()
    assert task is not None
    asked_before = task.cancelling()
    inner = asyncio.create_task(work, name=f"{task.get_name()}:close")
    cut_at = 0.0
    while True:
        try:
            if not cut_at:
                return await asyncio.shield(inner)
            left = cut_at + grace - time.monotonic()
            done, _ = await asyncio.wait({inner}, timeout=max(0.0, left))
            if not done:
                inner.cancel()
                await asyncio.wait({inner})
                raise asyncio.CancelledError(f"the close outlived its {grace:g} s")
            return inner.result()
        except asyncio.CancelledError:
            if inner.cancelled():
                raise  # cancelled itself, or past its grace: the cancel goes on
            while task.cancelling() > asked_before:  # the cuts were for the turn, now over
                task.uncancel()
            if inner.done():
                return inner.result()
            cut_at = cut_at or time.monotonic()


class SessionWorker(Generic[C]):
    """One stage's work for one session. Subclasses subscribe in ``subscribe_inputs`` (usually
    every subject to ``handle``, one ``match`` over the events) and do long work in tasks made
    with ``spawn`` (a subscription callback must never block). ``ledger`` is the session's turn
    book; a replica hands the session over once it is settled."""

    def __init__(self, service: StageService[C], start: ev.SessionStart) -> None:
        self.service = service
        self.bus = service.bus
        self.config: C = service.config_for(start.agent)
        self.start_event = start
        self.session = start.session
        self.log = logging.LoggerAdapter(log, {"stage": service.stage, "session": self.session})
        if start.agent and start.agent not in getattr(service, "agents", (start.agent,)):
            self.log.warning("unknown agent %r: this session gets the default one", start.agent)
        self.ledger = TurnLedger()
        # ``seq`` counts per producer: egress speaks as "egress" and as the judge, "floor".
        self._seq: collections.defaultdict[str, itertools.count[int]] = collections.defaultdict(
            lambda: itertools.count(1))
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._subjects: dict[sj.Topic, str] = {}
        # This worker ended the session itself (an agent's goodbye): it is not handed over.
        self.ended = False

    async def subscribe_inputs(self) -> None:
        """Subscribe to this session's inputs (before the lease is taken: no side effects)."""

    async def on_claimed(self) -> None:
        """Start work with side effects (sources, files) once the session is ours."""

    async def on_taken_over(self, record: FloorRecord) -> None:
        """The session was taken over from a replica that died: close what it left in flight
        (``record`` is the judge's view of the session)."""

    async def stop(self) -> None:
        """Release resources; called after subscriptions and tasks are gone."""

    async def load_floor(self) -> FloorRecord:
        """The judge's record of the session (a fresh one for a new session): a replica seeds
        its ledger from it, so turn numbers stay bounded across handovers."""
        try:
            entry = await self.bus.get(self.service.state, floor_key(self.session))
        except KeyNotFoundError:
            return FloorRecord()
        try:
            return RECORD_CODEC[1].decode(entry.value or b"")
        except msgspec.DecodeError:
            self.log.warning("the judge's record is unreadable; starting a fresh one")
            return FloorRecord()

    def next_seq(self, producer: str = "") -> int:
        return next(self._seq[producer or self.service.stage])

    def event(self, cls: type[E], producer: str = "", **fields: Any) -> E:
        return cls(session=self.session, seq=self.next_seq(producer), ts_ns=time.time_ns(),
                   **fields)

    async def emit(self, topic: sj.Topic, cls: type[E], *, trace: tracing.Headers | None = None,
                   **fields: Any) -> E:
        """Publish a new event of this session (``trace``: the turn's trace context)."""
        event = self.event(cls, topic.producer, **fields)
        subject = self._subjects.get(topic)
        if subject is None:  # built (and checked) once per topic, not once per frame
            subject = self._subjects[topic] = topic.subject(self.session)
        await self.bus.publish(topic, event, subject, trace)
        return event

    async def subscribe(self, subject: str, handler: Handler) -> None:
        self._subs.append(await self.bus.subscribe(subject, handler))

    async def stage_error(self, message: str, *, retryable: bool, turn: int = 0,
                          doing: str = "", bug: BaseException | None = None) -> None:
        """Log (with the traceback of a ``bug``) and announce (``<stage>.error``) that this stage
        could not do its work."""
        stage = self.service.stage
        self.log.error("%s failed: %s" if doing else "%s%s", doing, message, exc_info=bug)
        await self.emit(sj.ERROR[stage], ev.StageError, stage=stage, turn=turn,
                        message=message, retryable=retryable)

    async def provider_failed(self, turn: int, exc: Exception, doing: str) -> str:
        """Count, log and announce (``<stage>.error``) a failure on ``turn``; return its message.

        ``exc`` is a provider's ``ProviderError`` or, for a bug, anything else: either way the
        turn must still be closed downstream by the caller."""
        stage = self.service.stage
        bug = None if isinstance(exc, ProviderError) else exc
        if isinstance(exc, ProviderError):
            provider, retryable, message = exc.provider, exc.retryable, str(exc)
        else:
            provider, retryable, message = "", False, f"{type(exc).__name__}: {exc}"
        metrics.PROVIDER_ERRORS.labels(stage, provider, str(retryable)).inc()
        await self.stage_error(message, retryable=retryable, turn=turn, doing=doing, bug=bug)
        return message

    def spawn_turn(self, coro: Any, turn: int,
                   close: Callable[[int], Awaitable[None]]) -> asyncio.Task[Any]:
        """Spawn a turn's work; when it is over, the turn closes in the ledger. A task cancelled
        before it ever ran never reaches its own ``except CancelledError``; ``close(turn)`` then
        still announces the turn's end, and the turn closes after it. So the work announces its
        own end under ``to_the_end``: cancelled after that, it must not end cancelled."""
        task = self.spawn(coro, f"turn-{turn}")

        def closed(done: asyncio.Task[Any]) -> None:
            if done.cancelled():
                ending = self.spawn(close(turn), f"close-{turn}")
                ending.add_done_callback(lambda _: self.ledger.close(turn))
            else:
                self.ledger.close(turn)

        task.add_done_callback(closed)
        return task

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"{self.service.stage}:{self.session}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            metrics.HANDLER_ERRORS.labels(self.service.stage).inc()
            self.log.error("task %s failed", task.get_name(), exc_info=task.exception())

    async def close(self) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # the connection may already be closing
                pass
        self._subs.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.stop()


class StageService(Generic[C]):
    """A stage process: owns sessions, one worker each. Subclasses set ``stage``, ``Config``
    and ``Worker``, and load providers in ``setup``."""

    stage: ClassVar[str]
    Config: ClassVar[type[BaseConfig]]
    Worker: ClassVar[type[SessionWorker[Any]]]

    bus: Bus  # connected by ``run`` after ``setup``, before ``serve``

    def __init__(self, config: C) -> None:
        self.config = config
        # The replica name goes into subjects: keep it to one token of safe characters.
        name = config.replica or f"{socket.gethostname()}-{os.getpid()}"
        self.replica = re.sub(r"[^A-Za-z0-9_-]", "_", name)
        self.workers: dict[str, SessionWorker[C]] = {}
        self._claim_subs: list[Subscription] = []
        self._subs: list[Subscription] = []
        self.leases: Leases  # opened by ``serve``
        self.state: KeyValue  # the session state bucket (start events, the judge's record)
        self._background: set[asyncio.Task[Any]] = set()
        self._claiming: set[str] = set()
        self._ended: dict[str, None] = {}  # recently ended sessions, oldest first
        self._lease_rev: dict[str, int] = {}
        # A lease refresh fails four times a second per session while JetStream elects a
        # leader (up to Bus.jetstream's 20 s): one line per interval says it, the metric counts.
        self._lease_log = Throttle()

    def load_agents(self) -> None:
        """The agent profiles (services/runtime/agents.py) and this stage's settings for each:
        a profile this stage cannot use stops the start (ConfigError), not a call."""
        self.agents = agents.load()
        self.agent_configs = {name: agents.stage_config(self.config, agent, self.stage, name)
                              for name, agent in self.agents.items()}

    def config_for(self, agent: str) -> C:
        """The settings of a session of ``agent``: the stage's own, with the agent's (an
        unknown agent gets the default's; the token service refuses those)."""
        configs = getattr(self, "agent_configs", None) or {}
        return configs.get(agent or agents.DEFAULT) or configs.get(agents.DEFAULT) or self.config

    async def setup(self) -> None:
        """Load models and providers, before NATS is even connected: a configuration error
        (a missing key) stops the start at once, whatever the state of the bus."""

    async def teardown(self) -> None:
        """Close providers after the last session is gone."""

    # ---- lifecycle -----------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        self.leases = Leases(self.bus, self.stage, self.replica, int(self.config.lease_ttl))
        await self.leases.open()
        self.state = await self.bus.key_value(STATE_BUCKET, ttl=self.config.state_ttl)
        self.settle_heap()  # before any session: what they make is theirs to collect
        # A session comes from dispatch, or from a replica of ours that hands it over…
        for topic in (sj.CTL_START, sj.HANDOVER[self.stage]):
            self._claim_subs.append(await self.bus.subscribe(
                topic.every_session(), self._on_start, queue=self.stage))
        # …or from one that died: its lease expired.
        self._claim_subs.append(await self.leases.watch_expiries(self._on_lease_expired))
        for topic in sj.SESSION_ENDS:
            self._subs.append(await self.bus.subscribe(topic.every_session(), self._on_end))
        refresher = asyncio.create_task(self._refresh_leases())
        # nats.micro gives discovery for free: $SRV.PING/INFO/STATS.voicebus-<stage>.
        discovery = await micro.add_service(
            self.bus.nc, name=f"voicebus-{self.stage}", version=VERSION,
            metadata={"replica": self.replica, "contract": str(proto.CONTRACT_VERSION)},
        )
        await discovery.add_endpoint(
            name="sessions", subject=f"voicebus.{self.stage}.{self.replica}.sessions",
            handler=self._list_sessions,
        )
        log.info("%s replica %s ready", self.stage, self.replica, extra={"stage": self.stage})
        metrics.READY.labels(self.stage).set(1)
        metrics.set_readiness(lambda: not stop.is_set() and self.bus.nc.is_connected)
        await stop.wait()
        metrics.READY.labels(self.stage).set(0)
        log.info("shutting down: handing over %d session(s)", len(self.workers),
                 extra={"stage": self.stage})
        for sub in self._claim_subs:
            await sub.unsubscribe()
        await discovery.stop()
        # Claims already under way finish first, so their sessions are handed over too.
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._hand_over_all()
        refresher.cancel()
        for sub in self._subs:
            await sub.unsubscribe()
        await self.teardown()
        await self.bus.drain()

    def settle_heap(self) -> None:
        """Everything the replica keeps for its life is loaded now (the imports, the models, the
        bus): it is collected once and frozen, so no later garbage collection scans it again.
        Unfrozen, a model stage's full collection held its loop, and all fifty sessions on it,
        for 16-77 ms (docs/benchmarks.md, "The garbage collector's pauses")."""
        gc.collect()
        gc.freeze()
        metrics.GC_FROZEN.labels(self.stage).set(gc.get_freeze_count())

    async def is_listening(self, stage: str, session: str) -> bool:
        """Whether some replica of ``stage`` holds the session (and so is subscribed to it)."""
        return await self.leases.holder(stage, session) is not None

    async def _list_sessions(self, request: micro.Request) -> None:
        await request.respond(json.dumps(sorted(self.workers)).encode())

    def _in_background(self, work: Coroutine[Any, Any, Any], name: str) -> None:
        """Off the caller's path, and awaited before the replica stops."""
        task = asyncio.create_task(work, name=f"{self.stage}:{name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_start(self, start: ev.SessionStart, taken_from: str | None = None) -> None:
        if start.session in self.workers or start.session in self._claiming:
            return  # a repeated start: we already own (or are claiming) it
        self._ended.pop(start.session, None)
        self._claiming.add(start.session)
        # Claiming talks to KV and the worker subscribes: keep it off the callback's path.
        self._in_background(self._claim(self.Worker(self, start), taken_from), "claim")

    def _on_lease_expired(self, session: str, owner: str) -> None:
        """A replica of ours stopped renewing its lease: it is dead (or frozen). Try to take
        the session over; the replicas that try race for the lease, and one wins."""
        if owner == self.replica or session in self.workers or session in self._claiming \
                or session in self._ended:
            return  # our own lease lapsed (a starved moment): the refresher takes it back
        self._in_background(self._take_over(session, owner), "take-over")

    async def _take_over(self, session: str, owner: str) -> None:
        try:
            entry = await self.bus.get(self.state, f"{session}.start")
            start = codec.decode(entry.value or b"")
        except (KeyNotFoundError, codec.Rejected) as exc:
            log.warning("lease of %s expired, but its start is unknown (%s): not taken over",
                        owner or "a replica", type(exc).__name__,
                        extra={"stage": self.stage, "session": session})
            return
        if isinstance(start, ev.SessionStart):
            self._on_start(start, taken_from=owner or "?")

    async def _claim(self, worker: SessionWorker[C], taken_from: str | None = None) -> None:
        session = worker.session
        try:
            # Subscribe before taking the lease, so a lease in KV means "listening": upstream
            # stages may check it to know their events will be heard.
            await worker.subscribe_inputs()
            if taken_from is None:  # what a successor needs to know, if we die
                # Stored before the lease is taken: a lease that lapses always has a start to
                # be taken over from, and a store that waits out a JetStream election (up to
                # JS_ELECTION_S) cannot outlast a lease the refresher does not renew yet.
                await self.bus.put(self.state, f"{session}.start",
                                   codec.encode(worker.start_event))
            revision = await self.leases.acquire(session)
        except KeyWrongLastSequenceError:
            if taken_from is None:
                log.warning("session already leased by another %s replica; not claiming",
                            self.stage, extra={"stage": self.stage, "session": session})
            await worker.close()
            return
        except Exception:
            metrics.HANDLER_ERRORS.labels(self.stage).inc()
            log.exception("could not claim session", extra={"stage": self.stage, "session": session})
            await worker.close()
            return
        finally:
            self._claiming.discard(session)
        if session in self._ended:  # ended while we were claiming it
            await worker.close()
            await self._release(session)
            return
        self._lease_rev[session] = revision
        self.workers[session] = worker
        if taken_from is not None:
            log.warning("took the session over from %s, whose lease expired", taken_from,
                        extra={"stage": self.stage, "session": session})
            metrics.SESSIONS_TAKEN_OVER.labels(self.stage).inc()
            await worker.on_taken_over(await worker.load_floor())
        await worker.on_claimed()
        metrics.SESSIONS_CLAIMED.labels(self.stage).inc()
        metrics.SESSIONS_ACTIVE.labels(self.stage).set(len(self.workers))
        await self.bus.publish(
            sj.READY[self.stage],
            worker.event(ev.StageReady, stage=self.stage, replica=self.replica),
        )
        log.info("claimed session", extra={"stage": self.stage, "session": session})

    def has_ended(self, session: str) -> bool:
        """A SessionEnd for ``session`` has come (recently)."""
        return session in self._ended

    async def _on_end(self, end: ev.SessionEnd) -> None:
        self._ended[end.session] = None
        while len(self._ended) > 10_000:  # remembered only to stop claims in flight
            del self._ended[next(iter(self._ended))]
        worker = self.workers.pop(end.session, None)
        if worker is None:
            return
        await worker.close()
        await self._release(end.session)
        log.info("session ended (%s)", end.reason or "no reason",
                 extra={"stage": self.stage, "session": end.session})

    async def _release(self, session: str) -> None:
        metrics.SESSIONS_ACTIVE.labels(self.stage).set(len(self.workers))
        self._lease_rev.pop(session, None)
        try:
            # Waited for no longer than the lease lives: a delete held up by a JetStream
            # election waits out nats-py's request timeout (5 s), which would hold up a
            # handover or a shutdown's drain for a key that expires within its TTL anyway.
            async with asyncio.timeout(self.leases.ttl):
                await self.leases.release(session)
        except Exception as exc:  # the lease expires on its own anyway
            log.warning("could not release lease: %s", str(exc) or type(exc).__name__,
                        extra={"stage": self.stage})

    async def _refresh_leases(self) -> None:
        # Four renewals per lifetime: a lease lapses only after 3/4 of it without one.
        while True:
            await asyncio.sleep(self.leases.ttl / 4)
            await asyncio.gather(*(self._refresh(session) for session in list(self.workers)))

    async def _refresh(self, session: str) -> None:
        """Renew a lease by revision: a blind put could bring back a lease we released, or
        overwrite one another replica took. A lease that merely expired (a starved process) is
        taken back if it is still free; one that another replica holds now means the session
        is no longer ours."""
        try:
            try:
                revision = await self.leases.refresh(session, self._lease_rev.get(session, 0))
            except KeyWrongLastSequenceError:
                if session not in self.workers:
                    return  # released meanwhile (ended, handed over): not to be taken back
                revision = await self.leases.acquire(session)
                log.warning("lease had expired; renewed", extra={"stage": self.stage, "session": session})
            if session in self.workers:
                self._lease_rev[session] = revision
        except KeyWrongLastSequenceError as exc:
            worker = self.workers.pop(session, None)
            log.error("another replica holds the lease (%s): dropping the session",
                      exc.description, extra={"stage": self.stage, "session": session})
            if worker is not None:  # off the refresher's path: the other leases are due too
                self._in_background(worker.close(), f"drop-{session}")
        except Exception as exc:
            metrics.LEASE_REFRESH_FAILED.labels(self.stage).inc()
            if (held := self._lease_log.allow("refresh")) is not None:
                log.warning("lease refresh failed: %s%s", exc, held_back(held),
                            extra={"stage": self.stage})

    async def _hand_over_all(self) -> None:
        others: set[str] = set()
        if self.workers:
            others = await replicas_of(self.bus.nc, f"voicebus-{self.stage}") - {self.replica}

        async def hand_over(worker: SessionWorker[C]) -> None:
            try:
                await asyncio.wait_for(worker.ledger.settled.wait(), self.config.shutdown_grace)
            except asyncio.TimeoutError:
                worker.log.warning("turn still running after %.1fs; handing over anyway",
                                   self.config.shutdown_grace)
            await worker.close()
            self.workers.pop(worker.session, None)
            await self._release(worker.session)
            if worker.ended:
                return  # nothing to hand over: its own end is on the bus
            if others:
                await self._republish(worker)
            else:
                worker.log.warning("no other %s replica is running: session released, not handed "
                                   "over", self.stage)

        await asyncio.gather(*(hand_over(w) for w in list(self.workers.values())))

    async def _republish(self, worker: SessionWorker[C]) -> None:
        """Give the session to another replica and wait until one has it. Our claim
        subscription is gone, so the queue group hands the start to someone else. When every
        replica is stopping at once (the whole stack going down), nobody will: stop waiting as
        soon as no other replica is left taking sessions."""
        taken = asyncio.Event()

        def on_ready(ready: ev.StageReady) -> None:
            if ready.replica != self.replica:
                taken.set()

        sub = await self.bus.subscribe(sj.READY[self.stage].subject(worker.session), on_ready)
        # The same start (file edges included), on our stage's own handover subject.
        start = msgspec.structs.replace(worker.start_event, seq=worker.next_seq(),
                                        ts_ns=time.time_ns())
        await self.bus.publish(sj.HANDOVER[self.stage], start)
        deadline = time.monotonic() + self.config.shutdown_grace
        try:
            while not taken.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(taken.wait(), 0.5)
                if taken.is_set():
                    break
                others = await replicas_of(self.bus.nc, f"voicebus-{self.stage}") - {self.replica}
                if not others or time.monotonic() > deadline:
                    worker.log.error("no other %s replica took the session (%s): it has no %s "
                                     "stage now", self.stage,
                                     "none is left" if not others else "timed out", self.stage)
                    return
            metrics.SESSIONS_HANDED_OVER.labels(self.stage).inc()
        finally:
            await sub.unsubscribe()


class ProviderStage(StageService[C]):
    """A stage whose work is done by providers from the stage's lazy ``PROVIDERS`` map: the
    chain ``VOICEBUS_<STAGE>_PROVIDERS`` (or the one ``VOICEBUS_<STAGE>_PROVIDER``) behind the
    stage's ``Fallback`` adapter, which implements the same Protocol as each provider."""

    PROVIDERS: ClassVar[Mapping[str, str]]
    Fallback: ClassVar[type[FallbackAdapter[Any]]]
    provider: Any

    async def setup(self) -> None:
        self.prices = usage.load_prices(self.config.prices)  # a bad table stops the start
        self.provider = self._chain(self.config)
        # An agent with settings of its own for this stage gets a chain made with them (its
        # providers, its voice…), made now: one it cannot have stops the start.
        self.chains: dict[str, Any] = {}
        for name, config in getattr(self, "agent_configs", {}).items():
            if config is not self.config:
                self.chains[name] = self._chain(config)

    def _chain(self, config: C) -> Any:
        providers = [load_provider(self.stage, self.PROVIDERS, name, config)
                     for name in chain_names(config, self.stage)]
        return self.Fallback.from_config(providers, config)

    def provider_for(self, agent: str) -> Any:
        """The provider chain of a session of ``agent``."""
        return self.chains.get(agent or agents.DEFAULT, self.provider)

    async def teardown(self) -> None:
        for chain in getattr(self, "chains", {}).values():
            await chain.aclose()
        await self.provider.aclose()


async def run(service_cls: type[StageService[Any]]) -> None:
    try:
        config = service_cls.Config.from_env()
    except ConfigError as exc:
        raise SystemExit(f"voicebus {service_cls.stage}: configuration error: {exc}") from None
    setup_logging(config.log_format, config.log_level)
    metrics.serve(config.metrics_port, config.metrics_addr)
    metrics.watch_gc(service_cls.stage)
    log.info("starting with %s", config.redacted(), extra={"stage": service_cls.stage})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    service = service_cls(config)
    try:
        access = config.nats_options(service_cls.stage)
        tracing.setup(service_cls.stage, service.replica)
        service.load_agents()
        await service.setup()
    except ConfigError as exc:
        raise SystemExit(f"voicebus {service_cls.stage}: configuration error: {exc}") from None
    try:
        service.bus = await Bus.connect(config.nats_url, service_cls.stage,
                                        f"voicebus-{service_cls.stage}", stop, **access)
        service.bus.replicas = config.js_replicas
    except Stopped:
        log.info("stopped before NATS was reachable", extra={"stage": service_cls.stage})
        await service.teardown()
        return
    try:
        await service.serve(stop)
    except ConfigError as exc:
        await service.bus.drain()
        raise SystemExit(f"voicebus {service_cls.stage}: configuration error: {exc}") from None
    finally:
        tracing.shutdown()  # the spans still batched


def main(service_cls: type[StageService[Any]]) -> None:
    sys.setswitchinterval(GIL_SWITCH_S)
    asyncio.run(run(service_cls))
    exit_process(0)
