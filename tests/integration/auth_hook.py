"""An authorisation hook for the token service tests (``VOICEBUS_TOKEN_AUTHORIZE``): a ticket
in a header lets you in, except to one room."""

from __future__ import annotations

from fastapi import Request

TICKET_HEADER = "x-voicebus-ticket"
TICKET = "open-sesame"
CLOSED_ROOM = "closed-room"


async def require_ticket(request: Request, room: str, identity: str) -> bool:
    return request.headers.get(TICKET_HEADER) == TICKET and room != CLOSED_ROOM
