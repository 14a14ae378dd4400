"""``voicebus dial``: ask voicebus's SIP gateway to call a number or a SIP URI.

The request is a ``DialRequest`` on ``subjects.SIP_DIAL`` (request/reply; the gateways share a
queue group, so one of them places the call), sent as the operator: only the operator may make
the gateway dial (``proto/permissions.py``). The gateway answers once the callee picked up (a
session has started: its ``PhoneSessionStart`` says ``direction="outbound"``) or did not (busy,
declined, no answer…). The call then goes on without this command: the agent speaks the greeting
and talks; ``ctl.end`` (e.g. from the judge's goodbye) hangs up.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import nats

from proto import codec
from proto import events as ev
from proto import subjects as sj

# The gateway replies once the phone stopped ringing: answered, refused, or given up on at the
# ringing time (a CANCEL's 487 is not waited for). The margin is for a callee that answers
# and the session that must start before the reply, on a busy gateway, with room to spare.
REPLY_MARGIN_S = 70.0


class DialError(Exception):
    """The request could not be made (bad arguments, no gateway answered)."""


def request(target: str, *, greeting: str = "", caller_id: str = "", agent: str = "",
            instructions: str = "", answer_timeout_s: float = 30.0) -> ev.DialRequest:
    """The request, checked as the gateway will check it (a bad target fails here, not there)."""
    fields: dict[str, Any] = {"kind": "sip.dial", "target": target, "greeting": greeting,
                              "caller_id": caller_id, "agent": agent,
                              "instructions": instructions,
                              "answer_timeout_ms": round(answer_timeout_s * 1000)}
    try:
        dialled = codec.decode_dial(msgspec.msgpack.encode(fields))
    except codec.Rejected as exc:
        raise DialError(f"not a request the gateway takes: {exc.detail}") from None
    assert isinstance(dialled, ev.DialRequest)
    return dialled


async def dial(nc: nats.NATS, dialled: ev.DialRequest) -> ev.DialReply:
    """Send the request; the gateway's reply."""
    timeout = dialled.answer_timeout_ms / 1000 + REPLY_MARGIN_S
    try:
        msg = await nc.request(sj.SIP_DIAL, codec.encode(dialled), timeout=timeout)
    except nats.errors.NoRespondersError:
        raise DialError("no SIP gateway takes dial requests on this bus") from None
    except nats.errors.TimeoutError:
        raise DialError(f"the gateway did not answer within {timeout:.0f} s") from None
    try:
        reply = codec.decode_dial(msg.data)
    except codec.Rejected as exc:
        raise DialError(f"the gateway's reply is not one: {exc.detail}") from None
    if not isinstance(reply, ev.DialReply):
        raise DialError("the gateway answered with a request")
    return reply


def render(reply: ev.DialReply) -> str:
    """One line of JSON: ``{"session": …}`` or ``{"error": …, "status": …, "reason": …}``
    (the fields that are set)."""
    return json.dumps({name: value for name in reply.__struct_fields__
                       if (value := getattr(reply, name))})
