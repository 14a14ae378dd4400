"""A LiveKit edge that dies mid-call: the ingress replica that hears the user, or the egress
replica that speaks for the agent, is killed with SIGKILL. The other replica takes the session
over when the dead one's lease expires, joins the room (as the hidden listener, or as the
agent), and the user's next question is answered. The user's client never disconnects. A
message typed as the listener dies is not lost either."""

from __future__ import annotations

import re
import uuid

import pytest
from livekit import rtc

from proto import events as ev
from proto import subjects as sj
from services.ingress.audio import read_wav
from tests.conftest import LogTail
from tests.e2e.test_browser import BROWSER_ARGS, CHROMIUM, TIMEOUT_MS, _silence
from voicebus.call import Caller
from voicebus.client import Tap
from voicebus.launcher import Stack
from voicebus.speech import say_to_wav, transcribe_wav

pytestmark = [pytest.mark.e2e]


@pytest.mark.parametrize("stage", ["ingress", "egress"])
async def test_a_killed_edge_replica_is_replaced_and_the_call_goes_on(tmp_path, stage):
    room = f"lk-failover-{stage}"
    logs = LogTail(tmp_path / "stack.log")
    stack = Stack(tmp_path, sink=logs, livekit=True, replicas={stage: 2})
    await stack.start()
    nc = await stack.connect()
    tap = Tap(nc)
    await tap.watch(sj.session_all(room))
    caller = Caller(stack.token_url, room, "kim")
    disconnects: list[object] = []
    caller.room.on("disconnected", disconnects.append)
    question = await say_to_wav("What time is it?", tmp_path / "q.wav", lead_ms=0)
    pcm, rate, _ = read_wav(question)
    try:
        await caller.join()
        await caller.wait_state("listening", timeout=60)
        owner = tap.of(ev.StageReady, room, stage=stage)[0].replica
        stack.procs[owner].process.kill()
        await stack.procs[owner].process.wait()
        ready = await tap.wait_for(
            lambda: [r for r in tap.of(ev.StageReady, room, stage=stage) if r.replica != owner],
            30, f"the other {stage} replica to take the session over")
        # The heir hears the user again (ingress announces the microphone once STT listens)
        # and the agent is listening (a new agent, for egress).
        await tap.wait_for(lambda: [t for t in tap.of(ev.InputTrack, room, active=True)
                                    if t.ts_ns > ready[0].ts_ns], 30, "the microphone heard")
        await tap.wait_for(lambda: tap.of(ev.AgentState, room)
                           and tap.of(ev.AgentState, room)[-1].state == "listening", 30,
                           "the agent to listen")
        caller.recording.clear()
        await caller.say(pcm, rate)
        await caller.wait_reply(timeout=45)
        connected = caller.room.connection_state == rtc.ConnectionState.CONN_CONNECTED
        dropped = list(disconnects)  # (leaving, below, is a disconnect of our own)
    finally:
        caller.save_recording(tmp_path / "reply.wav")
        await caller.leave()
        await tap.close()
        await nc.close()
        codes = await stack.stop()
    assert connected and dropped == [], f"the user's client was disconnected: {dropped}"
    assert all(code == 0 for name, code in codes.items() if name != owner), (codes, logs.dump())
    heard = await transcribe_wav(tmp_path / "reply.wav")
    assert {"what", "time"} <= set(heard.split()), heard


async def test_a_message_typed_as_the_ear_dies_is_answered_once(tmp_path):
    """The page types the moment the ingress replica that reads the room is killed: the
    message goes to a participant that is gone, and livekit-server says nothing of it. The page
    sends it again (same id) until its words come back as the user's line; the heir reads it
    once, and the agent answers it once."""
    from playwright.async_api import async_playwright, expect

    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (make chromium)")
    room = f"lk-failover-typed-{uuid.uuid4().hex[:8]}"
    typed = "Book a table for two"
    logs = LogTail(tmp_path / "stack.log")
    stack = Stack(tmp_path, sink=logs, livekit=True, replicas={"ingress": 2})
    await stack.start()
    nc = await stack.connect()
    tap = Tap(nc)
    await tap.watch(sj.session_all(room))
    mute = _silence(tmp_path / "mute.wav")
    owner = ""
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=str(CHROMIUM),
                args=[*BROWSER_ARGS, f"--use-file-for-fake-audio-capture={mute}"])
            page = await browser.new_page()
            await page.goto(f"{stack.token_url}/?room={room}&name=Tia")
            await page.click("#join")
            await expect(page.locator("#state")).to_have_attribute(
                "data-state", "listening", timeout=TIMEOUT_MS)
            owner = tap.of(ev.StageReady, room, stage="ingress")[0].replica
            stack.procs[owner].process.kill()
            await stack.procs[owner].process.wait()

            box = page.get_by_label("Type to the agent")
            await box.fill(typed)
            await box.press("Enter")
            await expect(box).to_have_value("", timeout=TIMEOUT_MS)  # sent, to nobody
            user = page.locator('#transcript [data-speaker="user"][data-final="true"]')
            await expect(user).to_have_text([typed], timeout=TIMEOUT_MS)
            agent = page.locator('#transcript [data-speaker="agent"][data-final="true"]')
            answer = agent.filter(has_text=re.compile(re.escape(typed), re.IGNORECASE))
            await expect(answer).to_have_count(1, timeout=TIMEOUT_MS)
            await expect(page.locator("#error")).to_be_hidden()
            # Once on the bus, from the heir: the dead replica was gone before it was typed.
            assert [t.text for t in tap.of(ev.UserText, room)] == [typed]
            await page.click("#leave")
            await expect(page.locator("body")).to_have_attribute("data-connected", "false")
            await browser.close()
    finally:
        await tap.close()
        await nc.close()
        codes = await stack.stop()
    assert all(code == 0 for name, code in codes.items() if name != owner), (codes, logs.dump())
