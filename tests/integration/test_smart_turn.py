"""Smart Turn v3.2 (``voicebus bench turns --smart-turn``) as the bench runs it: its weights taken
out of the ``pipecat-ai`` wheel from the package index, our features into the real model, on
Piper's speech (the features themselves are pinned to Whisper's by ``test_smart_turn.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.ingress.audio import Resampler, read_wav
from services.tts.config import TtsConfig
from services.tts.providers.piper import PiperTts
from voicebus.bench import smart_turn as st
from voicebus.speech import say_to_wav

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def spoken(text: str, folder: Path) -> bytes:
    """``text`` said by Piper (deterministic) at 16 kHz, with 100 ms of quiet after it."""
    tts = PiperTts.from_config(TtsConfig.from_env({"VOICEBUS_PIPER_DETERMINISTIC": "true"}))
    try:
        path = await say_to_wav(text, folder / "said.wav", lead_ms=200, tail_ms=100, tts=tts)
    finally:
        await tts.aclose()
    pcm, rate, channels = read_wav(path)
    resampler = Resampler(rate, channels)
    return resampler.process(pcm) + resampler.flush()


# The bench's own cache (VOICEBUS_WHISPER_CACHE's default): downloaded once per machine.
CACHE = Path.home() / ".cache" / "voicebus"


async def test_the_model_hears_a_finished_question_and_a_hesitation(tmp_path: Path) -> None:
    model = st.SmartTurn(st.fetch(CACHE))
    finished = model.complete(await spoken("What time is it?", tmp_path))
    hesitating = model.complete(await spoken("and um", tmp_path))
    assert finished > 0.9, finished
    assert hesitating < 0.5, hesitating
    # Fetched once: a second fetch reads the cache (a download would need the index).
    assert st.fetch(CACHE, download=lambda folder: pytest.fail("downloaded")) \
        == st.model_path(CACHE)
