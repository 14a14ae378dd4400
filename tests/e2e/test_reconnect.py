"""Staying in the call: a token that expires mid-call, and a livekit-server restarted mid-call.

(a) The token service issues 20 s tokens; the call goes on past them. livekit-server sends
every participant a fresh token over the signal connection, and the SDK reconnects with it:
after the first token has expired (livekit-server now refuses it), the user's client is made
to reconnect from scratch, and the next question is answered.

(b) livekit-server is stopped mid-call and a new one starts on the same port with the same
keys. A single server without Redis loses its rooms: every participant must join again — the
user's client (``voicebus call``, and the web page in Chromium in a room of its own), the
hidden ingress and the agent (egress). The next turn is answered in both rooms.

Real livekit-server, nats-server, the five stages and the token service, each its own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
import urllib.request
import uuid
import wave
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_asyncio
from livekit import rtc
from prometheus_client.parser import text_string_to_metric_families

from proto import events as ev
from proto import subjects as sj
from services.ingress.audio import read_wav
from services.runtime.livekit import AGENT_IDENTITY
from tests.conftest import running_stack
from tests.e2e import screens
from voicebus.call import Caller
from voicebus.client import Tap
from voicebus.launcher import ROOT, Stack
from voicebus.speech import say_to_wav

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

TTL_S = 20
CHROMIUM = Path("/usr/bin/chromium")  # Debian's (make chromium); no browser is downloaded
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--no-first-run", "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream", "--autoplay-policy=no-user-gesture-required"]
SCREENSHOT = ROOT / "artifacts" / "browser-reconnect.png"
TIMEOUT_MS = 60_000


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def lk(tmp_path_factory: pytest.TempPathFactory):
    options = {"token_env": {"VOICEBUS_TOKEN_TTL": str(TTL_S)}}
    async for stack in running_stack(tmp_path_factory, livekit=True, **options):
        nc = await stack.connect()
        tap = Tap(nc)
        yield stack, tap
        await tap.close()
        await nc.drain()


def _words(text: str) -> set[str]:
    return set(re.sub(r"[^a-z' ]", " ", text.lower()).split())


async def _utterance(text: str, path: Path) -> tuple[bytes, int]:
    pcm, rate, _ = read_wav(await say_to_wav(text, path, lead_ms=0))
    return pcm, rate


async def _until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """``check()`` once it is truthy; it reads state the SDK's events update."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)
    return value


async def _answered(caller: Caller, question: tuple[bytes, int], timeout: float = 45) -> str:
    """Say ``question``; the agent's answer (the echo LLM repeats it), as the caller heard it."""
    replies = len(caller.transcript(AGENT_IDENTITY))
    await caller.say(*question)
    await caller.wait_reply(timeout=timeout)
    said = await caller.wait_finals(AGENT_IDENTITY, replies + 1, timeout=10)
    assert len(said) > replies, said
    return said[-1]


def _rejoins(stack: Stack) -> Counter:
    """voicebus_livekit_rejoins_total by (stage, outcome), summed over the stage processes."""
    counts: Counter = Counter()
    for port in stack.metrics_ports.values():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name == "voicebus_livekit_rejoins":
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        labels = sample.labels
                        counts[labels["stage"], labels["outcome"]] += int(sample.value)
    return counts


async def _restart_livekit(stack: Stack, crash: bool) -> None:
    """livekit-server goes and a new one starts on the same port with the same keys. A crash is
    SIGKILL; a stop is its forced stop (a second SIGTERM: the first only drains, waiting for
    the rooms to empty), which tells every participant the server shuts down."""
    old = stack.procs.pop("livekit")
    if crash:
        old.process.kill()
    while old.alive:  # a signal that comes before the first is handled may be merged with it
        old.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(old.process.wait(), 0.5)
    await old.stop()
    await stack._spawn_livekit(0)


async def test_a_call_outlives_its_token(lk, tmp_path):
    """A 20 s token; the call lasts past it. After the token expired, the caller's connection
    is rebuilt from scratch (the SDK's full reconnect, with the token livekit-server refreshed),
    and the next question is answered. (livekit-server accepts a token up to 60 s past its
    expiry, its clock leeway, so refusing the old one would take a minute more to show.)"""
    stack, tap = lk
    room = f"ttl-{uuid.uuid4().hex[:8]}"
    await tap.watch(sj.session_all(room))
    caller = Caller(stack.token_url, room, "tess")
    await caller.join()
    try:
        expires = jwt.decode(caller.grant["token"], options={"verify_signature": False})["exp"]
        assert expires - time.time() <= TTL_S + 1
        await caller.wait_state("listening", timeout=60)  # the greeting was played
        first = await _answered(caller, await _utterance("What time is it?", tmp_path / "1.wav"))
        assert {"what", "time"} <= _words(first), first

        # The token the SDK reconnects with is the one livekit-server sent it over the signal
        # connection (at join, then every 5 minutes), valid for 10 minutes, not ours.
        held = jwt.decode(caller.room._token or "", options={"verify_signature": False})
        assert held["exp"] > expires + 300 and held["sub"] == "tess", held
        # Past our token's expiry, the connection is rebuilt from scratch (new signal
        # connection, new peer connections, a new join): the call goes on.
        await asyncio.sleep(max(0.0, expires + 1 - time.time()))
        await caller.room.simulate_scenario(rtc.SimulateScenarioKind.SIMULATE_FULL_RECONNECT)
        await asyncio.wait_for(caller.back.wait(), 30)
        await tap.wait_for(lambda: tap.of(ev.InputTrack, room, track_sid=caller.mic_sid,
                                          active=True), 30, "ingress to hear the microphone")
        second = await _answered(caller, await _utterance(
            "Where is the nearest train station?", tmp_path / "2.wav"))
        assert {"train", "station"} <= _words(second), second
        assert caller.room.connection_state == rtc.ConnectionState.CONN_CONNECTED
        assert caller.drops == [], caller.drops  # never out of the room
        assert time.time() > expires
    finally:
        await caller.leave()
    # Nothing failed on the way: no stage reported an error for this session.
    assert tap.of(ev.StageError, room) == []


def _silence(path: Path, seconds: int = 5) -> Path:
    """A silent microphone for the page (Chromium's default fake one beeps)."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(bytes(16000 * 2 * seconds))
    return path


async def test_a_livekit_restart_mid_call(lk, tmp_path):
    """Two calls, one by ``voicebus call``, one by the web page in Chromium. livekit-server is
    restarted twice: stopped (it sends everyone away: each participant rejoins on its own
    account, with a fresh token), then killed (each SDK reconnects by itself to the new server,
    with the token the old one refreshed). Each time each client gets back into its room as
    the same participant, ingress and the agent join each room again, and the next turn is
    answered in both rooms — spoken, and typed."""
    from playwright.async_api import async_playwright, expect

    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (make chromium)")
    stack, tap = lk
    rooms = {"call": f"restart-{uuid.uuid4().hex[:8]}", "page": f"restart-{uuid.uuid4().hex[:8]}"}
    for room in rooms.values():
        await tap.watch(sj.session_all(room))
    asks = {"stop": ("Please call my mother.", {"call", "mother"}, "Book a table for two"),
            "crash": ("What time is it?", {"what", "time"}, "Order a taxi to the airport")}
    questions = {how: await _utterance(ask[0], tmp_path / f"{how}.wav")
                 for how, ask in asks.items()}
    mute = _silence(tmp_path / "mute.wav")
    errors: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[*BROWSER_ARGS, f"--use-file-for-fake-audio-capture={mute}"])
        page = await browser.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        body, state = page.locator("body"), page.locator("#state")
        agent = page.locator('#transcript [data-speaker="agent"][data-final="true"]')
        caller = Caller(stack.token_url, rooms["call"], "rita")
        try:
            await page.goto(f"{stack.token_url}/?room={rooms['page']}&name=Pia")
            await page.click("#join")
            await caller.join()
            await expect(state).to_have_attribute("data-state", "listening", timeout=TIMEOUT_MS)
            await caller.wait_state("listening", timeout=60)
            identity = await page.locator("#status").text_content()
            before = _rejoins(stack)
            for returns, how in enumerate(asks, start=1):
                question, heard, typed = asks[how]
                caller.back.clear()
                old_voice = caller.agent_track_sid
                restarted = time.time_ns()

                await _restart_livekit(stack, crash=how == "crash")

                # The caller is back in its room and heard again; the agent is back too: its
                # voice reaches the caller again. The next question is answered.
                await asyncio.wait_for(caller.back.wait(), 60)
                await tap.wait_for(
                    lambda: [t for t in tap.of(ev.InputTrack, rooms["call"], active=True,
                                               track_sid=caller.mic_sid)
                             if t.ts_ns > restarted], 60, "ingress to hear the caller again")
                await _until(lambda: caller.agent_track_sid != old_voice, 60,
                             "the agent's voice")
                said = await _answered(caller, questions[how])
                assert heard <= _words(said), (how, said)

                # The page is back (it counts its returns), the agent there too, and a typed
                # turn is answered.
                await expect(body).to_have_attribute("data-returns", str(returns),
                                                     timeout=TIMEOUT_MS)
                await expect(body).to_have_attribute("data-phase", "connected")
                await expect(state).to_have_attribute("data-state", "listening",
                                                      timeout=TIMEOUT_MS)
                box = page.get_by_label("Type to the agent")
                await box.fill(typed)
                await box.press("Enter")
                answer = agent.filter(has_text=re.compile(re.escape(typed), re.IGNORECASE))
                await expect(answer).to_have_count(1, timeout=TIMEOUT_MS)
            # One conversation all along: the greeting from before the restarts is still there.
            await expect(agent.first).to_contain_text("how can i help", ignore_case=True)
            await expect(page.locator("#error")).to_be_hidden()
            status = await page.locator("#status").text_content()
            await screens.keep(page, SCREENSHOT)
            await page.click("#leave")
            await expect(body).to_have_attribute("data-phase", "idle")
        except Exception:
            await screens.keep(page, SCREENSHOT.with_name("browser-reconnect-failure.png"),
                               "screenshot of the failure")
            raise
        finally:
            await caller.leave()
            await browser.close()
    assert not errors, errors
    assert status == identity, (status, identity)  # the same room, as the same participant
    assert caller.returns == 2 and caller.room.connection_state == \
        rtc.ConnectionState.CONN_DISCONNECTED
    # Ingress and the agent came back in both rooms twice: by a rejoin of their own, or through
    # the SDK's reconnect when the new server was up in time (either is counted).
    after = _rejoins(stack)
    back = {stage: sum(after[stage, o] - before[stage, o] for o in ("rejoined", "sdk"))
            for stage in ("ingress", "egress")}
    assert back["ingress"] >= 4 and back["egress"] >= 4, (back, after)
    for room in rooms.values():
        assert tap.of(ev.SessionEnd, room) == [], room  # the sessions never ended
        assert tap.of(ev.StageError, room) == [], room
