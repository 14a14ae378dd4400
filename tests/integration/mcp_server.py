"""A tiny MCP server over stdio for tests/integration/test_tools.py, written with the official
SDK's MCPServer (FastMCP, as mcp 2 calls it). Its tools: one that answers, one whose name is
not a bus name, one that refuses with a message, one that crashes, and one that takes the whole
server down mid-call. Over stdio, or streamable HTTP with ``--http PORT``."""

from __future__ import annotations

import os
import sys

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("voicebus-test", log_level="WARNING")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two whole numbers."""
    return a + b


@server.tool(name="text.shout")
def shout(text: str) -> str:
    """The text in capitals."""
    return text.upper()


@server.tool()
def refuse(reason: str) -> str:
    """Always refuses, with the reason given."""
    raise ToolError(f"refused: {reason}")


@server.tool()
def crash() -> str:
    """A bug: raises an unexpected exception."""
    raise RuntimeError("secret internal detail")


@server.tool()
def die() -> str:
    """The server process exits while the call is under way."""
    os._exit(3)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--http":  # streamable HTTP on this port
        server.run("streamable-http", port=int(sys.argv[2]))
    else:
        server.run("stdio")
