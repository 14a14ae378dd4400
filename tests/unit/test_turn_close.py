"""A turn whose end is being announced is not cut half way: a cut that lands while the LLM
stores a reply, or while TTS publishes the end of its speech, finds the turn over. The end is
announced once (a second, "interrupted" one came from the cut before) and the reply stays in
the history, before the turn that cut it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from proto import events as ev
from proto import subjects as sj
from services.llm.config import LlmConfig
from services.llm.provider import ChatMessage
from services.llm.providers.echo import EchoLlm
from services.llm.service import LlmWorker
from services.runtime.agents import Agents
from services.runtime.service import to_the_end
from services.tts.config import TtsConfig
from services.tts.provider import SpokenAudio
from services.tts.service import TtsWorker
from tests.fakes.bus import FakeBus, FakeKv


async def test_a_cancel_during_the_close_is_absorbed_and_the_close_finishes() -> None:
    gate, steps = asyncio.Event(), []

    async def close() -> str:
        steps.append("announced")
        await gate.wait()
        steps.append("stored")
        return "closed"

    async def turn() -> str:
        return await to_the_end(close(), grace=5)

    task = asyncio.create_task(turn())
    while not steps:
        await asyncio.sleep(0)
    task.cancel()
    task.cancel()  # two cuts (a cancel, then a newer verdict) are both for a turn that is over
    await asyncio.sleep(0)
    assert not task.done()
    gate.set()
    assert await task == "closed"
    assert steps == ["announced", "stored"]
    assert not task.cancelled() and task.cancelling() == 0


async def test_a_cancel_asked_before_the_close_stays_asked() -> None:
    """Only the cuts that land during the close are absorbed: one the turn had caught earlier
    (and not taken back) is still counted when the close is over."""
    async def turn() -> int:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0)  # the turn's work, cut: it goes on to its close
        await to_the_end(asyncio.sleep(0), grace=5)
        return task.cancelling()

    assert await asyncio.create_task(turn()) == 1


async def test_a_close_that_outlives_its_grace_after_a_cut_is_cancelled() -> None:
    """A close stuck (a KV write in an outage) holds a cut turn for ``grace`` at most: then the
    close is cancelled, and so is the turn (a replica that stops is not held up for ever)."""
    stuck, gave_up = asyncio.Event(), asyncio.Event()

    async def close() -> None:
        stuck.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            gave_up.set()
            raise

    task = asyncio.create_task(to_the_end(close(), grace=0.5))
    await stuck.wait()
    task.cancel()
    for _ in range(3):
        await asyncio.sleep(0)
    assert not task.done()  # absorbed, within the grace
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled() and gave_up.is_set()


class Gate:
    """Holds one kind of bus call until the test lets it through."""

    def __init__(self) -> None:
        self.reached, self.open = asyncio.Event(), asyncio.Event()

    async def wait(self) -> None:
        self.reached.set()
        await self.open.wait()


class HoldingBus(FakeBus):
    """The fake bus, able to hold the next KV write or the next publish of one event class."""

    def __init__(self) -> None:
        super().__init__()
        self.hold_put: Gate | None = None
        self.hold_publish: tuple[type[ev.Event], Gate] | None = None

    async def put(self, kv: FakeKv, key: str, value: bytes) -> int:
        if self.hold_put is not None:
            gate, self.hold_put = self.hold_put, None
            await gate.wait()
        return await super().put(kv, key, value)

    async def publish(self, topic: sj.Topic, event: ev.Event, subject: str = "",
                      headers: Any = None) -> None:
        if self.hold_publish is not None and isinstance(event, self.hold_publish[0]):
            gate = self.hold_publish[1]
            self.hold_publish = None
            await gate.wait()
        await super().publish(topic, event, subject, headers)

    def of(self, cls: type[ev.Event]) -> list[Any]:
        return [e for _, e in self.published if isinstance(e, cls)]

    async def until(self, ready: Any) -> None:
        async with asyncio.timeout(5):
            while not ready():
                self.changed.clear()
                await self.changed.wait()


class FakeService:
    def __init__(self, stage: str, config: Any, provider: Any) -> None:
        self.stage, self.config, self.provider = stage, config, provider
        self.bus, self.agents = HoldingBus(), Agents({})
        self.state = self.bus.kv  # the judge's record: none, a new session

    def config_for(self, agent: str) -> Any:
        return self.config

    def provider_for(self, agent: str) -> Any:
        return self.provider


def _verdict(turn: int, action: str, text: str = "") -> ev.Verdict:
    return ev.Verdict(session="s", turn=turn, action=action, text=text)


async def test_the_llm_stores_a_greeting_cut_as_it_is_stored_and_announces_it_once() -> None:
    service = FakeService("llm", LlmConfig(), EchoLlm(ack=""))
    bus = service.bus
    worker = LlmWorker(service, ev.SessionStart(session="s", greeting="Hi there."))  # type: ignore[arg-type]
    await worker.subscribe_inputs()
    bus.hold_put = stored = Gate()
    await worker.handle(_verdict(0, "greet"))
    await stored.reached.wait()  # the greeting is announced, and being stored
    await worker.handle(_verdict(1, "answer", "what time is it"))  # the user spoke: the cut
    stored.open.set()
    await bus.until(lambda: any(d.turn == 1 for d in bus.of(ev.ReplyDone)))
    await worker.close()

    done = [(d.turn, d.text, d.interrupted) for d in bus.of(ev.ReplyDone)]
    assert done == [(0, "Hi there.", False), (1, "What time is it...", False)]
    history = msgspec.msgpack.decode(bus.kv.data["s"], type=list[ChatMessage])
    assert [(m.role, m.content, m.turn) for m in history] == [
        ("assistant", "Hi there.", 0), ("user", "what time is it", 1),
        ("assistant", "What time is it...", 1)]


class OneToneTts:
    name, sample_rate, word_timestamps = "tone", 16000, False

    async def synthesize(self, chunks: AsyncIterator[str], words: Any = None
                         ) -> AsyncIterator[SpokenAudio]:
        index = 0
        async for _ in chunks:
            yield SpokenAudio(pcm=bytes(640), chunk=index)
            index += 1


async def test_tts_cut_as_it_announces_the_end_of_its_speech_announces_it_once() -> None:
    service = FakeService("tts", TtsConfig(tts_trim_lead_ms=0), OneToneTts())
    bus = service.bus
    worker = TtsWorker(service, ev.SessionStart(session="s"))  # type: ignore[arg-type]
    await worker.subscribe_inputs()
    bus.hold_publish = (ev.SynthesisDone, announced := Gate())
    worker.handle(ev.ReplyDelta(session="s", turn=0, text="Hello there."))
    worker.handle(ev.ReplyDone(session="s", turn=0, text="Hello there."))
    await announced.reached.wait()
    worker.handle(ev.Cancel(session="s", turn=0))  # a barge-in, once every frame is out
    announced.open.set()
    await bus.until(lambda: bus.of(ev.SynthesisDone))
    await worker.close()

    (done,) = bus.of(ev.SynthesisDone)
    assert (done.turn, done.frames, done.interrupted) == (0, len(bus.of(ev.AudioFrame)), False)
    assert done.frames > 0
