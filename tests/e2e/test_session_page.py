"""The session page: a call through LiveKit, kept by the capture, read back by the token service
as a timeline (``/api/sessions/<id>``) and drawn by the page (``/sessions/<id>``) in Chromium.

The call: the agent greets; the user asks for a long reply and cuts it with a question after
1.5 s of it; the question is answered whole. Everything the page says is checked against the
capture itself. Off (the setting), refused (the authorisation hook), a bad id and an unknown
session, and NATS out of reach each get their own answer.

Real livekit-server, nats-server, the five stages and the token service, each its own process.
The screenshot goes to ``artifacts/session-page.png`` (``session-page-failure.png`` when the
browser test fails)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from proto import codec
from proto import events as ev
from proto import subjects as sj
from services.ingress.audio import read_wav
from tests.conftest import running_stack
from tests.e2e import screens
from tests.integration.auth_hook import TICKET, TICKET_HEADER
from voicebus import record
from voicebus.call import Caller
from voicebus.client import Tap
from voicebus.launcher import ROOT, Stack
from voicebus.speech import say_to_wav
from voicebus.timeline import DRAFTED, WATERFALL

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

ROOM = "paged-call"
GREETING = "Hello! How can I help you today?"  # the token service's default
# Long replies, so that the user can cut one in the middle.
ACK = ("got it. Let me tell you everything I know about that, one thing after another, "
       "slowly and carefully, so that nothing important is left out of the answer.")
HOOK = "tests.integration.auth_hook:require_ticket"
SCREENSHOT = ROOT / "artifacts" / "session-page.png"
CHROMIUM = Path("/usr/bin/chromium")  # Debian's (make chromium); no browser is downloaded
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--no-first-run"]
TIMEOUT_MS = 30_000


@dataclass
class Call:
    stack: Stack
    nc: Any
    recording: record.Recording
    http: httpx.AsyncClient

    def events(self, cls: type[ev.Event], **fields: object) -> list:
        return [e for _, _, e in self.recording.events() if isinstance(e, cls)
                and all(getattr(e, k) == v for k, v in fields.items())]


async def _speech(text: str, path: Path) -> tuple[bytes, int]:
    """Made before the user joins: synthesis takes seconds on a busy machine."""
    pcm, rate, _ = read_wav(await say_to_wav(text, path, lead_ms=0))
    return pcm, rate


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def call(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("page")
    weather = await _speech("Tell me about the weather.", folder / "weather.wav")
    what_time = await _speech("What time is it?", folder / "time.wav")
    env = {"VOICEBUS_ECHO_ACK": ACK, "VOICEBUS_SESSION_EMPTY_GRACE": "2"}
    async for stack in running_stack(tmp_path_factory, livekit=True, env=env):
        nc = await stack.connect()
        tap = Tap(nc)
        await tap.watch(sj.session_all(ROOM))
        caller = Caller(stack.token_url, ROOM, "user")
        await caller.join()
        try:
            await caller.wait_state("listening", timeout=60)  # the greeting was heard
            await caller.say(*weather)
            await tap.wait_for(lambda: [p for p in tap.of(ev.Playback, ROOM, turn=1)
                                        if p.played_ms >= 1500 and not p.final], 60,
                               "1.5 s of reply 1 played")
            await caller.say(*what_time)
            await tap.wait_for(lambda: tap.of(ev.Playback, ROOM, turn=2, final=True), 60,
                               "reply 2 played")
        finally:
            await caller.leave()
        # The room is empty: the session ends (VOICEBUS_SESSION_EMPTY_GRACE).
        await tap.wait_for(lambda: tap.of(ev.SessionEnd, ROOM), 30, "the session's end")
        await _captured(nc, len([e for _, e in tap.events if e.session == ROOM]))
        recording = await record.export(nc.jetstream(), ROOM)
        async with httpx.AsyncClient(base_url=stack.token_url, timeout=30) as http:
            yield Call(stack, nc, recording, http)
        await tap.close()
        await nc.drain()


async def _captured(nc, count: int, timeout: float = 30) -> None:
    """Until the capture holds as many messages of the call as the tap heard: nats-server
    stores them as it delivers them, not before."""
    deadline = time.monotonic() + timeout
    while (await record.sessions(nc.jetstream())).get(ROOM, 0) < count:
        assert time.monotonic() < deadline, "the capture never caught up with the tap"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _token_service(call: Call, tmp_path: Path, **env: str):
    """Another token service on the call's bus, with settings of its own."""
    stack = Stack(tmp_path, sink=call.stack.sink, nats_port=call.stack.nats_port,
                  bus_dir=call.stack.bus_dir, token_env={"PYTHONPATH": str(ROOT), **env})
    await stack.start_token()
    try:
        async with httpx.AsyncClient(base_url=stack.token_url, timeout=30) as http:
            yield http
    finally:
        assert await stack.stop() == {"token": 0}


# ---- the timeline ------------------------------------------------------------------------------


async def test_the_call_reads_back_as_a_timeline(call: Call) -> None:
    resp = await call.http.get(f"/api/sessions/{ROOM}")
    assert resp.status_code == 200, resp.text
    assert resp.headers["cache-control"] == "no-store"  # transcripts: kept by no cache
    t = resp.json()
    assert t["session"] == ROOM and t["rejected"] == 0
    assert t["messages"] >= len(call.recording.entries)
    assert t["ended"] == call.events(ev.SessionEnd)[0].reason
    turns = {turn["turn"]: turn for turn in t["turns"]}
    assert sorted(turns) == [0, 1, 2]
    assert [turns[n]["kind"] for n in (0, 1, 2)] == ["greeting", "user", "user"]

    for n in (1, 2):  # the user's words, as the STT finally heard them
        (final,) = call.events(ev.Transcript, turn=n, final=True)
        assert turns[n]["said"] == final.text and final.text
        assert [p["text"] for p in turns[n]["partials"]] == \
            [p.text for p in call.events(ev.Transcript, turn=n, final=False)]
    for n in (0, 1, 2):  # the replies, and what of each was heard
        (done,) = call.events(ev.ReplyDone, turn=n)
        (played,) = call.events(ev.Playback, turn=n, final=True)
        heard = turns[n]["heard"]
        assert turns[n]["reply"] == done.text == heard["text"] + heard["unheard"]
        assert heard["played_ms"] == played.played_ms and heard["final"]
        assert heard["text"] == done.text[:played.text_offset]
    assert turns[0]["reply"] == GREETING and turns[0]["heard"]["unheard"] == ""

    # Turn 1 was cut by the user's question; the others were heard whole.
    (cancel,) = call.events(ev.Cancel)
    assert cancel.turn == 1
    assert [turns[n]["interrupted"] for n in (0, 1, 2)] == [False, True, False]
    assert turns[1]["heard"]["interrupted"] and turns[1]["cancelled_ms"] is not None
    assert 0 < len(turns[1]["heard"]["text"]) < len(turns[1]["reply"])
    assert turns[2]["heard"]["unheard"] == ""

    agent = [(s["turn"], s["interrupted"]) for s in t["spans"] if s["who"] == "agent"]
    assert agent == [(0, False), (1, True), (2, False)]
    assert {s["turn"] for s in t["spans"] if s["who"] == "user"} == {1, 2}


async def test_each_answered_turn_has_its_whole_waterfall(call: Call) -> None:
    t = (await call.http.get(f"/api/sessions/{ROOM}")).json()
    turns = {turn["turn"]: turn for turn in t["turns"]}
    assert [s["name"] for s in turns[0]["waterfall"]] == list(WATERFALL[2:])  # no user speech
    for n in (1, 2):
        steps = turns[n]["waterfall"]
        names = [s["name"] for s in steps]
        # A statement's reply is drafted while its final is held back: two more points.
        drafted = bool(call.events(ev.Verdict, turn=n, draft=True))
        assert sorted(names) == sorted(DRAFTED if drafted else WATERFALL), names
        # In the order things happened (every stage on this machine's clock), from the end of
        # speech to the playback, which starts within seconds of it.
        assert names[0] == "end of speech" and names[-1] == "playback start", names
        assert all(s["delta_ms"] >= 0 for s in steps), steps
        assert 0 < steps[-1]["since_ms"] < 10_000, steps
        (final,) = call.events(ev.Transcript, turn=n, final=True)
        at = {s["name"]: s["at_ms"] for s in steps}
        assert at["STT final"] == round((final.ts_ns - t["start_ns"]) / 1e6, 1)


async def test_the_list_names_the_call(call: Call) -> None:
    resp = await call.http.get("/api/sessions")
    assert resp.status_code == 200
    listed = {s["session"]: s["messages"] for s in resp.json()["sessions"]}
    assert listed[ROOM] >= len(call.recording.entries)


async def test_bad_ids_and_unknown_sessions_get_a_clear_answer(call: Call) -> None:
    unknown = await call.http.get("/api/sessions/nobody-called")
    assert unknown.status_code == 404 and "nobody-called" in unknown.json()["detail"]
    for bad in ("bad.id", "x" * 65, "demo%0A", "%00"):
        for path in (f"/api/sessions/{bad}", f"/sessions/{bad}"):
            resp = await call.http.get(path)
            assert resp.status_code == 422 and resp.json()["detail"], (path, resp.text)
    page = await call.http.get(f"/sessions/{ROOM}")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert (await call.http.get("/static/session.js")).status_code == 200


# ---- off, refused, unreachable -----------------------------------------------------------------


async def test_off_the_pages_are_not_there(call: Call, tmp_path: Path) -> None:
    async with _token_service(call, tmp_path, VOICEBUS_SESSION_PAGES="false") as http:
        for path in (f"/api/sessions/{ROOM}", "/api/sessions", f"/sessions/{ROOM}", "/sessions",
                     "/static/session.js"):
            assert (await http.get(path)).status_code == 404, path
        assert (await http.get("/static/app.js")).status_code == 200  # the rest is served


async def test_the_authorisation_hook_decides_who_reads(call: Call, tmp_path: Path) -> None:
    async with _token_service(call, tmp_path, VOICEBUS_TOKEN_AUTHORIZE=HOOK) as http:
        for path in (f"/api/sessions/{ROOM}", "/api/sessions"):
            refused = await http.get(path)
            assert refused.status_code == 403 and refused.json()["detail"], path
        allowed = await http.get(f"/api/sessions/{ROOM}", headers={TICKET_HEADER: TICKET})
        assert allowed.status_code == 200
        assert len(allowed.json()["turns"]) == 3


async def test_without_nats_the_pages_answer_503(tmp_path: Path) -> None:
    stack = Stack(tmp_path, sink=lambda _line: None)
    await stack.start_nats()
    await stack.start_token()
    try:
        async with httpx.AsyncClient(base_url=stack.token_url, timeout=30) as http:
            await stack.procs.pop("nats").stop()
            deadline = time.monotonic() + 15
            while (await http.get("/health")).status_code != 503:
                assert time.monotonic() < deadline, "/health never noticed NATS was gone"
                await asyncio.sleep(0.05)
            for path in (f"/api/sessions/{ROOM}", "/api/sessions"):
                resp = await http.get(path)
                assert resp.status_code == 503 and "NATS" in resp.json()["detail"], path
    finally:
        codes = await stack.stop()
    assert codes == {"token": 0}


# ---- the page, in Chromium ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (make chromium)")
    return CHROMIUM


async def test_the_page_shows_every_turn_of_the_call(call: Call, chromium: Path) -> None:
    from playwright.async_api import async_playwright, expect

    t = (await call.http.get(f"/api/sessions/{ROOM}")).json()
    base = call.stack.token_url
    errors: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(chromium), args=BROWSER_ARGS)
        page = None
        try:
            page = await browser.new_page(viewport={"width": 1100, "height": 900})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{base}/sessions")
            await page.locator(f'#sessions tr[data-session="{ROOM}"] a').click()
            await expect(page).to_have_url(f"{base}/sessions/{ROOM}")
            await expect(page.locator("body")).to_have_attribute("data-loaded", "true",
                                                                 timeout=TIMEOUT_MS)
            for turn in t["turns"]:
                box = page.locator(f'#turns .turn[data-turn="{turn["turn"]}"]')
                if turn["said"]:
                    await expect(box.locator(".said")).to_contain_text(turn["said"])
                await expect(box.locator(".reply")).to_have_text(turn["reply"])
                await expect(box.locator(".reply .heard")).to_have_text(turn["heard"]["text"])
                await expect(box.locator(".waterfall tbody tr")).to_have_count(
                    len(turn["waterfall"]))
                await expect(box).to_have_attribute("data-interrupted",
                                                    str(turn["interrupted"]).lower())
            cut = page.locator('#turns .turn[data-turn="1"]')
            await expect(cut.locator(".reply .unheard")).to_have_text(
                t["turns"][1]["heard"]["unheard"])
            await expect(cut.locator(".tag", has_text="interrupted")).to_be_visible()
            await expect(page.locator('.lane[data-who="agent"] .span')).to_have_count(3)
            await expect(page.locator(
                '.lane[data-who="agent"] .span[data-interrupted="true"]')).to_have_count(1)
            await expect(page.locator(".cut-mark")).to_have_count(1)
            await expect(page.locator("#error")).to_be_hidden()
            await screens.keep(page, SCREENSHOT)

            await page.goto(f"{base}/sessions/no-such-call")
            await expect(page.locator("#error")).to_contain_text("404")
        except Exception:
            if page is not None:
                await screens.keep(page, SCREENSHOT.with_name("session-page-failure.png"),
                                   "screenshot of the failure")
            raise
        finally:
            await browser.close()
    assert not errors, errors


async def test_the_page_shows_hostile_words_as_words(call: Call, chromium: Path) -> None:
    """Transcripts are the users' words: markup in them is shown, never run."""
    from playwright.async_api import async_playwright, expect

    session = "hostile"
    said = '<img src=x onerror="window.pwned = 1">'
    reply = "<script>window.pwned = 2</script> fine."
    js = call.nc.jetstream()
    for topic, event in (
            (sj.STT_FINAL, ev.Transcript(session=session, seq=1, ts_ns=time.time_ns(), turn=1,
                                         text=said, final=True)),
            (sj.LLM_DONE, ev.ReplyDone(session=session, seq=1, ts_ns=time.time_ns(), turn=1,
                                       text=reply))):
        await js.publish(topic.subject(session), codec.encode(event))  # stored once acked
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(chromium), args=BROWSER_ARGS)
        try:
            page = await browser.new_page()
            await page.goto(f"{call.stack.token_url}/sessions/{session}")
            await expect(page.locator("body")).to_have_attribute("data-loaded", "true",
                                                                 timeout=TIMEOUT_MS)
            box = page.locator('#turns .turn[data-turn="1"]')
            await expect(box.locator(".said")).to_have_text(said)
            await expect(box.locator(".reply")).to_have_text(reply)
            await expect(page.locator("#turns img, #turns script")).to_have_count(0)
            assert await page.evaluate("window.pwned") is None
        finally:
            await browser.close()
