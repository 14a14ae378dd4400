"""The LLM stage's side of tools (docs/tools.md): finding the tool services on the bus, and
calling one.

Discovery asks ``$SRV.INFO`` (every nats.micro service answers) and keeps the endpoints on
``tools.<name>``; it is cached, refreshed in the background when older than ``REFRESH_S``, and
awaited only when a session's agent allows a tool that is not known yet (at most every
``MISSING_RETRY_S``). A call is one NATS
request with the tool's own timeout; every way it can fail becomes an error text for the model
(it tells the user, rather than the turn hanging).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable

import msgspec
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from proto import codec
from proto import events as ev
from proto import subjects as sj
from proto import tools as tl
from services.llm.provider import ToolCall
from services.runtime.logs import Throttle

log = logging.getLogger("voicebus.llm.tools")
_throttle = Throttle(60.0)
_EXTRA = {"stage": "llm"}

REFRESH_S = 5.0
MISSING_RETRY_S = 2.0
# Discovery waits for answers until none came for QUIET_S (at most WINDOW_S in all).
QUIET_S, WINDOW_S = 0.1, 1.0

# Built into the LLM stage: no service answers these.
END_CALL = tl.ToolSpec(
    name="end_call",
    description="Hang up the call. Say goodbye in the same reply: the call ends once the user "
                "has heard all of it (if they interrupt, it does not end).",
)
# On a call through voicebus's SIP gateway only (a PhoneAction the gateway carries out).
SEND_DTMF = tl.ToolSpec(
    name="send_dtmf",
    description="Press keys on the phone call (to answer a phone menu): digits 0-9, * and #.",
    parameters={"type": "object", "required": ["digits"], "additionalProperties": False,
                "properties": {"digits": {"type": "string", "pattern": "^[0-9*#]{1,32}$"}}},
    timeout_ms=10_000,
)
TRANSFER = tl.ToolSpec(
    name="transfer",
    description="Hand the call to a person: a phone number (+15550100) or a SIP address "
                "(sip:desk@example.com). Say so before; the call leaves you once they take it.",
    parameters={"type": "object", "required": ["to"], "additionalProperties": False,
                "properties": {"to": {"type": "string"}}},
    timeout_ms=30_000,
)
BUILT_IN = {END_CALL.name: END_CALL}
PHONE_BUILT_IN = {SEND_DTMF.name: SEND_DTMF, TRANSFER.name: TRANSFER}


class ToolBox:
    """The tools this replica knows, shared by its sessions."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.specs: dict[str, tl.ToolSpec] = {}
        self.refreshed = 0.0  # monotonic time of the last discovery (0: never)
        self._refresh: asyncio.Task[None] | None = None

    async def offered(self, allowed: Iterable[str], phone: bool = False) -> list[tl.ToolSpec]:
        """The specs of the allowed tools that exist now: built-ins (the phone's on a call
        through the gateway only), then the bus's."""
        built_in = {**BUILT_IN, **(PHONE_BUILT_IN if phone else {})}
        allowed = [name for name in allowed if phone or name not in PHONE_BUILT_IN]
        on_bus = [name for name in allowed if name not in built_in]
        if on_bus:
            age = time.monotonic() - self.refreshed
            # A tool not seen yet may have just started: look once, but not on every turn
            # of an agent whose tool is simply not running (each look costs a turn ~0.1 s).
            missing = age > MISSING_RETRY_S and any(name not in self.specs for name in on_bus)
            if age > REFRESH_S or missing:
                task = self._start_refresh()
                if missing:
                    await asyncio.shield(task)
        return [spec for name in allowed
                if (spec := built_in.get(name) or self.specs.get(name)) is not None]

    def _start_refresh(self) -> asyncio.Task[None]:
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self.discover(), name="tool-discovery")
        return self._refresh

    async def discover(self) -> None:
        """Ask every micro service what it serves; keep the tools. A failure (the bus down)
        keeps what was known, and is not tried again before ``MISSING_RETRY_S``."""
        try:
            await self._discover()
        except Exception as exc:
            if _throttle.allow("discovery") is not None:
                log.warning("tool discovery failed: %s", exc, extra=_EXTRA)
            self.refreshed = time.monotonic()

    async def _discover(self) -> None:
        inbox = self.nc.new_inbox()
        answers: asyncio.Queue[bytes] = asyncio.Queue()

        async def collect(msg) -> None:
            answers.put_nowait(msg.data)

        sub = await self.nc.subscribe(inbox, cb=collect)
        found: dict[str, tl.ToolSpec] = {}
        try:
            await self.nc.publish("$SRV.INFO", b"", reply=inbox)
            deadline = time.monotonic() + WINDOW_S
            while (left := deadline - time.monotonic()) > 0:
                try:
                    data = await asyncio.wait_for(answers.get(), min(QUIET_S, left))
                except asyncio.TimeoutError:
                    break
                self._read_info(data, found)
        finally:
            await sub.unsubscribe()
        self.specs, self.refreshed = found, time.monotonic()

    @staticmethod
    def _read_info(data: bytes, found: dict[str, tl.ToolSpec]) -> None:
        try:
            info = json.loads(data)
            endpoints = info.get("endpoints") or []
        except (ValueError, AttributeError):
            if _throttle.allow("bad-info") is not None:
                log.warning("a $SRV.INFO answer is not micro's JSON; ignored", extra=_EXTRA)
            return
        for endpoint in endpoints:
            subject = str(endpoint.get("subject", ""))
            if not subject.startswith(tl.PREFIX + "."):
                continue  # a stage's endpoint, not a tool
            try:
                spec = tl.ToolSpec.from_endpoint(subject, endpoint.get("metadata"))
            except ValueError as exc:
                if _throttle.allow(f"bad-tool:{subject}") is not None:
                    log.warning("tool %s ignored: %s", subject, exc, extra=_EXTRA)
                continue
            found.setdefault(spec.name, spec)  # replicas of one service announce it alike

    async def phone(self, spec: tl.ToolSpec, call: ToolCall, session: str, turn: int,
                    seq: int) -> tuple[str, str]:
        """A phone built-in: a PhoneAction the SIP gateway carries out on the call."""
        try:
            arguments = json.loads(call.arguments or "{}")
            action = ev.PhoneAction(
                session=session, seq=seq, ts_ns=time.time_ns(), turn=turn, call_id=call.id[:128],
                action="dtmf" if spec is SEND_DTMF else "transfer",
                digits=str(arguments.get("digits", "")) if spec is SEND_DTMF else "",
                target=str(arguments.get("to", "")) if spec is TRANSFER else "")
            data = codec.encode(action)
            codec.decode(data)  # the contract's checks (digits, a number or SIP URI)
        except (ValueError, AttributeError, codec.Rejected) as exc:
            return "", f"bad arguments ({exc})"
        try:
            reply = await self.nc.request(sj.LLM_PHONE.subject(session), data,
                                          timeout=spec.timeout_ms / 1000)
            done = codec.decode(reply.data)
        except NoRespondersError:
            return "", "this call cannot do that (no SIP gateway has it)"
        except (NatsTimeout, asyncio.TimeoutError):
            return "", "the phone did not confirm in time"
        except codec.Rejected as exc:  # (a Rejected is a ValueError: caught here first)
            return "", f"the gateway's answer was unreadable ({exc})"
        if not isinstance(done, ev.PhoneActionDone):
            return "", "the gateway's answer was unreadable"
        if done.error:
            return "", done.error
        return json.dumps("done" if spec is SEND_DTMF else "transferred: the call is theirs now"), ""

    async def call(self, spec: tl.ToolSpec, call: ToolCall, session: str, turn: int
                   ) -> tuple[str, str]:
        """Run ``call``: (the result as JSON text, "") or ("", what went wrong, in words)."""
        try:
            arguments = json.loads(call.arguments or "{}")
        except ValueError as exc:
            return "", f"the arguments are not valid JSON ({exc})"
        if not isinstance(arguments, dict):
            return "", "the arguments must be a JSON object"
        request = tl.ToolRequest(session=session, turn=turn, call_id=call.id,
                                 arguments=arguments)
        timeout = spec.timeout_ms / 1000
        try:
            reply = await self.nc.request(tl.subject(spec.name), msgspec.json.encode(request),
                                          timeout=timeout)
        except NoRespondersError:
            return "", "the tool is not available right now"
        except (NatsTimeout, asyncio.TimeoutError):
            return "", f"the tool did not answer within {timeout:g} s"
        headers = reply.headers or {}
        if tl.ERROR_HEADER in headers:
            code = headers.get(tl.ERROR_CODE_HEADER, "")
            return "", f"{headers[tl.ERROR_HEADER]}" + (f" (code {code})" if code else "")
        text = reply.data.decode(errors="replace") or "null"
        try:
            json.loads(text)
        except ValueError:
            text = json.dumps(text)  # a tool that answered plain text: still JSON for the model
        return text, ""
