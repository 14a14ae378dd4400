"""The LLM stage's tool bookkeeping without a bus: the model's view of a history with tool
calls, cutting a reply that spans a call, and the offline demo agent's rules."""

from __future__ import annotations

import json

from proto.tools import ToolSpec
from services.llm.provider import ChatMessage, ToolCall
from services.llm.providers.demo import GOODBYE, HELP, DemoLlm
from services.llm.service import _cut_history, model_view
from services.llm.tools import ToolBox

CALL = ToolCall(id="c1", name="get_time")
OFFERED = [ToolSpec(name=n) for n in ("get_time", "get_balance", "end_call")]


def test_the_model_sees_each_answer_right_after_its_decision() -> None:
    history = [
        ChatMessage("user", "what time is it", turn=1),
        ChatMessage("assistant", "", turn=1, tool_calls=(CALL, ToolCall(id="c2", name="x"))),
        ChatMessage("assistant", "One moment.", turn=1, interrupted=True),
        ChatMessage("user", "hello?", turn=2),
        ChatMessage("tool", '"12:00"', turn=1, tool_call_id="c1", name="get_time"),
        ChatMessage("tool", '"orphan"', turn=0, tool_call_id="c0", name="old"),
    ]
    view = model_view(history)
    assert [(m.role, m.tool_call_id) for m in view] == [
        ("user", ""), ("assistant", ""), ("tool", "c1"), ("tool", "c2"), ("assistant", ""),
        ("user", "")]
    assert json.loads(view[3].content) == {"error": "the result was lost"}  # c2 never answered


def test_a_cut_spans_the_pieces_of_a_reply_around_a_call() -> None:
    history = [
        ChatMessage("user", "book it", turn=3),
        ChatMessage("assistant", "Let me book that. ", turn=3, tool_calls=(CALL,)),
        ChatMessage("tool", '"ok"', turn=3, tool_call_id="c1", name="get_time"),
        ChatMessage("assistant", "It is booked for noon.", turn=3),
    ]
    cut = list(history)
    _cut_history(cut, 3, len("Let me book that. It is"))
    assert [m.content for m in cut if m.role == "assistant"] == ["Let me book that. ", "It is"]
    assert all(m.interrupted for m in cut if m.role == "assistant" and m.content == "It is")
    early = list(history)
    _cut_history(early, 3, 3)
    # The decision stays (its answer refers to it), emptied of what was not heard; the rest goes.
    assert [(m.role, m.content) for m in early] == [
        ("user", "book it"), ("assistant", "Let"), ("tool", '"ok"')]


async def _run(llm: DemoLlm, messages: list[ChatMessage], tools=OFFERED) -> list[object]:
    return [item async for item in llm.complete(messages, tools)]


async def test_the_demo_agent_calls_the_tool_the_words_ask_for() -> None:
    llm = DemoLlm()
    (call,) = await _run(llm, [ChatMessage("user", "What time is it?")])
    assert isinstance(call, ToolCall) and call.name == "get_time"
    (call,) = await _run(llm, [ChatMessage("user", "balance of my savings account")])
    assert (call.name, json.loads(call.arguments)) == ("get_balance", {"account": "savings"})
    said = await _run(llm, [ChatMessage("user", "goodbye")])
    assert "".join(x for x in said if isinstance(x, str)) == GOODBYE
    assert isinstance(said[-1], ToolCall) and said[-1].name == "end_call"
    # Not offered, not called: the words get the help sentence instead.
    said = await _run(llm, [ChatMessage("user", "what time is it")], tools=[])
    assert "".join(said) == HELP


async def test_the_demo_agent_speaks_the_results() -> None:
    llm = DemoLlm()
    messages = [
        ChatMessage("user", "time and balance"),
        ChatMessage("assistant", "", tool_calls=(CALL,)),
        ChatMessage("tool", json.dumps({"say": "It is noon."}), tool_call_id="c1",
                    name="get_time"),
        ChatMessage("tool", json.dumps({"error": "no account 'x'"}), tool_call_id="c2",
                    name="get_balance"),
    ]
    said = "".join(await _run(llm, messages))
    assert said == "It is noon. Sorry, get balance did not work: no account 'x'."


async def test_the_phone_built_ins_are_offered_on_a_gateway_call_only() -> None:
    box = ToolBox(nc=None)  # built-ins only: no discovery on the bus
    allowed = ["end_call", "send_dtmf", "transfer"]
    assert [s.name for s in await box.offered(allowed)] == ["end_call"]
    assert [s.name for s in await box.offered(allowed, phone=True)] == allowed
    assert [s.name for s in await box.offered(["transfer"], phone=True)] == ["transfer"]


def test_a_reply_with_tools_is_settled_only_once_it_ended() -> None:
    """A replica taking over must tell a turn whose decision is stored but whose calls were
    still running (it closes that turn) from a turn that ended (it leaves that alone)."""
    from services.llm.service import _settled
    decided = [ChatMessage("user", "book it", turn=2),
               ChatMessage("assistant", "", turn=2, tool_calls=(CALL,))]
    assert not _settled(decided, 2)
    assert _settled([*decided, ChatMessage("assistant", "", turn=2, end=True)], 2)
    assert _settled([*decided, ChatMessage("assistant", "Booked.", turn=2)], 2)
    assert _settled([ChatMessage("assistant", "Hi.", turn=0)], 0) and not _settled([], 0)
    # The end marker survives a cut, and the model never sees it.
    ended = [*decided, ChatMessage("assistant", "", turn=2, end=True)]
    _cut_history(ended, 2, 0)
    assert ended[-1].end and [m.role for m in model_view(ended)] == ["user", "assistant",
                                                                     "tool"]
