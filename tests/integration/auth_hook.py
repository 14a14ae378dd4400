"""An authorisation hook for the token service tests (``VOICEBUS_TOKEN_AUTHORIZE``): a ticket
in a header lets you in, except to one room."""

from __future__ import annotations

from fastapi import Request

TICKET_HEADER = "x-voicebus-ticket"
TICKET = "open-sesame"
CLOSED_ROOM = "closed-room"


CUSTOMER_HEADER = "x-voicebus-customer"


async def require_ticket(request: Request, room: str, identity: str) -> bool | dict[str, str]:
    """A ticket lets you in; a known customer's agent also learns who is calling."""
    if request.headers.get(TICKET_HEADER) != TICKET or room == CLOSED_ROOM:
        return False
    if customer := request.headers.get(CUSTOMER_HEADER):
        return {"instructions": f"The caller is {customer}, a premium customer."}
    return True
