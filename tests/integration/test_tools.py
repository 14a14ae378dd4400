"""Tools on the bus, as real processes on a real nats-server with the generated credentials:
the demo tools, a test-only slow tool, and an MCP server behind the bridge are discovered
through ``$SRV.INFO`` and called with the LLM stage's own credentials; their answers, their
errors, a tool killed mid-call and an MCP server that dies are what the LLM stage would see.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
import pytest_asyncio
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from proto import tools as tl
from services.tools import demo
from tests.conftest import LogTail
from tests.integration import slow_tool
from voicebus.launcher import Proc, Stack, free_port, spawn

pytestmark = pytest.mark.asyncio(loop_scope="module")

HERE = Path(__file__).resolve().parent
CALL_TIMEOUT = 30.0  # generous: a loaded 2-core machine


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def tools_stack(tmp_path_factory: pytest.TempPathFactory):
    """nats-server with the generated credentials and the demo tools (as `voicebus up` starts
    them), metrics on; no stage."""
    tmp = tmp_path_factory.mktemp("tools")
    logs = LogTail(tmp / "stack.log")
    stack = Stack(tmp, sink=logs, metrics=True, tools=("demo",))
    stack.logs = logs  # type: ignore[attr-defined]
    try:
        await stack.start(stages=())
    except Exception:
        await stack.stop()
        raise RuntimeError(f"stack failed to start; logs:\n{logs.dump()}") from None
    yield stack
    codes = await stack.stop()
    assert all(code == 0 for code in codes.values()), f"{codes}\n{logs.dump()}"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def llm(tools_stack: Stack):
    """The bus as the LLM stage is on it: its role, its rights."""
    nc = await tools_stack.connect(role="llm")
    yield nc
    await nc.close()


# ---- the caller's side, as the LLM stage does it -----------------------------------------

async def discover(nc: nats.NATS, quiet: float = 0.3, window: float = 3.0
                   ) -> dict[str, tuple[tl.ToolSpec, dict[str, Any]]]:
    """Every tool that answers ``$SRV.INFO`` now: name → (spec, its service's info)."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    found: dict[str, tuple[tl.ToolSpec, dict[str, Any]]] = {}
    try:
        await nc.publish("$SRV.INFO", b"", reply=inbox)
        deadline = time.monotonic() + window
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=min(quiet, left))
            except NatsTimeout:
                break
            info = json.loads(msg.data)
            for endpoint in info.get("endpoints") or []:
                if endpoint["subject"].startswith(f"{tl.PREFIX}."):
                    spec = tl.ToolSpec.from_endpoint(endpoint["subject"], endpoint["metadata"])
                    found[spec.name] = (spec, info)
    finally:
        await sub.unsubscribe()
    return found


async def wait_for_tools(nc: nats.NATS, names: set[str], timeout: float = 60.0,
                         proc: Proc | None = None
                         ) -> dict[str, tuple[tl.ToolSpec, dict[str, Any]]]:
    deadline = time.monotonic() + timeout
    while not names <= set(found := await discover(nc)):
        if time.monotonic() > deadline or (proc is not None and not proc.alive):
            raise AssertionError(f"tools {sorted(names - set(found))} not discovered")
    return found


def request(arguments: Any = None, call_id: str = "call_1") -> bytes:
    return msgspec.json.encode(tl.ToolRequest(session="s1", turn=1, call_id=call_id,
                                              arguments=arguments or {}))


async def call(nc: nats.NATS, name: str, arguments: Any = None, *,
               timeout: float = CALL_TIMEOUT) -> tuple[Any, str, str]:
    """(result, "", "") or (None, error code, error text)."""
    reply = await nc.request(tl.subject(name), request(arguments), timeout=timeout)
    headers = reply.headers or {}
    if tl.ERROR_HEADER in headers:
        return None, headers.get(tl.ERROR_CODE_HEADER, ""), headers[tl.ERROR_HEADER]
    return json.loads(reply.data), "", ""


async def metric(stack: Stack, process: str, name: str, **labels: str) -> float:
    """One sample of a process's /metrics (0 when it has none yet)."""
    url = f"http://127.0.0.1:{stack.metrics_ports[process]}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class Lines:
    """A spawned process's output, kept for the test to wait on."""

    def __init__(self, logs: LogTail) -> None:
        self.logs = logs
        self.lines: list[str] = []
        self.changed = asyncio.Event()

    def __call__(self, line: str) -> None:
        self.logs(line)
        self.lines.append(line)
        self.changed.set()

    async def wait_for(self, text: str, timeout: float = 60.0) -> None:
        async with asyncio.timeout(timeout):
            while not any(text in line for line in self.lines):
                self.changed.clear()
                await self.changed.wait()


async def start_process(stack: Stack, name: str, argv: list[str],
                        **extra_env: str) -> tuple[Proc, Lines]:
    """One of our processes, as the role ``tool``, the way the launcher starts tools."""
    lines = Lines(stack.logs)  # type: ignore[attr-defined]
    env = {**os.environ, **extra_env, **stack.role_env("tool"), "VOICEBUS_REPLICA": name}
    return await spawn(name, argv, env, lines), lines


# ---- the demo tools -------------------------------------------------------------------------

async def test_the_llm_discovers_the_demo_tools(tools_stack: Stack, llm: nats.NATS) -> None:
    found = await wait_for_tools(llm, {"get_time", "get_balance"})
    for tool in demo.TOOLS:
        spec, info = found[tool.spec.name]
        assert spec == tool.spec  # everything the model is told survived discovery
        assert info["name"] == "voicebus-tools-demo"
        assert info["metadata"]["replica"] == "tools-demo"
        endpoint = next(e for e in info["endpoints"] if e["name"] == spec.name)
        assert endpoint["queue_group"] == tl.QUEUE


async def test_get_time_answers_now_here_and_in_a_zone(llm: nats.NATS) -> None:
    result, code, error = await call(llm, "get_time")
    assert not code, error
    now = dt.datetime.fromisoformat(result["iso"])
    assert abs((now - dt.datetime.now(dt.timezone.utc)).total_seconds()) < 120
    assert result["say"].startswith(f"It is {result['time']}")

    result, code, error = await call(llm, "get_time", {"timezone": "Asia/Tokyo"})
    assert not code, error
    assert dt.datetime.fromisoformat(result["iso"]).utcoffset() == dt.timedelta(hours=9)
    assert result["timezone"] == "Asia/Tokyo" and "Asia/Tokyo" in result["say"]


@pytest.mark.parametrize("arguments, words", [
    ({"timezone": "Mars/Olympus_Mons"}, "unknown time zone 'Mars/Olympus_Mons'"),
    ({"timezone": "../../etc/passwd"}, "unknown time zone"),
    ({"timezone": 5}, "bad arguments: Expected `str`, got `int`"),
    ({"zone": "UTC"}, "bad arguments"),
])
async def test_get_time_refuses_what_is_not_a_zone(llm: nats.NATS, arguments, words) -> None:
    result, code, error = await call(llm, "get_time", arguments)
    assert (result, code) == (None, "400")
    assert words in error


async def test_get_balance_looks_accounts_up_by_name_or_number(llm: nats.NATS) -> None:
    result, code, error = await call(llm, "get_balance", {"account": "checking"})
    assert not code, error
    assert result["balance"] == 1243.5 and result["currency"] == "EUR"
    assert result["say"] == "Your checking account balance is 1,243.50 euros."
    again, _, _ = await call(llm, "get_balance", {"account": "checking"})
    assert again == result  # deterministic
    result, code, error = await call(llm, "get_balance", {"account": "4002-1002"})
    assert not code, error
    assert result["account"] == "savings" and result["balance"] == 10200.0


async def test_an_unknown_account_is_an_error_the_model_can_read(llm: nats.NATS) -> None:
    result, code, error = await call(llm, "get_balance", {"account": "gold"})
    assert (result, code) == (None, "404")
    assert error == "no account 'gold': the accounts are checking, savings, holiday"
    result, code, error = await call(llm, "get_balance", {})
    assert code == "400" and "account" in error


async def test_malformed_calls_get_400_and_the_tool_lives_on(tools_stack: Stack,
                                                             llm: nats.NATS) -> None:
    async def rejected(reason: str) -> float:
        return await metric(tools_stack, "tools-demo", "voicebus_messages_rejected_total",
                            stage="tool", reason=reason)

    before = {reason: await rejected(reason) for reason in ("bad_json", "bad_request")}
    for body, reason in ((b"{not json", "bad_json"), (b"", "bad_json"),
                         (b'{"session": "s1", "turn": 1}', "bad_request"),
                         (b'{"session": "s1", "turn": "one", "call_id": "c"}', "bad_request")):
        reply = await llm.request("tools.get_time", body, timeout=CALL_TIMEOUT)
        assert reply.headers is not None and reply.headers[tl.ERROR_CODE_HEADER] == "400", body
        assert "\n" not in reply.headers[tl.ERROR_HEADER]
    # (counted before the answer went out)
    assert await rejected("bad_json") == before["bad_json"] + 2
    assert await rejected("bad_request") == before["bad_request"] + 2
    assert tools_stack.procs["tools-demo"].alive
    result, code, _ = await call(llm, "get_time", {"timezone": "UTC"})
    assert not code and result["timezone"] == "UTC"
    assert await metric(tools_stack, "tools-demo", "voicebus_tool_answers_total",
                        tool="get_time", outcome="ok") >= 1


# ---- who may call ---------------------------------------------------------------------------

class Refusals:
    """A connection as one role that remembers the permission violations the server reports."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.changed = asyncio.Event()

    async def on_error(self, exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            self.seen.append(str(exc).lower())
            self.changed.set()

    async def of(self, subject: str, timeout: float = 30.0) -> None:
        wanted = f'"{subject.lower()}"'
        async with asyncio.timeout(timeout):
            while not any(wanted in seen for seen in self.seen):
                self.changed.clear()
                await self.changed.wait()


async def test_only_the_llm_calls_tools_and_a_tool_says_nothing_else(tools_stack: Stack) -> None:
    """A tool answers calls and nothing more: it cannot publish an event, call another tool or
    listen to the conversation; no role but the LLM's (and the operator's) can call a tool."""
    clients = {}
    for role in ("tool", "token", "stt", "sip"):
        refusals = Refusals()
        clients[role] = (await tools_stack.connect(role=role, error_cb=refusals.on_error),
                         refusals)
    try:
        tool, refused = clients["tool"]
        for subject in ("voice.victim.stt.final", "voice.victim.llm.delta", "tools.get_balance",
                        "$SRV.INFO"):
            await tool.publish(subject, b"{}")
        await tool.subscribe("voice.>")
        await tool.flush()
        for subject in ("voice.victim.stt.final", "voice.victim.llm.delta", "tools.get_balance",
                        "$SRV.INFO", "voice.>"):
            await refused.of(subject)
        for role in ("token", "stt", "sip"):
            nc, refused = clients[role]
            await nc.publish("tools.get_balance", request({"account": "savings"}))
            await nc.flush()
            await refused.of("tools.get_balance")
    finally:
        for nc, _ in clients.values():
            await nc.close()


# ---- a tool process killed mid-call ---------------------------------------------------------

async def test_a_tool_killed_mid_call_fails_the_call_not_hangs(tools_stack: Stack,
                                                              llm: nats.NATS) -> None:
    proc, lines = await start_process(tools_stack, "slowtool",
                                      [sys.executable, str(HERE / "slow_tool.py")])
    try:
        spec, _ = (await wait_for_tools(llm, {"slow"}, proc=proc))["slow"]
        assert spec.timeout_ms == slow_tool.TIMEOUT_MS
        timeout = spec.timeout_ms / 1000  # what the LLM stage waits: the spec's own
        started = time.monotonic()
        pending = asyncio.create_task(llm.request(
            "tools.slow", request({"seconds": 3600}, call_id="doomed"), timeout=timeout))
        await lines.wait_for(f"{slow_tool.STARTED} doomed")
        proc.process.kill()  # SIGKILL: no goodbye, no reply
        await proc.process.wait()
        with pytest.raises(NatsTimeout):
            await pending
        assert time.monotonic() - started < timeout + 10  # ended by the timeout, not a hang
        # Once nats-server has seen the connection go, a new call fails at once.
        deadline = time.monotonic() + 30
        while True:
            try:
                await llm.request("tools.slow", request({"seconds": 0}), timeout=2)
            except NoRespondersError:
                break
            except NatsTimeout:
                assert time.monotonic() < deadline, "the dead tool still has responders"
            else:
                raise AssertionError("a killed tool answered")
    finally:
        await proc.stop()


async def test_sigterm_lets_calls_under_way_answer(tools_stack: Stack, llm: nats.NATS) -> None:
    """A planned stop loses no answer: the calls under way finish within the grace (and one
    that would not is told so), then the process drains and exits 0."""
    proc, lines = await start_process(tools_stack, "slowtool2",
                                      [sys.executable, str(HERE / "slow_tool.py")],
                                      VOICEBUS_SHUTDOWN_GRACE="5")
    try:
        await wait_for_tools(llm, {"slow"}, proc=proc)
        quick = asyncio.create_task(call(llm, "slow", {"seconds": 0.5}))
        await lines.wait_for(f"{slow_tool.STARTED} call_1")
        endless = asyncio.create_task(llm.request(
            "tools.slow", request({"seconds": 3600}, call_id="endless"), timeout=CALL_TIMEOUT))
        await lines.wait_for(f"{slow_tool.STARTED} endless")
        proc.process.terminate()
        assert await quick == ({"waited": 0.5}, "", "")
        reply = await endless  # cut at the end of the grace, and told so
        assert reply.headers is not None and reply.headers[tl.ERROR_CODE_HEADER] == "503"
        assert "stopped before it finished" in reply.headers[tl.ERROR_HEADER]
        assert await asyncio.wait_for(proc.process.wait(), 60) == 0
    finally:
        await proc.stop()


# ---- the MCP bridge -------------------------------------------------------------------------

def bridge_argv(group: str) -> list[str]:
    return [sys.executable, "-m", "services.tools.mcp", "--name", group, "--timeout-ms", "20000",
            "--stdio", sys.executable, str(HERE / "mcp_server.py")]


MCP_TOOLS = {"add", "text_shout", "refuse", "crash", "die"}


async def test_an_mcp_servers_tools_are_served_on_the_bus(tools_stack: Stack,
                                                          llm: nats.NATS) -> None:
    proc, _ = await start_process(tools_stack, "mcpa", bridge_argv("mcpa"))
    try:
        found = await wait_for_tools(llm, MCP_TOOLS, proc=proc)
        add, info = found["add"]
        assert info["name"] == "voicebus-tools-mcpa"
        assert add.description == "Add two whole numbers."
        assert add.parameters["required"] == ["a", "b"]
        assert add.parameters["properties"]["a"]["type"] == "integer"
        assert add.timeout_ms == 20000 and not add.cancellable

        assert await call(llm, "add", {"a": 2, "b": 40}) == ({"result": 42}, "", "")
        assert await call(llm, "text_shout", {"text": "hi"}) == ({"result": "HI"}, "", "")
        # The tool's refusal, in its own words; a crash, without its internals.
        _, code, error = await call(llm, "refuse", {"reason": "closed on Sundays"})
        assert code == "502" and error.endswith("refused: closed on Sundays")
        _, code, error = await call(llm, "crash")
        assert code == "502" and "crash" in error and "secret" not in error
        _, code, error = await call(llm, "add", {"a": "two"})  # the server's own validation
        assert code == "502" and "validation" in error
    finally:
        assert await proc.stop() == 0  # SIGTERM: a clean stop, its MCP server with it


async def test_a_dead_mcp_server_fails_the_call_and_the_bridge_exits(tools_stack: Stack,
                                                                     llm: nats.NATS) -> None:
    proc, _ = await start_process(tools_stack, "mcpb", bridge_argv("mcpb"))
    try:
        await wait_for_tools(llm, MCP_TOOLS, proc=proc)
        started = time.monotonic()
        result, code, error = await call(llm, "die")
        assert (result, code) == (None, "503") and "gone" in error
        assert time.monotonic() - started < 20  # at once, not the tool's timeout
        # …and the bridge exits non-zero, for its supervisor to start it (and the server) again.
        code = await asyncio.wait_for(proc.process.wait(), 60)
        assert code == 1
    finally:
        await proc.stop()


async def test_an_mcp_server_over_streamable_http(tools_stack: Stack, llm: nats.NATS) -> None:
    """The same bridge to a server at a URL; when that server goes away, the bridge notices
    (its ping fails) and exits non-zero."""
    port = free_port()
    server, _ = await start_process(tools_stack, "mcphttp",
                                    [sys.executable, str(HERE / "mcp_server.py"), "--http",
                                     str(port)])
    bridge: Proc | None = None
    try:
        await wait_tcp(port, server)
        bridge, _ = await start_process(tools_stack, "mcpc", [
            sys.executable, "-m", "services.tools.mcp", "--name", "mcpc", "--prefix", "web_",
            "--url", f"http://127.0.0.1:{port}/mcp"])
        await wait_for_tools(llm, {"web_add", "web_text_shout"}, proc=bridge)
        assert await call(llm, "web_add", {"a": 1, "b": 2}) == ({"result": 3}, "", "")
        await server.stop()
        assert await asyncio.wait_for(bridge.process.wait(), 60) == 1
    finally:
        if bridge is not None:
            await bridge.stop()
        await server.stop()


async def wait_tcp(port: int, proc: Proc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            assert proc.alive and time.monotonic() < deadline, f"nothing listens on {port}"
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return
