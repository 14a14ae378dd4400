"""The offline default LLM: the "echo modifier" repeats what the user said plus a fixed ack.

It needs no network, no model and no key, so the whole pipeline can run and be measured on a
laptop; its reply is a pure function of the input, which keeps tests deterministic.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence

from proto.tools import ToolSpec
from services.llm.config import LlmConfig
from services.llm.provider import ChatMessage

# Each delta is a word with the whitespace after it, so "".join(deltas) is the reply exactly.
_WORD = re.compile(r"\S+\s*")
# Trailing punctuation from STT would collide with the "..." we append ("hi?..." reads badly).
_TRAILING_PUNCT = ".,;:!?"


class EchoLlm:
    name = "echo"

    def __init__(self, ack: str = "got it.") -> None:
        self.ack = " ".join(ack.split())

    @classmethod
    def from_config(cls, cfg: LlmConfig) -> EchoLlm:
        return cls(ack=cfg.echo_ack)

    def reply_to(self, messages: Sequence[ChatMessage]) -> str:
        """The full reply for ``messages``; empty when the last user message is blank."""
        heard = _last_user_text(messages)
        heard = " ".join(heard.split()).rstrip(_TRAILING_PUNCT).rstrip()
        if not heard:
            return ""
        heard = heard[0].upper() + heard[1:]
        return f"{heard}... {self.ack}" if self.ack else f"{heard}..."

    async def complete(self, messages: Sequence[ChatMessage],
                       tools: Sequence[ToolSpec] = ()) -> AsyncIterator[str]:  # never calls tools
        for delta in _WORD.findall(self.reply_to(messages)):
            yield delta
            # No artificial latency, but let a cancel or other sessions in between words.
            await asyncio.sleep(0)

    async def aclose(self) -> None:
        return None


def _last_user_text(messages: Sequence[ChatMessage]) -> str:
    for message in reversed(messages):
        if message.role == "user":
            return message.content
    return ""
