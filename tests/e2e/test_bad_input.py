"""Bad input on every subject of a live session: every service stays up, counts each rejection,
and the conversation still completes its turns."""

from __future__ import annotations

import asyncio
import random
import urllib.request
from collections import Counter

import msgspec
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from proto import codec
from proto import events as ev
from proto import subjects as sj
from voicebus.client import dispatch, end_session
from voicebus.speech import say_to_wav

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

SESSION = "storm"
# Which stages subscribe to each subject of a live session (what they must count).
ALL = ("ingress", "stt", "llm", "tts", "egress")
RECEIVERS = {
    sj.INGRESS_AUDIO: ("stt",), sj.INGRESS_VAD: ("stt", "egress"), sj.STT_PARTIAL: ("egress",),
    sj.STT_FINAL: ("egress",), sj.STT_IDLE: ("egress",),
    # The STT follows the agent's state for its early drafts (and its user-idle timer).
    sj.FLOOR_VERDICT: ("llm",), sj.FLOOR_CANCEL: ("llm", "tts"), sj.FLOOR_STATE: ("llm", "stt"),
    # Every stage watches session ends; the LLM also hears this one on its floor.* subscription.
    sj.FLOOR_END: (*ALL, "llm"), sj.LLM_DELTA: ("tts", "egress"),
    sj.LLM_DONE: ("tts", "egress"), sj.TTS_AUDIO: ("egress",), sj.TTS_DONE: ("egress",),
    sj.EGRESS_PLAYBACK: ("ingress", "llm"),
    sj.CTL_START: ALL, sj.CTL_END: ALL,
    # A stage's handover subject reaches its own queue group, and every stage that listens to
    # all that stage says (one subscription per producer keeps its events in order).
    sj.HANDOVER["ingress"]: ("ingress", "stt"), sj.HANDOVER["stt"]: ("stt", "egress"),
    sj.HANDOVER["llm"]: ("llm", "tts", "egress"), sj.HANDOVER["tts"]: ("tts", "egress"),
    sj.HANDOVER["egress"]: ("egress",),
}
# What the stages watch for every session (ghost sessions reach them too): only their own.
EVERY_SESSION = {sj.CTL_START: ALL, sj.CTL_END: ALL, sj.FLOOR_END: ALL,
                 **{sj.HANDOVER[stage]: (stage,) for stage in ALL}}


def bad_payloads(topic: sj.Topic, rng: random.Random) -> list[bytes]:
    """One of each kind of bad message for ``topic`` in session SESSION."""
    other = ev.ReplyDone(session=SESSION, turn=1) if topic is not sj.LLM_DONE else \
        ev.Transcript(session=SESSION, turn=1, text="x")
    return [
        rng.randbytes(rng.randrange(0, 2000)),  # garbage
        codec.encode(other),  # a valid event of the wrong type
        # audio in the wrong format: 8 kHz, 20 ms of it, where 16 kHz / native rate is due
        codec.encode(ev.AudioFrame(session=SESSION, pcm=bytes(320), sample_rate=8000, turn=1))
        if topic is sj.INGRESS_AUDIO else
        # 20 ms at 44.1 kHz is 1 764 bytes, not 320
        codec.encode(ev.AudioFrame(session=SESSION, pcm=bytes(320), sample_rate=44100, turn=1))
        if topic is sj.TTS_AUDIO else rng.randbytes(7),
        # an oversized frame, past the contract's limit
        msgspec.msgpack.encode({"kind": "audio", "session": SESSION, "sample_rate": 16000,
                                "pcm": bytes(ev.MAX_PCM_BYTES + 1)}),
        # a valid event claiming another (unknown) session on this session's subject
        codec.encode(ev.Cancel(session="ghost", turn=1)),
    ]


def rejected_counts(stack) -> Counter:
    counts: Counter = Counter()
    for name, port in stack.metrics_ports.items():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name == "voicebus_messages_rejected":
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        counts[name] += int(sample.value)
    return counts


async def _rejections_settle(stack, before: Counter, expected: Counter) -> dict[str, int]:
    """Counts per stage once they reach what was sent (or after 10 s, whatever they are)."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        after = await asyncio.to_thread(rejected_counts, stack)
        deltas = {stage: after[stage] - before[stage] for stage in ALL}
        if deltas == {stage: expected[stage] for stage in ALL}:
            return deltas
        if asyncio.get_running_loop().time() > deadline:
            return deltas
        await asyncio.sleep(0.1)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def wavs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("storm")
    return [await say_to_wav("What time is it?", folder / "a.wav", lead_ms=1500),
            await say_to_wav("Please call my mother.", folder / "b.wav", lead_ms=400)]


async def test_a_thousand_bad_messages_are_counted_and_the_session_goes_on(stack, bus, tap, wavs):
    await tap.watch(sj.session_all(SESSION))
    before = await asyncio.to_thread(rejected_counts, stack)
    await dispatch(bus, tap, SESSION, wav_in=[str(w) for w in wavs])

    rng = random.Random(1234)
    expected: Counter = Counter()
    topics = list(RECEIVERS)
    for i in range(1000):
        topic = topics[i % len(topics)]
        payloads = bad_payloads(topic, rng)
        await bus.publish(topic.subject(SESSION), payloads[(i // len(topics)) % len(payloads)])
        expected.update(RECEIVERS[topic])
    # Unknown sessions on their own subjects: only the subjects that stages watch for every
    # session (dispatch, ends, handovers) reach anyone; nothing may break.
    for topic in topics:
        await bus.publish(topic.subject("ghost"), rng.randbytes(64))
        expected.update(EVERY_SESSION.get(topic, ()))
    await bus.flush()

    try:
        await tap.wait_for(lambda: len(tap.of(ev.Playback, SESSION, final=True)) >= 2, 60,
                           "both turns to be played after the storm")
    finally:
        await end_session(bus, SESSION)
    deltas = await _rejections_settle(stack, before, expected)
    assert deltas == {stage: expected[stage] for stage in ALL}, stack.logs.dump()
    assert all(proc.alive for proc in stack.procs.values())
    finals = tap.of(ev.Transcript, SESSION, final=True)
    assert [f.turn for f in finals] == [1, 2]
    assert "time" in finals[0].text and "mother" in finals[1].text
    assert all(p.frames_dropped == 0 for p in tap.of(ev.Playback, SESSION, final=True))
