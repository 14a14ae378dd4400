"""Usage and cost per turn in real stage processes on a real nats-server: the STT (instant), the
LLM (the OpenAI fake, then echo behind it) and the TTS (instant) each end every turn with one
``Usage`` per provider on ``<stage>.usage``, count ``voicebus_usage_total`` and
``voicebus_cost_usd_total`` on their /metrics, and the session's capture holds the events, so
an exported recording shows them turn by turn."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nats.js import api
from prometheus_client.parser import text_string_to_metric_families

from proto import codec
from proto import events as ev
from proto import subjects as sj
from services.tts.chunker import SentenceChunker
from services.tts.config import TtsConfig
from tests.conftest import LogTail
from tests.fakes.openai_server import FakeOpenAI, start_fake_openai
from voicebus import record, timeline
from voicebus.client import Tap, dispatch
from voicebus.launcher import Stack

KEY = "test-key"
SESSION = "usage"
# USD per unit, as an operator would write them; echo has no price: its events carry no cost.
PRICES = ("stt.instant.audio_in_s=0.006/min,llm.openai.input_tokens=2.5/1M,"
          "llm.openai.output_tokens=10/1M,tts.instant.characters=30/1M")
FRAME = bytes(640)  # 20 ms at 16 kHz


async def metrics_of(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


class Run:
    def __init__(self, stack: Stack, nc: Any, tap: Tap, fake: FakeOpenAI) -> None:
        self.stack, self.nc, self.tap, self.fake = stack, nc, tap, fake
        self.seq = itertools.count(1)

    async def publish(self, topic: sj.Topic, cls: type[Any], **fields: Any) -> None:
        event = cls(session=SESSION, seq=next(self.seq), ts_ns=time.time_ns(), **fields)
        await self.nc.publish(topic.subject(SESSION), codec.encode(event))

    async def wait(self, what: str, predicate: Any) -> Any:
        return await self.tap.wait_for(predicate, 20, what)

    def used(self, stage: str, turn: int) -> list[ev.Usage]:
        return self.tap.of(ev.Usage, SESSION, topic=sj.USAGE[stage], turn=turn)

    async def verdict(self, turn: int, text: str) -> None:
        await self.publish(sj.FLOOR_VERDICT, ev.Verdict, turn=turn, action="answer", text=text)


@pytest.fixture
async def run(tmp_path: Path) -> AsyncIterator[Run]:
    logs = LogTail(tmp_path / "stack.log")
    fake = await start_fake_openai(api_key=KEY)
    stack = Stack(tmp_path, sink=logs, metrics=True, env={"VOICEBUS_RECORD": "events",
                                                          "VOICEBUS_PRICES": PRICES})
    await stack.start(stages=())
    # The three provider stages start side by side.
    await stack.start_stage("stt", VOICEBUS_STT_PROVIDER="instant")
    await stack.start_stage("llm", VOICEBUS_LLM_PROVIDERS="openai,echo", OPENAI_API_KEY=KEY,
                            OPENAI_BASE_URL=fake.base_url, VOICEBUS_LLM_RETRIES="0",
                            VOICEBUS_LLM_TIMEOUT="5")
    await stack.start_stage("tts", VOICEBUS_TTS_PROVIDER="instant")
    nc = await stack.connect()
    tap = Tap(nc)
    try:
        await stack.wait_ready(("stt", "llm", "tts"))
        await tap.watch(sj.session_all(SESSION))
        await dispatch(nc, tap, SESSION, stages=("stt", "llm", "tts"))
        yield Run(stack, nc, tap, fake)
    finally:
        await tap.close()
        await nc.close()
        codes = await stack.stop()
        await fake.close()
    assert all(code == 0 for code in codes.values()), f"{codes}\n{logs.dump()}"


def chunk_chars(deltas: list[ev.ReplyDelta]) -> int:
    """The characters the TTS gave its provider: the reply's chunks as its chunker cut them."""
    config = TtsConfig.from_env()  # as the stage reads it
    chunker = SentenceChunker(max_chars=config.tts_max_chunk_chars,
                              first_clause=config.tts_first_clause_chars)
    chunks = [c for d in deltas for c in chunker.push(d.text)] + chunker.flush()
    return sum(len(c.text) for c in chunks)


async def test_every_stage_reports_each_turns_usage_and_cost_and_the_record_keeps_it(
        run: Run) -> None:
    # ---- turn 1: spoken, answered by openai, spoken back --------------------------------
    await run.publish(sj.INGRESS_VAD, ev.SpeechStarted, pts_ms=0)
    for index in range(40):  # 0.8 s
        await run.publish(sj.INGRESS_AUDIO, ev.AudioFrame, pcm=FRAME, sample_rate=16000,
                          pts_ms=20 * index)
    await run.publish(sj.INGRESS_VAD, ev.SpeechEnded, pts_ms=800, speech_ms=800)
    (final,) = await run.wait("the final", lambda: run.tap.of(
        ev.Transcript, SESSION, topic=sj.STT_FINAL))
    (stt,) = await run.wait("the STT's usage", lambda: run.used("stt", 1))
    assert (final.turn, stt.stage, stt.provider, stt.requests, stt.failed) == (
        1, "stt", "instant", 1, False)
    assert stt.audio_in_s == 0.8 and stt.cost_usd == pytest.approx(0.8 / 60 * 0.006)

    await run.verdict(1, final.text)
    (llm,) = await run.wait("the LLM's usage", lambda: run.used("llm", 1))
    (done,) = run.tap.of(ev.ReplyDone, SESSION, turn=1)
    # The fake counts words: the prompt's (system and user) in, the reply's out.
    prompt = sum(len(str(m["content"]).split()) for m in run.fake.requests[-1]["messages"])
    assert (done.provider, llm.provider, llm.requests, llm.failed, llm.interrupted) == (
        "openai", "openai", 1, False, False)
    assert (llm.input_tokens, llm.output_tokens) == (prompt, len(done.text.split()))
    assert llm.cost_usd == pytest.approx(prompt * 2.5e-6 + llm.output_tokens * 10e-6)

    (tts,) = await run.wait("the TTS's usage", lambda: run.used("tts", 1))
    (spoken,) = run.tap.of(ev.SynthesisDone, SESSION, turn=1)
    chars = chunk_chars(run.tap.of(ev.ReplyDelta, SESSION, turn=1))
    assert (tts.provider, tts.requests, tts.characters) == ("instant", 1, chars)
    # What the provider made; the frames pad its tail to 20 ms.
    assert spoken.frames * 0.02 - 0.02 < tts.audio_out_s <= spoken.frames * 0.02
    assert tts.cost_usd == pytest.approx(chars * 30e-6)

    # ---- turn 2: the judge cuts the reply after two words -------------------------------
    run.fake.hold_after(2)
    run.fake.reply = "Okay. Counting to ten now."  # a first sentence the TTS speaks at once
    await run.verdict(2, "count to ten")
    await run.wait("two words", lambda: len(run.tap.of(ev.ReplyDelta, SESSION, turn=2)) == 2)
    # Cut while the TTS's provider works on the turn: its first sentence is being spoken.
    await run.wait("the first sentence's audio", lambda: run.tap.of(
        ev.AudioFrame, SESSION, topic=sj.TTS_AUDIO, turn=2))
    await run.publish(sj.FLOOR_CANCEL, ev.Cancel, turn=2, reason="barge-in")
    (llm,) = await run.wait("the cut reply's usage", lambda: run.used("llm", 2))
    # Charged to openai, cut; its API reports tokens only at a stream's end: none, no cost.
    assert (llm.provider, llm.requests, llm.interrupted, llm.input_tokens,
            llm.output_tokens, llm.cost_usd) == ("openai", 1, True, 0, 0, None)
    await run.wait("the cut speech's end", lambda: run.tap.of(ev.SynthesisDone, SESSION, turn=2))
    (tts2,) = await run.wait("the cut speech's usage", lambda: run.used("tts", 2))
    # Cut: what the provider was given until then (the first sentence; the rest never came).
    assert (tts2.provider, tts2.requests, tts2.interrupted, tts2.characters) == (
        "instant", 1, True, len("Okay."))
    run.fake.reset()
    run.fake.reply = None

    # ---- turn 3: openai fails, echo answers the same turn -------------------------------
    run.fake.fail_with_status(500)
    await run.verdict(3, "are you there")
    failed, answered = await run.wait("both providers' usage",
                                      lambda: (u := run.used("llm", 3)) and len(u) == 2 and u)
    assert (failed.provider, failed.failed, failed.requests, failed.input_tokens,
            failed.cost_usd) == ("openai", True, 1, 0, None)
    assert (answered.provider, answered.failed, answered.requests, answered.cost_usd) == (
        "echo", False, 1, None)  # echo has no price: no cost, not a zero
    (tts3,) = await run.wait("the echo reply's speech", lambda: run.used("tts", 3))
    assert tts3.characters == chunk_chars(run.tap.of(ev.ReplyDelta, SESSION, turn=3))
    # One event per provider per turn.
    usages = run.tap.of(ev.Usage, SESSION)
    assert len(usages) == len({(u.stage, u.provider, u.turn) for u in usages})

    # ---- /metrics: the same units and costs, per stage process --------------------------
    stt_m = await metrics_of(run.stack.metrics_ports["stt"])
    assert value(stt_m, "voicebus_usage_total", stage="stt", provider="instant",
                 unit="audio_in_s") == pytest.approx(0.8)
    assert value(stt_m, "voicebus_cost_usd_total", stage="stt",
                 provider="instant") == pytest.approx(stt.cost_usd)
    llm_m = await metrics_of(run.stack.metrics_ports["llm"])
    openai_turns = [u for u in usages if u.provider == "openai"]
    for unit in ("requests", "input_tokens", "output_tokens"):
        assert value(llm_m, "voicebus_usage_total", stage="llm", provider="openai",
                     unit=unit) == sum(getattr(u, unit) for u in openai_turns), unit
    assert value(llm_m, "voicebus_usage_total", stage="llm", provider="echo",
                 unit="requests") == 1
    assert value(llm_m, "voicebus_cost_usd_total", stage="llm",
                 provider="openai") == pytest.approx(run.used("llm", 1)[0].cost_usd)
    assert value(llm_m, "voicebus_cost_usd_total", stage="llm", provider="echo") is None
    tts_m = await metrics_of(run.stack.metrics_ports["tts"])
    spoken_by = [u for u in usages if u.stage == "tts"]
    assert value(tts_m, "voicebus_usage_total", stage="tts", provider="instant",
                 unit="characters") == sum(u.characters for u in spoken_by)
    assert value(tts_m, "voicebus_cost_usd_total", stage="tts",
                 provider="instant") == pytest.approx(sum(u.cost_usd for u in spoken_by))

    # ---- the garbage collector: each stage froze what it loaded, and times its pauses -----
    for stage, port in run.stack.metrics_ports.items():
        samples = await metrics_of(port)
        assert value(samples, "voicebus_gc_frozen_objects", stage=stage) > 10_000, stage
        # settle_heap's own full collection, at least
        assert value(samples, "voicebus_gc_pause_seconds_count", stage=stage,
                     generation="2") >= 1, stage

    # ---- the record: captured, exported as a file, read back ----------------------------
    js = run.nc.jetstream()
    await stored(js, len(usages))
    recording = record.loads(record.dumps(await record.export(js, SESSION)))
    kept = [(subject, event) for subject, _, event in recording.events()
            if isinstance(event, ev.Usage)]
    assert [event for _, event in kept] == usages
    assert {subject for subject, _ in kept} == {sj.USAGE[s].subject(SESSION)
                                                for s in ("stt", "llm", "tts")}
    report = timeline.usage_report(SESSION, recording.entries)
    assert f"turn 1\t{timeline.usage_line(timeline.use_of(run.used('llm', 1)[0]))}" in report
    assert "turn 3\tllm openai: 1 request (failed)" in report
    assert any(line.startswith("total\tllm openai: 3 turns, 3 requests") for line in report)


async def stored(js: Any, count: int) -> None:
    """Until the capture stream holds ``count`` usage events of the session: JetStream stores
    a message after delivering it to live subscribers, so the tap seeing it proves nothing."""
    seen = 0
    enough = asyncio.Event()

    async def on_msg(msg: Any) -> None:
        nonlocal seen
        seen += msg.subject.endswith(".usage")
        if seen >= count:
            enough.set()

    sub = await js.subscribe(sj.session_all(SESSION), stream=record.STREAM, cb=on_msg,
                             ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL)
    try:
        await asyncio.wait_for(enough.wait(), 20)
    finally:
        await sub.unsubscribe()


async def test_a_bad_price_table_stops_the_stage_at_start(tmp_path: Path) -> None:
    logs = LogTail(tmp_path / "stack.log")
    stack = Stack(tmp_path, sink=logs, env={"VOICEBUS_RECORD": "off"})
    await stack.start(stages=())
    try:
        proc = await stack.start_stage("tts", VOICEBUS_TTS_PROVIDER="instant",
                                       VOICEBUS_PRICES="tts.instant.tokens=1")
        # Before NATS is even connected: a configuration error, named, exit 1.
        assert await asyncio.wait_for(proc.process.wait(), 30) == 1
        await proc.pump
    finally:
        await stack.stop()
    assert "VOICEBUS_PRICES" in logs.dump() and "tts stage's units" in logs.dump()
