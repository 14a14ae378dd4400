"""Talking to a running voicebus from outside: dispatch a session, watch its events.

Used by the CLI, the benchmarks and the tests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from proto import codec
from proto import events as ev
from proto import subjects as sj


class Tap:
    """Records every valid event of the sessions it watches, in arrival order."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.events: list[tuple[str, ev.Event]] = []
        self.rejected = 0
        self._changed = asyncio.Condition()
        self._subs: list[Subscription] = []
        self.on_event: Callable[[str, ev.Event], None] | None = None

    async def watch(self, subject: str) -> None:
        self._subs.append(await self.nc.subscribe(subject, cb=self._on_msg))
        await self.nc.flush()

    async def _on_msg(self, msg: Msg) -> None:
        try:
            event = codec.decode_on(msg.subject, msg.data)
        except codec.Rejected:
            self.rejected += 1
            return
        self.events.append((msg.subject, event))
        if self.on_event is not None:
            self.on_event(msg.subject, event)
        async with self._changed:
            self._changed.notify_all()

    def of(self, cls: type[Any], session: str | None = None, topic: sj.Topic | None = None,
           **where: Any) -> list[Any]:
        """Recorded events of type ``cls`` (of one session, on one topic, with field values)."""
        out = []
        for subject, event in self.events:
            if not isinstance(event, cls) or (session and event.session != session):
                continue
            if topic and subject != topic.subject(event.session):
                continue
            if all(getattr(event, k) == v for k, v in where.items()):
                out.append(event)
        return out

    async def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str = "") -> Any:
        """Wait until ``predicate()`` is truthy; return its value."""
        async def check() -> Any:
            async with self._changed:
                while not (value := predicate()):
                    await self._changed.wait()
                return value
        try:
            return await asyncio.wait_for(check(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}") from None

    async def close(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()


_NO_TIMING = ev.Timing()


def timing(event: ev.Event) -> ev.Timing:
    """An event's measurements (all zero when its producer sent none)."""
    return getattr(event, "timing", None) or _NO_TIMING


async def dispatch(nc: Client, tap: Tap, session: str, *, wav_in: Sequence[str] = (),
                   wav_out: str = "", room: str = "", stages: Sequence[str] = sj.STAGES,
                   greeting: str = "", agent: str = "", timeout: float = 30.0
                   ) -> dict[str, str]:
    """Publish ``SessionStart`` (``FileSessionStart`` with WAV file edges, a development aid)
    and wait until every stage has claimed it.

    ``tap`` must already watch the session. Returns stage -> replica.
    """
    start: ev.SessionStart
    if wav_in or wav_out:
        start = ev.FileSessionStart(session=session, seq=1, ts_ns=time.time_ns(), room=room,
                                    greeting=greeting, wav_in=tuple(wav_in), wav_out=wav_out)
    else:
        start = ev.SessionStart(session=session, seq=1, ts_ns=time.time_ns(), room=room,
                                greeting=greeting, agent=agent)
    await nc.publish(sj.CTL_START.subject(session), codec.encode(start))

    def claimed() -> dict[str, str] | None:
        ready = {e.stage: e.replica for e in tap.of(ev.StageReady, session)}
        return ready if all(s in ready for s in stages) else None

    return await tap.wait_for(claimed, timeout, f"every stage to claim {session}")


async def end_session(nc: Client, session: str, reason: str = "done") -> None:
    end = ev.SessionEnd(session=session, seq=2, ts_ns=time.time_ns(), reason=reason)
    await nc.publish(sj.CTL_END.subject(session), codec.encode(end))
    await nc.flush()
