"""``voicebus bench stt``: how well an STT provider hears voices the project never used, and how
soon its final comes after the end of speech.

The voices are synthetic ones from Debian (espeak-ng variants at several speeds, flite's
voices); Piper's joe, which the tests speak with, is kept out. Each phrase is spoken by each
voice, resampled to 16 kHz, and streamed into the provider as the STT stage does: 20 ms frames
at the microphone's pace (``--pace 1``; ``0`` for as fast as it takes them), then the quiet the
VAD waits before its end edge (``VOICEBUS_VAD_SILENCE_MS``), where the frames end. Reported per provider:

- ``keywords_kept``: the share of each phrase's key words in its final (numbers as words);
- ``wer``: word error rate of the finals against the phrases;
- ``final_after_edge_ms``: from the last frame (the VAD's end edge) to the final, p50 / p95;
- ``cpu_s_per_audio_s``: the process's CPU time per second of audio streamed;
- ``stable_before_edge_ms``: for a provider that knows the words before the end of speech
  (whisper's final decoded ahead), how long before the edge its stable partial came, p50 / p95
  (negative: after it): the time the agent has to prepare its answer;
- ``drafts_thrown``: stable partials that the final then contradicted (speech went on after a
  pause): each one an answer prepared for nothing, with an LLM in the cloud a request paid.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from services.ingress.audio import FRAME_BYTES, Resampler, read_wav
from services.ingress.service import IngressConfig
from services.runtime.providers import load_provider
from services.stt.config import SttConfig
from services.stt.provider import PROVIDERS
from voicebus.bench.pipeline import stats

# What people ask a voice assistant, with the words that must be heard.
PHRASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("please set an alarm for seven in the morning", ("alarm", "seven", "morning")),
    ("how far away is the moon from the earth", ("far", "moon", "earth")),
    ("what time is it", ("what", "time")),
    ("tell me a story about a dog", ("story", "dog")),
    ("i want to book a table for two tonight", ("book", "table", "tonight")),
    ("what is the weather like in paris tomorrow", ("weather", "paris", "tomorrow")),
    ("call my mother on her mobile phone", ("call", "mother", "phone")),
    ("turn off the lights in the kitchen", ("lights", "kitchen")),
    ("how do i get to the nearest train station", ("nearest", "train", "station")),
    ("remind me to buy milk after work", ("remind", "milk", "work")),
    ("can you play some music by the beatles", ("play", "music", "beatles")),
    ("what is the capital of france", ("capital", "france")),
    ("send a message to john saying i am late", ("message", "john", "late")),
    ("how many grams are in a pound", ("grams", "pound")),
    ("cancel my meeting this afternoon", ("cancel", "meeting", "afternoon")),
    ("thank you that was very helpful", ("thank", "helpful")),
)
# (name, command before the text); the WAV path and the text are added per voice kind.
VOICES: tuple[tuple[str, list[str]], ...] = (
    ("espeak en-us 150", ["espeak-ng", "-v", "en-us", "-s", "150"]),
    ("espeak en-gb 165", ["espeak-ng", "-v", "en-gb", "-s", "165"]),
    ("espeak en-us+f3 140", ["espeak-ng", "-v", "en-us+f3", "-s", "140"]),
    ("espeak en+m3 175", ["espeak-ng", "-v", "en+m3", "-s", "175"]),
    ("espeak en-gb-x-rp+f2 160", ["espeak-ng", "-v", "en-gb-x-rp+f2", "-s", "160"]),
    ("flite slt", ["flite", "-voice", "slt"]),
    ("flite rms", ["flite", "-voice", "rms"]),
    ("flite awb", ["flite", "-voice", "awb"]),
    ("flite kal16", ["flite", "-voice", "kal16"]),
)
NUMBERS = {str(n): w for n, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}
LEAD_MS = 200


def words(text: str) -> list[str]:
    out = []
    for word in re.sub(r"[^a-z0-9' ]", " ", text.lower()).split():
        out.append(NUMBERS.get(word, word))
    return out


def wer(reference: list[str], heard: list[str]) -> float:
    """Word error rate: the edit distance over the reference's length."""
    row = list(range(len(heard) + 1))
    for i, ref in enumerate(reference, 1):
        previous, row[0] = row[0], i
        for j, got in enumerate(heard, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1,
                                           previous + (ref != got))
    return row[-1] / max(1, len(reference))


def speak(command: list[str], text: str, wav: Path) -> bytes:
    """``text`` by a Debian voice, as 16 kHz mono s16 with ``LEAD_MS`` of quiet before it."""
    raw = wav.with_suffix(".raw.wav")
    if command[0] == "espeak-ng":
        subprocess.run([*command, "-w", str(raw), text], check=True, capture_output=True)
    else:
        subprocess.run([*command, "-t", text, "-o", str(raw)], check=True, capture_output=True)
    pcm, rate, channels = read_wav(raw)
    resampler = Resampler(rate, channels)
    audio = resampler.process(pcm) + resampler.flush()
    return bytes(16000 * 2 * LEAD_MS // 1000) + audio


def missing_tools() -> list[str]:
    return [tool for tool in ("espeak-ng", "flite") if shutil.which(tool) is None]


async def run_stt_bench(providers: list[str], pace: float = 1.0, voices: int = 0,
                        phrases: int = 0) -> dict[str, Any]:
    if missing := missing_tools():
        raise RuntimeError(f"the unseen voices need {', '.join(missing)} "
                           f"(Debian: apt-get install {' '.join(missing)})")
    chosen_voices = VOICES[:voices or len(VOICES)]
    chosen_phrases = PHRASES[:phrases or len(PHRASES)]
    folder = Path(tempfile.mkdtemp(prefix="voicebus-stt-bench-"))
    clips = [(voice, text, keys, speak(command, text, folder / f"{i}-{j}.wav"))
             for i, (voice, command) in enumerate(chosen_voices)
             for j, (text, keys) in enumerate(chosen_phrases)]
    config = SttConfig.from_env(os.environ)
    quiet_ms = IngressConfig.from_env(os.environ).vad_silence_ms
    result: dict[str, Any] = {"voices": [v for v, _ in chosen_voices],
                              "phrases": len(chosen_phrases), "pace": pace, "providers": {}}
    for name in providers:
        stt = load_provider("stt", PROVIDERS, name, config)
        try:
            result["providers"][name] = await _measure(stt, clips, pace, quiet_ms)
        finally:
            await stt.aclose()
    return result


async def _measure(stt: Any, clips: list[tuple[str, str, tuple[str, ...], bytes]],
                   pace: float, quiet_ms: int) -> dict[str, Any]:
    kept = total = 0
    errors: list[float] = []
    after_edge: list[float] = []
    before_edge: list[float] = []
    thrown = 0
    by_voice: dict[str, list[int]] = {}
    cpu_before, audio_s = time.process_time(), 0.0
    for voice, text, keys, audio in clips:
        audio += bytes(16000 * 2 * quiet_ms // 1000)
        audio_s += len(audio) / 32000
        edge: list[float] = []
        final = ""
        stable: list[tuple[float, str]] = []
        async for res in stt.stream(_frames(audio, pace, edge)):
            if res.stable:
                stable.append((time.perf_counter(), res.text))
            if res.final:
                final = res.text
                after_edge.append((time.perf_counter() - edge[0]) * 1000)
        thrown += sum(text != final for _, text in stable)
        if stable and stable[-1][1] == final:
            before_edge.append((edge[0] - stable[-1][0]) * 1000)
        heard = set(words(final))
        got = sum(key in heard for key in keys)
        kept, total = kept + got, total + len(keys)
        tally = by_voice.setdefault(voice, [0, 0])
        tally[0], tally[1] = tally[0] + got, tally[1] + len(keys)
        errors.append(wer(words(text), words(final)))
    return {
        "keywords_kept": round(kept / total, 3),
        "wer": round(float(np.mean(errors)), 3),
        "final_after_edge_ms": stats(after_edge),
        "cpu_s_per_audio_s": round((time.process_time() - cpu_before) / audio_s, 3),
        "stable_before_edge_ms": stats(before_edge),
        "drafts_thrown": thrown,
        "keywords_kept_by_voice": {v: round(k / n, 2) for v, (k, n) in by_voice.items()},
    }


async def _frames(audio: bytes, pace: float, edge: list[float]):
    started = time.perf_counter()
    for n, i in enumerate(range(0, len(audio) - FRAME_BYTES + 1, FRAME_BYTES)):
        if pace > 0:
            await asyncio.sleep(max(0.0, started + (n + 1) * 0.02 / pace - time.perf_counter()))
        yield audio[i:i + FRAME_BYTES]
    edge.append(time.perf_counter())  # the last frame: the VAD's end edge
