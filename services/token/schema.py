"""What ``POST /api/token`` accepts and answers, and reading its body defensively.

Every way a body can be wrong ends in a 4xx with a JSON ``detail``: bad input must never look
like a server fault (and never costs more than ``MAX_BODY`` bytes of memory).
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from fastapi import HTTPException, Request
from starlette.requests import ClientDisconnect
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from proto.events import SESSION_CHARS
from services.runtime.livekit import RESERVED_PREFIX
from services.runtime.logs import Throttle
from services.token import metrics

RESERVED_NAME = RESERVED_PREFIX.rstrip("-")  # "voicebus"

log = logging.getLogger("voicebus.token")
_disconnects = Throttle()

MAX_BODY = 4096
IDENTITY_PATTERN = r"^[A-Za-z0-9_.@-]{1,64}$"


# Pydantic checks patterns with Rust's regex, whose ``$`` is the very end (it knows no ``\Z``).
ROOM_PATTERN = rf"^{SESSION_CHARS}$"


class TokenRequest(BaseModel):
    # strict: a number is not a room name; unknown fields are ignored so clients may evolve.
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    room: Annotated[str, Field(pattern=ROOM_PATTERN, description="the room, also the bus "
                               "session id")]
    identity: Annotated[str | None, Field(pattern=IDENTITY_PATTERN, description="generated "
                                          "when missing")] = None
    name: Annotated[str | None, Field(max_length=64, description="display name")] = None
    agent: Annotated[str | None, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="the "
                                       "agent profile that answers (GET /api/agents); the "
                                       "default one when missing")] = None

    @field_validator("identity")
    @classmethod
    def _not_ours(cls, identity: str | None) -> str | None:
        # Any case, any separator: a look-alike of the agent's identity ("voicebus_agent",
        # "VoiceBus.agent") is as misleading to a person as the real one.
        if identity is not None and identity.lower().startswith(RESERVED_NAME):
            raise ValueError(f"identities starting with {RESERVED_NAME!r} are reserved for "
                             "voicebus's own participants")
        return identity

    @field_validator("name")
    @classmethod
    def _printable(cls, name: str | None) -> str | None:
        if name is not None and not name.isprintable():
            raise ValueError("name must contain printable characters only")
        return name


class TokenResponse(BaseModel):
    token: str
    url: str
    room: str
    identity: str
    expires_at: int


async def read_token_request(request: Request) -> TokenRequest:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise HTTPException(415, "send the body as Content-Type: application/json")
    data = _parse_json(await read_limited(request, MAX_BODY))
    try:
        return TokenRequest.model_validate(data)
    except ValidationError as exc:
        # Through JSON: error contexts may hold exception objects that cannot be serialised.
        errors = json.loads(exc.json(include_url=False, include_input=False))
        raise HTTPException(422, errors) from None


async def read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"the body must be at most {limit} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():  # a chunked body has no Content-Length to trust
            body += chunk
            if len(body) > limit:
                raise HTTPException(413, f"the body must be at most {limit} bytes")
    except ClientDisconnect:
        # Nobody is left to answer; one line (throttled), not a traceback per request.
        metrics.CLIENT_DISCONNECTS.inc()
        if (held := _disconnects.allow("disconnect")) is not None:
            client = request.client.host if request.client else "?"
            log.info("client %s hung up mid-body on %s (+%d more since last report)", client,
                     request.url.path, held)
        raise HTTPException(400, "the client disconnected") from None
    return bytes(body)


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: 4 KiB of nested brackets
        raise HTTPException(400, "the body is not valid JSON") from None
