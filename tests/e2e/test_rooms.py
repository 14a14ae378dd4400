"""A room belongs to its user: a second person who joins the same room is not heard, is not
answered, and receives none of the user's transcripts. Once the user has left, whoever comes
next (a reloaded page has a new identity) is the session's user. Unless the agent is in a
meeting (the ``meeting`` profile): then everyone is heard, each under their own name, the agent
answers whoever addresses it, and anyone may cut it short. Real livekit-server, nats-server,
every stage and the token service."""

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
        # Not a meeting: the page shows nobody's lines but the agent's and its user's own.
        assert "voicebus.meeting" not in \
            user.room.remote_participants[AGENT_IDENTITY].attributes
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


async def test_a_meeting_hears_everyone_and_answers_whoever_addresses_it(
        lk_stack, rooms_tap, tmp_path) -> None:
    tap, room = rooms_tap, "meeting"
    await tap.watch(sj.session_all(room))

    async def speech(name: str, text: str) -> tuple[bytes, int]:
        return read_wav(await say_to_wav(text, tmp_path / f"{name}.wav", lead_ms=0))[:2]

    chatter = await speech("chatter", "Did you see the game last night?")
    alice_asks = await speech("alice", "Computer, what time is it?")
    bob_asks = await speech("bob", "Computer, where is the station?")
    story = await speech("story", "Hey computer, tell me a long story about the sea and the ships.")
    stop = await speech("stop", "Wait, wait, stop please, I have something to say.")
    alice = Caller(lk_stack.token_url, room, "alice", agent="meeting")
    bob = Caller(lk_stack.token_url, room, "bob", agent="meeting")

    def reply_to(turn_of: ev.Verdict) -> ev.ReplyDone | None:
        done = tap.of(ev.ReplyDone, room, turn=turn_of.turn)
        return done[0] if done else None

    def judged() -> str:
        """What was heard and decided so far, for a failure's message."""
        return "; ".join(f"{e.turn} {e.speaker}: {e.text!r} → "
                         f"{[(v.action, v.reason) for v in tap.of(ev.Verdict, room, turn=e.turn)]}"
                         for e in tap.of(ev.Transcript, room, final=True))

    async def answered(speaker: str, words: str) -> ev.Verdict:
        verdict = await tap.wait_for(lambda: next(
            (v for v in tap.of(ev.Verdict, room, action="answer", speaker=speaker)
             if words in v.text.lower()), None), 30, f"{speaker} answered")
        await tap.wait_for(lambda: tap.of(ev.Playback, room, turn=verdict.turn, final=True),
                           30, f"the reply to {speaker}")
        return verdict

    try:
        await alice.join()
        await bob.join()
        await tap.wait_for(lambda: len({t.speaker for t in tap.of(ev.InputTrack, room,
                                                                   active=True)}) == 2,
                           30, "both microphones heard")
        await tap.wait_for(lambda: tap.of(ev.Playback, room, turn=0, final=True), 30,
                           "the greeting")
        await bob.say(*chatter)                   # talk between people: heard, not answered
        await tap.wait_for(lambda: tap.of(ev.Verdict, room, reason=ev.NOT_ADDRESSED,
                                          speaker="bob"), 30, "bob's chatter judged")
        await alice.say(*alice_asks)
        to_alice = await answered("alice", "time")
        await bob.say(*bob_asks)
        to_bob = await answered("bob", "station")
        # Each reply names whom it answers (the model sees who said what).
        assert "alice" in reply_to(to_alice).text.lower(), reply_to(to_alice)
        assert "bob" in reply_to(to_bob).text.lower(), reply_to(to_bob)
        # A long reply to Alice, cut short by Bob: the one voice stops for everyone.
        await alice.say(*story)
        # Whatever words the recogniser makes of it (she named the agent; it may hear it as
        # two turns, "computer" and the rest): the reply to her that is playing is the one.
        playing = await tap.wait_for(lambda: next(
            (p for p in tap.of(ev.Playback, room, final=False) if p.turn > to_bob.turn
             and tap.of(ev.Verdict, room, turn=p.turn, action="answer", speaker="alice")),
            None), 30, "the story playing")
        long_one = playing
        await bob.say(*stop)
        (cut,) = await tap.wait_for(lambda: tap.of(ev.Cancel, room, turn=long_one.turn), 30,
                                    "bob's barge-in")
        (played,) = await tap.wait_for(lambda: tap.of(ev.Playback, room, turn=long_one.turn,
                                                       final=True), 30, "the story cut")
        await alice.wait_state("listening", timeout=30)
        await bob.wait_state("listening", timeout=30)
        # The agent tells the pages that everyone is heard (they then show others' lines).
        agent = alice.room.remote_participants[AGENT_IDENTITY]
        assert agent.attributes.get("voicebus.meeting") == "true", agent.attributes
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; heard so far: {judged()}") from None
    finally:
        await bob.leave()
        await alice.leave()

    assert played.interrupted
    # …cut by Bob's speech, which began while it played.
    bob_spoke = [e.ts_ns for e in tap.of(ev.SpeechStarted, room, speaker="bob")
                 if e.ts_ns > playing.ts_ns]
    assert bob_spoke and cut.ts_ns > bob_spoke[0], (cut, bob_spoke)
    assert all("game" not in v.text.lower() for v in tap.of(ev.Verdict, room, action="answer"))
    finals = tap.of(ev.Transcript, room, final=True)
    assert {"alice", "bob"} <= {t.speaker for t in finals}, finals
    for caller in (alice, bob):
        # Both sides of the meeting reach everyone, each line under its speaker's identity.
        assert any("time" in t.lower() for t in caller.transcript("alice")), caller.segments
        assert any("station" in t.lower() for t in caller.transcript("bob")), caller.segments
        agent_lines = caller.transcript(AGENT_IDENTITY)
        assert any("alice" in t.lower() for t in agent_lines), agent_lines
