"""A user in a LiveKit room talks to the agent: real livekit-server, real nats-server, the five
stages and the token service each their own process; the user is a Python participant with a
token from the token service, exactly what ``voicebus call`` does."""

from __future__ import annotations

import nats
import pytest
import pytest_asyncio

from proto import events as ev
from proto import subjects as sj
from services.ingress.audio import read_wav
from services.runtime.livekit import AGENT_IDENTITY
from voicebus.call import Caller
from voicebus.client import Tap
from voicebus.speech import say_to_wav, transcribe_wav

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

ROOM = "lk-e2e"


def _words(text: str) -> set[str]:
    return set(text.lower().replace(".", " ").replace(",", " ").replace("?", " ").split())


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def lk_tap(lk_stack):
    nc = await nats.connect(lk_stack.nats_url)
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
        turn = await caller.say(*await _utterance("What time is it?", tmp_path))
        await caller.wait_reply(timeout=30)
        await lk_tap.wait_for(lambda: lk_tap.of(ev.Playback, ROOM, turn=1, final=True), 10,
                              "the final playback report")
    finally:
        caller.save_recording(tmp_path / "reply.wav")
        await caller.leave()

    reply = lk_tap.of(ev.ReplyDone, ROOM, turn=1)[0]
    # The agent's voice reached the user: pocketsphinx hears the echoed question in it.
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
    assert len(agent) == 1 and agent[0].final and agent[0].text == reply.text, agent
    assert agent[0].track_id == caller.agent_track_sid != ""

    # lk.agent.state went listening → thinking → speaking → listening, and the bus agrees.
    states = [state for _, state in turn.states]
    assert _order(["listening", *states], "listening", "thinking", "speaking", "listening"), states
    on_bus = [e.state for e in lk_tap.of(ev.AgentState, ROOM)]
    assert _order(on_bus, "initializing", "listening", "thinking", "speaking", "listening"), on_bus


async def test_user_rejoins_and_republishes(lk_stack, lk_tap, tmp_path):
    """The user leaves and comes back (a new track), then republishes the microphone: ingress
    follows each new track and the conversation goes on with its history."""
    turns_before = len(lk_tap.of(ev.Transcript, ROOM, final=True))
    caller = Caller(lk_stack.token_url, ROOM, "alice")
    await caller.join()
    try:
        await caller.wait_state("listening", timeout=30)
        await lk_tap.wait_for(
            lambda: lk_tap.of(ev.InputTrack, ROOM, track_sid=caller.mic_sid, active=True), 15,
            "ingress to hear the new track")
        await caller.say(*await _utterance("Please call my mother.", tmp_path))
        await caller.wait_reply(timeout=30)

        old_sid = caller.mic_sid
        new_sid = await caller.publish_microphone()
        assert new_sid != old_sid
        await lk_tap.wait_for(
            lambda: lk_tap.of(ev.InputTrack, ROOM, track_sid=new_sid, active=True), 15,
            "ingress to follow the republished track")
        await caller.say(*await _utterance("Where is the nearest train station?", tmp_path))
        await caller.wait_reply(timeout=30)
    finally:
        await caller.leave()

    finals = lk_tap.of(ev.Transcript, ROOM, final=True)[turns_before:]
    assert [f.turn for f in finals] == [turns_before + 1, turns_before + 2], finals
    assert {"call", "mother"} <= _words(finals[0].text), finals[0]
    assert {"train", "station"} <= _words(finals[1].text), finals[1]
    # The old track's end reached the bus too.
    assert lk_tap.of(ev.InputTrack, ROOM, track_sid=old_sid, active=False)


async def test_room_emptied_ends_the_session(lk_stack, lk_tap, tmp_path):
    """When the last user leaves, livekit-server's webhook makes the token service end the
    session; every stage lets it go."""
    room = "lk-e2e-end"
    await lk_tap.watch(sj.session_all(room))
    caller = Caller(lk_stack.token_url, room, "bob")
    await caller.join()
    await caller.wait_state("listening", timeout=30)
    await caller.leave()
    ends = await lk_tap.wait_for(lambda: lk_tap.of(ev.SessionEnd, room), 30, "the session end")
    assert ends[0].reason == "room empty"
