"""Fallback chains: when a provider fails or is too slow, the same turn moves to the next one.

The rules (after LiveKit Agents' ``fallback_adapter``):

- Providers are tried in the configured order, skipping those marked unavailable. When every
  one is unavailable all are tried anyway: a turn must not fail only because probes lag.
- A provider that fails (any error, retryable or not) or gives no first result within the
  stage's budget is marked unavailable and probed in the background with a cheap real call
  until one succeeds; then it is used again.
- Once a provider's first committing result went out, the turn is committed to it: a later
  failure ends the turn with an error, never a retry (the user would hear the start twice).
  Every result commits, except where the stage says otherwise (``commits``): STT commits on
  its final, so a provider that fails or stalls after partials still hands the utterance on.
- The budget does not apply to the last provider a turn can try: nothing is left to move to,
  and a late answer beats none (that provider's own timeouts still apply). So a chain of one
  behaves exactly as a bare provider, with no buffering.

Each stage's adapter (``services/<stage>/service.py``) implements the stage's provider Protocol
on top of ``FallbackAdapter.run`` and defines the probe.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, ClassVar, Generic, TypeVar

from services.runtime import metrics, usage
from services.runtime.config import BaseConfig, parse_list
from services.runtime.errors import APITimeoutError, ConfigError, ProviderError

log = logging.getLogger(__name__)

T = TypeVar("T")
P = TypeVar("P")
_END: Any = object()  # a stream ended without a result

# What starts a provider's first-result clock: the request itself, the input's first item
# (TTS: nothing can be spoken before text exists) or its end (STT: a final needs all the audio).
READY_NOW, READY_FIRST, READY_END = "now", "first", "end"


class ChainConfig(BaseConfig, frozen=True, kw_only=True):
    """Settings every provider stage shares (stage configs inherit them)."""

    # Seconds between background probes of a provider marked unavailable.
    provider_probe_interval: float = 5.0
    # Seconds a probe may take before it counts as failed.
    provider_probe_timeout: float = 10.0
    # The price table (services/runtime/usage.py): a TOML file or its entries inline; empty:
    # usage without cost.
    prices: str = ""


def chain_names(config: Any, stage: str) -> tuple[str, ...]:
    """``VOICEBUS_<STAGE>_PROVIDERS`` when set, else the single ``VOICEBUS_<STAGE>_PROVIDER``."""
    names = parse_list(getattr(config, f"{stage}_providers", "")) or (
        getattr(config, f"{stage}_provider"),)
    if len(set(names)) != len(names):
        raise ConfigError(f"VOICEBUS_{stage.upper()}_PROVIDERS names a provider twice: "
                          f"{','.join(names)}")
    return names


class BudgetExceeded(APITimeoutError):
    """No first result within the stage's first-result budget."""


class Replay(Generic[T]):
    """A turn's input on its way to the providers, with the moments it became ready.

    With ``keep`` (a second provider might be tried) every item is kept so the next provider
    is fed the input from the start, and one task reads the source: a provider abandoned
    mid-read (cancelled inside its ``__anext__``) must not finish the source for the next.
    Without it the input passes straight through."""

    def __init__(self, source: AsyncIterator[T], *, keep: bool) -> None:
        self._source = source
        self.keep = keep
        self.items: list[T] = []
        self.done = False
        self._error: Exception | None = None
        self._grew = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        # Resolved with the loop time of the first item (or of the end) / of the end.
        self.first: asyncio.Future[float] = self._loop.create_future()
        self.ended: asyncio.Future[float] = self._loop.create_future()

    def ready(self, on: str) -> asyncio.Future[float] | None:
        return {READY_FIRST: self.first, READY_END: self.ended}.get(on)

    async def reader(self) -> AsyncIterator[T]:
        if not self.keep:
            async for item in self._source:
                _resolve(self.first, self._loop.time())
                yield item
            self._finish()
            return
        if self._pump is None:
            self._pump = asyncio.create_task(self._fill(), name="fallback-replay")
        index = 0
        while True:
            if index < len(self.items):
                yield self.items[index]
                index += 1
            elif self.done:
                if self._error is not None:
                    raise self._error
                return
            else:
                await self._grew.wait()

    async def _fill(self) -> None:
        try:
            async for item in self._source:
                self.items.append(item)
                _resolve(self.first, self._loop.time())
                self._wake()
        except Exception as exc:  # the stage's own input broke: every reader sees it
            self._error = exc
        finally:
            self._finish()

    def _finish(self) -> None:
        self.done = True
        _resolve(self.first, self._loop.time())
        _resolve(self.ended, self._loop.time())
        self._wake()

    def _wake(self) -> None:
        # A fresh event per growth: waiters hold the old one, which stays set.
        self._grew.set()
        self._grew = asyncio.Event()

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)


class FallbackStream(Generic[T]):
    """The iterator a fallback adapter returns. ``provider`` names the provider answering (or,
    after a failure, the last one tried), so the stage can label its events and metrics."""

    def __init__(self, adapter: FallbackAdapter[Any], call: Callable[..., AsyncIterator[T]],
                 source: AsyncIterator[Any] | None, ready_on: str) -> None:
        self.provider = adapter.slots[0].name
        self._items = adapter._turn(self, call, source, ready_on)

    def __aiter__(self) -> FallbackStream[T]:
        return self

    async def __anext__(self) -> T:
        return await self._items.__anext__()

    async def aclose(self) -> None:
        await self._items.aclose()


def answered_by(stream: Any, provider: Any) -> str:
    """Which provider answers ``stream`` (a bare provider's stream: that provider)."""
    return getattr(stream, "provider", None) or provider.name


class _Slot:
    """One provider in a chain and its availability."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider
        self.name: str = provider.name
        self.up = asyncio.Event()
        self.up.set()
        self.probe: asyncio.Task[None] | None = None


class FallbackAdapter(Generic[P]):
    """Shared logic of the stages' adapters: order, budget, availability, probes, counters."""

    stage: ClassVar[str]

    def __init__(self, providers: Sequence[P], *, first_result_timeout: float,
                 probe_interval: float = 5.0, probe_timeout: float = 10.0) -> None:
        if not providers:
            raise ConfigError(f"no {self.stage} provider configured")
        self.slots = [_Slot(p) for p in providers]
        self.name = ",".join(slot.name for slot in self.slots)
        self.first_result_timeout = first_result_timeout
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        for slot in self.slots:
            metrics.PROVIDER_AVAILABLE.labels(self.stage, slot.name).set(1)

    def commits(self, item: Any) -> bool:
        """Whether ``item`` going out ties the turn to the provider that gave it."""
        return True

    @classmethod
    def from_config(cls, providers: Sequence[P], config: Any) -> FallbackAdapter[P]:
        return cls(providers,
                   first_result_timeout=getattr(config, f"{cls.stage}_first_result_timeout"),
                   probe_interval=config.provider_probe_interval,
                   probe_timeout=config.provider_probe_timeout)

    async def probe(self, provider: P) -> None:
        """A cheap real call through ``provider``; raises if it is still broken."""
        raise NotImplementedError

    def run(self, call: Callable[[P, AsyncIterator[Any] | None], AsyncIterator[T]],
            source: AsyncIterator[Any] | None = None, ready_on: str = READY_NOW,
            ) -> FallbackStream[T]:
        """One turn: ``call(provider, input)`` for each provider in turn until one answers.
        ``source`` (the turn's input, if it streams) is replayed to each provider tried."""
        return FallbackStream(self, call, source, ready_on)

    def available(self, name: str) -> bool:
        return self._slot(name).up.is_set()

    async def wait_available(self, name: str) -> None:
        await self._slot(name).up.wait()

    def _slot(self, name: str) -> _Slot:
        return next(slot for slot in self.slots if slot.name == name)

    async def aclose(self) -> None:
        probes = [slot.probe for slot in self.slots if slot.probe is not None]
        for task in probes:
            task.cancel()
        await asyncio.gather(*probes, return_exceptions=True)
        for slot in self.slots:
            try:
                await slot.provider.aclose()
            except Exception:  # closing the others matters more
                log.exception("closing %s failed", slot.name, extra=self._extra(slot))

    # ---- one turn ------------------------------------------------------------------------

    async def _turn(self, stream: FallbackStream[T], call: Callable[..., AsyncIterator[T]],
                    source: AsyncIterator[Any] | None, ready_on: str) -> AsyncIterator[T]:
        slots = [slot for slot in self.slots if slot.up.is_set()] or list(self.slots)
        # Input is kept only when a second provider might need it.
        replay = Replay(source, keep=len(slots) > 1) if source is not None else None
        failures: list[tuple[str, Exception]] = []
        try:
            for index, slot in enumerate(slots):
                if index:
                    self._moved(slots[index - 1], slot)
                stream.provider = slot.name
                # What this provider reads and makes is charged to it (usage.py).
                used = usage.attempt(self.stage, slot.name)
                reader = usage.metered_input(self.stage, used, replay.reader() if replay else None)
                items = usage.metered_output(self.stage, used, call(slot.provider, reader),
                                             getattr(self, "sample_rate", 0))
                budget = self.first_result_timeout if index < len(slots) - 1 else None
                ready = replay.ready(ready_on) if replay else None
                started = asyncio.get_running_loop().time()
                committed = failed = False
                try:
                    # Results before the committing one (STT partials) go out too, but the
                    # budget still runs and a failure still moves the turn on.
                    item = await self._next(slot, items, budget, ready, started, first=True)
                    while item is not _END and not self.commits(item):
                        yield item
                        item = await self._next(slot, items, budget, ready, started)
                    committed = True
                    if item is not _END:
                        yield item
                        async for item in items:
                            yield item
                    return
                except Exception as exc:
                    failed = True
                    if used is not None:
                        used.failed = True
                    self._failed(slot, exc)
                    if committed:
                        raise  # a result went out: the stage reports the failure, no retry
                    failures.append((slot.name, exc))
                finally:
                    await _close(items)
                    # Also after an early close (barge-in): the provider did its part.
                    if committed and not failed:
                        self._succeeded(slot)
            raise self._all_failed(failures)
        finally:
            if replay is not None:
                await replay.close()

    async def _next(self, slot: _Slot, items: AsyncIterator[T], budget: float | None,
                    ready: asyncio.Future[float] | None, started: float, first: bool = False,
                    ) -> T:
        """The provider's next result (or ``_END``), due within ``budget`` seconds of the moment
        its input was ready (the later of ``started`` and ``ready``)."""
        loop = asyncio.get_running_loop()
        try:
            waiting = True  # a done callback already scheduled may run after we stopped
            async with asyncio.timeout(None) as timer:
                def arm(fut: asyncio.Future[float] | None = None) -> None:
                    if waiting and budget is not None and not (fut and fut.cancelled()):
                        timer.reschedule(max(started, fut.result() if fut else started) + budget)

                if ready is None or ready.done():
                    arm(ready)
                else:  # the clock starts when the input is there, not before
                    ready.add_done_callback(arm)
                try:
                    item = await anext(items, _END)
                finally:
                    waiting = False
                    if ready is not None:
                        ready.remove_done_callback(arm)
        except TimeoutError:
            if not timer.expired():
                raise  # the provider's own, not ours
            raise BudgetExceeded(f"no result within {budget:g}s",
                                 provider=slot.name) from None
        if first and item is not _END:
            since = started if ready is None else (
                max(started, ready.result()) if ready.done() else None)
            # A result before the input was complete (an STT partial mid-speech) waited on nothing.
            waited = loop.time() - since if since is not None else 0.0
            metrics.PROVIDER_FIRST_RESULT.labels(self.stage, slot.name).observe(waited)
        return item

    def _succeeded(self, slot: _Slot) -> None:
        metrics.PROVIDER_REQUESTS.labels(self.stage, slot.name, "success").inc()
        if not slot.up.is_set():  # every provider was down and this one answered
            self._mark_up(slot)

    def _all_failed(self, failures: list[tuple[str, Exception]]) -> Exception:
        if len(self.slots) == 1:
            return failures[0][1]  # a chain of one fails exactly like its provider
        detail = "; ".join(f"{name}: {_describe(exc)}" for name, exc in failures)
        retryable = any(getattr(exc, "retryable", False) for _, exc in failures)
        return ProviderError(f"every {self.stage} provider failed: {detail}",
                             provider=self.name, retryable=retryable)

    # ---- availability --------------------------------------------------------------------

    def _failed(self, slot: _Slot, exc: Exception) -> None:
        outcome = "timeout" if isinstance(exc, APITimeoutError) else "failure"
        metrics.PROVIDER_REQUESTS.labels(self.stage, slot.name, outcome).inc()
        log.warning("%s provider %s failed: %s", self.stage, slot.name, _describe(exc),
                    extra=self._extra(slot), exc_info=not isinstance(exc, ProviderError))
        if len(self.slots) > 1:  # alone, it is tried anyway: probing would only add load
            self._mark_down(slot)

    def _moved(self, source: _Slot, target: _Slot) -> None:
        metrics.PROVIDER_FALLBACKS.labels(self.stage, source.name, target.name).inc()
        log.warning("falling back from %s to %s", source.name, target.name,
                    extra=self._extra(target))

    def _mark_down(self, slot: _Slot) -> None:
        if not slot.up.is_set():
            return
        slot.up.clear()
        metrics.PROVIDER_AVAILABLE.labels(self.stage, slot.name).set(0)
        # A context of its own: probes are not the failed turn's work (nor its trace).
        slot.probe = asyncio.create_task(self._probe_until_back(slot),
                                         name=f"{self.stage}:probe:{slot.name}",
                                         context=contextvars.Context())

    def _mark_up(self, slot: _Slot) -> None:
        slot.up.set()
        metrics.PROVIDER_AVAILABLE.labels(self.stage, slot.name).set(1)
        if slot.probe is not None and slot.probe is not asyncio.current_task():
            slot.probe.cancel()
        slot.probe = None
        log.info("%s provider %s is available again", self.stage, slot.name,
                 extra=self._extra(slot))

    async def _probe_until_back(self, slot: _Slot) -> None:
        while True:
            # A schedule, not a race: probes are spaced so a broken vendor is not hammered.
            await asyncio.sleep(self.probe_interval)
            try:
                async with asyncio.timeout(self.probe_timeout):
                    await self.probe(slot.provider)
            except Exception as exc:
                metrics.PROVIDER_PROBES.labels(self.stage, slot.name, "failure").inc()
                log.info("probe of %s failed: %s", slot.name, _describe(exc),
                         extra=self._extra(slot))
                continue
            metrics.PROVIDER_PROBES.labels(self.stage, slot.name, "success").inc()
            self._mark_up(slot)
            return

    def _extra(self, slot: _Slot) -> dict[str, str]:
        return {"stage": self.stage, "provider": slot.name}


def _resolve(fut: asyncio.Future[float], value: float) -> None:
    if not fut.done():
        fut.set_result(value)


async def _close(items: AsyncIterator[Any]) -> None:
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        await aclose()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ProviderError):
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"
