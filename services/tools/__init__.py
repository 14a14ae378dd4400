"""Tool services: processes that act for the agent, each a nats.micro service on the bus
(``proto/tools.py`` is the contract, ``docs/tools.md`` the guide).

- ``serve``: serve tools written in Python (``Tool``, ``serve``, ``ToolProcess``);
- ``demo`` (``python -m services.tools.demo``): the offline demo tools, the time and a balance;
- ``mcp`` (``python -m services.tools.mcp``): an MCP server's tools, bridged onto the bus.
"""
