"""RoomKeeper's rules, on a stand-in for ``rtc.Room``: which disconnects are rejoined, how
(fresh credentials each attempt, backoff, the listeners told who is gone), and that closing
stops it for good. The real thing, against livekit-server: tests/e2e/test_reconnect.py."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
from livekit import rtc
from prometheus_client import REGISTRY

from services.runtime import livekit as lk


class FakeRoom:
    """What RoomKeeper uses of an ``rtc.Room``: events, the remote participants, connect."""

    def __init__(self, failures: int = 0, joining: asyncio.Event | None = None) -> None:
        self.handlers: dict[str, list[Callable[..., Any]]] = defaultdict(list)
        self.remote_participants: dict[str, object] = {}
        self.tokens: list[str] = []
        self.failures = failures  # connects refused before one succeeds
        self.joining = joining  # connect waits for it (a join in flight)
        self.disconnects = 0
        self.gone: list[object] = []
        self.on("participant_disconnected", self.gone.append)
        self.connection_state = rtc.ConnectionState.CONN_DISCONNECTED
        self.drop_as_it_joins = 0  # connects that succeed but are dropped before they return

    def on(self, event: str, callback: Callable[..., Any]) -> None:
        self.handlers[event].append(callback)

    def emit(self, event: str, *args: Any) -> None:
        for callback in list(self.handlers[event]):
            callback(*args)

    async def connect(self, url: str, token: str, options: object = None) -> None:
        self.tokens.append(token)
        if self.joining is not None:
            await self.joining.wait()
        if len(self.tokens) <= self.failures:
            raise rtc.ConnectError("connection refused")
        if self.drop_as_it_joins:
            self.drop_as_it_joins -= 1
            return  # in, and out again at once: the state says so
        self.connection_state = rtc.ConnectionState.CONN_CONNECTED

    async def disconnect(self) -> None:
        self.disconnects += 1


def _count(outcome: str, stage: str) -> float:
    return REGISTRY.get_sample_value("voicebus_livekit_rejoins_total",
                                     {"stage": stage, "outcome": outcome}) or 0.0


@pytest.fixture(autouse=True)
def fast(monkeypatch):
    monkeypatch.setattr(lk, "REJOIN_FIRST_DELAY", 0.01)
    monkeypatch.setattr(lk, "REJOIN_MAX_DELAY", 0.02)


def _keeper(room: FakeRoom, stage: str, **options: Any) -> tuple[lk.RoomKeeper, list[str]]:
    minted: list[str] = []

    async def credentials() -> tuple[str, str]:
        minted.append(f"token-{len(minted) + 1}")
        return "ws://livekit", minted[-1]

    return lk.RoomKeeper(room, "room-1", credentials, stage=stage, **options), minted  # type: ignore[arg-type]


@pytest.mark.parametrize("reason", ["CLIENT_INITIATED", "DUPLICATE_IDENTITY",
                                    "PARTICIPANT_REMOVED", "ROOM_DELETED"])
async def test_a_decided_disconnect_is_not_rejoined(reason):
    """Our own leave, a replica that took the session over (same identity), an operator."""
    room = FakeRoom()
    keeper, _ = _keeper(room, "unit-final")
    room.emit("disconnected", rtc.DisconnectReason.Value(reason))
    assert not keeper.rejoining and keeper.outages == 0
    await keeper.aclose()
    assert room.tokens == []


async def test_an_outage_is_rejoined_with_fresh_credentials_and_backoff():
    back: list[int] = []
    room = FakeRoom(failures=2)
    room.remote_participants = {"user": "the user", "voicebus-ingress": "ingress"}
    keeper, minted = _keeper(room, "unit-outage", on_back=lambda: back.append(len(room.tokens)))
    before = (_count("rejoined", "unit-outage"), _count("failed", "unit-outage"))

    room.emit("disconnected", rtc.DisconnectReason.SERVER_SHUTDOWN)
    room.emit("disconnected", rtc.DisconnectReason.UNKNOWN_REASON)  # one outage, one loop
    assert keeper.rejoining and keeper.outages == 1
    await asyncio.wait_for(keeper._task, 5)  # type: ignore[arg-type]

    assert room.tokens == minted == ["token-1", "token-2", "token-3"]  # a fresh one each time
    assert back == [3]  # told once, after the join that worked
    # Who was there is gone for the listeners (a restarted server knows nobody), and no
    # longer listed: connect would refuse to list them again.
    assert room.gone == ["the user", "ingress"] and room.remote_participants == {}
    assert _count("rejoined", "unit-outage") - before[0] == 1
    assert _count("failed", "unit-outage") - before[1] == 2
    await keeper.aclose()


async def test_the_sdks_own_reconnect_calls_on_back_too():
    back: list[str] = []
    room = FakeRoom()
    keeper, _ = _keeper(room, "unit-sdk", on_back=lambda: back.append("back"))
    before = _count("sdk", "unit-sdk")
    room.emit("reconnected")
    assert back == ["back"] and room.tokens == []
    assert _count("sdk", "unit-sdk") - before == 1
    await keeper.aclose()
    room.emit("reconnected")  # closed: nothing more
    assert back == ["back"]


async def test_closing_stops_the_rejoining_and_leaves_a_join_in_flight():
    joining = asyncio.Event()
    room = FakeRoom(joining=joining)
    keeper, _ = _keeper(room, "unit-close")
    room.emit("disconnected", rtc.DisconnectReason.SIGNAL_CLOSE)
    while not room.tokens:  # the first attempt is under way
        await asyncio.sleep(0.01)
    closing = asyncio.create_task(keeper.aclose())
    await asyncio.sleep(0.05)
    assert not closing.done()  # the join in flight is let finish…
    joining.set()
    await asyncio.wait_for(closing, 5)
    assert room.disconnects == 1 and len(room.tokens) == 1  # …then left at once, for good
    room.emit("disconnected", rtc.DisconnectReason.SIGNAL_CLOSE)
    assert not keeper.rejoining


async def test_a_room_that_stays_out_of_reach_is_given_up():
    gone: list[str] = []
    room = FakeRoom(failures=1_000)
    keeper, _ = _keeper(room, "unit-gone", give_up_after=0.1, on_gone=gone.append)
    room.emit("disconnected", rtc.DisconnectReason.UNKNOWN_REASON)
    await asyncio.wait_for(keeper._task, 5)  # type: ignore[arg-type]
    assert len(gone) == 1 and gone[0].startswith("room unreachable: connection refused")
    await keeper.aclose()


async def test_a_drop_that_comes_as_the_rejoin_connects_is_rejoined_too():
    back: list[int] = []
    room = FakeRoom()
    room.drop_as_it_joins = 1
    keeper, minted = _keeper(room, "unit-dropped-again",
                             on_back=lambda: back.append(len(room.tokens)))
    room.emit("disconnected", rtc.DisconnectReason.SERVER_SHUTDOWN)
    await asyncio.wait_for(keeper._task, 5)  # type: ignore[arg-type]
    assert minted == ["token-1", "token-2"] and back == [2]  # not "back" after the first
    await keeper.aclose()
