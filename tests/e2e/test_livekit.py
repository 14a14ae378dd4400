"""A user in a LiveKit room talks to the agent: real livekit-server, real nats-server, the five
stages and the token service each their own process; the user is a Python participant with a
token from the token service, exactly what ``voicebus call`` does."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import pytest
import pytest_asyncio

from proto import events as ev
from proto import subjects as sj
from services.ingress.audio import read_wav
from services.runtime.livekit import AGENT_IDENTITY
from voicebus.call import Caller, CallError, fetch_token
from voicebus.client import Tap
from voicebus.speech import say_to_wav, transcribe_wav

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

ROOM = "lk-e2e"


def _words(text: str) -> set[str]:
    return set(text.lower().replace(".", " ").replace(",", " ").replace("?", " ").split())


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def lk_tap(lk_stack):
    nc = await lk_stack.connect()
    tap = Tap(nc)
    await tap.watch(sj.session_all(ROOM))
    yield tap
    await tap.close()
    await nc.drain()


async def _utterance(text: str, tmp_path) -> tuple[bytes, int]:
    pcm, rate, _ = read_wav(await say_to_wav(text, tmp_path / "q.wav", lead_ms=0))
    return pcm, rate


def _order(states: list[str], *wanted: str) -> bool:
    """``wanted`` appears in ``states`` in this order (other states may come between)."""
    it = iter(states)
    return all(any(s == w for s in it) for w in wanted)


async def test_user_hears_the_agent_with_transcripts_and_states(lk_stack, lk_tap, tmp_path):
    caller = Caller(lk_stack.token_url, ROOM, "alice")
    await caller.join()
    try:
        await caller.wait_state("listening", timeout=30)
        caller.recording.clear()  # the greeting: what is checked below is the reply
        turn = await caller.say(*await _utterance("What time is it?", tmp_path))
        await caller.wait_reply(timeout=30)
        await lk_tap.wait_for(lambda: lk_tap.of(ev.Playback, ROOM, turn=1, final=True), 10,
                              "the final playback report")
    finally:
        caller.save_recording(tmp_path / "reply.wav")
        await caller.leave()

    reply = lk_tap.of(ev.ReplyDone, ROOM, turn=1)[0]
    # The agent's voice reached the user: Whisper hears the echoed question in it.
    heard = await transcribe_wav(tmp_path / "reply.wav")
    assert {"what", "time"} <= _words(heard), heard
    assert turn.first_sound > turn.speech_end > 0

    # lk.transcription: the user's words (partials, then a final) and the agent's reply,
    # attributed to the right participant and track.
    user = [s for s in caller.segments.values() if s.speaker == "alice"]
    agent = [s for s in caller.segments.values() if s.speaker == AGENT_IDENTITY]
    assert len(user) == 1 and user[0].final and {"what", "time"} <= _words(user[0].text), user
    assert user[0].streams >= 2, "no partial transcript reached the room before the final"
    assert user[0].track_id == caller.mic_sid
    # The greeting first (turn 0), then the reply.
    assert len(agent) == 2 and agent[1].final and agent[1].text == reply.text, agent
    assert agent[1].track_id == caller.agent_track_sid != ""

    # lk.agent.state went listening → thinking → speaking → listening, and the bus agrees.
    states = [state for _, state in turn.states]
    assert _order(["listening", *states], "listening", "thinking", "speaking", "listening"), states
    on_bus = [e.state for e in lk_tap.of(ev.AgentState, ROOM)]
    assert _order(on_bus, "initializing", "listening", "thinking", "speaking", "listening"), on_bus


async def test_user_rejoins_and_republishes(lk_stack, lk_tap, tmp_path):
    """Within one session the user leaves and comes back (a page reload: a new participant and
    track), then republishes the microphone: ingress follows each new track, the session is not
    ended under them, and the conversation goes on with its turn counter and history."""
    room = "lk-e2e-rejoin"
    await lk_tap.watch(sj.session_all(room))
    asks = [("What time is it?", {"what", "time"}), ("Please call my mother.", {"call", "mother"}),
            ("Where is the nearest train station?", {"train", "station"})]

    async def ask(caller: Caller, index: int) -> None:
        await caller.say(*await _utterance(asks[index][0], tmp_path))
        await caller.wait_reply(timeout=30)

    first = Caller(lk_stack.token_url, room, "carol")
    await first.join()
    await first.wait_state("listening", timeout=30)
    await ask(first, 0)
    old_sid = first.mic_sid
    await first.leave()

    again = Caller(lk_stack.token_url, room, "carol")
    await again.join()
    try:
        await lk_tap.wait_for(
            lambda: lk_tap.of(ev.InputTrack, room, track_sid=again.mic_sid, active=True), 15,
            "ingress to hear the rejoined user's track")
        await again.wait_state("listening", timeout=30)
        await ask(again, 1)
        new_sid = await again.publish_microphone()
        await lk_tap.wait_for(
            lambda: lk_tap.of(ev.InputTrack, room, track_sid=new_sid, active=True), 15,
            "ingress to follow the republished track")
        await ask(again, 2)
    finally:
        await again.leave()

    finals = lk_tap.of(ev.Transcript, room, final=True)
    assert [f.turn for f in finals] == [1, 2, 3], finals
    for final, (_, words) in zip(finals, asks):
        assert words <= _words(final.text), final
    # One session throughout: no end between the leave and the last answer. (The agent's
    # "listening" reaches the user by LiveKit, the Playback by NATS: either may come first.)
    last_answer = (await lk_tap.wait_for(
        lambda: lk_tap.of(ev.Playback, room, turn=3, final=True), 10, "the last Playback"))[0]
    assert all(e.ts_ns > last_answer.ts_ns for e in lk_tap.of(ev.SessionEnd, room))
    assert lk_tap.of(ev.InputTrack, room, track_sid=old_sid, active=False)


async def test_room_emptied_ends_the_session(lk_stack, lk_tap, tmp_path):
    """When the last user leaves (and nobody comes back within the grace), livekit-server's
    webhook makes the token service end the session, and the agent leaves the room."""
    room = "lk-e2e-end"
    await lk_tap.watch(sj.session_all(room))
    caller = Caller(lk_stack.token_url, room, "bob")
    await caller.join()
    await caller.wait_state("listening", timeout=30)
    await caller.leave()
    ends = await lk_tap.wait_for(lambda: lk_tap.of(ev.SessionEnd, room), 30, "the session end")
    assert ends[0].reason == "room empty"

    # Every stage let the session go: the agent and ingress left the room.
    from livekit import api

    env = lk_stack.livekit_env
    async with api.LiveKitAPI(env["LIVEKIT_URL"].replace("ws://", "http://"),
                              env["LIVEKIT_API_KEY"], env["LIVEKIT_API_SECRET"]) as lkapi:
        deadline = time.monotonic() + 15
        while True:
            try:
                listed = await lkapi.room.list_participants(api.ListParticipantsRequest(room=room))
                present = [p.identity for p in listed.participants]
            except api.TwirpError:  # the room itself is gone
                present = []
            if not present:
                break
            assert time.monotonic() < deadline, f"still in the room: {present}"
            await asyncio.sleep(0.2)


async def test_voicebus_call_command(lk_stack, lk_tap, tmp_path):
    """The command a user without a browser runs: a 22 kHz Piper WAV is resampled, spoken into
    the room, the reply recorded and both transcripts printed; exit status 0."""
    room = "lk-e2e-cli"
    await lk_tap.watch(sj.session_all(room))
    question = await say_to_wav("What time is it?", tmp_path / "question.wav")
    out = tmp_path / "reply.wav"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voicebus", "call", "--token-url", lk_stack.token_url,
        "--room", room, "--identity", "carol", "--wav", str(question), "--out", str(out),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    printed, _ = await asyncio.wait_for(proc.communicate(), 90)
    text = printed.decode()
    assert proc.returncode == 0, text

    said = {line.split(":", 1)[0].strip(): line.split(":", 1)[1] for line in text.splitlines()
            if line.strip().startswith(("you:", "agent:"))}
    assert {"what", "time"} <= _words(said["you"]), text
    reply = lk_tap.of(ev.ReplyDone, room, turn=1)[0]
    assert said["agent"].strip() == reply.text, text
    # The recording holds the agent's voice: the greeting and the reply, in full (the
    # recognizer mishears the short "what" of a TTS voice through Opus now and then; "time",
    # and the length, it does not).
    pcm, rate, _ = read_wav(out)
    spoken_s = sum(d.frames for d in lk_tap.of(ev.SynthesisDone, room)) * ev.FRAME_MS / 1000
    assert len(pcm) / 2 / rate >= spoken_s, (len(pcm) / 2 / rate, spoken_s)
    assert "time" in _words(await transcribe_wav(out)), text


async def test_the_demo_agent_tells_the_time_through_its_tool(lk_stack, tmp_path):
    """The offline demo agent (agents.toml): its rule-based LLM calls the demo tools' get_time
    on the bus, and the user hears the time the tool gave, in voice and in the transcript."""
    room = "lk-demo"
    nc = await lk_stack.connect()
    tap = Tap(nc)
    await tap.watch(sj.session_all(room))
    caller = Caller(lk_stack.token_url, room, "bob", agent="demo")
    await caller.join()
    try:
        await caller.wait_state("listening", timeout=30)
        caller.recording.clear()  # the demo's greeting
        await caller.say(*await _utterance("What time is it?", tmp_path))
        await caller.wait_reply(timeout=30)
        (played,) = await tap.wait_for(
            lambda: [p for p in tap.of(ev.Playback, room, final=True) if p.turn > 0], 15,
            "the answer played")
    finally:
        caller.save_recording(tmp_path / "reply.wav")
        await caller.leave()
        await tap.close()
        await nc.drain()

    (start,) = tap.of(ev.SessionStart, room, topic=sj.CTL_START)
    assert start.agent == "demo" and start.greeting.startswith("Hello! Ask me the time")
    uses = tap.of(ev.ToolUse, room, topic=sj.LLM_TOOL)
    assert [(u.name, u.done) for u in uses] == [("get_time", False), ("get_time", True)]
    assert not uses[1].error
    told = json.loads(uses[1].result)
    (reply,) = tap.of(ev.ReplyDone, room, turn=played.turn)
    assert reply.text == told["say"] and not reply.interrupted
    assert played.played_ms > 1000 and not played.interrupted
    heard = _words(await transcribe_wav(tmp_path / "reply.wav"))
    assert heard & {"time", told["weekday"].lower()}, heard


async def test_an_unknown_agent_is_refused_with_a_clear_4xx(lk_stack) -> None:
    with pytest.raises(CallError, match="400: unknown agent 'bank'; known: default, demo"):
        await fetch_token(lk_stack.token_url, "lk-bank", "carol", agent="bank")
