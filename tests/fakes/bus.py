"""A stage's ``Bus`` as unit tests drive a real ``SessionWorker`` without a server: KV in a
dict, every published event kept in order (``changed`` is set on each)."""

from __future__ import annotations

import asyncio
from typing import Any

from nats.js.errors import KeyNotFoundError

from proto import events as ev
from proto import subjects as sj


class FakeKv:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def get(self, key: str) -> Any:
        if key not in self.data:
            raise KeyNotFoundError
        return type("Entry", (), {"value": self.data[key]})()

    async def put(self, key: str, value: bytes) -> int:
        self.data[key] = value
        return 1


class FakeBus:
    def __init__(self) -> None:
        self.kv = FakeKv()
        self.published: list[tuple[sj.Topic, ev.Event]] = []
        self.changed = asyncio.Event()
        self.handlers: dict[str, Any] = {}

    async def key_value(self, bucket: str, ttl: float) -> FakeKv:
        return self.kv

    async def put(self, kv: FakeKv, key: str, value: bytes) -> int:
        return await kv.put(key, value)

    async def get(self, kv: FakeKv, key: str) -> Any:
        return await kv.get(key)

    async def publish(self, topic: sj.Topic, event: ev.Event, subject: str = "",
                      headers: dict[str, str] | None = None) -> None:
        self.published.append((topic, event))
        self.changed.set()

    async def subscribe(self, subject: str, handler: Any, queue: str = "") -> Any:
        self.handlers[subject] = handler
        return type("Sub", (), {"unsubscribe": staticmethod(_nothing)})()

    def reject(self, *args: Any) -> None:
        raise AssertionError(f"rejected: {args}")


async def _nothing() -> None:
    pass
