"""The LLM provider interface: a conversation (and the tools it may call) in; text deltas and
tool calls out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Literal, Protocol

import msgspec

from proto.tools import ToolSpec

Role = Literal["system", "user", "assistant", "tool"]


class ToolCall(msgspec.Struct, frozen=True):
    """One call the model decided on: its id (the model's), the tool, and the arguments as the
    JSON text the model wrote (parsed, and refused when malformed, by the LLM stage)."""

    id: str
    name: str
    arguments: str = "{}"


class ChatMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    role: Role
    content: str
    # Set on an assistant message the user did not hear in full (barge-in).
    interrupted: bool = False
    # The turn a message belongs to (0: the greeting): how a Playback report finds its reply.
    turn: int = 0
    # An assistant message that called tools (its content: what was said before).
    tool_calls: tuple[ToolCall, ...] = ()
    # A tool's answer ("tool" role): which call it answers, and the tool's name.
    tool_call_id: str = ""
    name: str = ""
    # The end of a reply that called tools and said nothing after them (an empty assistant
    # message): the turn is settled, which a replica taking over must be able to tell.
    end: bool = False


class LlmProvider(Protocol):
    name: str

    def complete(self, messages: Sequence[ChatMessage],
                 tools: Sequence[ToolSpec] = ()) -> AsyncIterator[str | ToolCall]:
        """Stream the reply to ``messages`` (system prompt first; the last message is the
        user's, or a tool's answer) as text deltas, then the ``ToolCall``s the model decided
        on, if any, once they are complete (only tools in ``tools`` are offered). Closing the
        iterator early must stop the provider's work. Raises only ``ProviderError``."""
        ...

    async def aclose(self) -> None: ...


PROVIDERS = {
    "echo": "services.llm.providers.echo:EchoLlm",
    "openai": "services.llm.providers.openai:OpenAILlm",
    "anthropic": "services.llm.providers.anthropic:AnthropicLlm",
    "groq": "services.llm.providers.groq:GroqLlm",
    "gemini": "services.llm.providers.gemini:GeminiLlm",
    "demo": "services.llm.providers.demo:DemoLlm",
}
