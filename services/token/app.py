"""The token service: user tokens with the least grants, agent dispatch, session end when
livekit-server closes the room (its webhooks), the web page, ``/health`` and ``/metrics``;
and, when turned on, the session pages (``services.token.sessions``).
It keeps no session state: any replica serves any request, and one that dies loses nothing.

Minting and dispatch go together: a token is handed out only after its ``SessionStart`` has
reached nats-server, so no user waits in a room no agent was sent to.

Anyone who can reach ``POST /api/token`` gets a token unless ``VOICEBUS_TOKEN_AUTHORIZE`` names
a hook (see ``services.token.authorize``): put a hook or an authenticating reverse proxy in
front before exposing the service beyond a trusted network.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import jwt
import nats.errors
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from livekit import api
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Receive, Scope, Send

from proto import events as ev
from proto import subjects as sj
from services.runtime import agents
from services.runtime.bus import Bus
from services.runtime.livekit import token_for
from services.token import metrics
from services.token.authorize import Authorizer, require
from services.token.config import TokenConfig
from services.token.ratelimit import RateLimiter, retry_after
from services.token.schema import TokenRequest, TokenResponse, read_limited, read_token_request
from services.token.sessions import ASSETS as SESSION_ASSETS
from services.token.sessions import add_session_routes
from services.token.webhook import Webhooks

log = logging.getLogger("voicebus.token")

E = TypeVar("E", bound=ev.Event)

STAGE = "token"
TOKEN_PATH = "/api/token"
MAX_WEBHOOK_BODY = 1 << 20
# What each refusal of POST /api/token is counted as.
REJECT_REASONS = {400: "bad_json", 403: "forbidden", 413: "too_large", 415: "content_type",
                  422: "invalid", 429: "rate_limited", 500: "hook_failed", 503: "unavailable"}


class TokenService:
    """The state behind the routes: settings, the bus, the rate limiter, the webhook handler."""

    def __init__(self, config: TokenConfig, authorize: Authorizer | None) -> None:
        self.config = config
        self.authorize = authorize
        self.limiter = RateLimiter(config.token_rate_per_minute / 60.0, config.token_burst)
        self.webhooks = Webhooks(config)
        self.agents = agents.load()
        self.bus: Bus | None = None
        # The session pages' own connection, as the read-only role "pages" (when they are on).
        self.pages_bus: Bus | None = None
        # One counter for every session: monotonic per session too, without a dict per room.
        self._seq = itertools.count(1)
        self._connecting: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self.bus is not None and self.bus.nc.is_connected

    async def start(self) -> None:
        # Connect in the background: /health answers (503) while nats-server is unreachable.
        self._connecting = asyncio.create_task(self._connect(), name="nats-connect")

    async def _connect(self) -> None:
        self.bus = await Bus.connect(self.config.nats_url, STAGE, "voicebus-token",
                                     **self.config.nats_options(STAGE))
        log.info("connected to NATS", extra={"stage": STAGE})
        if self.config.session_pages:
            self.pages_bus = await Bus.connect(self.config.nats_url, STAGE, "voicebus-pages",
                                               **self.config.pages_nats_options())

    async def stop(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connecting
        await self.webhooks.aclose()
        for bus in (self.bus, self.pages_bus):
            if bus is not None:
                await bus.drain()

    def check_rate(self, request: Request) -> None:
        client = request.client.host if request.client else "unknown"
        wait = self.limiter.take(client)
        if wait:
            seconds = retry_after(wait)
            raise HTTPException(429, f"too many token requests; retry in {seconds} s",
                                headers={"Retry-After": str(seconds)})

    def mint(self, room: str, identity: str, name: str) -> TokenResponse:
        grants = api.VideoGrants(
            room_join=True, room=room, can_publish=True, can_publish_sources=["microphone"],
            # Data: the user types to the agent (text streams on lk.chat). Nothing a user sends
            # is trusted as ours: livekit-server stamps a user's packets with their own
            # identity, ingress reads lk.chat from the session's user alone (bounded, rate
            # limited), and the page shows transcripts only from the agent (docs/security.md).
            can_subscribe=True, can_publish_data=True, can_update_own_metadata=False)
        token = token_for(self.config, room, identity, grants=grants, kind="standard", name=name,
                          ttl=self.config.token_ttl)
        # The expiry as written into the token (the SDK rounds to whole seconds).
        expires = jwt.decode(token, options={"verify_signature": False})["exp"]
        return TokenResponse(token=token, url=self.config.public_url, room=room,
                             identity=identity, expires_at=int(expires))

    def event(self, cls: type[E], session: str, **fields: Any) -> E:
        return cls(session=session, seq=next(self._seq), ts_ns=time.time_ns(), **fields)

    async def dispatch(self, room: str, caller: str = "", agent: str = "",
                       instructions: str = "") -> None:
        """Send the agent: stages ignore a repeated start for a session they own, so every
        token dispatches. Returns once nats-server has the start; else 503."""
        if self.bus is None or not self.connected:
            raise HTTPException(503, "the agent cannot be dispatched: not connected to NATS")
        greeting = self.agents[agent].greeting or self.config.greeting
        await self.bus.publish(sj.CTL_START, self.event(ev.SessionStart, room, room=room,
                                                        greeting=greeting, caller=caller,
                                                        agent=agent, instructions=instructions))
        try:
            await self.bus.nc.flush(timeout=2)
        except (nats.errors.Error, asyncio.TimeoutError):
            raise HTTPException(503, "the agent cannot be dispatched: NATS did not confirm") \
                from None

    async def end_session(self, room: str, reason: str) -> None:
        if self.bus is None:
            raise HTTPException(503, "not connected to NATS")
        await self.bus.publish(sj.CTL_END, self.event(ev.SessionEnd, room, reason=reason))
        metrics.SESSIONS_ENDED.labels(reason).inc()
        log.info("session ended: %s", reason, extra={"stage": STAGE, "session": room})


def create_app(config: TokenConfig, authorize: Authorizer | None = None) -> FastAPI:
    service = TokenService(config, authorize)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="voicebus token service", version="0.1.0", lifespan=lifespan)
    app.state.service = service
    _add_api_routes(app, service)
    _add_ops_routes(app, service)
    # The session pages' script is served only when they are on.
    assets = ASSETS + (SESSION_ASSETS if config.session_pages else ())
    _add_web_routes(app, config.web_path, assets)
    if config.session_pages:
        add_session_routes(app, service, config.web_path)
    if origins := config.cors_origins:
        app.add_middleware(TokenCors, origins=origins)
    return app


class TokenCors:
    """CORS for ``POST /api/token`` alone, from the origins of ``VOICEBUS_TOKEN_CORS_ORIGINS``:
    a page served elsewhere may ask for a token; nothing else here is opened to other origins
    (no credentials either: the hook sees the request's own headers)."""

    def __init__(self, app: ASGIApp, origins: list[str]) -> None:
        self.app = app
        self.cors = CORSMiddleware(app, allow_origins=origins, allow_methods=["POST"],
                                   allow_headers=["Content-Type"], max_age=600)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == TOKEN_PATH:
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _add_api_routes(app: FastAPI, service: TokenService) -> None:
    body_schema = {"required": True, "content": {
        "application/json": {"schema": TokenRequest.model_json_schema()}}}

    @app.post(TOKEN_PATH, response_model=TokenResponse,
              openapi_extra={"requestBody": body_schema},
              responses={status: {"description": reason} for status, reason in
                         REJECT_REASONS.items()})
    async def token(request: Request, response: Response) -> TokenResponse:
        """A token to join ``room`` as ``identity`` (generated if missing); dispatches the agent."""
        try:
            granted = await _mint_for(service, request)
        except HTTPException as exc:
            metrics.REQUESTS_REJECTED.labels(REJECT_REASONS.get(exc.status_code, "other")).inc()
            raise
        response.headers["Cache-Control"] = "no-store"  # a credential: no cache may keep it
        return granted

    @app.get("/api/agents")
    async def list_agents() -> list[dict[str, str]]:
        """The agents a token may ask for (``agent``), with what they do."""
        return [{"name": name, "description": agent.description}
                for name, agent in service.agents.items()]

    @app.post("/livekit/webhook", include_in_schema=False)
    async def webhook(request: Request) -> dict[str, bool]:
        body = await read_limited(request, MAX_WEBHOOK_BODY)
        event = service.webhooks.verify(body, request.headers.get("authorization", ""))
        if not service.webhooks.first_time(event):
            return {"ok": True}
        if (room := await service.webhooks.finished_room(event)) is not None:
            await service.end_session(room, "room finished")
        elif (call := service.webhooks.phone_call(event)) is not None:
            # A phone call through LiveKit SIP: nobody asked us for a token, the room's
            # first caller is the cue (livekit-server retries the webhook on a 503).
            await service.dispatch(*call)
            metrics.SIP_CALLS.inc()
            # The number stays out of the log: it is the caller's, and on SessionStart only.
            log.info("phone call: agent sent", extra={"stage": STAGE, "session": call[0]})
        return {"ok": True}


async def _mint_for(service: TokenService, request: Request) -> TokenResponse:
    service.check_rate(request)  # before the body is read: the cheapest refusal first
    wanted = await read_token_request(request)
    agent = wanted.agent or request.query_params.get("agent", "")
    if agent not in service.agents:
        known = ", ".join(service.agents)
        raise HTTPException(400, f"unknown agent {agent[:64]!r}; known: {known}")
    identity = wanted.identity or f"user-{secrets.token_hex(6)}"
    instructions = await require(service.authorize, request, wanted.room, identity,
                                 "not allowed to join this room")
    granted = service.mint(wanted.room, identity, wanted.name or "")
    await service.dispatch(wanted.room, agent=agent, instructions=instructions)
    metrics.TOKENS_MINTED.inc()
    log.info("token for %s", identity, extra={"stage": STAGE, "session": wanted.room})
    return granted


def _add_ops_routes(app: FastAPI, service: TokenService) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        if service.connected:
            return JSONResponse({"status": "ok", "nats": "connected"})
        state = "connecting" if service.bus is None else "disconnected"
        return JSONResponse({"status": "unavailable", "nats": state}, status_code=503)

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


# The page's own files: nothing else under web/ (node_modules, the lock file) is served.
ASSETS = ("app.js", "style.css")


def _add_web_routes(app: FastAPI, web: Path, assets: tuple[str, ...]) -> None:
    vendor = web / "node_modules" / "livekit-client" / "dist" / "livekit-client.umd.js"
    if not web.is_dir():
        log.warning("web directory %s does not exist: no web page", web, extra={"stage": STAGE})

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return _file(web / "index.html", f"the web page is missing ({web}/index.html)")

    @app.get("/vendor/livekit-client.umd.js", include_in_schema=False)
    async def livekit_client() -> FileResponse:
        return _file(vendor, "livekit-client is not installed: run `make install`")

    @app.get("/static/{name}", include_in_schema=False)
    async def asset(name: str) -> FileResponse:
        if name not in assets:  # an allow-list: no path from the request reaches the disk
            raise HTTPException(404, "not found")
        return _file(web / name, "not found")


def _file(path: Path, missing: str) -> FileResponse:
    if not path.is_file():
        raise HTTPException(404, missing)
    return FileResponse(path)
