"""Redeploying egress mid-conversation: the replica that speaks for the agent gets SIGTERM, a
second replica takes the session over, joins the room as the agent, learns whose microphone
it is, and the user's next question is answered and transcribed as before."""

from __future__ import annotations

import pytest

from proto import events as ev
from proto import subjects as sj
from services.ingress.audio import read_wav
from services.runtime.livekit import AGENT_IDENTITY
from tests.conftest import LogTail
from voicebus.call import Caller
from voicebus.client import Tap
from voicebus.launcher import Stack
from voicebus.speech import say_to_wav, transcribe_wav

pytestmark = [pytest.mark.e2e]

ROOM = "lk-handover"


async def test_egress_handover_keeps_the_agent_in_the_room(tmp_path):
    logs = LogTail(tmp_path / "stack.log")
    stack = Stack(tmp_path, sink=logs, livekit=True, replicas={"egress": 2})
    await stack.start()
    nc = await stack.connect()
    tap = Tap(nc)
    await tap.watch(sj.session_all(ROOM))
    caller = Caller(stack.token_url, ROOM, "dana")
    try:
        await caller.join()
        await caller.wait_state("listening", timeout=30)
        owner = tap.of(ev.StageReady, ROOM, stage="egress")[0].replica

        code = await stack.procs[owner].stop()
        assert code == 0, logs.dump()
        ready = await tap.wait_for(
            lambda: [r for r in tap.of(ev.StageReady, ROOM, stage="egress") if r.replica != owner],
            30, "the other egress replica to claim the session")
        # The new agent is told whose microphone it transcribes, and listens.
        await tap.wait_for(lambda: [s for s in tap.of(ev.AgentState, ROOM, state="listening")
                                    if s.ts_ns > ready[0].ts_ns], 30, "the new agent to listen")

        pcm, rate, _ = read_wav(await say_to_wav("What time is it?", tmp_path / "q.wav",
                                                 lead_ms=0))
        caller.recording.clear()
        await caller.say(pcm, rate)
        await caller.wait_reply(timeout=30)
    finally:
        caller.save_recording(tmp_path / "reply.wav")
        await caller.leave()
        await tap.close()
        await nc.close()
        codes = await stack.stop()
    assert all(code == 0 for code in codes.values()), (codes, logs.dump())

    heard = await transcribe_wav(tmp_path / "reply.wav")
    assert {"what", "time"} <= set(heard.split()), heard
    user = [s for s in caller.segments.values() if s.speaker == "dana" and s.final]
    assert user and {"what", "time"} <= set(user[-1].text.split()), caller.segments
    assert [s for s in caller.segments.values() if s.speaker == AGENT_IDENTITY and s.final], \
        caller.segments
