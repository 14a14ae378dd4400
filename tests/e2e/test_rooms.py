"""A room belongs to its user: a second person who joins the same room is not heard, is not
answered, and receives none of the user's transcripts. Once the user has left, whoever comes
next (a reloaded page has a new identity) is the session's user. Real livekit-server,
nats-server, every stage and the token service."""

from __future__ import annotations

import pytest
import pytest_asyncio

from proto import events as ev
from proto import subjects as sj
from services.ingress.audio import read_wav
from services.runtime.livekit import AGENT_IDENTITY
from voicebus.call import Caller
from voicebus.client import Tap
from voicebus.speech import say_to_wav

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(loop_scope="module")
async def rooms_tap(lk_stack):
    nc = await lk_stack.connect()
    tap = Tap(nc)
    yield tap
    await tap.close()
    await nc.close()


async def test_a_second_person_in_the_room_is_not_heard_and_gets_no_transcripts(
        lk_stack, rooms_tap, tmp_path) -> None:
    tap, room = rooms_tap, "owned"
    await tap.watch(sj.session_all(room))
    question = read_wav(await say_to_wav("What time is it?", tmp_path / "q.wav", lead_ms=0))
    intruder_says = read_wav(await say_to_wav("Please call my mother.", tmp_path / "i.wav",
                                              lead_ms=0))
    user = Caller(lk_stack.token_url, room, "owner")
    intruder = Caller(lk_stack.token_url, room, "intruder")
    try:
        await user.join()
        await user.wait_state("listening", timeout=60)
        await intruder.join()
        await intruder.say(*intruder_says[:2])  # speaks first, loud and clear
        await user.say(*question[:2])
        await user.wait_reply(timeout=30)
        await tap.wait_for(lambda: tap.of(ev.Playback, room, turn=1, final=True), 15, "reply")
    finally:
        await intruder.leave()
        await user.leave()

    heard = [t.text for t in tap.of(ev.Transcript, room, final=True)]
    assert heard and all("mother" not in text for text in heard), heard
    assert "time" in heard[0]
    tracks = {t.participant for t in tap.of(ev.InputTrack, room)}
    assert tracks == {"owner"}, tracks
    # The user and the other person have left; the user's page reloads under a new identity
    # and is heard: the session goes on with it.
    reloaded = Caller(lk_stack.token_url, room, "owner-reloaded")
    try:
        await reloaded.join()
        await tap.wait_for(lambda: tap.of(ev.InputTrack, room, participant="owner-reloaded",
                                          active=True), 30, "ingress to hear the reloaded page")
        await reloaded.say(*intruder_says[:2])
        await reloaded.wait_reply(timeout=30)
    finally:
        await reloaded.leave()
    assert "mother" in tap.of(ev.Transcript, room, final=True)[-1].text
    # The user gets both sides of the conversation; the intruder gets none of it.
    assert user.transcript("owner") and user.transcript(AGENT_IDENTITY)
    assert intruder.segments == {}, intruder.segments
