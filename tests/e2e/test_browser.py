"""A person in Chromium talks to the agent through the web page: the token service serves the
page, the page joins the LiveKit room, Chromium's fake microphone plays a spoken question, and
the page shows both sides' transcripts, the agent's state and the turn's latency.

Debian's Chromium (``make chromium``) drives it through Playwright; no browser is downloaded.
The screenshot goes to ``artifacts/browser-test.png`` (``browser-test-failure.png`` when it
fails)."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from tests.e2e import screens
from voicebus.speech import say_to_wav

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "artifacts" / "browser-test.png"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--no-first-run", "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream", "--autoplay-policy=no-user-gesture-required"]
# Chromium's fake microphone starts the file when the page opens the microphone and loops it.
# The lead gives ingress time to subscribe to the new track; the long tail keeps the question
# from coming round again while the test waits for the answer.
LEAD_MS, TAIL_MS = 2500, 30000
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
            # "got it.".
            agent = page.locator('#transcript [data-speaker="agent"][data-final="true"]')
            await expect(agent.first).to_contain_text("how can i help", ignore_case=True,
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
