"""A replica that dies costs no turn: two replicas of a stage, real processes on a real
nats-server; the one that owns the session is killed with SIGKILL between turns and in the
middle of one. The other replica takes the session over when the dead one's lease expires
(the server's delete marker, not a timer of ours), the next utterance is answered by it, and
the turn that was in flight ends as docs/operations.md says."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from proto import codec
from proto import events as ev
from proto import subjects as sj
from services.ingress.audio import FRAME_BYTES, Resampler, read_wav
from services.llm.provider import ChatMessage
from services.runtime.ledger import RECORD_CODEC, STATE_BUCKET, FloorRecord, floor_key
from tests.conftest import LogTail
from tests.fakes.openai_server import start_fake_openai
from voicebus.client import Tap, dispatch
from voicebus.launcher import Stack
from voicebus.speech import say_to_wav

SESSION = "phoenix"
# Kill → the stage serves again: lease lifetime (1 s) + the server's marker timer + the claim.
# The bound is generous for a loaded machine; `voicebus bench chaos` measures it.
TAKEOVER_S = 15


class Pair:
    """nats-server and two replicas of one stage, driven through the bus."""

    def __init__(self, stack: Stack, nc: Any, tap: Tap) -> None:
        self.stack, self.nc, self.tap = stack, nc, tap
        self.seq = itertools.count(1)

    async def publish(self, topic: sj.Topic, cls: type[Any], **fields: Any) -> Any:
        event = cls(session=SESSION, seq=next(self.seq), ts_ns=time.time_ns(), **fields)
        await self.nc.publish(topic.subject(SESSION), codec.encode(event))
        return event

    def owner(self, stage: str) -> str:
        return [r.replica for r in self.tap.of(ev.StageReady, SESSION, stage=stage)][-1]

    async def kill_owner(self, stage: str) -> tuple[str, int]:
        """SIGKILL the replica that owns the session; (its name, when, on the wall clock)."""
        owner = self.owner(stage)
        self.stack.procs[owner].process.kill()
        await self.stack.procs[owner].process.wait()
        return owner, time.time_ns()

    async def taken_over(self, stage: str, dead: str, since_ns: int) -> str:
        ready = await self.tap.wait_for(
            lambda: [r for r in self.tap.of(ev.StageReady, SESSION, stage=stage)
                     if r.replica != dead and r.ts_ns > since_ns],
            TAKEOVER_S, f"another {stage} replica to take over")
        return ready[-1].replica

    async def restart(self, stage: str, name: str) -> None:
        """Start the killed replica again, as an orchestrator would."""
        await self.stack.start_stage(stage, int(name.removeprefix(stage) or 0))
        await self.stack.wait_ready((stage,))


async def start_pair(tmp_path, stage: str, **env: str) -> AsyncIterator[Pair]:
    logs = LogTail(tmp_path / "stack.log")
    stack = Stack(tmp_path, sink=logs, replicas={stage: 2}, env=env)
    stack.logs = logs  # type: ignore[attr-defined]
    await stack.start(stages=(stage,))
    nc = await stack.connect()
    tap = Tap(nc)
    await tap.watch(sj.session_all(SESSION))
    try:
        yield Pair(stack, nc, tap)
    finally:
        await tap.close()
        await nc.close()
        codes = await stack.stop()
        alive = {name: code for name, code in codes.items() if code != -9}
        assert all(code == 0 for code in alive.values()), f"{codes}\n{logs.dump()}"


@pytest.fixture
async def llm_pair(tmp_path):
    fake = await start_fake_openai(api_key="test-key")
    async for pair in start_pair(tmp_path, "llm", VOICEBUS_LLM_PROVIDER="openai",
                                 OPENAI_API_KEY="test-key", OPENAI_BASE_URL=fake.base_url):
        pair.fake = fake  # type: ignore[attr-defined]
        yield pair
    await fake.close()


async def answer(pair: Pair, turn: int, text: str) -> ev.ReplyDone:
    await pair.publish(sj.FLOOR_VERDICT, ev.Verdict, turn=turn, action="answer", text=text)
    done = await pair.tap.wait_for(lambda: pair.tap.of(ev.ReplyDone, SESSION, turn=turn), 15,
                                   f"the reply to turn {turn}")
    return done[0]


async def test_llm_replica_killed_between_turns_and_mid_turn(llm_pair: Pair) -> None:
    pair, fake = llm_pair, llm_pair.fake  # type: ignore[attr-defined]
    await dispatch(pair.nc, pair.tap, SESSION, stages=("llm",))
    assert (await answer(pair, 1, "what time is it")).text == "You said: what time is it."

    # (a) Between turns: the next question is answered by the other replica, with history.
    dead, killed = await pair.kill_owner("llm")
    heir = await pair.taken_over("llm", dead, killed)
    await pair.restart("llm", dead)
    assert (await answer(pair, 2, "call my mother")).text == "You said: call my mother."
    assert [m["content"] for m in fake.requests[-1]["messages"][1:]] == [
        "what time is it", "You said: what time is it.", "call my mother"]

    # (b) Mid-turn: the model is still writing when its replica dies. The turn is closed with
    # an error by the replica that takes over; the next question is answered.
    fake.reply = "One two three four five six seven eight."
    fake.hold_after(2)
    await pair.publish(sj.FLOOR_VERDICT, ev.Verdict, turn=3, action="answer", text="count")
    await pair.tap.wait_for(lambda: len(pair.tap.of(ev.ReplyDelta, SESSION, turn=3)) >= 2, 15,
                            "the first words of reply 3")
    # The judge holds the floor for reply 3 (its record in KV says so).
    await _keep_floor(pair, turn=3)
    _, killed = await pair.kill_owner("llm")
    await pair.taken_over("llm", heir, killed)
    closed = await pair.tap.wait_for(lambda: pair.tap.of(ev.ReplyDone, SESSION, turn=3),
                                     TAKEOVER_S, "reply 3 closed")
    assert closed[0].error == "replica lost" and closed[0].interrupted
    assert [e.turn for e in pair.tap.of(ev.StageError, SESSION)] == [3]
    fake.reset()
    fake.reply = None
    assert (await answer(pair, 4, "are you there")).text == "You said: are you there."
    entry = await (await pair.nc.jetstream().key_value("voicebus_history")).get(SESSION)
    history = msgspec.msgpack.decode(entry.value, type=list[ChatMessage])
    assert [m.turn for m in history] == [1, 1, 2, 2, 4, 4]


async def _keep_floor(pair: Pair, turn: int) -> None:
    """Write the judge's record as egress keeps it while reply ``turn`` holds the floor (no
    egress runs in this test)."""
    from services.runtime.ledger import RECORD_CODEC, FloorRecord, floor_key

    kv = await pair.nc.jetstream().key_value("voicebus_sessions")
    await kv.put(floor_key(SESSION), RECORD_CODEC[0].encode(FloorRecord(judged=turn, reply=turn)))


@pytest.fixture
async def tts_pair(tmp_path):
    async for pair in start_pair(tmp_path, "tts"):
        yield pair


async def test_tts_replica_killed_mid_turn_and_between_turns(tts_pair: Pair) -> None:
    pair = tts_pair
    await dispatch(pair.nc, pair.tap, SESSION, stages=("tts",))
    long = " ".join(f"This is sentence number {n} of a long answer." for n in range(1, 61))
    await pair.publish(sj.LLM_DELTA, ev.ReplyDelta, turn=1, text=long)
    await pair.publish(sj.LLM_DONE, ev.ReplyDone, turn=1, text=long)
    await pair.tap.wait_for(lambda: pair.tap.of(ev.AudioFrame, SESSION, turn=1), 15,
                            "the first audio of turn 1")
    await _keep_floor(pair, turn=1)
    dead, killed = await pair.kill_owner("tts")
    heir = await pair.taken_over("tts", dead, killed)
    # (b) The turn in flight is closed by the heir: its text died with the replica.
    done = await pair.tap.wait_for(lambda: pair.tap.of(ev.SynthesisDone, SESSION, turn=1),
                                   TAKEOVER_S, "turn 1 closed")
    assert done[0].interrupted and done[0].frames == 0
    # (a) The next reply is spoken by the heir, in full.
    await pair.publish(sj.LLM_DELTA, ev.ReplyDelta, turn=2, text="Short answer.")
    await pair.publish(sj.LLM_DONE, ev.ReplyDone, turn=2, text="Short answer.")
    second = await pair.tap.wait_for(lambda: pair.tap.of(ev.SynthesisDone, SESSION, turn=2), 15,
                                     "turn 2")
    assert second[0].frames > 0 and not second[0].interrupted
    frames = pair.tap.of(ev.AudioFrame, SESSION, topic=sj.TTS_AUDIO, turn=2)
    assert len(frames) == second[0].frames and pair.owner("tts") == heir


@pytest.fixture
async def stt_pair(tmp_path):
    async for pair in start_pair(tmp_path, "stt", VOICEBUS_STT_WARM_DECODERS="1"):
        yield pair


@pytest.fixture
async def stt_idle_pair(tmp_path):
    async for pair in start_pair(tmp_path, "stt", VOICEBUS_STT_USER_IDLE_S=str(IDLE_S)):
        yield pair


IDLE_S = 2.0


async def _frames(text: str, folder) -> list[bytes]:
    path = await say_to_wav(text, folder / "q.wav", lead_ms=0)
    pcm, rate, channels = read_wav(path)
    resampler = Resampler(rate, channels)
    audio = resampler.process(pcm) + resampler.flush()
    return [audio[i:i + FRAME_BYTES] for i in range(0, len(audio) - FRAME_BYTES + 1, FRAME_BYTES)]


async def test_stt_replica_killed_between_turns_and_mid_utterance(stt_pair: Pair, tmp_path) -> None:
    pair = stt_pair
    frames = await _frames("What time is it?", tmp_path)
    await dispatch(pair.nc, pair.tap, SESSION, stages=("stt",))

    async def speak(*, kill_midway: bool = False) -> int:
        """One utterance; with ``kill_midway`` its STT owner dies half-way through it."""
        await pair.publish(sj.INGRESS_VAD, ev.SpeechStarted, pts_ms=0)
        killed = 0
        for index, pcm in enumerate(frames):
            if kill_midway and index == len(frames) // 2:
                dead, killed = await pair.kill_owner("stt")
            await pair.publish(sj.INGRESS_AUDIO, ev.AudioFrame, pcm=pcm, sample_rate=16000)
        await pair.publish(sj.INGRESS_VAD, ev.SpeechEnded, pts_ms=0, speech_ms=20 * len(frames))
        if kill_midway:
            await pair.taken_over("stt", dead, killed)
        return killed

    async def final(turn: int) -> ev.Transcript:
        found = await pair.tap.wait_for(
            lambda: pair.tap.of(ev.Transcript, SESSION, turn=turn, final=True), 20,
            f"the final of turn {turn}")
        return found[0]

    await speak()
    assert (await final(1)).text == "what time is it"
    # (a) Between turns: the heir goes on from the turn counter in KV.
    dead, killed = await pair.kill_owner("stt")
    await pair.taken_over("stt", dead, killed)
    await pair.restart("stt", dead)
    await speak()
    assert (await final(2)).text == "what time is it"
    # (b) Mid-utterance: what the dead replica had heard is gone, so that utterance gets no
    # final; its turn number was never saved, and the next utterance opens it again.
    await speak(kill_midway=True)
    await speak()
    assert (await final(3)).text == "what time is it"
    assert [t.turn for t in pair.tap.of(ev.Transcript, SESSION, final=True)] == [1, 2, 3]


async def test_stt_heir_knows_the_agent_listens_and_still_prompts_a_silent_user(
        stt_idle_pair: Pair) -> None:
    """The agent's state is published when it changes; a replica that takes over reads it
    from the judge's record, so a user who walked away is still prompted, then told goodbye,
    without waiting for a change that may never come."""
    pair = stt_idle_pair
    await dispatch(pair.nc, pair.tap, SESSION, stages=("stt",))
    kv = await pair.nc.jetstream().key_value(STATE_BUCKET)
    await kv.put(floor_key(SESSION), RECORD_CODEC[0].encode(FloorRecord(greeted=True)))
    await pair.publish(sj.FLOOR_STATE, ev.AgentState, state="listening")
    dead, killed = await pair.kill_owner("stt")
    await pair.taken_over("stt", dead, killed)
    idle = await pair.tap.wait_for(
        lambda: [i for i in pair.tap.of(ev.UserIdle, SESSION) if i.ts_ns > killed],
        IDLE_S + TAKEOVER_S, "the heir's user-idle turn")
    assert idle[0].count == 1
