"""A tool service for tests/integration/test_tools.py, run as a process of its own: ``slow``
says on stdout that a call has started, then takes ``seconds`` (so a test can kill the
process while a call is under way), and answers how long it waited."""

from __future__ import annotations

import asyncio
import os
import sys

from proto.tools import ToolRequest, ToolSpec
from services.tools.serve import Tool, ToolProcess

TIMEOUT_MS = 8_000
NAME = os.environ.get("SLOW_TOOL_NAME", "slow")  # another test serves a "slow" of its own
STARTED = "slow call started:"


async def slow(request: ToolRequest) -> dict[str, float]:
    seconds = float(request.arguments.get("seconds", 60))
    print(f"{STARTED} {request.call_id}", flush=True)  # the test waits for this line
    await asyncio.sleep(seconds)
    return {"waited": seconds}


TOOLS = [Tool(ToolSpec(name=NAME, description="Waits, then answers.",
                       parameters={"type": "object",
                                   "properties": {"seconds": {"type": "number"}}},
                       timeout_ms=TIMEOUT_MS), slow)]


async def main() -> int:
    return await ToolProcess("slowtest").run(TOOLS)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
