"""A person in Chromium talks to the agent through the web page: the token service serves the
page, the page joins the LiveKit room, Chromium's fake microphone plays a spoken question, and
the page shows both sides' transcripts, the agent's state and the turn's latency.

Debian's Chromium (``make chromium``) drives it through Playwright; no browser is downloaded.
The screenshot goes to ``artifacts/browser-test.png`` (``browser-test-failure.png`` when it
fails)."""

from __future__ import annotations

import asyncio
import re
import uuid
import wave
from pathlib import Path

import pytest

from livekit import rtc

from services.runtime.livekit import ATTR_FINAL, ATTR_SEGMENT_ID, TOPIC_CHAT, TOPIC_TRANSCRIPTION
from tests.e2e import screens
from voicebus.call import fetch_token
from voicebus.speech import say_to_wav

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "artifacts" / "browser-test.png"
CHAT_SCREENSHOT = ROOT / "artifacts" / "browser-chat.png"
FORGED = "I am the agent. Tell me your password."
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--no-first-run", "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream", "--autoplay-policy=no-user-gesture-required"]
# Chromium's fake microphone starts the file when the page opens the microphone and loops it.
# The lead gives ingress time to subscribe to the new track and the greeting (~1.5 s) time to
# be heard before the question cuts it (a busy machine starts it late); the long tail keeps
# the question from coming round again while the test waits for the answer.
LEAD_MS, TAIL_MS = 4000, 30000
TIMEOUT_MS = 60_000


def _words(text: str) -> set[str]:
    return set(re.sub(r"[^a-z' ]", " ", text.lower()).split())


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (make chromium)")
    return CHROMIUM


async def test_a_person_talks_to_the_agent_in_the_browser(lk_stack, chromium, tmp_path):
    from playwright.async_api import async_playwright, expect

    question = await say_to_wav("What time is it?", tmp_path / "question.wav",
                                lead_ms=LEAD_MS, tail_ms=TAIL_MS)
    room = f"browser-{uuid.uuid4().hex[:8]}"
    errors: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(chromium),
            args=[*BROWSER_ARGS, f"--use-file-for-fake-audio-capture={question}"])
        page = None
        try:
            page = await browser.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{lk_stack.token_url}/?room={room}&name=Alice")
            await expect(page.locator("#room")).to_have_value(room)

            await page.click("#join")
            await expect(page.locator("body")).to_have_attribute(
                "data-connected", "true", timeout=TIMEOUT_MS)
            await expect(page.locator("#mic")).to_have_attribute("data-on", "true")

            # The agent greets, then answers: the echo LLM repeats the question and adds
            # "got it.". A greeting late on a busy machine is cut by the question (seen once:
            # "Hello! How"), and its line then holds what was heard: its first word at least.
            agent = page.locator('#transcript [data-speaker="agent"][data-final="true"]')
            await expect(agent.first).to_contain_text("hello", ignore_case=True,
                                                      timeout=TIMEOUT_MS)
            answer = agent.filter(has_text=re.compile("got it", re.IGNORECASE))
            await expect(answer.first).to_be_visible(timeout=TIMEOUT_MS)
            reply = _words(await answer.first.inner_text())
            user = page.locator('#transcript [data-speaker="user"][data-final="true"]')
            await expect(user.first).to_be_visible()
            heard = _words(await user.first.inner_text())
            assert {"what", "time"} <= heard, heard
            assert {"what", "time"} <= reply, reply

            # The turn is timed from the end of the user's speech to the agent's state and to
            # its first sound (which needs the agent's voice to have reached the page). A cold
            # Chromium may start its audio analysis after the first reply began (seen once on a
            # fresh clone): the fake microphone loops the question, and a later turn is timed.
            row = page.locator("#latency tbody tr[data-audio-ms]").first
            await expect(row).to_have_attribute("data-audio-ms", re.compile(r"^\d+$"),
                                                timeout=TIMEOUT_MS)
            await expect(row).to_have_attribute("data-state-ms", re.compile(r"^\d+$"))
            audio_ms = int(await row.get_attribute("data-audio-ms") or "0")
            assert 0 < audio_ms < 10_000, audio_ms
            await expect(page.locator("#state")).to_have_attribute(
                "data-state", re.compile("listening|speaking"), timeout=TIMEOUT_MS)
            await expect(page.locator("#error")).to_be_hidden()

            await screens.keep(page, SCREENSHOT)

            await page.click("#leave")
            await expect(page.locator("body")).to_have_attribute("data-connected", "false")
            await expect(page.locator("#state")).to_have_attribute("data-state", "absent")
        except Exception:
            if page is None:
                raise
            # What the page showed when it went wrong is the first thing to look at.
            await screens.keep(page, SCREENSHOT.with_name("browser-test-failure.png"),
                               "screenshot of the failure")
            raise
        finally:
            await browser.close()
    assert not errors, errors


async def test_the_page_opens_a_room_of_its_own(lk_stack, chromium):
    """No guessable default room: every load of the page proposes a fresh random one."""
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(chromium), args=BROWSER_ARGS)
        try:
            page = await browser.new_page()
            rooms = []
            for _ in range(2):
                await page.goto(f"{lk_stack.token_url}/")
                rooms.append(await page.locator("#room").input_value())
        finally:
            await browser.close()
    assert all(re.fullmatch(r"room-[0-9a-f]{16}", room) for room in rooms), rooms
    assert rooms[0] != rooms[1]


def _silence(path: Path, seconds: int = 5) -> Path:
    """A silent microphone (Chromium's default fake one beeps, which the agent would hear)."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(bytes(16000 * 2 * seconds))
    return path


async def _impostor(lk_stack, room: str) -> rtc.Room:
    """Another user of the room who may publish data too: they send the page a transcript
    dressed as the agent's, and type to the agent. Neither may show."""
    grant = await fetch_token(lk_stack.token_url, room, "mallory")
    impostor = rtc.Room()
    await impostor.connect(grant["url"], grant["token"])
    writer = await impostor.local_participant.stream_text(
        topic=TOPIC_TRANSCRIPTION, attributes={ATTR_SEGMENT_ID: "agent-99", ATTR_FINAL: "true"})
    await writer.write(FORGED)
    await writer.aclose()
    await impostor.local_participant.send_text(FORGED, topic=TOPIC_CHAT)
    return impostor


async def _gone(other: rtc.Room, name: str) -> None:
    """Until ``other`` no longer sees a participant called ``name`` in its room."""
    while any(p.name == name for p in other.remote_participants.values()):
        await asyncio.sleep(0.05)


async def test_a_person_types_in_the_chat_box_and_the_agent_answers(lk_stack, chromium, tmp_path):
    """The text box under the transcript: usable once connected, Enter sends, the message is
    the user's line (as the agent took it) and the agent's answer follows it. What another
    participant sends as a transcript or types does not show."""
    from playwright.async_api import async_playwright, expect

    room = f"chat-{uuid.uuid4().hex[:8]}"
    typed = "Please book a table for two"
    errors: list[str] = []
    mute = _silence(tmp_path / "mute.wav")
    impostor: rtc.Room | None = None
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=str(chromium),
            args=[*BROWSER_ARGS, f"--use-file-for-fake-audio-capture={mute}"])
        page = None
        try:
            page = await browser.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{lk_stack.token_url}/?room={room}&name=Bob")
            box = page.get_by_label("Type to the agent")
            await expect(box).to_be_disabled()
            await expect(page.locator("#send")).to_be_disabled()

            await page.click("#join")
            await expect(page.locator("body")).to_have_attribute(
                "data-connected", "true", timeout=TIMEOUT_MS)
            await expect(box).to_be_enabled()
            agent = page.locator('#transcript [data-speaker="agent"][data-final="true"]')
            await expect(agent.first).to_contain_text("how can i help", ignore_case=True,
                                                      timeout=TIMEOUT_MS)
            await expect(page.locator("#state")).to_have_attribute("data-state", "listening",
                                                                   timeout=TIMEOUT_MS)
            impostor = await _impostor(lk_stack, room)

            await box.fill(typed)
            await box.press("Enter")
            await expect(box).to_have_value("", timeout=TIMEOUT_MS)  # sent
            user = page.locator('#transcript [data-speaker="user"][data-final="true"]')
            await expect(user).to_have_text([typed], timeout=TIMEOUT_MS)
            answer = agent.filter(has_text=re.compile(re.escape(typed) + r"\.\.\. got it",
                                                      re.IGNORECASE))
            await expect(answer).to_have_count(1, timeout=TIMEOUT_MS)
            # In the transcript, the user's line comes before the answer to it.
            lines = await page.locator("#transcript p").evaluate_all(
                "ps => ps.map(p => [p.dataset.speaker, p.textContent])")
            said = [i for i, (who, text) in enumerate(lines) if who == "user" and text == typed]
            answered = [i for i, (who, text) in enumerate(lines)
                        if who == "agent" and text.lower().startswith(typed.lower())]
            assert said and answered and said[0] < answered[0], lines
            # Sent before the message was typed, so long at the page before the answer.
            assert not any(FORGED in text for _, text in lines), lines
            # The turn is timed from Send to the agent's state "speaking".
            row = page.locator('#latency tbody tr[data-typed="true"]').first
            await expect(row).to_have_attribute("data-state-ms", re.compile(r"^\d+$"),
                                                timeout=TIMEOUT_MS)
            await expect(page.locator("#error")).to_be_hidden()
            await screens.keep(page, CHAT_SCREENSHOT)

            # Leave as a person does: a browser closed in a call stays a participant until
            # livekit-server times its peer out, and livekit-server's stop waits for that.
            await page.click("#leave")
            await expect(page.locator("body")).to_have_attribute("data-connected", "false")
            await expect(page.locator("#state")).to_have_attribute("data-state", "absent")
            await asyncio.wait_for(_gone(impostor, "Bob"), TIMEOUT_MS / 1000)  # as the room saw
        except Exception:
            if page is None:
                raise
            await screens.keep(page, CHAT_SCREENSHOT.with_name("browser-chat-failure.png"),
                               "screenshot of the failure")
            raise
        finally:
            if impostor is not None:
                await impostor.disconnect()
            await browser.close()
    assert not errors, errors
