"""The capacity-planning providers (bench pipeline --providers instant): the same words at
once, and a tone as long as the reply's words."""

from __future__ import annotations

from collections.abc import AsyncIterator

from services.stt.config import SttConfig
from services.stt.providers.instant import BYTES_PER_MS, InstantStt
from services.tts.config import TtsConfig
from services.tts.providers.instant import InstantTts


async def _frames(count: int, ms: int = 20) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield bytes(ms * BYTES_PER_MS)


async def _texts(*chunks: str) -> AsyncIterator[str]:
    for chunk in chunks:
        yield chunk


async def test_instant_stt_grows_a_partial_every_interval_then_hears_its_words() -> None:
    stt = InstantStt.from_config(SttConfig(stt_instant_text="Where is my train?",
                                           stt_partial_interval_ms=200))
    results = [r async for r in stt.stream(_frames(50))]  # 1 s of audio
    partials = [r.text for r in results if not r.final]
    assert partials == ["Where", "Where is", "Where is my", "Where is my train?",
                        "Where is my train?"]
    assert results[-1].final and results[-1].text == "Where is my train?"
    assert [r.text async for r in stt.stream(_frames(0))] == ["Where is my train?"]


async def test_instant_tts_speaks_each_chunk_for_its_words_and_skips_the_unspeakable() -> None:
    tts = InstantTts.from_config(TtsConfig(tts_instant_ms_per_word=100))
    spoken = [a async for a in tts.synthesize(_texts("Hello there.", "...", "Bye"))]
    assert [a.chunk for a in spoken] == [0, 2]
    assert [len(a.pcm) // 2 * 1000 // tts.sample_rate for a in spoken] == [200, 100]
    assert any(spoken[0].pcm)  # a tone, not silence
