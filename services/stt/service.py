"""STT stage: ingress audio + VAD edges in, partial and final transcripts out.

Only speech is decoded: frames are kept in a short pre-roll while the user is silent, and an
utterance runs from ``SpeechStarted`` (plus pre-roll) to ``SpeechEnded``. Each utterance opens
the next turn; the turn counter lives in JetStream KV so another replica can carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing

from nats.js.errors import KeyNotFoundError

from proto import events as ev
from proto import subjects as sj
from services.runtime import metrics
from services.runtime.bus import SeqGaps
from services.runtime.fallback import READY_END, FallbackAdapter, answered_by
from services.runtime.service import ProviderStage, SessionWorker
from services.stt.config import SttConfig
from services.stt.provider import PROVIDERS, SAMPLE_RATE, SttProvider, SttResult

STATE_BUCKET = "voicebus_sessions"
# An utterance longer than this is closed without waiting for the VAD (a lost SpeechEnded).
MAX_UTTERANCE_FRAMES = 30 * 50
# A probe: half a second of silence (20 ms frames).
_PROBE_FRAMES = 25
_SILENCE = bytes(SAMPLE_RATE * 2 // 50)


class SttFallback(FallbackAdapter[SttProvider]):
    """The STT chain, itself an ``SttProvider``. The utterance's frames are kept so the next
    provider hears it from the start; the budget for the final runs from the end of speech (a
    provider cannot be asked for a final before it has heard everything). Only the final
    commits: a provider that fails or stalls after partials hands the utterance on."""

    stage = "stt"

    def commits(self, item: SttResult) -> bool:
        # Partials are shown but bind nothing: until a final, the utterance can move on.
        return item.final

    def stream(self, frames: AsyncIterator[bytes]) -> AsyncIterator[SttResult]:
        return self.run(lambda provider, replay: provider.stream(replay), frames, READY_END)

    async def probe(self, provider: SttProvider) -> None:
        async def silence() -> AsyncIterator[bytes]:
            for _ in range(_PROBE_FRAMES):
                yield _SILENCE

        async with aclosing(provider.stream(silence())) as results:
            async for _ in results:
                pass


class Utterance:
    """Frames of one utterance on their way to the provider."""

    def __init__(self, turn: int) -> None:
        self.turn = turn
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.frames = 0
        self.ended_at = 0.0
        self.dropped = 0

    def push(self, pcm: bytes) -> None:
        self.frames += 1
        self.queue.put_nowait(pcm)

    def end(self) -> None:
        if not self.ended_at:
            self.ended_at = time.perf_counter()
            self.queue.put_nowait(None)

    async def frames_iter(self) -> AsyncIterator[bytes]:
        while (pcm := await self.queue.get()) is not None:
            yield pcm


class SttWorker(SessionWorker[SttConfig]):
    service: SttService

    async def start(self) -> None:
        self.kv = await self.bus.key_value(STATE_BUCKET, ttl=self.config.state_ttl)
        self.turn = await self._load_turn()
        self.preroll: deque[bytes] = deque(maxlen=max(1, self.config.stt_preroll_ms // 20))
        self.utterance: Utterance | None = None
        self.gaps = SeqGaps()
        # One subscription for audio and VAD keeps them in publish order.
        await self.subscribe(sj.producer_all(self.session, "ingress"), self.on_ingress)

    async def _load_turn(self) -> int:
        try:
            entry = await self.kv.get(f"{self.session}.turn")
        except KeyNotFoundError:  # a new session (any other KV error fails the claim)
            return 0
        return int(entry.value or b"0")

    def on_ingress(self, event: ev.Event) -> None:
        if lost := self.gaps.lost(event):
            metrics.FRAMES_DROPPED.labels("stt").inc(lost)
            if self.utterance is not None:
                self.utterance.dropped += lost
        if isinstance(event, ev.AudioFrame):
            self.on_audio(event)
        elif isinstance(event, ev.SpeechStarted):
            self.begin_utterance()
        elif isinstance(event, ev.SpeechEnded) and self.utterance is not None:
            self.utterance.end()
            self.utterance = None

    def on_audio(self, frame: ev.AudioFrame) -> None:
        if problem := ev.frame_problem(frame, SAMPLE_RATE):
            self.bus.reject("bad_audio", problem, sj.INGRESS_AUDIO.subject(self.session))
            return
        if self.utterance is None:
            self.preroll.append(frame.pcm)
            return
        self.utterance.push(frame.pcm)
        if self.utterance.frames >= MAX_UTTERANCE_FRAMES:
            self.utterance.end()
            self.utterance = None

    def begin_utterance(self) -> None:
        if self.utterance is not None:
            self.utterance.end()
        self.turn += 1
        utterance = Utterance(self.turn)
        for pcm in self.preroll:
            utterance.push(pcm)
        self.preroll.clear()
        self.utterance = utterance
        self.idle.clear()
        self.spawn(self.transcribe(utterance), f"turn-{utterance.turn}")

    async def transcribe(self, utt: Utterance) -> None:
        provider = self.service.provider
        text = ""
        try:
            # Closed on every way out (a cancelled turn too): a provider's socket must not
            # outlive its turn.
            async with contextlib.aclosing(provider.stream(utt.frames_iter())) as stream:
                async for result in stream:
                    name = answered_by(stream, provider)
                    if not result.final:
                        await self.emit(sj.STT_PARTIAL, ev.Transcript, turn=utt.turn,
                                        text=result.text, provider=name)
                        continue
                    text = result.text
                    compute = time.perf_counter() - utt.ended_at
                    metrics.PROVIDER_SECONDS.labels("stt", name).observe(compute)
                    await self.emit(sj.STT_FINAL, ev.Transcript, turn=utt.turn, text=text,
                                    final=True, confidence=result.confidence,
                                    compute_ms=compute * 1000, frames_dropped=utt.dropped,
                                    provider=name)
        except Exception as exc:  # a provider failure or a bug: the turn still closes
            await self._failed(utt.turn, exc)
        finally:
            if self.utterance is None:
                self.idle.set()
        metrics.TURNS.labels("stt", "ok" if text else "empty").inc()
        await self.kv.put(f"{self.session}.turn", str(utt.turn).encode())

    async def _failed(self, turn: int, exc: Exception) -> None:
        await self.provider_failed(turn, exc, "transcription")
        # A final with no words still closes the turn for every stage downstream.
        await self.emit(sj.STT_FINAL, ev.Transcript, turn=turn, text="", final=True)

class SttService(ProviderStage[SttConfig]):
    stage = "stt"
    Config = SttConfig
    Worker = SttWorker
    PROVIDERS = PROVIDERS
    Fallback = SttFallback
    provider: SttFallback
