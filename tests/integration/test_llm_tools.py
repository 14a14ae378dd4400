"""The LLM stage calls tools on the bus: a real LLM process (the OpenAI SDK against the local
fake, which streams tool calls as the API does), tools served on the bus by this test as the
role ``tool`` (services/tools/serve.py), verdicts and playback reports published as the judge
and egress would.

What must hold (docs/tools.md, "Interruptions"): the right requests reach the tools and their
results reach the model, whose answer is spoken; each call runs once; a call that has started
runs to its end through a barge-in and its result is kept for the next reply; a cancellable
one is abandoned; a reply cut before the model finished deciding calls nothing; a bad or dead
tool becomes words for the model, not a hang; a slow tool gets a filler; ``end_call`` is
asked for only by a reply that ran to its end."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from pathlib import Path

import msgspec
import pytest

from proto import events as ev
from proto import subjects as sj
from proto.tools import ToolRequest, ToolSpec
from services.llm.provider import ChatMessage
from services.llm.service import model_view
from services.tools.serve import Tool, ToolError, serve
from tests.fakes.openai_server import start_fake_openai
from tests.integration import slow_tool
from tests.integration.test_stage_processes import publish
from tests.integration.test_tools import start_process, wait_for_tools
from voicebus.client import dispatch

seq = itertools.count(1)
SLOW_TOOL = Path(slow_tool.__file__)
AGENTS = """
[agents.clerk]
instructions = "You are a test clerk."
tools = ["lookup", "slow", "stuck", "nap", "end_call"]
filler = "One moment."
filler_ms = 300

[agents.clerk.llm]
llm_provider = "openai"
"""


class Tools:
    """The tools this test serves: what each was asked, and gates a test opens."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ToolRequest]] = []
        self.slow_gate = asyncio.Event()
        self.arrived = asyncio.Event()
        self.cancelled = 0

    async def lookup(self, request: ToolRequest) -> dict:
        self.calls.append(("lookup", request))
        self.arrived.set()
        key = request.arguments.get("key")
        if key == "missing":
            raise ToolError("no such key", 404)
        return {"value": f"{key}-value"}

    async def slow(self, request: ToolRequest) -> dict:
        """Runs until the test opens the gate (not cancellable: it has a side effect)."""
        self.calls.append(("slow", request))
        self.arrived.set()
        await self.slow_gate.wait()
        return {"booked": request.arguments.get("what", "")}

    async def stuck(self, request: ToolRequest) -> dict:
        """Cancellable, and never answers by itself."""
        self.calls.append(("stuck", request))
        self.arrived.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return {}


@pytest.fixture
async def clerk(bare_stack, tmp_path: Path):
    stack, nc, tap = bare_stack
    fake = await start_fake_openai(api_key="test-key")
    agents_file = tmp_path / "agents.toml"
    agents_file.write_text(AGENTS)
    tools = Tools()
    tool_nc = await stack.connect(role="tool")
    server = await serve(tool_nc, "test", [
        Tool(ToolSpec(name="lookup", description="Look a key up.", parameters={
            "type": "object", "properties": {"key": {"type": "string"}}}), tools.lookup),
        Tool(ToolSpec(name="slow", description="Book something.", timeout_ms=20_000),
             tools.slow),
        Tool(ToolSpec(name="stuck", description="Never ends.", timeout_ms=20_000,
                      cancellable=True), tools.stuck),
    ])
    # The stage's own provider stays echo: only the clerk's sessions use the model.
    await stack.start_stage("llm", VOICEBUS_AGENTS=str(agents_file),
                            OPENAI_API_KEY="test-key", OPENAI_BASE_URL=fake.base_url,
                            VOICEBUS_LLM_TIMEOUT="10")
    await stack.wait_ready(("llm",))
    try:
        yield stack, nc, tap, fake, tools
    finally:
        await server.stop(1.0)
        await tool_nc.close()
        await fake.close()


async def start(nc, tap, session: str) -> None:
    await tap.watch(sj.session_all(session))
    await dispatch(nc, tap, session, stages=("llm",), agent="clerk")


def event(cls: type[ev.Event], session: str, **fields) -> ev.Event:
    return cls(session=session, seq=next(seq), ts_ns=time.time_ns(), **fields)


async def ask(nc, session: str, turn: int, text: str) -> None:
    await publish(nc, sj.FLOOR_VERDICT, event(ev.Verdict, session, turn=turn, action="answer",
                                              text=text))


async def done(tap, session: str, turn: int) -> ev.ReplyDone:
    found = await tap.wait_for(lambda: tap.of(ev.ReplyDone, session, turn=turn), 20,
                               f"the reply to turn {turn}")
    return found[0]


async def history(nc, session: str) -> list[ChatMessage]:
    entry = await (await nc.jetstream().key_value("voicebus_history")).get(session)
    return msgspec.msgpack.decode(entry.value, type=list[ChatMessage])


async def test_a_tool_answers_and_the_reply_speaks_its_result(clerk) -> None:
    stack, nc, tap, fake, tools = clerk
    await start(nc, tap, "tools-basic")
    fake.tool_calls = [{"name": "lookup", "arguments": '{"key": "alpha"}'}]
    await ask(nc, "tools-basic", 1, "what is alpha")
    reply = await done(tap, "tools-basic", 1)

    assert [(name, r.arguments, r.session, r.turn) for name, r in tools.calls] == [
        ("lookup", {"key": "alpha"}, "tools-basic", 1)]
    assert reply.text == 'The tools said: {"value":"alpha-value"}.' and not reply.interrupted
    first, second = fake.requests
    assert first["messages"][0] == {"role": "system", "content": "You are a test clerk."}
    assert {t["function"]["name"] for t in first["tools"]} == {"lookup", "slow", "stuck",
                                                               "end_call"}  # no nap running
    call_id = second["messages"][-2]["tool_calls"][0]["id"]
    assert second["messages"][-1] == {"role": "tool", "tool_call_id": call_id,
                                      "content": '{"value":"alpha-value"}'}
    assert tools.calls[0][1].call_id == call_id
    uses = tap.of(ev.ToolUse, "tools-basic", topic=sj.LLM_TOOL)
    assert [(u.name, u.done, u.error) for u in uses] == [("lookup", False, ""),
                                                        ("lookup", True, "")]
    assert [m.role for m in await history(nc, "tools-basic")] == ["user", "assistant", "tool",
                                                                   "assistant"]


async def test_parallel_calls_run_together_and_errors_reach_the_model(clerk) -> None:
    """Two calls in one decision run at once (the slow one is still running when the other
    answers); a tool's own error, malformed arguments and an unknown tool each become words
    for the model, and the reply still comes."""
    stack, nc, tap, fake, tools = clerk
    await start(nc, tap, "tools-many")
    fake.tool_calls = [{"name": "slow", "arguments": '{"what": "a table"}'},
                       {"name": "lookup", "arguments": '{"key": "missing"}'},
                       {"name": "lookup", "arguments": '{"key": '}]
    await ask(nc, "tools-many", 1, "book a table and look up missing")
    # The lookup answered (and failed) while the slow call still runs: they run in parallel.
    await tap.wait_for(lambda: [u for u in tap.of(ev.ToolUse, "tools-many")
                                if u.done and u.name == "lookup"][1:], 20, "both lookups")
    assert not tools.slow_gate.is_set()
    tools.slow_gate.set()
    reply = await done(tap, "tools-many", 1)
    answers = [m for m in fake.requests[-1]["messages"] if m["role"] == "tool"]
    assert json.loads(answers[0]["content"]) == {"booked": "a table"}
    assert "no such key" in json.loads(answers[1]["content"])["error"]
    assert "not valid JSON" in json.loads(answers[2]["content"])["error"]
    assert [name for name, _ in tools.calls].count("lookup") == 1  # the malformed one never ran
    assert "no such key" in reply.text


async def test_a_barge_in_during_a_call_neither_repeats_nor_loses_it(clerk) -> None:
    stack, nc, tap, fake, tools = clerk
    session = "tools-cut"
    await start(nc, tap, session)
    fake.tool_calls = [{"name": "slow", "arguments": '{"what": "a taxi"}'}]
    await ask(nc, session, 1, "book me a taxi")
    await asyncio.wait_for(tools.arrived.wait(), 20)
    # The filler comes while the call runs and nothing was said yet.
    (filler,) = await tap.wait_for(lambda: tap.of(ev.ReplyDelta, session, turn=1), 20,
                                   "the filler")
    assert filler.text.strip() == "One moment."
    # The user talks over it: the judge cuts turn 1 and gives the floor to turn 2.
    await publish(nc, sj.FLOOR_CANCEL, event(ev.Cancel, session, turn=1, reason="barge-in"))
    cut = await done(tap, session, 1)
    assert cut.interrupted and not cut.end_call
    fake.tool_calls = []
    await ask(nc, session, 2, "are you there")
    tools.slow_gate.set()  # the call started before the cut runs to its end
    reply = await done(tap, session, 2)

    assert [name for name, _ in tools.calls] == ["slow"]  # once, never again
    # The next reply saw the decision, its result right after it (as the API wants), and the
    # filler said meanwhile.
    messages = fake.requests[-1]["messages"]
    roles = [m["role"] for m in messages]
    assert roles[-4:] == ["assistant", "tool", "assistant", "user"], roles
    assert json.loads(messages[-3]["content"]) == {"booked": "a taxi"}
    assert messages[-2]["content"].strip() == "One moment."
    assert reply.text == "You said: are you there." and not reply.interrupted
    # Kept in the order things happened (the result came after the cut), read in the model's.
    kept = model_view(await history(nc, session))
    assert [(m.role, m.turn) for m in kept] == [("user", 1), ("assistant", 1), ("tool", 1),
                                                ("assistant", 1), ("user", 2), ("assistant", 2)]
    assert kept[3].interrupted


async def test_a_cancellable_call_is_abandoned_on_a_barge_in(clerk) -> None:
    stack, nc, tap, fake, tools = clerk
    session = "tools-abandon"
    await start(nc, tap, session)
    fake.tool_calls = [{"name": "stuck", "arguments": "{}"}]
    await ask(nc, session, 1, "do the stuck thing")
    await asyncio.wait_for(tools.arrived.wait(), 20)
    await publish(nc, sj.FLOOR_CANCEL, event(ev.Cancel, session, turn=1, reason="barge-in"))
    assert (await done(tap, session, 1)).interrupted
    (use,) = await tap.wait_for(lambda: [u for u in tap.of(ev.ToolUse, session) if u.done],
                                20, "the call's end")
    assert use.name == "stuck" and "cancelled" in use.error
    kept = await history(nc, session)
    # The decision, its answer, and the reply's end (it said nothing after the call).
    assert [(m.role, m.end) for m in kept] == [("user", False), ("assistant", False),
                                               ("assistant", True), ("tool", False)]
    assert [m.role for m in model_view(kept)] == ["user", "assistant", "tool"]


async def test_a_reply_cut_before_the_model_decided_calls_nothing(clerk) -> None:
    """The model says goodbye and is about to call end_call when the user barges in: the
    stream is cut before the call arrives, so nothing runs and the call does not end."""
    stack, nc, tap, fake, tools = clerk
    session = "tools-undecided"
    await start(nc, tap, session)
    fake.reply = "Goodbye then."
    fake.tool_calls = [{"name": "end_call", "arguments": "{}"}]
    fake.hold_after(2)  # two words out, then the stream stalls before the call
    await ask(nc, session, 1, "bye")
    await tap.wait_for(lambda: len(tap.of(ev.ReplyDelta, session, turn=1)) == 2, 20,
                       "the words before the stall")
    await publish(nc, sj.FLOOR_CANCEL, event(ev.Cancel, session, turn=1, reason="barge-in"))
    cut = await done(tap, session, 1)
    assert cut.interrupted and not cut.end_call
    assert tap.of(ev.ToolUse, session) == []


async def test_end_call_is_asked_for_by_a_reply_that_ran_to_its_end(clerk) -> None:
    stack, nc, tap, fake, tools = clerk
    session = "tools-bye"
    await start(nc, tap, session)
    fake.reply = "Goodbye then."
    fake.tool_calls = [{"name": "end_call", "arguments": "{}"}]
    await ask(nc, session, 1, "bye")
    reply = await done(tap, session, 1)
    assert reply.end_call and not reply.interrupted
    assert reply.text.startswith("Goodbye then.")
    assert tools.calls == []  # a built-in: no service was asked


async def test_a_tool_process_killed_mid_call_is_an_error_for_the_model_not_a_hang(clerk) -> None:
    """A tool service of its own process (tests/integration/slow_tool.py, as "nap") dies
    mid-call: the reply comes once the tool's timeout has passed, and says what went wrong."""
    stack, nc, tap, fake, tools = clerk
    session = "tools-killed"
    proc, lines = await start_process(stack, "naptool", [sys.executable, str(SLOW_TOOL)],
                                      SLOW_TOOL_NAME="nap")
    try:
        await wait_for_tools(nc, {"nap"}, proc=proc)  # up and announced
        await start(nc, tap, session)
        fake.tool_calls = [{"name": "nap", "arguments": '{"seconds": 3600}'}]
        began = time.monotonic()
        await ask(nc, session, 1, "take a nap")  # the stage finds nap, not yet in its cache
        await lines.wait_for(slow_tool.STARTED)
        proc.process.kill()
        await proc.process.wait()
        reply = await done(tap, session, 1)
    finally:
        await proc.stop()
    assert "did not answer within 8 s" in reply.text and not reply.interrupted
    assert time.monotonic() - began < slow_tool.TIMEOUT_MS / 1000 + 15
    (use,) = [u for u in tap.of(ev.ToolUse, session) if u.done]
    assert use.name == "nap" and "did not answer" in use.error
