"""Tools on the bus: the contract between the LLM stage and the services that act for the agent.

A tool is a NATS request/reply endpoint of a ``nats.micro`` service (any language has one), so
it is discovered through ``$SRV.INFO``, deployed, scaled and swapped like a stage:

- its subject is ``tools.<name>`` (``name``: letters, digits, ``_`` and ``-``; what the model
  sees), served in the queue group ``tools`` so that one replica takes each call;
- its endpoint metadata (strings, as micro wants them) describe it to the model and to the
  LLM stage: ``description``, ``parameters`` (a JSON Schema object, as JSON text),
  ``timeout_ms`` (how long the LLM stage waits; ``DEFAULT_TIMEOUT_MS`` when absent) and
  ``cancellable`` (``"true"``: a barge-in may abandon the call; otherwise a call that has
  started runs to its end and its result is kept for the next reply);
- the request body is a ``ToolRequest`` as JSON; the reply body is the result as JSON (any
  value). A tool that fails answers with micro's error headers (``Nats-Service-Error`` and
  ``Nats-Service-Error-Code``), which the model is told in words.

``call_id`` is the model's id for one call: a service may use it to make a side effect
idempotent (the LLM stage itself never sends the same id twice).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

PREFIX = "tools"
QUEUE = "tools"
DEFAULT_TIMEOUT_MS = 10_000
# nats-server lets a service answer a request for 2 minutes (allow_responses' default window,
# voicebus/auth.py): a longer wait could never end in an answer.
MAX_TIMEOUT_MS = 120_000
# \Z, not $: "$" also matches before a final newline, and "get_time\n" is no name.
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
# micro's error headers.
ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"


def subject(name: str) -> str:
    if not NAME.match(name):
        raise ValueError(f"bad tool name {name!r}: 1-64 letters, digits, _ or -")
    return f"{PREFIX}.{name}"


class ToolRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """One call of a tool by the agent of ``session`` (JSON on the wire)."""

    session: str
    turn: int
    call_id: str
    arguments: dict[str, Any] = {}


class ToolSpec(msgspec.Struct, frozen=True):
    """A tool as the LLM stage knows it after discovery."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = msgspec.field(
        default_factory=lambda: {"type": "object", "properties": {}})
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    cancellable: bool = False

    def metadata(self) -> dict[str, str]:
        """The endpoint metadata that announces this tool."""
        return {"description": self.description,
                "parameters": msgspec.json.encode(self.parameters).decode(),
                "timeout_ms": str(self.timeout_ms),
                "cancellable": "true" if self.cancellable else "false"}

    @classmethod
    def from_endpoint(cls, subject_: str, metadata: dict[str, str] | None) -> ToolSpec:
        """The tool a discovered endpoint serves; ValueError when it is not a valid tool."""
        head, _, name = subject_.partition(".")
        if head != PREFIX or not NAME.match(name):
            raise ValueError(f"{subject_!r} is not a tool subject (tools.<name>)")
        meta = metadata or {}
        try:
            parameters = msgspec.json.decode(meta.get("parameters") or '{"type": "object"}')
            timeout_ms = int(meta.get("timeout_ms") or DEFAULT_TIMEOUT_MS)
        except (msgspec.DecodeError, ValueError) as exc:
            raise ValueError(f"tool {name}: bad metadata ({exc})") from None
        if not isinstance(parameters, dict) or parameters.get("type") != "object":
            raise ValueError(f"tool {name}: parameters must be a JSON Schema object")
        if not 0 < timeout_ms <= MAX_TIMEOUT_MS:
            raise ValueError(f"tool {name}: timeout_ms must be in 1..{MAX_TIMEOUT_MS}")
        return cls(name=name, description=meta.get("description", ""), parameters=parameters,
                   timeout_ms=timeout_ms,
                   cancellable=meta.get("cancellable", "").lower() == "true")
