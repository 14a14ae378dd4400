"""Phone calls: through LiveKit SIP, and through the bus contract of voicebus's own SIP gateway.

LiveKit SIP. LiveKit's SIP service cannot be installed here, so the
caller is what it puts into a room: a participant of kind SIP with its ``sip.*`` attributes,
joining with a token nobody asked the token service for. livekit-server's webhook is then the
only cue: the token service sends the agent, the caller's number reaches ``SessionStart``, and
the agent hears and answers the phone participant like a browser user. Real livekit-server,
nats-server, every stage and the token service."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import pytest_asyncio
import soxr
from livekit import api

from proto import codec
from proto import events as ev
from proto import subjects as sj
from services.ingress.audio import FRAME_BYTES, Resampler, read_wav
from services.stt.config import SttConfig
from services.stt.providers.whisper import WhisperCppStt
from tests.conftest import running_stack
from voicebus.call import Caller
from voicebus.client import Tap
from voicebus.launcher import offline_ear
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
                                          can_publish_data=True, can_subscribe=True)))
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
        # Keys on the keypad (LiveKit SIP's DTMF packets): "#" ends them, and they are a turn
        # the agent answers like words.
        for code, digit in ((1, "1"), (2, "2"), (11, "#")):
            await caller.room.local_participant.publish_dtmf(code=code, digit=digit)
        keyed = await tap.wait_for(lambda: tap.of(ev.ReplyDone, room, turn=2), 30,
                                   "the answer to the keys")
    finally:
        await caller.leave()
        await tap.close()
        await nc.close()

    starts = tap.of(ev.SessionStart, room, topic=sj.CTL_START)
    assert starts and {s.caller for s in starts} == {NUMBER}, starts
    (final,) = tap.of(ev.Transcript, room, turn=1, final=True)
    assert "time" in final.text.lower(), final.text
    assert [d.digit for d in tap.of(ev.Dtmf, room)] == ["1", "2", "#"]
    (keys,) = tap.of(ev.Transcript, room, turn=2, final=True)
    assert (keys.text, keys.provider) == ("(keypad: 12#)", "keypad")
    assert "12#" in keyed[0].text  # the echo LLM repeats what it was told
    assert {t.participant for t in tap.of(ev.InputTrack, room)} == {f"sip_{NUMBER}"}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def phone_stack(tmp_path_factory: pytest.TempPathFactory):
    """nats-server and the five stages, with the offline ear `voicebus up` runs (whisper):
    phone audio is narrowband, which pocketsphinx hears poorly."""
    async for running in running_stack(tmp_path_factory, livekit=False, env=offline_ear()):
        yield running


async def test_a_phone_call_through_the_gateways_bus_contract(phone_stack, tmp_path):
    """The SIP gateway's side of the bus, played by this test with the gateway's own identity
    (role ``sip``; the gateway itself is not built yet): a PhoneSessionStart, then the caller's
    voice as 8 kHz frames in real time, silence included, as decoded RTP is. The agent answers
    on ``egress.audio``: 20 ms frames at 8 kHz, paced, which hold the spoken answer. The caller
    hangs up: the session ends."""
    stack, session = phone_stack, "phone-1"
    pcm, rate, channels = read_wav(await say_to_wav("What time is it?", tmp_path / "q.wav",
                                                    lead_ms=400))
    resampler = Resampler(rate, channels)
    at_16k = resampler.process(pcm) + resampler.flush()
    narrow = soxr.resample(np.frombuffer(at_16k, np.int16), 16000, 8000).astype(np.int16)
    gateway = await stack.connect(role="sip")
    tap = Tap(await stack.connect())
    heard: list[ev.AudioFrame] = []

    async def on_agent(msg) -> None:
        heard.append(codec.decode_on(msg.subject, msg.data))

    try:
        await tap.watch(sj.session_all(session))
        sub = await gateway.subscribe(sj.EGRESS_AUDIO.subject(session), cb=on_agent)
        start = ev.PhoneSessionStart(session=session, seq=1, ts_ns=time.time_ns(),
                                     caller="+15550100", greeting="")
        await gateway.publish(sj.CTL_START.subject(session), codec.encode(start))
        await tap.wait_for(lambda: len(tap.of(ev.StageReady, session)) == 5, 30, "every stage")
        # The caller: the question, then silence until the answer has been played.
        audio = narrow.tobytes() + bytes(16000)  # + 1 s of quiet
        seq, pts, began = 2, 0, time.monotonic()
        while pts < 30_000 and not tap.of(ev.Playback, session, turn=1, final=True):
            chunk = audio[pts * 16:(pts + 20) * 16] if pts * 16 < len(audio) else bytes(320)
            frame = ev.AudioFrame(session=session, seq=seq, ts_ns=time.time_ns(),
                                  pcm=chunk.ljust(320, b"\0"), sample_rate=8000, pts_ms=pts)
            await gateway.publish(sj.SIP_AUDIO.subject(session), codec.encode(frame))
            seq, pts = seq + 1, pts + 20
            await asyncio.sleep(max(0.0, began + pts / 1000 - time.monotonic()))
        for digit in "5#":  # the caller's keys, as the gateway decodes them (RFC 4733)
            key = ev.Dtmf(session=session, seq=seq, ts_ns=time.time_ns(), digit=digit)
            await gateway.publish(sj.SIP_DTMF.subject(session), codec.encode(key))
            seq += 1
        await tap.wait_for(lambda: tap.of(ev.Transcript, session, turn=2, final=True), 10,
                           "the keys' turn")
        end = ev.SessionEnd(session=session, seq=seq, ts_ns=time.time_ns(), reason="hung up")
        await gateway.publish(sj.CTL_END.subject(session), codec.encode(end))
        await gateway.flush()
        await tap.wait_for(lambda: tap.of(ev.SessionEnd, session, topic=sj.CTL_END), 10,
                           "the hang-up")
        await sub.unsubscribe()
    finally:
        await tap.close()
        await gateway.close()

    (final,) = tap.of(ev.Transcript, session, turn=1, final=True)
    assert "time" in final.text.lower(), final.text
    # The caller, by that name alone (the number stays out of events); announced again when
    # egress's StageReady comes after ingress has started (a new egress replica must learn it).
    tracks = tap.of(ev.InputTrack, session)
    assert tracks and {(t.participant, t.track_sid, t.active) for t in tracks} == {
        ("caller", "phone", True)}, tracks
    assert tap.of(ev.Transcript, session, turn=2, final=True)[0].text == "(keypad: 5#)"
    assert heard and {f.sample_rate for f in heard} == {8000}
    assert {len(f.pcm) for f in heard} == {320} and \
        [f.pts_ms for f in heard] == list(range(0, 20 * len(heard), 20))
    # What the caller hears: the echo of the question, "What time is it... got it."
    (done,) = tap.of(ev.ReplyDone, session, turn=1)
    said = await hear(b"".join(f.pcm for f in heard))
    assert {"time", "got"} <= said, (said, done.text)


async def hear(pcm_8k: bytes) -> set[str]:
    """The words whisper hears in 8 kHz audio (as a phone plays it)."""
    wide = soxr.resample(np.frombuffer(pcm_8k, np.int16), 8000, 16000).astype(np.int16)
    audio = wide.tobytes() + bytes(2 * 16000 // 2)
    stt = WhisperCppStt.from_config(SttConfig.from_env())

    async def frames():
        for i in range(0, len(audio) - FRAME_BYTES + 1, FRAME_BYTES):
            yield audio[i:i + FRAME_BYTES]

    try:
        results = [r async for r in stt.stream(frames())]
    finally:
        await stt.aclose()
    return set(results[-1].text.lower().replace(".", " ").replace(",", " ").split())
