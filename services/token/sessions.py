"""The session pages: a recorded session as a timeline (``/sessions/<id>``, drawn by
``web/session.js`` from ``/api/sessions/<id>``) and the list of captured sessions
(``/sessions``, ``/api/sessions``).

They show what users said, so they exist only when ``VOICEBUS_SESSION_PAGES`` is on (``voicebus
up`` turns it on; a deployment leaves it off, or puts the ``VOICEBUS_TOKEN_AUTHORIZE`` hook in
front: every read asks it, with an empty identity). The data is read from the capture stream
on each request over a connection of its own, as the role "pages", which may read the capture
and do nothing else (the token role cannot read it); nothing is kept here, so any replica
answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import msgspec
import nats.errors
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse

from services.token.authorize import require
from services.token.schema import ROOM_PATTERN
from voicebus import record, timeline

if TYPE_CHECKING:
    from services.token.app import TokenService

log = logging.getLogger("voicebus.token")

T = TypeVar("T")

ASSETS = ("session.js",)
# Reading a session pulls all of its messages (audio too): a few at a time, on a 2-core box.
CONCURRENT_READS = 2
PRIVATE = {"Cache-Control": "no-store"}  # transcripts: no cache may keep them
SessionId = Annotated[str, PathParam(pattern=ROOM_PATTERN, description="a session id")]


def add_session_routes(app: FastAPI, service: TokenService, web: Path) -> None:
    reads = asyncio.Semaphore(CONCURRENT_READS)

    async def read(request: Request, room: str, work: Callable[[Any], Awaitable[T]]) -> T:
        await require(service.authorize, request, room, "", "not allowed to read this session")
        bus = service.pages_bus
        if bus is None or not bus.nc.is_connected:
            raise HTTPException(503, "the capture cannot be read: not connected to NATS")
        try:
            async with reads:
                return await work(bus.js)
        except record.RecordingError as exc:  # no capture stream on this bus
            raise HTTPException(404, str(exc)) from None
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            log.warning("cannot read the capture: %s", type(exc).__name__,
                        extra={"stage": "token", "session": room})
            raise HTTPException(503, "the capture did not answer; try again") from None

    # Not in the published OpenAPI schema, which is what the token service's clients use
    # (tokens, webhooks): these serve the pages, an operator's view of the conversations.
    @app.get("/api/sessions", include_in_schema=False)
    async def list_sessions(request: Request) -> JSONResponse:
        """The captured sessions and how many messages each has."""
        counts = await read(request, "", record.sessions)
        listed = [{"session": s, "messages": n} for s, n in sorted(counts.items())]
        return JSONResponse({"sessions": listed}, headers=PRIVATE)

    @app.get("/api/sessions/{session}", include_in_schema=False)
    async def session_timeline(request: Request, session: SessionId) -> Response:
        """One captured session as a timeline (``voicebus/timeline.py``)."""
        entries = await read(request, session, lambda js: record.captured(js, session))
        if not entries:
            raise HTTPException(404, f"no session {session!r} in the capture")
        client = request.client.host if request.client else "?"
        log.info("session read by %s", client, extra={"stage": "token", "session": session})
        body = msgspec.json.encode(timeline.build(session, entries))
        return Response(body, media_type="application/json", headers=PRIVATE)

    @app.get("/sessions", include_in_schema=False)
    async def sessions_page() -> FileResponse:
        return _page(web)

    @app.get("/sessions/{session}", include_in_schema=False)
    async def session_page(session: SessionId) -> FileResponse:
        return _page(web)  # the same page: it reads the id from its address


def _page(web: Path) -> FileResponse:
    path = web / "session.html"
    if not path.is_file():
        raise HTTPException(404, f"the session page is missing ({path})")
    return FileResponse(path, headers=PRIVATE)
