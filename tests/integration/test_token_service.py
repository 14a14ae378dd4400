"""The token service as its own process, against a real nats-server and a real livekit-server:
grants, dispatch, webhooks, limits, the web page, and a secret that never leaves."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import pytest
import pytest_asyncio
from livekit import api, rtc
from livekit.protocol.models import TrackSource
from livekit.rtc.participant import PublishTrackError

from proto import codec
from proto import events as ev
from proto import subjects as sj
from services.runtime.livekit import AGENT_IDENTITY
from tests.conftest import LogTail
from services.runtime import agents
from tests.integration.auth_hook import CLOSED_ROOM, CUSTOMER_HEADER, TICKET, TICKET_HEADER
from voicebus.launcher import ROOT, Stack

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEY = "voicebus-test-key"
SECRET = f"test-secret-{secrets.token_hex(24)}"  # random: any match in output is a leak
# livekit-server accepts a token up to a minute past its exp (protocol/auth/verifier.go:
# tokenLeeway), so "refused once expired" can only be observed after that.
LIVEKIT_LEEWAY = 60
SHORT_TTL = 2
APP_ORIGIN = "https://app.example.com"  # a page served elsewhere that asks for tokens


@dataclass
class Service:
    stack: Stack
    http: httpx.AsyncClient


def _stack(tmp: Path, logs: LogTail, base: Stack | None = None, **token_env: str) -> Stack:
    """A token service of its own; with ``base``, on base's nats-server and livekit-server."""
    shared = {"nats_port": base.nats_port, "livekit_port": base.livekit_port,
              "bus_dir": base.bus_dir} if base else {}
    stack = Stack(tmp, sink=logs, livekit=True, env={"LIVEKIT_API_KEY": KEY,
                  "LIVEKIT_API_SECRET": SECRET}, token_env=token_env, **shared)
    stack.logs = logs  # type: ignore[attr-defined]
    return stack


async def _stopped_cleanly(stack: Stack) -> None:
    codes = await stack.stop()
    logs = stack.logs.dump()  # type: ignore[attr-defined]
    assert all(code == 0 for code in codes.values()), f"{codes}\n{logs}"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def main(tmp_path_factory: pytest.TempPathFactory):
    """nats-server, livekit-server (webhooks to this token service) and the token service,
    serving a web directory of the test's own."""
    tmp = tmp_path_factory.mktemp("token")
    web = tmp / "web"
    (web / "sub").mkdir(parents=True)
    (web / "index.html").write_text("<!doctype html><title>voicebus</title>")
    (web / "app.js").write_text("console.log('hi')")
    (web / "sub" / "app.js").write_text("console.log('not for the web')")
    (web / "package-lock.json").write_text("{}")
    (web / "node_modules" / "x").mkdir(parents=True)
    (web / "node_modules" / "x" / "index.js").write_text("not for the web")
    (tmp / "outside.txt").write_text("not for the web")
    stack = _stack(tmp, LogTail(tmp / "stack.log"), VOICEBUS_TOKEN_BURST="1000",
                   VOICEBUS_WEB_DIR=str(web), VOICEBUS_TOKEN_CORS_ORIGINS=APP_ORIGIN)
    try:
        await stack.start_nats()
        await stack.start_livekit()
        await stack.start_token()
    except Exception:
        await stack.stop()
        logs = stack.logs.dump()  # type: ignore[attr-defined]
        raise RuntimeError(f"stack failed to start:\n{logs}") from None
    async with httpx.AsyncClient(base_url=stack.token_url, timeout=10) as http:
        yield Service(stack, http)
    await _stopped_cleanly(stack)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def nc(main: Service):
    conn = await main.stack.connect()
    yield conn
    await conn.drain()


# Autouse: started before the module's first test, so that the expiry test (the last) finds
# its token past livekit-server's leeway after the other tests' time, not a minute of its own.
@pytest_asyncio.fixture(loop_scope="module", scope="module", autouse=True)
async def guarded(main: Service, tmp_path_factory: pytest.TempPathFactory):
    """A second token service: tokens live 2 s, and an authorisation hook is required. Its
    first token is joined at once (while valid); the expiry test checks it much later."""
    tmp = tmp_path_factory.mktemp("guarded")
    stack = _stack(tmp, LogTail(tmp / "stack.log"), main.stack,
                   VOICEBUS_TOKEN_TTL=str(SHORT_TTL), PYTHONPATH=str(ROOT),
                   VOICEBUS_TOKEN_AUTHORIZE="tests.integration.auth_hook:require_ticket")
    await stack.start_token()
    async with httpx.AsyncClient(base_url=stack.token_url, timeout=10,
                                 headers={TICKET_HEADER: TICKET}) as http:
        grant = (await http.post("/api/token", json={"room": "short-lived"})).json()
        room = await _join(grant)
        await room.disconnect()
        yield Service(stack, http), (grant, room.name)
    await _stopped_cleanly(stack)


async def _token(http: httpx.AsyncClient, **body: str) -> dict:
    resp = await http.post("/api/token", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


async def _join(grant: dict) -> rtc.Room:
    room = rtc.Room()
    await room.connect(grant["url"], grant["token"], rtc.RoomOptions(auto_subscribe=False))
    return room


def _claims(token: str, expired: bool = False) -> dict:
    """The token's claims, checking the signature (and, unless ``expired``, the expiry)."""
    return jwt.decode(token, SECRET, algorithms=["HS256"], issuer=KEY,
                      options={"verify_exp": not expired})


def _signed(body: str, secret: str = SECRET) -> str:
    digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
    return api.AccessToken(KEY, secret).with_sha256(digest).to_jwt()


async def _post_webhook(http: httpx.AsyncClient, body: str, status: int = 200,
                        authorization: str | None = None) -> None:
    """POST ``body`` as livekit-server would (signed, unless ``authorization`` is given)."""
    headers = {"Authorization": _signed(body) if authorization is None else authorization}
    resp = await http.post("/livekit/webhook", content=body, headers=headers)
    assert resp.status_code == status and resp.json(), (resp.status_code, resp.text)


def _webhook(event: str, room: str, age_s: float = 0, **participant: str) -> str:
    body = {"event": event, "room": {"name": room}, "id": secrets.token_hex(4),
            "createdAt": str(int(time.time() - age_s))}
    if participant:
        body["participant"] = participant
    return json.dumps(body)


async def _ends_until(sub, room: str, timeout: float = 10) -> list[ev.SessionEnd]:
    """Every SessionEnd received up to and including the first one for ``room``."""
    seen: list[ev.SessionEnd] = []
    while not seen or seen[-1].session != room:
        msg = await sub.next_msg(timeout=timeout)
        seen.append(codec.decode_on(msg.subject, msg.data))
    return seen


# ---- health, grants, joining -----------------------------------------------------------------


async def test_health(main: Service) -> None:
    resp = await main.http.get("/health")
    assert resp.status_code == 200 and resp.json() == {"status": "ok", "nats": "connected"}


async def test_token_carries_the_least_grants_a_user_needs(main: Service) -> None:
    resp = await main.http.post("/api/token", json={"room": "grants", "identity": "alice",
                                                    "name": "Alice A."})
    assert resp.status_code == 200 and resp.headers["cache-control"] == "no-store"
    grant = resp.json()
    assert grant["url"] == main.stack.livekit_url and grant["room"] == "grants"
    assert grant["identity"] == "alice"
    claims = api.TokenVerifier(KEY, SECRET).verify(grant["token"])
    video = claims.video
    assert claims.identity == "alice" and claims.name == "Alice A." and claims.kind == "standard"
    assert video.room == "grants" and video.room_join and video.can_subscribe
    # Data for typed chat (lk.chat), which ingress reads from the session's user alone.
    assert video.can_publish_sources == ["microphone"] and video.can_publish_data
    assert not video.can_update_own_metadata
    assert not any((video.room_admin, video.room_create, video.room_list, video.room_record,
                    video.hidden, video.agent, video.recorder, video.ingress_admin,
                    video.can_manage_agent_session, video.destination_room))
    raw = _claims(grant["token"])
    # Nothing beyond the video grant: no sip, agent, inference, attributes or metadata claims.
    assert set(raw) == {"sub", "iss", "nbf", "exp", "name", "kind", "video"}, raw
    assert raw["exp"] == grant["expires_at"] and raw["exp"] - raw["nbf"] in (900, 901)

    generated = await _token(main.http, room="grants")
    assert generated["identity"].startswith("user-") and generated["identity"] != "alice"


async def test_a_user_joins_its_room_only_and_cannot_pose_as_the_agent(main: Service) -> None:
    alice = await _join(await _token(main.http, room="room-a", identity="alice"))
    bob = await _join(await _token(main.http, room="room-a", identity="bob"))
    other = await _join(await _token(main.http, room="room-b", identity="carol"))
    try:
        assert (alice.name, bob.name, other.name) == ("room-a", "room-a", "room-b")
        assert set(alice.remote_participants) <= {"bob"} and "carol" not in bob.remote_participants

        changed: list[dict] = []
        bob.on("participant_attributes_changed", lambda attrs, p: changed.append(dict(attrs)))
        published = asyncio.Event()
        bob.on("track_published", lambda pub, p: p.identity == "alice" and published.set())
        await alice.local_participant.set_attributes({"lk.agent.state": "speaking"})
        # A later request on alice's signalling connection: once bob hears of it, an accepted
        # attribute change (sent before it, on the same ordered connection) would have come.
        mic = rtc.LocalAudioTrack.create_audio_track("mic", rtc.AudioSource(48000, 1))
        await alice.local_participant.publish_track(
            mic, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
        await asyncio.wait_for(published.wait(), 15)
        assert changed == [] and "lk.agent.state" not in bob.remote_participants["alice"].attributes

        camera = rtc.LocalVideoTrack.create_video_track("cam", rtc.VideoSource(64, 64))
        with pytest.raises(PublishTrackError):  # the server never acknowledges it
            await alice.local_participant.publish_track(
                camera, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA))

        async with api.LiveKitAPI(f"http://127.0.0.1:{main.stack.livekit_port}", KEY,
                                  SECRET) as lkapi:
            listed = await lkapi.room.list_participants(api.ListParticipantsRequest(room="room-a"))
        seen = {p.identity: p for p in listed.participants}
        assert dict(seen["alice"].attributes) == {}
        assert [t.source for t in seen["alice"].tracks] == [TrackSource.MICROPHONE]
    finally:
        for room in (alice, bob, other):
            await room.disconnect()


# ---- refusals --------------------------------------------------------------------------------

JSON = {"content-type": "application/json"}
BAD_REQUESTS = {
    "bad room characters": (json.dumps({"room": "a b/c"}), JSON, 422),
    "65-character room": (json.dumps({"room": "r" * 65}), JSON, 422),
    "empty room": (json.dumps({"room": ""}), JSON, 422),
    "room with a newline": (json.dumps({"room": "abc\n"}), JSON, 422),
    "non-ascii room": (json.dumps({"room": "räum"}), JSON, 422),
    "missing room": (json.dumps({"identity": "alice"}), JSON, 422),
    "null room": (json.dumps({"room": None}), JSON, 422),
    "numeric room": (json.dumps({"room": 5}), JSON, 422),
    "numeric identity": (json.dumps({"room": "ok", "identity": 7}), JSON, 422),
    "list name": (json.dumps({"room": "ok", "name": ["x"]}), JSON, 422),
    "long name": (json.dumps({"room": "ok", "name": "n" * 65}), JSON, 422),
    "unprintable name": (json.dumps({"room": "ok", "name": "a\x07b"}), JSON, 422),
    "bad identity characters": (json.dumps({"room": "ok", "identity": "al ice!"}), JSON, 422),
    "reserved identity": (json.dumps({"room": "ok", "identity": AGENT_IDENTITY}), JSON, 422),
    "reserved identity, other case": (json.dumps({"room": "ok", "identity": "VoiceBus-x"}),
                                      JSON, 422),
    "look-alike identity, underscore": (json.dumps({"room": "ok", "identity": "voicebus_agent"}),
                                        JSON, 422),
    "look-alike identity, dot": (json.dumps({"room": "ok", "identity": "voicebus.agent"}),
                                 JSON, 422),
    "JSON array": ("[]", JSON, 422),
    "JSON string": ('"ok"', JSON, 422),
    "JSON null": ("null", JSON, 422),
    "not JSON": ("room=ok", JSON, 400),
    "empty body": ("", JSON, 400),
    "deeply nested JSON": ("[" * 4000, JSON, 400),
    "invalid UTF-8": (b'{"room": "\xff"}', JSON, 400),
    "oversized body": (json.dumps({"room": "ok", "name": "x" * 5000}), JSON, 413),
    "text/plain": (json.dumps({"room": "ok"}), {"content-type": "text/plain"}, 415),
    "form-encoded": ("room=ok", {"content-type": "application/x-www-form-urlencoded"}, 415),
    "no content type": (json.dumps({"room": "ok"}), {"content-type": ""}, 415),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_requests_get_a_4xx_with_a_json_detail(main: Service, case: str) -> None:
    body, headers, status = BAD_REQUESTS[case]
    resp = await main.http.post("/api/token", content=body, headers=headers)
    assert resp.status_code == status, resp.text
    assert resp.json()["detail"]


async def test_an_oversized_chunked_body_is_cut_off(main: Service) -> None:
    async def chunks():
        for _ in range(64):  # no Content-Length: the limit must hold while reading
            yield b" " * 1024

    resp = await main.http.post("/api/token", content=chunks(), headers=JSON)
    assert resp.status_code == 413 and resp.json()["detail"]


async def test_the_authorisation_hook_decides(guarded) -> None:
    service, _ = guarded
    assert (await service.http.post("/api/token", json={"room": "ok"},
                                    headers={TICKET_HEADER: "wrong"})).status_code == 403
    assert (await service.http.post("/api/token", json={"room": CLOSED_ROOM})).status_code == 403
    assert (await service.http.post("/api/token", json={"room": "ok"})).status_code == 200


async def test_a_burst_over_the_limit_gets_429_with_retry_after(main: Service, tmp_path) -> None:
    stack = _stack(tmp_path, LogTail(tmp_path / "stack.log"), main.stack,
                   VOICEBUS_TOKEN_BURST="3", VOICEBUS_TOKEN_RATE_PER_MINUTE="1")
    await stack.start_token()
    try:
        async with httpx.AsyncClient(base_url=stack.token_url) as http:
            # Each from a different X-Forwarded-For: believed only from a trusted proxy (none
            # here), so one client cannot pose as many.
            codes = [(await http.post("/api/token", json={"room": "busy"},
                                      headers={"X-Forwarded-For": f"203.0.113.{i}"})).status_code
                     for i in range(3)]
            refused = await http.post("/api/token", json={"room": "busy"},
                                      headers={"X-Forwarded-For": "203.0.113.99"})
    finally:
        await _stopped_cleanly(stack)
    assert codes == [200, 200, 200]
    assert refused.status_code == 429 and refused.json()["detail"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60


async def test_without_nats_no_token_is_handed_out(main: Service, tmp_path) -> None:
    stack = _stack(tmp_path, LogTail(tmp_path / "stack.log"), main.stack)
    stack.nats_port = 0  # a nats-server of its own, to take away
    await stack.start_nats()
    await stack.start_token()
    try:
        async with httpx.AsyncClient(base_url=stack.token_url) as http:
            await stack.procs.pop("nats").stop()
            health = await _poll(http, "/health", 503)
            refused = await http.post("/api/token", json={"room": "lonely"})
            await stack.start_nats()  # same port: the service reconnects
            await _poll(http, "/health", 200)
    finally:
        await _stopped_cleanly(stack)
    assert health.json() == {"status": "unavailable", "nats": "disconnected"}
    assert refused.status_code == 503 and "NATS" in refused.json()["detail"]


async def _poll(http: httpx.AsyncClient, path: str, status: int,
                timeout: float = 15) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while (resp := await http.get(path)).status_code != status:
        assert time.monotonic() < deadline, f"{path} stayed {resp.status_code}"
        await asyncio.sleep(0.05)
    return resp


AUTHORIZE = "VOICEBUS_TOKEN_AUTHORIZE"


@pytest.mark.parametrize("env, named", [
    ({"VOICEBUS_TOKEN_TTL": "0"}, "VOICEBUS_TOKEN_TTL"),
    ({"VOICEBUS_TOKEN_TTL": "86401"}, "VOICEBUS_TOKEN_TTL"),
    ({"VOICEBUS_TOKEN_TTL": "soon"}, "VOICEBUS_TOKEN_TTL"),
    ({"VOICEBUS_TOKEN_BURST": "0"}, "VOICEBUS_TOKEN_BURST"),
    ({"VOICEBUS_TOKEN_AUTHORIZE": "tests.integration.no_such_module:f"}, AUTHORIZE),
    ({"VOICEBUS_TOKEN_AUTHORIZE": "tests.integration.auth_hook:missing"}, AUTHORIZE),
    ({"VOICEBUS_TOKEN_AUTHORIZE": "no-colon"}, AUTHORIZE),
    ({"VOICEBUS_TOKEN_CORS_ORIGINS": "*"}, "VOICEBUS_TOKEN_CORS_ORIGINS"),
    ({"VOICEBUS_TOKEN_CORS_ORIGINS": "https://a.example/page"}, "VOICEBUS_TOKEN_CORS_ORIGINS"),
])
async def test_bad_settings_stop_the_service_at_start(env: dict, named: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.token", cwd=ROOT, stderr=asyncio.subprocess.PIPE,
        env={"PATH": "", "LIVEKIT_API_SECRET": SECRET, "PYTHONPATH": str(ROOT), **env})
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode != 0 and named in err.decode() and SECRET not in err.decode()


async def test_a_page_of_a_listed_origin_may_ask_for_a_token_and_nothing_else(
        main: Service) -> None:
    """CORS: the preflight and the answer of POST /api/token name a listed origin; another
    origin gets no CORS headers, and no other route is opened to a listed one either."""
    ask = {"Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "content-type"}
    allowed = await main.http.options("/api/token", headers={"Origin": APP_ORIGIN, **ask})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "access-control-allow-credentials" not in allowed.headers
    other = await main.http.options("/api/token", headers={"Origin": "https://evil.example",
                                                           **ask})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    minted = await main.http.post("/api/token", json={"room": "cors"},
                                  headers={"Origin": APP_ORIGIN})
    assert minted.status_code == 200
    assert minted.headers["access-control-allow-origin"] == APP_ORIGIN
    health = await main.http.get("/health", headers={"Origin": APP_ORIGIN})
    assert "access-control-allow-origin" not in health.headers


# ---- dispatch and session end ----------------------------------------------------------------


async def test_a_token_dispatches_the_agent(main: Service, nc) -> None:
    sub = await nc.subscribe(sj.CTL_START.subject("dispatch-me"))
    await nc.flush()
    await _token(main.http, room="dispatch-me")
    msg = await sub.next_msg(timeout=10)
    start = codec.decode_on(msg.subject, msg.data)
    assert isinstance(start, ev.SessionStart)
    assert (start.session, start.room) == ("dispatch-me", "dispatch-me") and start.ts_ns > 0
    # The agent is sent with its greeting (VOICEBUS_GREETING; the default here).
    assert start.greeting == "Hello! How can I help you today?"
    await sub.unsubscribe()


async def _start_of(nc, room: str, request) -> ev.SessionStart:
    sub = await nc.subscribe(sj.CTL_START.subject(room))
    await nc.flush()
    try:
        await request
        msg = await sub.next_msg(timeout=10)
    finally:
        await sub.unsubscribe()
    start = codec.decode_on(msg.subject, msg.data)
    assert isinstance(start, ev.SessionStart)
    return start


async def test_the_client_chooses_the_agent_and_an_unknown_one_is_refused(main: Service,
                                                                          nc) -> None:
    listed = (await main.http.get("/api/agents")).json()
    assert {a["name"] for a in listed} == {"default", "demo", "meeting"}
    assert all(a["description"] for a in listed)
    start = await _start_of(nc, "bank-room", _token(main.http, room="bank-room", agent="demo"))
    assert start.agent == "demo"
    assert start.greeting == agents.load()["demo"].greeting  # the agent's own greeting
    # As the design documents' clients ask: a query parameter.
    resp = main.http.post("/api/token?agent=demo", json={"room": "query-room"})
    start = await _start_of(nc, "query-room", resp)
    assert start.agent == "demo"
    refused = await main.http.post("/api/token", json={"room": "r", "agent": "bank"})
    assert refused.status_code == 400
    assert refused.json()["detail"] == "unknown agent 'bank'; known: default, demo, meeting"
    assert (await main.http.post("/api/token", json={"room": "r", "agent": "../x"})
            ).status_code == 422


async def test_the_authorisation_hook_may_tell_the_agent_who_calls(guarded) -> None:
    service, _ = guarded
    nc = await service.stack.connect()
    try:
        start = await _start_of(nc, "vip-room", service.http.post(
            "/api/token", json={"room": "vip-room"}, headers={CUSTOMER_HEADER: "Ada"}))
    finally:
        await nc.close()
    assert start.instructions == "The caller is Ada, a premium customer."


async def test_only_signed_webhooks_are_believed(main: Service, nc) -> None:
    sub = await nc.subscribe(sj.CTL_END.every_session())
    await nc.flush()
    body = _webhook("room_finished", "forged")
    for forged in ("", "hello", _signed(body, secret="x" * 40),  # none, not a JWT, wrong secret
                   _signed(_webhook("room_finished", "other")),  # another body's hash
                   api.AccessToken(KEY, SECRET).to_jwt()):  # no body hash at all
        await _post_webhook(main.http, body, 401, authorization=forged)
    await _post_webhook(main.http, "{not json", 400)
    # An agent leaving is not the room emptying, and an invalid session id is ignored.
    await _post_webhook(main.http, _webhook("participant_left", "signed", identity=AGENT_IDENTITY,
                                            kind="AGENT", sid="PA_agent"))
    await _post_webhook(main.http, _webhook("participant_left", "signed",
                                            identity="voicebus-ingress", sid="PA_in"))
    await _post_webhook(main.http, _webhook("room_finished", "not a session!"))
    await _post_webhook(main.http, _webhook("room_finished", "signed"))
    # All published on one ordered connection: anything the earlier webhooks had caused
    # would arrive before this end.
    ends = await _ends_until(sub, "signed")
    assert [(e.session, e.reason) for e in ends if e.session in ("forged", "signed")] == \
        [("signed", "room finished")]
    await sub.unsubscribe()


async def test_a_webhook_is_acted_on_once_and_only_while_fresh(main: Service, nc) -> None:
    """A signed webhook replayed: the second delivery changes nothing; one recorded long ago is
    refused; an invalid session id ("demo\\n") is ignored, not a server error."""
    sub = await nc.subscribe(sj.CTL_END.every_session())
    await nc.flush()
    once = _webhook("room_finished", "once")
    await _post_webhook(main.http, once)
    await _post_webhook(main.http, once)  # the same event id: 200, nothing else
    await _post_webhook(main.http, _webhook("room_finished", "stale", age_s=3600), 400)
    await _post_webhook(main.http, _webhook("room_finished", "demo\n"))
    await _post_webhook(main.http, _webhook("room_finished", "after"))
    ends = await _ends_until(sub, "after")
    assert [e.session for e in ends if e.session in ("once", "stale", "after")] == \
        ["once", "after"]
    metrics = (await main.http.get("/metrics")).text
    assert 'voicebus_livekit_webhooks_rejected_total{reason="replay"}' in metrics
    assert 'voicebus_livekit_webhooks_rejected_total{reason="stale"}' in metrics
    await sub.unsubscribe()


async def test_only_a_phone_caller_joining_sends_the_agent_with_its_number(main: Service,
                                                                          nc) -> None:
    """LiveKit SIP's caller joining (kind SIP) dispatches the room's session with the caller's
    number; a browser user joining does not (its token did already), nor a forged call into a
    room that is no session id."""
    sub = await nc.subscribe(sj.CTL_START.every_session())
    await nc.flush()
    await _post_webhook(main.http, _webhook("participant_joined", "web-user", identity="bob",
                                            kind="STANDARD", sid="PA_bob"))
    await _post_webhook(main.http, _webhook("participant_joined", "bad room!", kind="SIP",
                                            identity="sip_x", sid="PA_x"))
    body = json.loads(_webhook("participant_joined", "call-1", identity="sip_+15550100",
                               kind="SIP", sid="PA_sip"))
    body["participant"]["attributes"] = {"sip.phoneNumber": "+15550100"}
    await _post_webhook(main.http, json.dumps(body))
    # One ordered connection: a start for the earlier webhooks would have come first.
    msg = await sub.next_msg(timeout=10)
    start = codec.decode_on(msg.subject, msg.data)
    assert (start.session, start.room, start.caller) == ("call-1", "call-1", "+15550100")
    assert 'voicebus_token_sip_calls_total 1.0' in (await main.http.get("/metrics")).text
    await sub.unsubscribe()


async def test_a_room_finished_is_believed_only_once_livekit_no_longer_lists_it(
        main: Service, nc) -> None:
    """A signed webhook may be stale or replayed: the room is asked about first."""
    sub = await nc.subscribe(sj.CTL_END.every_session())
    await nc.flush()
    bob = await _join(await _token(main.http, room="staying", identity="bob"))
    try:
        await _post_webhook(main.http, _webhook("room_finished", "staying"))
        await _post_webhook(main.http, _webhook("room_finished", "closed"))
        # Ordered like above: had the live room's session been ended, that came first.
        first = await sub.next_msg(timeout=10)
        end = codec.decode_on(first.subject, first.data)
        assert (end.session, end.reason) == ("closed", "room finished")
    finally:
        await bob.disconnect()
        await sub.unsubscribe()


# ---- the web page ----------------------------------------------------------------------------


async def _raw_get(port: int, path: str) -> tuple[int, str]:
    """GET ``path`` exactly as written (HTTP clients normalise away the ``..``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.decode(errors="replace").partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_the_web_page_is_served_and_nothing_else(main: Service) -> None:
    page = await main.http.get("/")
    assert page.status_code == 200 and "<title>voicebus</title>" in page.text
    assert (await main.http.get("/static/app.js")).text == "console.log('hi')"
    for path in ("/static/../outside.txt", "/static/%2e%2e/outside.txt",
                 "/static/..%2foutside.txt", "/static/sub/../../outside.txt",
                 "/static/sub/app.js", "/static/package-lock.json",
                 "/static/node_modules/x/index.js", "/static/index.html"):
        status, body = await _raw_get(main.stack.token_port, path)
        assert status == 404 and "not for the web" not in body, path
    vendor = await main.http.get("/vendor/livekit-client.umd.js")
    assert vendor.status_code == 404 and "make install" in vendor.json()["detail"]


async def test_a_client_hanging_up_mid_body_is_one_line_in_the_log(main: Service) -> None:
    log_file = main.stack.workdir / "stack.log"

    def lines_since(count: int) -> list[str]:
        return log_file.read_text().splitlines()[count:]

    before = len(lines_since(0))
    for _ in range(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", main.stack.token_port)
        writer.write(b"POST /api/token HTTP/1.1\r\nHost: test\r\nContent-Type: application/json"
                     b"\r\nContent-Length: 1000\r\n\r\n{\"room\": ")
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    # The service is still there, and has logged the hang-ups in a line or two, no traceback.
    assert (await _token(main.http, room="after-hangups"))["room"] == "after-hangups"
    await asyncio.wait_for(_until(lambda: any("hung up" in line
                                              for line in lines_since(before))), 10)
    new = [line for line in lines_since(before) if line.startswith("token")]
    assert not any("Traceback" in line or "Exception in ASGI" in line for line in new), new
    assert 1 <= sum("hung up" in line for line in new) <= 2, new


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.05)


async def test_metrics_count_tokens_and_refusals(main: Service) -> None:
    await _token(main.http, room="counted")
    await main.http.post("/api/token", content="[]", headers=JSON)
    text = (await main.http.get("/metrics")).text
    assert "voicebus_tokens_minted_total" in text
    assert 'voicebus_token_requests_rejected_total{reason="invalid"}' in text


async def test_the_secret_never_leaves(main: Service) -> None:
    http = main.http
    seen = [await http.get(path) for path in ("/", "/health", "/openapi.json", "/docs",
                                              "/metrics", "/static/sub/app.js", "/nope",
                                              "/vendor/livekit-client.umd.js")]
    seen.append(await http.post("/api/token", json={"room": "leak-check"}))
    seen.append(await http.post("/api/token", content="{", headers=JSON))
    seen.append(await http.post("/api/token", json={"room": "../x", "identity": "voicebus-a"}))
    seen.append(await http.post("/api/token", content="x" * 10000, headers=JSON))
    seen.append(await http.post("/livekit/webhook", content="{}", headers={"Authorization": "x"}))
    seen.append(await http.get("/api/token"))
    for resp in seen:
        assert SECRET not in resp.text and SECRET not in str(resp.headers), resp.url
    token_lines = [line for line in (main.stack.workdir / "stack.log").read_text().splitlines()
                   if line.startswith("token")]
    assert any("livekit_api_secret" in line for line in token_lines)  # settings were logged…
    assert not any(SECRET in line for line in token_lines)  # …redacted


async def test_schemathesis_finds_no_server_error(main: Service, tmp_path) -> None:
    """A bounded fuzzing pass over the published OpenAPI: every operation, generated and
    mutated bodies, headers and content types; no 5xx, ever (rate limits are off: burst 1000)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "schemathesis.cli", "run", f"{main.stack.token_url}/openapi.json",
        "--checks", "not_a_server_error", "--max-examples", "60", "--generation-deterministic",
        "--request-timeout", "10", "--no-color",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path)
    out, _ = await asyncio.wait_for(proc.communicate(), 300)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    cases = re.search(r"(\d+) generated, (\d+) passed", text)
    assert cases and int(cases[1]) >= 50 and cases[1] == cases[2], text[-2000:]
    assert "No issues found" in text, text[-2000:]
    assert SECRET not in text


# ---- expiry (last: its token was minted when the guarded service started, first) -------------


async def test_an_expired_token_is_refused_by_livekit(guarded) -> None:
    _, (grant, joined_room) = guarded
    raw = _claims(grant["token"], expired=True)
    assert raw["exp"] - raw["nbf"] in (SHORT_TTL, SHORT_TTL + 1)  # the SDK reads the clock twice
    assert grant["expires_at"] == raw["exp"]
    assert joined_room == "short-lived"  # joined while valid
    while time.time() <= raw["exp"]:
        await asyncio.sleep(0.1)
    with pytest.raises(jwt.ExpiredSignatureError):
        _claims(grant["token"])
    while time.time() <= raw["exp"] + LIVEKIT_LEEWAY + 1:
        await asyncio.sleep(0.5)
    with pytest.raises(rtc.ConnectError):
        await rtc.Room().connect(grant["url"], grant["token"])
