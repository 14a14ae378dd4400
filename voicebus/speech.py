"""Offline speech tools for the CLI, benchmarks and tests, built on the stages' own providers:
Piper to say a sentence into a WAV, pocketsphinx to hear one back."""

from __future__ import annotations

import wave
from collections.abc import AsyncIterator
from pathlib import Path

from services.ingress.audio import FRAME_BYTES, Resampler, read_wav
from services.stt.config import SttConfig
from services.stt.providers.pocketsphinx import PocketSphinxStt
from services.tts.config import TtsConfig
from services.tts.providers.piper import PiperTts


async def say_to_wav(text: str, path: Path, *, lead_ms: int = 300, tail_ms: int = 0,
                     tts: PiperTts | None = None) -> Path:
    """Write ``text`` spoken by Piper to ``path`` (mono s16le, the voice's rate), with silence
    of ``lead_ms`` before it and ``tail_ms`` after."""
    own = tts is None
    tts = tts or PiperTts.from_config(TtsConfig.from_env())
    try:
        async def one() -> AsyncIterator[str]:
            yield text

        pcm = b"".join([piece.pcm async for piece in tts.synthesize(one())])
        rate = tts.sample_rate
    finally:
        if own:
            await tts.aclose()
    lead, tail = bytes(rate * lead_ms // 1000 * 2), bytes(rate * tail_ms // 1000 * 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(lead + pcm + tail)
    return path


async def transcribe_wav(path: Path, stt: PocketSphinxStt | None = None) -> str:
    """What pocketsphinx hears in a WAV file (any rate, mono or stereo, 16-bit)."""
    pcm, rate, channels = read_wav(path)
    resampler = Resampler(rate, channels)
    audio = resampler.process(pcm) + resampler.flush()
    own = stt is None
    stt = stt or PocketSphinxStt.from_config(SttConfig.from_env())

    async def frames() -> AsyncIterator[bytes]:
        for i in range(0, len(audio) - FRAME_BYTES + 1, FRAME_BYTES):
            yield audio[i:i + FRAME_BYTES]

    try:
        text = ""
        async for result in stt.stream(frames()):
            if result.final:
                text = result.text
        return text
    finally:
        if own:
            await stt.aclose()
