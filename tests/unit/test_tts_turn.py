"""A TTS turn's text queue never swallows the cancel of a barge-in (Python 3.11's
``asyncio.wait_for`` did, when the cancel landed as the queue handed over a chunk: the whole
reply was then synthesized)."""

from __future__ import annotations

import asyncio

import pytest

from services.tts.chunker import Chunk
from services.tts.service import TurnSpeech


@pytest.mark.parametrize("gap", [0, 1, 2])
async def test_a_cancel_as_a_chunk_arrives_stops_the_turn(gap: int) -> None:
    speech = TurnSpeech(1, max_chars=160)
    taken: list[str] = []

    async def speak() -> None:
        async for text in speech.chunks(timeout=5):
            taken.append(text)
            await asyncio.sleep(0.01)  # synthesis: where a cancel must stop the turn

    task = asyncio.create_task(speak())
    await asyncio.sleep(0)  # waiting for text
    speech.add([Chunk("One sentence.", 0, 13)], llm_ms=0.0)
    for _ in range(gap):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_reply_that_goes_quiet_closes_its_turn() -> None:
    speech = TurnSpeech(1, max_chars=160)
    assert [text async for text in speech.chunks(timeout=0.05)] == []
