"""The offline ``demo`` agent's "LLM": a few rules that call the demo tools, so that tools work
end to end with no model and no key (the ``demo`` profile, docs/tools.md).

It asks for ``get_time`` when the user mentions the time, ``get_balance`` for a balance (of the
account the user names: checking unless they say savings), and ``end_call`` when they say
goodbye; after the tools have answered it speaks their results. Anything else gets a short
help sentence. Like the echo provider, its replies are a pure function of the conversation.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

from proto.tools import ToolSpec
from services.llm.config import LlmConfig
from services.llm.provider import ChatMessage, ToolCall

_WORD = re.compile(r"\S+\s*")
_WORDS = re.compile(r"[a-z']+")
HELP = "I can tell you the time, or the balance of your checking or savings account."
GOODBYE = "Goodbye, and thank you for calling!"


class DemoLlm:
    name = "demo"

    def __init__(self) -> None:
        self._ids = itertools.count(1)

    @classmethod
    def from_config(cls, cfg: LlmConfig) -> DemoLlm:
        return cls()

    async def complete(self, messages: Sequence[ChatMessage],
                       tools: Sequence[ToolSpec] = ()) -> AsyncIterator[str | ToolCall]:
        offered = {tool.name for tool in tools}
        last = messages[-1] if messages else ChatMessage("user", "")
        if last.role == "tool":
            text, calls = _speak_results(messages), []
        else:
            text, calls = self._decide(last.content, offered)
        for delta in _WORD.findall(text):
            yield delta
            await asyncio.sleep(0)  # let a cancel in between words
        for call in calls:
            yield call

    def _decide(self, heard: str, offered: set[str]) -> tuple[str, list[ToolCall]]:
        words = set(_WORDS.findall(heard.lower()))
        if not words:
            return "", []
        calls: list[tuple[str, dict[str, Any]]] = []
        if "time" in words and "get_time" in offered:
            calls.append(("get_time", {}))
        if words & {"balance", "account"} and "get_balance" in offered:
            calls.append(("get_balance",
                          {"account": "savings" if "savings" in words else "checking"}))
        if calls:
            return "", [self._call(name, args) for name, args in calls]
        if words & {"bye", "goodbye"} and "end_call" in offered:
            return GOODBYE, [self._call("end_call", {})]
        return HELP, []

    def _call(self, name: str, arguments: dict[str, Any]) -> ToolCall:
        return ToolCall(id=f"demo_{next(self._ids)}", name=name,
                        arguments=json.dumps(arguments))

    async def aclose(self) -> None:
        return None


def _speak_results(messages: Sequence[ChatMessage]) -> str:
    """One sentence per answer of the last round of calls."""
    answers: list[ChatMessage] = []
    for message in reversed(messages):
        if message.role != "tool":
            break
        answers.insert(0, message)
    return " ".join(filter(None, (_sentence(answer) for answer in answers)))


def _sentence(answer: ChatMessage) -> str:
    if answer.name == "end_call":
        return ""  # the goodbye came before the call
    try:
        result = json.loads(answer.content)
    except ValueError:
        result = answer.content
    if isinstance(result, dict) and "error" in result:
        return f"Sorry, {answer.name.replace('_', ' ')} did not work: {result['error']}."
    if isinstance(result, dict) and isinstance(result.get("say"), str):
        return result["say"]
    if isinstance(result, dict):
        facts = ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in result.items())
        return f"{facts[:1].upper()}{facts[1:]}."
    return f"{result}."
