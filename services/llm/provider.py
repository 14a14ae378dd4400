"""The LLM provider interface: a conversation in, text deltas out."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Literal, Protocol

import msgspec

Role = Literal["system", "user", "assistant"]


class ChatMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    role: Role
    content: str
    # Set on an assistant message the user did not hear in full (barge-in).
    interrupted: bool = False
    # The turn a message belongs to (0: the greeting): how a Playback report finds its reply.
    turn: int = 0


class LlmProvider(Protocol):
    name: str

    def complete(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str]:
        """Stream the reply to ``messages`` (system prompt first, user message last) as text
        deltas. Closing the iterator early must stop the provider's work. Raises only
        ``ProviderError``."""
        ...

    async def aclose(self) -> None: ...


PROVIDERS = {
    "echo": "services.llm.providers.echo:EchoLlm",
    "openai": "services.llm.providers.openai:OpenAILlm",
}
