"""The offline providers with their real models: Piper speaks, PocketSphinx listens."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import soxr

from services.runtime.errors import ConfigError, ProviderError
from services.stt.config import SttConfig
from services.stt.provider import SAMPLE_RATE, SttResult
from services.stt.providers.pocketsphinx import PocketSphinxStt
from services.tts.config import TtsConfig
from services.tts.provider import SpokenAudio
from services.tts.providers.piper import PiperTts

pytestmark = pytest.mark.asyncio(loop_scope="module")

FRAME_BYTES = SAMPLE_RATE * 2 // 50  # 20 ms


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tts() -> AsyncIterator[PiperTts]:
    provider = PiperTts.from_config(TtsConfig(piper_deterministic=True))
    yield provider
    await provider.aclose()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stt() -> AsyncIterator[PocketSphinxStt]:
    provider = PocketSphinxStt.from_config(SttConfig())
    yield provider
    await provider.aclose()


async def texts_in(items: Iterable[str], pulled: list[int] | None = None) -> AsyncIterator[str]:
    for i, text in enumerate(items):
        if pulled is not None:
            pulled.append(i)
        yield text


async def speak(tts: PiperTts, *chunks: str) -> list[SpokenAudio]:
    return [piece async for piece in tts.synthesize(texts_in(chunks))]


async def speech_16k(tts: PiperTts, text: str) -> bytes:
    pcm = b"".join(piece.pcm for piece in await speak(tts, text))
    resampled = soxr.resample(np.frombuffer(pcm, np.int16), tts.sample_rate, SAMPLE_RATE)
    return resampled.astype(np.int16).tobytes()


async def frames_of(pcm: bytes, log: list[str] | None = None, name: str = "") -> AsyncIterator[bytes]:
    """20 ms frames, all available at once, as after a burst from the bus."""
    pcm += bytes(-len(pcm) % FRAME_BYTES)
    for i in range(0, len(pcm), FRAME_BYTES):
        if log is not None:
            log.append(name)
        yield pcm[i:i + FRAME_BYTES]


async def transcribe(stt: PocketSphinxStt, frames: AsyncIterator[bytes]) -> list[SttResult]:
    return [result async for result in stt.stream(frames)]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def what_time(tts: PiperTts) -> bytes:
    return await speech_16k(tts, "What time is it?")


async def test_piper_speaks_at_its_native_rate(tts: PiperTts) -> None:
    pieces = await speak(tts, "What time is it?")
    assert tts.sample_rate == 22050
    assert pieces and {p.chunk for p in pieces} == {0}
    samples = np.frombuffer(b"".join(p.pcm for p in pieces), np.int16)
    assert 0.5 <= len(samples) / tts.sample_rate <= 3.0
    assert np.sqrt(np.mean(samples.astype(np.float64) ** 2)) > 500  # speech, not silence


async def test_piper_skips_unspeakable_chunks_but_keeps_their_index(tts: PiperTts) -> None:
    pieces = await speak(tts, "Hello.", " ... ", "Goodbye.")
    assert sorted({p.chunk for p in pieces}) == [0, 2]


async def test_round_trip_gives_partials_then_one_final(stt: PocketSphinxStt, what_time: bytes) -> None:
    results = await transcribe(stt, frames_of(what_time))
    finals = [r for r in results if r.final]
    assert len(finals) == 1 and results[-1] is finals[0]
    assert "time" in finals[0].text.split()
    assert 0.0 < finals[0].confidence <= 1.0
    partials = results[:-1]
    assert partials and all(r.text for r in partials)
    # A partial is sent only when the words changed.
    assert all(a.text != b.text for a, b in zip(partials, partials[1:], strict=False))


async def test_concurrent_utterances_on_one_provider(stt: PocketSphinxStt, tts: PiperTts,
                                                     what_time: bytes) -> None:
    morning = await speech_16k(tts, "Good morning.")
    pulls: list[str] = []
    first, second = await asyncio.gather(
        transcribe(stt, frames_of(what_time, pulls, "a")),
        transcribe(stt, frames_of(morning, pulls, "b")),
    )
    assert first[-1].final and first[-1].text == "what time is it"
    assert second[-1].final and second[-1].text == "good morning"
    # The two streams really overlapped: b was fed before a was done.
    assert pulls.index("b") < len(pulls) - 1 - pulls[::-1].index("a")
    assert stt.decoders >= 2


async def test_words_do_not_depend_on_what_the_decoder_heard_before(tts: PiperTts,
                                                                   what_time: bytes) -> None:
    # One decoder for everything, so each utterance reuses the one before's decoder.
    stt = PocketSphinxStt(warm_decoders=1)
    morning = await speech_16k(tts, "Good morning.")
    try:
        fresh = await transcribe(stt, frames_of(morning))
        for _ in range(3):
            await transcribe(stt, frames_of(what_time))
        reused = await transcribe(stt, frames_of(morning))
    finally:
        await stt.aclose()
    assert stt.decoders == 1
    assert fresh[-1].text == "good morning"
    # Same partials and final, and the confidence within rounding (it differs by ~1e-4 of
    # itself): no noise estimate or cepstral mean carried over.
    assert [r.text for r in reused] == [r.text for r in fresh]
    assert reused[-1].confidence == pytest.approx(fresh[-1].confidence, rel=1e-3)


async def test_decoding_hands_the_loop_back(stt: PocketSphinxStt, what_time: bytes) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    start = ticks
    try:
        results = await transcribe(stt, frames_of(what_time))  # frames never wait
    finally:
        task.cancel()
    assert results[-1].text == "what time is it"
    # ~1 s of audio is well over 50 ms of decoding, handed back every 10 ms.
    assert ticks - start >= 4


async def test_silence_gives_an_empty_final(stt: PocketSphinxStt) -> None:
    results = await transcribe(stt, frames_of(bytes(SAMPLE_RATE * 2)))
    assert results == [SttResult("", final=True, confidence=0.0)]


async def test_early_close_returns_the_decoder(what_time: bytes) -> None:
    stt = PocketSphinxStt(warm_decoders=1)
    async with aclosing(stt.stream(frames_of(what_time))) as results:
        first = await anext(results)
    assert not first.final
    again = await transcribe(stt, frames_of(what_time))
    assert again[-1].text == "what time is it"
    assert stt.decoders == 1  # the closed utterance gave its decoder back


async def test_decoder_errors_are_provider_errors(stt: PocketSphinxStt) -> None:
    async def bad_frames() -> AsyncIterator[bytes]:
        yield "not audio"  # type: ignore[misc]

    with pytest.raises(ProviderError) as caught:
        await transcribe(stt, bad_frames())
    assert caught.value.provider == "pocketsphinx" and not caught.value.retryable
    silent = await transcribe(stt, frames_of(bytes(FRAME_BYTES * 10)))
    assert silent[-1].final  # the provider still works


async def test_early_close_stops_synthesis(tts: PiperTts) -> None:
    sentences = ["The first sentence is here.", "The second one follows it.", "A third one ends it."]
    pulled: list[int] = []
    async with aclosing(tts.synthesize(texts_in(sentences, pulled))) as audio:
        first = await anext(audio)
    assert first.chunk == 0 and first.pcm
    assert pulled == [0]  # the second chunk was never even asked for
    assert [p.chunk for p in await speak(tts, "Still here.")] == [0]


async def cpu_idle_after(script: str) -> float:
    """The CPU seconds a fresh interpreter spends in the 200 ms after ``script`` (its last act
    the work of a model) has returned: what the model's threads burn once their work is done."""
    idle = ("\nimport time as _time\n_before = _time.process_time()\n_time.sleep(0.2)\n"
            "print(_time.process_time() - _before)\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script + idle, cwd=Path(__file__).parents[2],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    return float(out.decode().split()[-1])


async def test_piper_burns_no_cpu_once_a_sentence_is_made() -> None:
    """onnxruntime's threads spin for ~45 ms after each run unless told to stop: CPU that
    the other sessions and stages on the machine want."""
    burnt = await cpu_idle_after(
        "import asyncio\n"
        "from services.tts.config import TtsConfig\n"
        "from services.tts.providers.piper import PiperTts\n"
        "tts = PiperTts.from_config(TtsConfig(piper_deterministic=True))\n"
        "async def chunks():\n"
        "    yield 'Where is the nearest train station?'\n"
        "async def main():\n"
        "    async for _ in tts.synthesize(chunks()):\n"
        "        pass\n"
        "asyncio.run(main())\n")  # the session lives on, as in the TTS stage
    assert burnt < 0.010, f"{burnt * 1000:.1f} ms of CPU after the synthesis"


async def test_unknown_voice_fails_at_startup() -> None:
    with pytest.raises(ConfigError):
        PiperTts.from_config(TtsConfig(piper_voice="/nonexistent/voice.onnx"))


async def test_only_the_bundled_language() -> None:
    with pytest.raises(ConfigError):
        PocketSphinxStt.from_config(SttConfig(stt_language="de-de"))
