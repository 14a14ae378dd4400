"""``python -m services.tools.demo``: the offline demo tools of the ``demo`` agent.

- ``get_time``: the current time, here or in an IANA time zone (``Europe/Paris``);
- ``get_balance``: a made-up bank's balance of an account, by its name (``checking``,
  ``savings``) or number, from a fixed table: the same answer every time, no network.

Each answer carries ``say``, a sentence for the ear (the rule-based demo "LLM" speaks it as
is); a real model reads the other fields.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import zoneinfo
from typing import Any

import msgspec

from proto.tools import ToolRequest, ToolSpec
from services.tools.serve import Tool, ToolError, ToolProcess

GROUP = "demo"


class TimeArguments(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    timezone: str = ""


class BalanceArguments(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    account: str


def _zone(name: str) -> dt.tzinfo | None:
    """The zone called ``name`` (None: this machine's local time); ToolError if unknown."""
    if not name.strip():
        return None
    try:
        return zoneinfo.ZoneInfo(name.strip())
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        # (ValueError: not even a well-formed key, e.g. "../x")
        raise ToolError(f"unknown time zone {name[:60]!r}: use an IANA name such as "
                        "Europe/Paris or America/New_York", 400) from None


async def get_time(request: ToolRequest) -> dict[str, Any]:
    args = msgspec.convert(request.arguments, TimeArguments)
    zone = _zone(args.timezone)
    now = dt.datetime.now(zone).astimezone(zone)  # aware either way
    name = args.timezone.strip() or now.tzname() or "local time"
    spoken = now.strftime("%H:%M")
    return {"time": spoken, "date": now.date().isoformat(), "weekday": now.strftime("%A"),
            "timezone": name, "iso": now.isoformat(timespec="seconds"),
            "say": f"It is {spoken} on {now.strftime('%A')}, {name} time."}


class Account(msgspec.Struct, frozen=True):
    number: str
    name: str
    holder: str
    cents: int
    currency: str = "EUR"


# One made-up customer's accounts (what the demo agent's caller owns).
ACCOUNTS = (
    Account("40021001", "checking", "Alex Morgan", 124_350),
    Account("40021002", "savings", "Alex Morgan", 1_020_000),
    Account("40021003", "holiday", "Alex Morgan", 38_715),
)


def find_account(asked: str) -> Account:
    """By name (``checking``, ``Savings account``) or number (spaces and dashes ignored)."""
    key = asked.strip().lower().removesuffix(" account").strip()
    digits = key.replace(" ", "").replace("-", "")
    for account in ACCOUNTS:
        if key == account.name or (digits and digits == account.number):
            return account
    names = ", ".join(account.name for account in ACCOUNTS)
    raise ToolError(f"no account {asked[:60]!r}: the accounts are {names}", 404)


async def get_balance(request: ToolRequest) -> dict[str, Any]:
    args = msgspec.convert(request.arguments, BalanceArguments)
    account = find_account(args.account)
    amount = f"{account.cents // 100:,}.{account.cents % 100:02d}"
    return {"account": account.name, "number": account.number,
            "balance": account.cents / 100, "currency": account.currency,
            "say": f"Your {account.name} account balance is {amount} "
                   f"{'euros' if account.currency == 'EUR' else account.currency}."}


TOOLS = (
    Tool(ToolSpec(
        name="get_time",
        description="The current time and date, here or in a given time zone.",
        parameters={"type": "object", "properties": {"timezone": {
            "type": "string",
            "description": "An IANA time zone such as Europe/Paris; omit for local time"}},
            "additionalProperties": False},
        timeout_ms=2_000, cancellable=True), get_time),  # reads only: safe to abandon
    Tool(ToolSpec(
        name="get_balance",
        description="The balance of one of the caller's bank accounts.",
        parameters={"type": "object", "properties": {"account": {
            "type": "string",
            "description": "The account's name (checking, savings, holiday) or number"}},
            "required": ["account"], "additionalProperties": False},
        timeout_ms=3_000, cancellable=True), get_balance),
)


async def main() -> int:
    process = ToolProcess(GROUP)
    return await process.run(TOOLS, description="the demo agent's offline tools")


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
