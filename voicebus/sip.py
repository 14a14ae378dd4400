"""``voicebus sip setup``: phone calls through LiveKit SIP, the standard-trunk path.

LiveKit's SIP service (run next to livekit-server; docs/telephony.md) answers a trunk's calls
and puts each caller into a room as a participant of kind SIP. What it needs from us is an
inbound trunk (which numbers, from which addresses, with what credentials) and a dispatch rule
(which room a call goes to). Both live in livekit-server (in its Redis) and are made through
its server API, here with ``livekit-api``. The token service does the rest: the caller joining
the room is its cue to send the agent (``services/token/webhook.py``).

Running it again updates the trunk and the rule it made before (found by name): the command
is safe to put in a deployment script.
"""

from __future__ import annotations

from dataclasses import dataclass

from livekit import api
from livekit.protocol import sip as lksip

from proto.subjects import BadSubject, check_session


@dataclass(frozen=True)
class SipSetup:
    name: str = "voicebus"
    numbers: tuple[str, ...] = ()  # the trunk's phone numbers (E.164); empty: any
    allowed_addresses: tuple[str, ...] = ()  # the trunk provider's addresses or CIDR ranges
    auth_username: str = ""  # digest authentication the provider must answer
    auth_password: str = ""
    room_prefix: str = "call-"  # each call gets a room of its own: <prefix><random>


class SipSetupError(ValueError):
    """The settings cannot make a trunk nobody else can call into."""


def check(setup: SipSetup) -> None:
    if not setup.name.strip():
        raise SipSetupError("a trunk needs a name")
    if not (setup.allowed_addresses or setup.auth_username):
        # An open trunk would let anyone on the Internet place calls that cost the agent's
        # compute (and a provider's money, when the agent calls out).
        raise SipSetupError("name the trunk provider's addresses (--allowed-address) or set "
                            "digest credentials (--auth-username, and the password in "
                            "VOICEBUS_SIP_AUTH_PASSWORD)")
    if bool(setup.auth_username) != bool(setup.auth_password):
        raise SipSetupError("digest authentication needs both a username and a password")
    try:  # the rooms are voicebus sessions: their names must be session ids
        check_session(f"{setup.room_prefix}x")
    except BadSubject as exc:
        raise SipSetupError(f"room prefix {setup.room_prefix!r}: {exc}") from None


async def apply(lkapi: api.LiveKitAPI, setup: SipSetup) -> dict[str, object]:
    """Create (or update) the inbound trunk and its dispatch rule. Returns their ids and
    whether each was created."""
    check(setup)
    trunk_info = lksip.SIPInboundTrunkInfo(
        name=setup.name, numbers=list(setup.numbers),
        allowed_addresses=list(setup.allowed_addresses),
        auth_username=setup.auth_username, auth_password=setup.auth_password)
    trunks = await lkapi.sip.list_inbound_trunk(lksip.ListSIPInboundTrunkRequest())
    existing = [t for t in trunks.items if t.name == setup.name]
    if existing:
        trunk_id = existing[0].sip_trunk_id
        await lkapi.sip.update_inbound_trunk(trunk_id, trunk_info)
    else:
        created = await lkapi.sip.create_inbound_trunk(
            lksip.CreateSIPInboundTrunkRequest(trunk=trunk_info))
        trunk_id = created.sip_trunk_id

    rule = lksip.SIPDispatchRule(dispatch_rule_individual=lksip.SIPDispatchRuleIndividual(
        room_prefix=setup.room_prefix))
    rules = await lkapi.sip.list_dispatch_rule(lksip.ListSIPDispatchRuleRequest())
    mine = [r for r in rules.items if r.name == setup.name]
    if mine:
        rule_id = mine[0].sip_dispatch_rule_id
        await lkapi.sip.update_dispatch_rule(rule_id, lksip.SIPDispatchRuleInfo(
            name=setup.name, rule=rule, trunk_ids=[trunk_id]))
    else:
        made = await lkapi.sip.create_dispatch_rule(lksip.CreateSIPDispatchRuleRequest(
            dispatch_rule=lksip.SIPDispatchRuleInfo(name=setup.name, rule=rule,
                                                    trunk_ids=[trunk_id])))
        rule_id = made.sip_dispatch_rule_id
    return {"trunk_id": trunk_id, "trunk_created": not existing,
            "dispatch_rule_id": rule_id, "dispatch_rule_created": not mine,
            "room_prefix": setup.room_prefix}
