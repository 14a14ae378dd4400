from __future__ import annotations

from services.llm.config import LlmConfig
from services.llm.provider import ChatMessage
from services.llm.providers.echo import EchoLlm


async def _deltas(llm: EchoLlm, messages: list[ChatMessage]) -> list[str]:
    return [delta async for delta in llm.complete(messages)]


def _conversation(user: str) -> list[ChatMessage]:
    return [
        ChatMessage("system", "You are a helpful voice assistant."),
        ChatMessage("user", "earlier question"),
        ChatMessage("assistant", "Earlier question... got it."),
        ChatMessage("user", user),
    ]


async def test_repeats_the_last_user_message_with_the_default_ack() -> None:
    llm = EchoLlm.from_config(LlmConfig())
    assert "".join(await _deltas(llm, _conversation("what time is it"))) == (
        "What time is it... got it."
    )


async def test_deltas_are_words_that_join_to_the_reply_exactly() -> None:
    llm = EchoLlm.from_config(LlmConfig())
    deltas = await _deltas(llm, _conversation("  turn   the\tlights  on  "))
    assert deltas == ["Turn ", "the ", "lights ", "on... ", "got ", "it."]
    assert "".join(deltas) == llm.reply_to(_conversation("turn the lights on"))


async def test_ack_is_configurable() -> None:
    llm = EchoLlm.from_config(LlmConfig(echo_ack="understood, working on it."))
    reply = "".join(await _deltas(llm, _conversation("book a table?")))
    assert reply == "Book a table... understood, working on it."


async def test_blank_user_message_yields_nothing() -> None:
    llm = EchoLlm.from_config(LlmConfig())
    assert await _deltas(llm, _conversation("   \n ")) == []
    assert await _deltas(llm, [ChatMessage("system", "no user yet")]) == []
