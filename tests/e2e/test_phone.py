"""A phone call through LiveKit SIP. LiveKit's SIP service cannot be installed here, so the
caller is what it puts into a room: a participant of kind SIP with its ``sip.*`` attributes,
joining with a token nobody asked the token service for. livekit-server's webhook is then the
only cue: the token service sends the agent, the caller's number reaches ``SessionStart``, and
the agent hears and answers the phone participant like a browser user. Real livekit-server,
nats-server, every stage and the token service."""

from __future__ import annotations

import pytest
from livekit import api

from proto import events as ev
from proto import subjects as sj
from services.ingress.audio import read_wav
from voicebus.call import Caller
from voicebus.client import Tap
from voicebus.speech import say_to_wav

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

NUMBER = "+15550100"


def sip_grant(stack, room: str) -> dict[str, str]:
    """The token LiveKit SIP would mint for a caller (kind SIP, the caller's attributes)."""
    env = stack.livekit_env
    token = (api.AccessToken(env["LIVEKIT_API_KEY"], env["LIVEKIT_API_SECRET"])
             .with_identity(f"sip_{NUMBER}").with_name("Phone caller").with_kind("sip")
             .with_attributes({"sip.phoneNumber": NUMBER, "sip.trunkPhoneNumber": "+15550199",
                               "sip.callID": "SCL_test", "sip.callStatus": "active"})
             .with_grants(api.VideoGrants(room_join=True, room=room, can_publish=True,
                                          can_subscribe=True)))
    return {"url": stack.livekit_url, "token": token.to_jwt()}


async def test_a_phone_caller_is_answered_and_its_number_reaches_the_session(
        lk_stack, tmp_path) -> None:
    room = "call-phone1"
    question = read_wav(await say_to_wav("What time is it?", tmp_path / "q.wav", lead_ms=0))
    nc = await lk_stack.connect()
    tap = Tap(nc)
    caller = Caller(lk_stack.token_url, room, f"sip_{NUMBER}")
    try:
        await tap.watch(sj.session_all(room))
        await caller.join(grant=sip_grant(lk_stack, room))
        await caller.wait_state("listening", timeout=60)  # the agent came, unasked
        await caller.say(*question[:2])
        await caller.wait_reply(timeout=30)
        await tap.wait_for(lambda: tap.of(ev.Playback, room, turn=1, final=True), 15, "reply")
    finally:
        await caller.leave()
        await tap.close()
        await nc.close()

    starts = tap.of(ev.SessionStart, room, topic=sj.CTL_START)
    assert starts and {s.caller for s in starts} == {NUMBER}, starts
    (final,) = tap.of(ev.Transcript, room, turn=1, final=True)
    assert "time" in final.text.lower(), final.text
    assert {t.participant for t in tap.of(ev.InputTrack, room)} == {f"sip_{NUMBER}"}
