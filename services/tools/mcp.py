"""``python -m services.tools.mcp``: an MCP server's tools, served on the bus.

    python -m services.tools.mcp --stdio npx -y @some/mcp-server      (a local command)
    python -m services.tools.mcp --url http://127.0.0.1:8000/mcp      (streamable HTTP)

The bridge opens one session with the MCP server (the official ``mcp`` SDK: the
``voicebus[tools-mcp]`` extra), lists its tools and announces each as ``tools.<name>`` (its
``inputSchema`` as parameters, its description), then forwards every call with
``call_tool``. A result becomes the reply: its structured content when it has some, else its
text; a result with ``isError`` becomes an error reply (502) with the tool's own words, for the
model to read.

The bridge lives as long as its MCP server: when the server dies (its process exits, the HTTP
server stops answering pings), the calls under way fail at once with a 503 and the bridge
exits with 1, so that its supervisor (the launcher, compose, Kubernetes) starts both again.
The tool list is read once, at start; a server whose tools change is picked up on restart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any

from mcp import ClientSession, MCPError, StdioServerParameters, stdio_client
from mcp import types as mt
from mcp.client.streamable_http import streamable_http_client

from proto import tools as tl
from services.tools.serve import ROLE, Handler, Tool, ToolError, ToolProcess

log = logging.getLogger("voicebus.tools.mcp")

# How often an idle bridge asks its MCP server whether it is still there.
PING_S = 2.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.tools.mcp",
                                     description="Serve an MCP server's tools on the bus.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--stdio", nargs=argparse.REMAINDER, metavar="CMD",
                        help="run this command (and the arguments after it) as the MCP server")
    source.add_argument("--url", help="an MCP server over streamable HTTP (…/mcp)")
    parser.add_argument("--name", default="mcp", help="the service's group: voicebus-tools-NAME")
    parser.add_argument("--prefix", default="", help="put this before every tool's name on the "
                        "bus (two MCP servers may both have a `search`)")
    parser.add_argument("--timeout-ms", type=int, default=tl.DEFAULT_TIMEOUT_MS,
                        help="how long the LLM stage waits for each of these tools")
    parser.add_argument("--env", action="append", default=[], metavar="NAME",
                        help="pass this variable of ours to a --stdio server (it gets only "
                        "HOME, PATH and the like otherwise: our bus credentials stay ours)")
    args = parser.parse_args(argv)
    if args.stdio is not None and not args.stdio:
        parser.error("--stdio needs a command")
    if not 0 < args.timeout_ms <= tl.MAX_TIMEOUT_MS:
        parser.error(f"--timeout-ms must be in 1..{tl.MAX_TIMEOUT_MS}")
    return args


@contextlib.asynccontextmanager
async def mcp_session(args: argparse.Namespace) -> AsyncIterator[ClientSession]:
    """An initialised session with the MCP server the arguments name."""
    if args.stdio:
        env = {name: os.environ[name] for name in args.env if name in os.environ}
        server = StdioServerParameters(command=args.stdio[0], args=args.stdio[1:], env=env)
        transport = stdio_client(server)
    else:
        transport = streamable_http_client(args.url)
    async with transport as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


async def list_tools(session: ClientSession) -> list[mt.Tool]:
    """Every tool the server has, page after page."""
    listed: list[mt.Tool] = []
    cursor: str | None = None
    while True:
        params = mt.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        listed += page.tools
        cursor = page.next_cursor
        if not cursor:
            return listed


def bus_name(mcp_name: str, prefix: str = "") -> str:
    """A tool name as the bus allows it (letters, digits, ``_``, ``-``; 64 at most)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", prefix + mcp_name)[:64]


def bridged_tools(session: ClientSession, listed: Sequence[mt.Tool], args: argparse.Namespace,
                  gone: asyncio.Event) -> list[Tool]:
    tools: dict[str, Tool] = {}
    for tool in listed:
        name = bus_name(tool.name, args.prefix)
        schema = tool.input_schema
        if name in tools or not isinstance(schema, dict) or schema.get("type") != "object":
            log.warning("MCP tool %r not served: %s", tool.name,
                        f"its name is taken as {name}" if name in tools
                        else "its inputSchema is not a JSON Schema object",
                        extra={"stage": ROLE})
            continue
        # The annotations are the server's hints; the operator chose to trust this server. A
        # tool that only reads can be abandoned on a barge-in without a side effect lost.
        read_only = bool(tool.annotations and tool.annotations.read_only_hint)
        spec = tl.ToolSpec(name=name, description=tool.description or tool.title or "",
                           parameters=schema, timeout_ms=args.timeout_ms,
                           cancellable=read_only)
        tools[name] = Tool(spec, _forward(session, tool.name, gone))
    return list(tools.values())


def _forward(session: ClientSession, mcp_name: str, gone: asyncio.Event) -> Handler:
    async def call(request: tl.ToolRequest) -> Any:
        if gone.is_set():
            raise ToolError("the MCP server behind this tool is gone", 503)
        try:
            result = await session.call_tool(mcp_name, request.arguments or None)
        except MCPError as exc:
            if exc.code == mt.CONNECTION_CLOSED:
                log.error("the MCP server closed the connection", extra={"stage": ROLE})
                gone.set()
                raise ToolError("the MCP server behind this tool is gone", 503) from None
            raise ToolError(f"the MCP server refused the call: {exc.message}", 502) from None
        return result_value(result)

    return call


def result_value(result: mt.CallToolResult) -> Any:
    """The reply for an MCP result: its structured content if any, else its text (one block:
    a string; several: joined by newlines); what is not text is named, not sent (the agent
    speaks). ``isError`` raises ``ToolError`` with the tool's own words."""
    texts = [block.text if isinstance(block, mt.TextContent) else f"[{block.type} omitted]"
             for block in result.content]
    if result.is_error:
        raise ToolError(" ".join(texts) or "the MCP tool failed", 502)
    if result.structured_content is not None:
        return result.structured_content
    return "\n".join(texts) if texts else None


async def _watch(session: ClientSession, gone: asyncio.Event) -> None:
    """Between calls, notice that the server died: a ping that fails or hangs."""
    while not gone.is_set():
        await asyncio.sleep(PING_S)
        try:
            await asyncio.wait_for(session.send_ping(), PING_S * 5)
        except (MCPError, TimeoutError, OSError) as exc:
            log.error("the MCP server does not answer a ping (%s)", exc or type(exc).__name__,
                      extra={"stage": ROLE})
            gone.set()


async def hold_session(args: argparse.Namespace, ready: asyncio.Future[list[Tool]],
                       gone: asyncio.Event, release: asyncio.Event) -> None:
    """Keep the MCP session open until ``release``; ``ready`` gets its tools. The session runs
    in this task of its own because the SDK's transports run in anyio task groups, which
    cancel the task that opened them when their connection breaks: serving the bus from
    another task, the bridge still answers the calls under way and drains. However the
    session ends, ``gone`` is set."""
    try:
        async with mcp_session(args) as session:
            ready.set_result(bridged_tools(session, await list_tools(session), args, gone))
            watch = asyncio.create_task(_watch(session, gone))
            try:
                await _first(release.wait(), gone.wait())
            finally:
                watch.cancel()
    except Exception as exc:  # could not start, reach or keep it: the supervisor tries again
        if not ready.done():
            ready.set_exception(exc)
        elif not release.is_set():
            log.error("the MCP session broke: %s", _reason(exc), extra={"stage": ROLE})
    finally:
        gone.set()
        if not ready.done():
            ready.cancel()


async def _first(*waits: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


async def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    process = ToolProcess(args.name)  # (logs are set up from here on)
    for chatty in ("httpx", "httpx2", "mcp"):  # a line per HTTP request, pings included
        logging.getLogger(chatty).setLevel(logging.WARNING)
    what = " ".join(args.stdio) if args.stdio else args.url
    gone, release = asyncio.Event(), asyncio.Event()
    ready: asyncio.Future[list[Tool]] = asyncio.get_running_loop().create_future()
    holder = asyncio.create_task(hold_session(args, ready, gone, release))
    try:
        await _first(asyncio.shield(ready), process.stop.wait())
        if process.stop.is_set():
            return 0  # told to stop before the MCP server was up
        try:
            tools = ready.result()
        except (Exception, asyncio.CancelledError) as exc:
            log.error("MCP server %s: %s", what, _reason(exc), extra={"stage": ROLE})
            return 1
        if not tools:
            log.error("MCP server %s has no tool to serve", what, extra={"stage": ROLE})
            return 1
        code = await process.run(tools, failed=gone, description=f"MCP: {what}")
        if code:
            log.error("exiting: the MCP server %s is gone", what, extra={"stage": ROLE})
        return code
    finally:
        release.set()
        if not ready.done():
            holder.cancel()  # still starting (a server that does not answer): give up on it
        await asyncio.gather(holder, return_exceptions=True)  # (its own errors are logged)


def _reason(exc: BaseException) -> str:
    """The first real cause inside anyio's exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
