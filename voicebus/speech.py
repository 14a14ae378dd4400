"""Offline speech tools for the CLI, benchmarks and tests, built on the stages' own providers:
Piper to say a sentence into a WAV, Whisper to hear one back."""

from __future__ import annotations

import re
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

from proto.events import FRAME_MS
from services.ingress.audio import FRAME_BYTES, Resampler, read_wav
from services.stt.config import SttConfig
from services.stt.provider import SttProvider
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


def phrases(audio: bytes, *, gap_ms: int = 300, loud: int = 500) -> list[bytes]:
    """Cut 16 kHz s16le audio into the phrases between pauses of at least ``gap_ms``, as the
    VAD cuts a user's speech into utterances; each phrase keeps a little of its quiet."""
    frames = np.frombuffer(audio[:len(audio) - len(audio) % FRAME_BYTES], np.int16)
    frames = frames.reshape(-1, FRAME_BYTES // 2)
    voiced = np.abs(frames.astype(np.int32)).max(axis=1) > loud
    gap = gap_ms // FRAME_MS
    out, start, quiet = [], None, 0
    for i, v in enumerate(voiced):
        if v:
            start = max(0, i - gap // 2) if start is None else start
            quiet = 0
        elif start is not None:
            quiet += 1
            if quiet >= gap:
                out.append(audio[start * FRAME_BYTES:(i - quiet + gap // 2 + 1) * FRAME_BYTES])
                start, quiet = None, 0
    if start is not None:
        out.append(audio[start * FRAME_BYTES:])
    return out


async def transcribe_wav(path: Path, stt: SttProvider | None = None) -> str:
    """What an offline STT (``stt``, by default Whisper tiny.en) hears in a WAV file (any rate,
    mono or stereo, 16-bit), phrase by phrase, as lowercase words without punctuation.

    Phrase by phrase: a recording of several replies decoded in one pass lets a misheard first
    phrase drag the next ones wrong, where the STT stage would have heard each on its own.
    Whisper, not pocketsphinx: a test that checks the agent's reply reached the room intact
    must not fail on the listener. Over 51 replies the suite recorded in five runs,
    pocketsphinx lost the sense of 16 (a correct "What time is it?" came out "what i'm as it",
    the greeting "oh aka opiate"), Whisper of none (it left out the digits of a clock time),
    in about the same time (14 s for all 51)."""
    pcm, rate, channels = read_wav(path)
    resampler = Resampler(rate, channels)
    audio = resampler.process(pcm) + resampler.flush()
    own = stt is None
    if stt is None:
        from services.stt.providers.whisper import WhisperCppStt  # an extra: stt-whisper
        stt = WhisperCppStt.from_config(SttConfig.from_env())

    async def frames(phrase: bytes) -> AsyncIterator[bytes]:
        for i in range(0, len(phrase) - FRAME_BYTES + 1, FRAME_BYTES):
            yield phrase[i:i + FRAME_BYTES]

    try:
        heard = []
        for phrase in phrases(audio):
            text = ""
            async for result in stt.stream(frames(phrase)):
                if result.final:
                    text = result.text
            heard.append(text)
        return " ".join(re.findall(r"[a-z0-9']+", " ".join(heard).lower()))
    finally:
        if own:
            await stt.aclose()
