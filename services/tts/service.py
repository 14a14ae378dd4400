"""TTS stage: reply deltas in, 20 ms frames at the voice's native rate out.

Text is cut into sentences as it streams, so the first sentence is being synthesized while the
LLM is still writing the rest. Frames go out as fast as they are made; egress paces them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from functools import partial
from importlib.util import find_spec

import numpy as np

from proto import events as ev
from proto import subjects as sj
from proto.events import Timing
from services.runtime import metrics, tracing, usage
from services.runtime.audio import frame_bytes
from services.runtime.errors import ConfigError, ProviderError
from services.runtime.fallback import READY_FIRST, FallbackAdapter, answered_by
from services.runtime.ledger import FloorRecord, TurnLedger
from services.runtime.service import ProviderStage, SessionWorker, to_the_end
from services.tts.chunker import Chunk, SentenceChunker
from services.tts.config import TtsConfig
from services.tts.provider import PROVIDERS, SpokenAudio, TtsProvider, WordTiming, word_marks

FRAME_MS = ev.FRAME_MS
log = logging.getLogger(__name__)


class TtsFallback(FallbackAdapter[TtsProvider]):
    """The TTS chain, itself a ``TtsProvider``. Text chunks are kept so the next provider
    speaks the turn from its first chunk; the budget runs from the first chunk (nothing can be
    spoken before text exists). Audio always leaves at the first provider's rate: egress plays
    one rate per session, so a fallback voice with another rate is resampled."""

    stage = "tts"

    def __init__(self, providers: Sequence[TtsProvider], **settings: float) -> None:
        super().__init__(providers, **settings)
        self.sample_rate = providers[0].sample_rate
        self.word_timestamps = any(_times_words(p) for p in providers)
        # soxr is needed only when rates differ; missing, it must stop the start, not a turn.
        if any(p.sample_rate != self.sample_rate for p in providers) and not find_spec("soxr"):
            raise ConfigError("TTS providers with different sample rates need soxr: "
                              "pip install 'voicebus[tts]'")

    def synthesize(self, chunks: AsyncIterator[str], *,
                   words: list[WordTiming] | None = None) -> AsyncIterator[SpokenAudio]:
        """The turn's audio from the first provider that answers; word timings of the provider
        that speaks go to ``words`` when it gives them."""
        return self.run(partial(self._speak, words=words), chunks, READY_FIRST)

    def _speak(self, provider: TtsProvider, chunks: AsyncIterator[str],
               words: list[WordTiming] | None = None) -> AsyncIterator[SpokenAudio]:
        if words is not None:
            words.clear()  # a provider that failed before speaking leaves no timings behind
        if words is not None and _times_words(provider):
            audio = provider.synthesize(chunks, words=words)  # type: ignore[call-arg]
        else:
            audio = provider.synthesize(chunks)
        if provider.sample_rate == self.sample_rate:
            return audio
        return _resampled(audio, provider.sample_rate, self.sample_rate)

    async def probe(self, provider: TtsProvider) -> None:
        async def text() -> AsyncIterator[str]:
            yield "Hi."

        async with aclosing(provider.synthesize(text())) as audio:
            spoke = [piece async for piece in audio if piece.pcm]
        if not spoke:
            raise ProviderError("the probe produced no audio", provider=provider.name)


def _times_words(provider: TtsProvider) -> bool:
    return bool(getattr(provider, "word_timestamps", False))


async def _resampled(audio: AsyncIterator[SpokenAudio], rate: int, to: int) -> AsyncIterator[SpokenAudio]:
    import soxr  # the tts extra: checked at start-up by TtsFallback

    resampler = soxr.ResampleStream(rate, to, 1, dtype="int16")
    chunk = 0
    async with aclosing(audio):  # type: ignore[type-var]
        async for piece in audio:
            chunk = piece.chunk
            pcm = resampler.resample_chunk(np.frombuffer(piece.pcm, dtype=np.int16)).tobytes()
            if pcm:
                yield SpokenAudio(pcm, chunk)
    tail = resampler.resample_chunk(np.empty(0, dtype=np.int16), last=True).tobytes()
    if tail:
        yield SpokenAudio(tail, chunk)


class TurnSpeech:
    """One turn's text on its way to the provider, and what came out."""

    def __init__(self, turn: int, max_chars: int, first_clause: int = 0) -> None:
        self.turn = turn
        self.chunker = SentenceChunker(max_chars=max_chars, first_clause=first_clause)
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.spans: list[tuple[int, int]] = []
        self.text = ""
        self.llm_ms = 0.0
        self.first_chunk_at = 0.0
        self.task: asyncio.Task[None] | None = None
        # The turn's trace as the reply's first text brought it, and when that came.
        self.trace: tracing.Headers | None = None
        self.first_text_ns = 0

    def add(self, chunks: list[Chunk], llm_ms: float) -> None:
        for chunk in chunks:
            if not self.spans:
                self.llm_ms = llm_ms
                self.first_chunk_at = time.perf_counter()
            self.spans.append((chunk.start, chunk.end))
            self.queue.put_nowait(chunk.text)

    async def chunks(self, timeout: float) -> AsyncIterator[str]:
        """The turn's text chunks; ends at ReplyDone, or when the LLM went quiet (a lost
        ReplyDone must not hold the turn open for ever)."""
        while True:
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a cancel that
                # lands as the queue hands over a chunk, and a barge-in's cancel was lost so
                # (the whole reply was synthesized) on a busy machine.
                async with asyncio.timeout(timeout):
                    text = await self.queue.get()
            except TimeoutError:
                log.warning("no reply text for %.0fs: closing turn %d", timeout, self.turn)
                return
            if text is None:
                return
            yield text


class TtsWorker(SessionWorker[TtsConfig]):
    service: TtsService

    async def subscribe_inputs(self) -> None:
        self.current: TurnSpeech | None = None
        self.ledger = TurnLedger.following(await self.load_floor())
        await self.subscribe(sj.producer_all(self.session, "llm"), self.handle)
        await self.subscribe(sj.FLOOR_CANCEL.subject(self.session), self.handle)

    def handle(self, event: ev.Event) -> None:
        match event:
            case ev.Cancel() if self.ledger.cancel(event.turn):
                current = self.current
                if current is not None and current.task and self.ledger.is_cut(current.turn):
                    current.task.cancel()
            case ev.ReplyDelta() | ev.ReplyDone():
                self.on_reply(event)

    async def on_taken_over(self, record: FloorRecord) -> None:
        """The replica that died may have been speaking the reply that holds the floor; its
        text died with it. The turn is closed (interrupted): egress plays what it got."""
        if record.reply >= 0 and self.ledger.pass_over(record.reply):
            await self.stage_error("the replica speaking this turn died", retryable=True,
                                   turn=record.reply)
            await self._unstarted(record.reply)

    def on_reply(self, event: ev.ReplyDelta | ev.ReplyDone) -> None:
        turn = event.turn
        current = self.current if self.current is not None and self.current.turn == turn else None
        if current is None and (self.ledger.is_cut(turn) or
                                (isinstance(event, ev.ReplyDone) and not event.text)):
            # Nothing to say: a turn cut before its text came, or an empty or failed reply. It
            # still gets its SynthesisDone (once), and a reply being spoken is not disturbed.
            if isinstance(event, ev.ReplyDone) and self.ledger.pass_over(turn):
                self.spawn(self._unstarted(turn, event.interrupted or self.ledger.is_cut(turn)),
                           "done")
            return
        speech = self._speech_for(turn)
        if speech is None:
            return  # a late event of a turn already spoken, or superseded
        llm_ms = event.timing.compute_ms if event.timing is not None else 0.0
        if not speech.first_text_ns:
            speech.trace, speech.first_text_ns = tracing.received(), time.time_ns()
        if isinstance(event, ev.ReplyDelta):
            speech.text += event.text
            speech.add(speech.chunker.push(event.text), llm_ms)
        else:
            speech.add(speech.chunker.flush(), llm_ms)
            speech.queue.put_nowait(None)

    def _speech_for(self, turn: int) -> TurnSpeech | None:
        current = self.current
        if current is not None and turn == current.turn:
            return current
        if not self.ledger.open(turn):
            return None
        if current is not None and current.task is not None:
            current.task.cancel()  # a newer reply supersedes the one still being spoken
        speech = TurnSpeech(turn, self.config.tts_max_chunk_chars,
                            self.config.tts_first_clause_chars)
        speech.task = self.spawn_turn(self.speak(speech), turn, self._unstarted)
        self.current = speech
        return speech

    async def _unstarted(self, turn: int, interrupted: bool = True) -> None:
        await self.emit(sj.TTS_DONE, ev.SynthesisDone, turn=turn, interrupted=interrupted)

    async def speak(self, speech: TurnSpeech) -> None:
        provider = self.service.provider_for(self.start_event.agent)
        framer = _Framer(provider.sample_rate)
        lead = LeadTrim(provider.sample_rate, self.config.tts_trim_lead_ms)
        frames, first_ts, tts_ms = 0, 0, 0.0
        interrupted = False
        failure: Exception | None = None  # what broke the synthesis: told as the turn closes
        words: list[WordTiming] | None = [] if provider.word_timestamps else None
        chunks = speech.chunks(self.config.tts_text_timeout)
        meter = usage.metering()  # the text each provider read, the audio it made

        async def send(pcm: bytes, text_offset: int) -> None:
            nonlocal frames, first_ts, tts_ms
            trace = None
            if not frames:
                tts_ms = (time.perf_counter() - speech.first_chunk_at) * 1000
                trace = self._first_audio(speech, answered_by(audio, provider), tts_ms)
            frame = await self.emit(sj.TTS_AUDIO, ev.AudioFrame, pcm=pcm,
                                    sample_rate=provider.sample_rate, pts_ms=frames * FRAME_MS,
                                    turn=speech.turn, trace=trace, text_offset=text_offset)
            first_ts = first_ts or frame.ts_ns
            frames += 1

        try:
            async with aclosing(provider.synthesize(chunks, words=words)) as audio:
                async for piece in audio:
                    start, end = speech.spans[piece.chunk]
                    for pcm, share in framer.cut(lead.cut(piece.pcm)):
                        await send(pcm, start + round((end - start) * share))
            for pcm, _ in framer.cut(lead.flush()):  # silent throughout: played as it is
                await send(pcm, 0)
            if (tail := framer.flush()) is not None:
                await send(tail, len(speech.text))
        except asyncio.CancelledError:
            interrupted = True
        except Exception as exc:  # a provider failure or a bug: the turn still closes
            failure = exc

        async def close() -> None:
            """The turn's end, announced once: a cut that comes now finds nothing to stop."""
            if failure is not None:
                await self.provider_failed(speech.turn, failure, "synthesis")
            await self.emit(sj.TTS_DONE, ev.SynthesisDone, turn=speech.turn, frames=frames,
                            text=speech.text, interrupted=interrupted,
                            words=word_marks(speech.text, lead.shift(words or [])),
                            timing=Timing(first_frame_ts_ns=first_ts, llm_ms=speech.llm_ms,
                                          tts_ms=tts_ms))
            await usage.publish(self, meter, speech.turn, interrupted=interrupted)
            metrics.TURNS.labels("tts", "interrupted" if interrupted else "ok").inc()

        await to_the_end(close(), self.config.shutdown_grace)

    def _first_audio(self, speech: TurnSpeech, provider: str, tts_ms: float
                     ) -> tracing.Headers | None:
        """The reply's first audio is out: TTS TTFB (from its first sentence to the provider),
        and the turn's span from its first text, carried on to egress."""
        metrics.PROVIDER_SECONDS.labels("tts", provider).observe(tts_ms / 1000)
        metrics.TTS_TTFB.labels(provider).observe(tts_ms / 1000)
        return tracing.stage_span("tts_first_audio", session=self.session, turn=speech.turn,
                                  parent=speech.trace, start_ns=speech.first_text_ns,
                                  provider=provider)


class LeadTrim:
    """Cuts the silence a reply's audio starts with, so the user does not wait through it:
    audio is held until its first sample above ``LEVEL``, then goes on from ``KEEP_MS`` before
    that sample (a soft onset stays whole). A silence longer than ``limit_ms`` is played as it
    is (a pause meant), and so is a reply silent throughout (``flush``)."""

    LEVEL = 200  # about -44 dBFS: above a TTS's quiet (Piper's stays under 40), under any onset
    KEEP_MS = 10

    def __init__(self, sample_rate: int, limit_ms: int) -> None:
        self.rate = sample_rate
        self.keep = sample_rate * self.KEEP_MS // 1000
        self.limit = sample_rate * limit_ms // 1000
        self.held = b""
        self.trimmed = 0  # samples cut
        self.done = limit_ms <= 0

    def cut(self, pcm: bytes) -> bytes:
        """``pcm`` as it should go on: b"" while still held."""
        if self.done:
            return pcm
        self.held += pcm
        samples = np.frombuffer(self.held, dtype="<i2", count=len(self.held) // 2)
        sound = np.flatnonzero((samples > self.LEVEL) | (samples < -self.LEVEL))
        if sound.size and sound[0] - self.keep <= self.limit:
            self.trimmed = max(0, int(sound[0]) - self.keep)
        elif not sound.size and len(samples) <= self.limit + self.keep:
            return b""  # all quiet so far, and not past the limit
        return self.flush()

    def flush(self) -> bytes:
        """What is still held, untrimmed unless the sound was found; nothing is held after."""
        out, self.held = self.held[self.trimmed * 2:], b""
        self.done = True
        return out

    def shift(self, words: list[WordTiming]) -> list[WordTiming]:
        """Word timings of the provider's audio on the trimmed audio's clock."""
        if not self.trimmed:
            return words
        cut = self.trimmed / self.rate
        return [WordTiming(w.word, max(0.0, w.start - cut), max(0.0, w.end - cut)) for w in words]


class _Framer:
    """Cuts provider audio into 20 ms frames, carrying the remainder to the next piece."""

    def __init__(self, sample_rate: int) -> None:
        self.frame_bytes = frame_bytes(sample_rate)
        self.carry = b""

    def cut(self, pcm: bytes) -> list[tuple[bytes, float]]:
        """Frames and, for each, how far through ``pcm`` its end lies (0..1]."""
        data = self.carry + pcm
        offset = len(self.carry)
        count = len(data) // self.frame_bytes
        out = []
        for i in range(count):
            end = (i + 1) * self.frame_bytes
            share = min(1.0, max(0, end - offset) / len(pcm)) if pcm else 1.0
            out.append((data[i * self.frame_bytes:end], share))
        self.carry = data[count * self.frame_bytes:]
        return out

    def flush(self) -> bytes | None:
        if not self.carry:
            return None
        tail = self.carry.ljust(self.frame_bytes, b"\0")
        self.carry = b""
        return tail


class TtsService(ProviderStage[TtsConfig]):
    stage = "tts"
    Config = TtsConfig
    Worker = TtsWorker
    PROVIDERS = PROVIDERS
    Fallback = TtsFallback
    provider: TtsFallback
