"""Real-time playout of the agent's voice: a small jitter buffer per turn, a drift-free clock,
and barge-in that silences the agent at once. Independent of NATS and of where audio goes.

Frames arrive per turn (``push``/``finish``); ``run`` plays turns in ascending order, one frame
per frame period, into a ``Sink``. ``cancel(N)`` drops every turn <= N for good. Progress goes to
``on_progress`` as ``PlayoutReport``s; every turn the playout has heard of gets exactly one final
report (played out, cancelled, or — frames of an already cancelled turn — 0 ms interrupted).
"""

from __future__ import annotations

import asyncio
import time
import wave
from collections import deque
from collections.abc import Awaitable, Callable
from os import PathLike
from typing import NamedTuple, Protocol

from services.runtime.resample import StreamResampler

# How far a pause can take audio back: more than any sink's queue (the agent track holds 100 ms).
REWIND_FRAMES = 25


class PlayoutReport(NamedTuple):
    turn: int
    played_ms: int
    text_offset: int
    final: bool
    interrupted: bool
    underruns: int


class Sink(Protocol):
    async def write(self, pcm: bytes) -> None: ...

    async def aclose(self) -> None: ...


class TurnAwareSink(Sink, Protocol):
    async def end_turn(self) -> None:
        """A turn was played to its end: flush what the sink still holds of it (a resampler's
        delay line) before the next turn's first frame."""
        ...


class BufferedSink(Sink, Protocol):
    def clear(self) -> int:
        """Drop what the sink holds but has not played yet; return how many samples (at the
        playout's rate) that was."""
        ...


class NullSink:
    """Plays into nothing (a session without an output): the pacing still happens."""

    async def write(self, pcm: bytes) -> None:
        return None

    async def aclose(self) -> None:
        return None


class WavSink:
    """s16le into a WAV file, created at the first write so a silent session leaves no file."""

    def __init__(self, path: str | PathLike[str], sample_rate: int, channels: int = 1) -> None:
        self.path = path
        self.sample_rate = sample_rate
        self.channels = channels
        self._wav: wave.Wave_write | None = None
        self._closed = False

    async def write(self, pcm: bytes) -> None:
        if self._closed:
            raise RuntimeError(f"write to closed sink {self.path}")
        if self._wav is None:
            # Unbuffered, and ``writeframes`` patches the header's lengths on every write: the
            # file is a complete WAV after each frame, so it can be read while the session runs.
            self._file = open(self.path, "wb", buffering=0)  # noqa: SIM115 (closed in aclose)
            self._wav = wave.open(self._file, "wb")
            self._wav.setnchannels(self.channels)
            self._wav.setsampwidth(2)
            self._wav.setframerate(self.sample_rate)
        # Plain blocking writes: a few hundred bytes into the page cache every 20 ms cost
        # microseconds, less than a thread hop would.
        self._wav.writeframes(pcm)

    async def aclose(self) -> None:
        self._closed = True
        if self._wav is not None:
            self._wav.close()
            self._file.close()
            self._wav = None


class _Turn:
    __slots__ = ("turn", "frames", "offsets", "buffered", "finished", "cancelled", "played",
                 "text_offset", "underruns", "recent", "recent_offsets")

    def __init__(self, turn: int) -> None:
        self.turn = turn
        # Two parallel queues rather than one of (pcm, offset) pairs: no tuple per frame.
        self.frames: deque[bytes] = deque()
        self.offsets: deque[int] = deque()
        self.buffered = 0  # samples queued
        self.finished = False
        self.cancelled = False
        self.played = 0  # samples written to the sink
        self.text_offset = 0
        self.underruns = 0
        # Frames last written and their offsets (parallel, like ``frames``): a pause may have to
        # take them back.
        self.recent: deque[bytes] = deque(maxlen=REWIND_FRAMES)
        self.recent_offsets: deque[int] = deque(maxlen=REWIND_FRAMES)

    def rewind(self, samples: int) -> None:
        """Put back frames whose audio the sink dropped unplayed (``samples`` of it)."""
        while samples > 0 and self.recent:
            pcm = self.recent.pop()
            self.frames.appendleft(pcm)
            self.offsets.appendleft(self.recent_offsets.pop())
            n = len(pcm) // 2
            self.buffered += n
            self.played -= n
            samples -= n
        # What was heard ends with the last frame still played (a rewind is far shorter than
        # the memory, so an empty memory means the turn's start).
        self.text_offset = self.recent_offsets[-1] if self.recent_offsets else 0

    def report(self, rate: int, final: bool = False, interrupted: bool = False) -> PlayoutReport:
        return PlayoutReport(self.turn, self.played * 1000 // rate, self.text_offset, final,
                             interrupted, self.underruns)


class Playout:
    """See the module docstring. ``push``, ``finish`` and ``cancel`` never block; ``run`` is the
    one task that writes to the sink."""

    def __init__(self, sink: Sink, sample_rate: int, frame_ms: int = 20, prebuffer_ms: int = 40,
                 progress_ms: int = 250, lead_ms: int = 0,
                 on_progress: Callable[[PlayoutReport], None] | None = None,
                 on_played: Callable[[int, int, int], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        self.sink = sink
        self.sample_rate = sample_rate
        self.frame_ms = frame_ms
        self.frame_bytes = sample_rate * frame_ms // 1000 * 2
        self._prebuffer = max(1, sample_rate * prebuffer_ms // 1000)  # samples
        # Written ahead of real time: the sink's own queue holds this much, so a late wake-up
        # of this loop does not leave the track without audio.
        self._lead = lead_ms / 1000
        self._progress = sample_rate * progress_ms // 1000  # samples between progress reports
        self._on_progress = on_progress
        # Told after every frame written: (turn, ms played, text offset). Cheap work only.
        self._on_played = on_played
        self._clock = clock
        self._sleep = sleep
        self._turns: dict[int, _Turn] = {}
        # Playout order: turns below this can never play again (cut, played, or overtaken by a
        # newer one). The cut itself is the session ledger's; this only keeps turns in order.
        self._first_playable = 0
        self._last_final = -1  # highest turn given its final report (finals go in turn order)
        self._playing: _Turn | None = None
        self.paused = False
        self._writing = False
        self._wake = asyncio.Event()
        self._closed = False
        self._stopped = asyncio.Event()
        self._running = False
        self.stale_dropped = 0  # frames of turns that could no longer play
        self._held: set[int] = set()  # turns that may not start yet (unconfirmed drafts)

    # ---- producer side (never blocks) --------------------------------------------------------

    def push(self, turn: int, pcm: bytes, text_offset: int) -> None:
        if turn < self._first_playable or self._closed:
            self.stale_dropped += 1
            return
        state = self._turns.get(turn) or self._new_turn(turn)
        state.frames.append(pcm)
        state.offsets.append(text_offset)
        state.buffered += len(pcm) // 2
        self._wake.set()

    def finish(self, turn: int) -> None:
        """All frames of ``turn`` have been pushed."""
        if turn < self._first_playable:
            if turn > self._last_final and turn not in self._turns:
                # Its frames were all stale (cancel came first): the turn still needs its end.
                self._final(_Turn(turn), interrupted=True)
            return
        state = self._turns.get(turn) or self._new_turn(turn)
        state.finished = True
        self._wake.set()

    def _new_turn(self, turn: int) -> _Turn:
        # TTS speaks turns in order, so a newer turn means the older ones have all their frames:
        # finishing them here keeps a lost SynthesisDone from stalling playout until the next cancel.
        for older in self._turns.values():
            if older.turn < turn:
                older.finished = True
        state = self._turns[turn] = _Turn(turn)
        return state

    def cancel(self, up_to_turn: int) -> PlayoutReport | None:
        """Drop every turn <= ``up_to_turn``, now and forever; return the report of the turn cut
        off mid-play, if any. Nothing of those turns reaches the sink after this returns."""
        self._first_playable = max(self._first_playable, up_to_turn + 1)
        cut: PlayoutReport | None = None
        for turn in sorted(t for t in self._turns if t <= up_to_turn):
            state = self._turns.pop(turn)
            state.cancelled = True
            state.frames.clear()
            state.offsets.clear()
            report = self._final(state, interrupted=True)
            if state is self._playing:
                cut = report
        self._wake.set()
        return cut

    def pause(self) -> None:
        """Stop the agent's voice now, keeping its place: nothing more reaches the sink (and no
        turn starts) until ``resume``; what the sink held unplayed is played again then."""
        if self.paused:
            return
        self.paused = True
        # Nothing playing: what the sink holds is the end of a turn already reported as heard.
        if self._playing is not None and not self._writing:  # (if writing: after the write)
            self._take_back()

    def _take_back(self) -> None:
        clear = getattr(self.sink, "clear", None)
        dropped = clear() if clear is not None else 0
        if self._playing is not None and dropped:
            self._playing.rewind(dropped)

    def hold(self, turn: int) -> None:
        """``turn`` may be queued but not start until ``release`` (a draft, unconfirmed)."""
        self._held.add(turn)

    def release(self, turn: int) -> None:
        if turn in self._held:
            self._held.discard(turn)
            self._wake.set()

    def has(self, turn: int) -> bool:
        """Frames of ``turn`` are queued or playing."""
        return turn in self._turns or (self._playing is not None and self._playing.turn == turn)

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self._wake.set()

    # ---- the playout loop --------------------------------------------------------------------

    async def run(self) -> None:
        self._running = True
        self._stopped.clear()
        try:
            while True:
                state = await self._next_ready()
                if state is None:
                    return
                await self._play(state)
                self._playing = None
                self._turns.pop(state.turn, None)
        finally:
            self._playing = None
            self._running = False
            self._stopped.set()

    async def aclose(self) -> None:
        """Stop the loop (within one frame period) and close the sink."""
        self._closed = True
        self._wake.set()
        if self._running:
            await self._stopped.wait()
        await self.sink.aclose()

    async def _next_ready(self) -> _Turn | None:
        """The lowest queued turn once it may start: prebuffer full, or finished."""
        while not self._closed:
            if self._turns:
                state = self._turns[min(self._turns)]
                if self._ready(state):
                    self._first_playable = max(self._first_playable, state.turn)
                    return state
            await self._wait()
        return None

    def _ready(self, state: _Turn) -> bool:
        return not self.paused and state.turn not in self._held and \
            (state.finished or state.buffered >= self._prebuffer)

    async def _wait(self) -> None:
        self._wake.clear()
        await self._wake.wait()

    async def _play(self, state: _Turn) -> None:
        self._playing = state
        rate = self.sample_rate
        start, sent = self._clock(), 0  # schedule: the frame after `sent` samples is due then
        next_progress = 0
        while True:
            delay = start + sent / rate - self._lead - self._clock()
            if delay > 0:
                await self._sleep(delay)
            if state.cancelled or self._closed:
                return  # the pending frame is dropped; cancel() already reported the turn
            if self.paused:
                if not await self._hold(state):
                    return
                start, sent = self._clock(), 0
                continue
            if not state.frames:
                if state.finished:
                    if (end_turn := getattr(self.sink, "end_turn", None)) is not None:
                        await end_turn()
                    self._final(state)
                    return
                if (due := start + sent / rate - self._clock()) > 0:
                    # Written ahead: the sink plays what it holds until then, and a frame that
                    # comes meanwhile is still in time.
                    await self._sleep(due)
                    continue
                if not await self._rebuffer(state):
                    return
                start, sent = self._clock(), 0
                continue
            pcm = state.frames.popleft()
            offset = state.offsets.popleft()
            n = len(pcm) // 2
            state.buffered -= n
            self._writing = True
            try:
                await self.sink.write(pcm)
            finally:
                self._writing = False
            if state.cancelled:
                return  # cancelled while the sink took the frame: the turn is already reported
            state.recent.append(pcm)
            state.recent_offsets.append(offset)
            state.played += n
            state.text_offset = offset
            if self.paused:  # paused while the sink took the frame: it must not play either
                self._take_back()
            sent += n
            if self._on_played is not None:
                self._on_played(state.turn, state.played * 1000 // rate, state.text_offset)
            if state.played >= next_progress and self._on_progress is not None:
                self._on_progress(state.report(rate))
                next_progress = state.played + self._progress

    async def _hold(self, state: _Turn) -> bool:
        """Paused: wait for ``resume`` (or the turn's end by cancel or close)."""
        while self.paused and not (state.cancelled or self._closed):
            await self._wait()
        return not (state.cancelled or self._closed)

    async def _rebuffer(self, state: _Turn) -> bool:
        """Underrun: wait until the jitter buffer refills (or the turn is finished or cancelled).

        No silence is written meanwhile: a written frame cannot be taken back, so a real frame
        arriving just after would queue behind it and every underrun would add latency to the
        rest of the turn; silence would also count as "played" in the reports. A live track
        goes quiet by itself when it is not fed.
        """
        state.underruns += 1
        while not (self._ready(state) or state.cancelled or self._closed):
            await self._wait()
        return not (state.cancelled or self._closed)

    def _final(self, state: _Turn, interrupted: bool = False) -> PlayoutReport:
        report = state.report(self.sample_rate, final=True, interrupted=interrupted)
        self._last_final = max(self._last_final, state.turn)
        self._first_playable = max(self._first_playable, state.turn + 1)
        if self._on_progress is not None:
            self._on_progress(report)
        return report


class PhoneSink:
    """A playout sink onto the bus for the SIP gateway: the agent's voice as ``egress.audio``
    frames of exactly 20 ms at the call's rate (8 kHz for G.711), one per write as playout
    paces them. ``publish(pcm, pts_ms)`` sends one frame."""

    def __init__(self, publish: Callable[[bytes, int], Awaitable[object]], in_rate: int,
                 out_rate: int) -> None:
        self.publish = publish
        self.in_rate = in_rate
        self.frame_bytes = out_rate * 2 // 50
        self.resampler = None if in_rate == out_rate else StreamResampler(in_rate, out_rate)
        self.pending = bytearray()
        self.pts_ms = 0

    async def write(self, pcm: bytes) -> None:
        if self.resampler is not None:
            pcm = self.resampler.process(pcm)
        await self._send(pcm)

    async def end_turn(self) -> None:
        """The turn's last milliseconds: what the resampler holds, padded to a whole frame."""
        if self.resampler is not None:
            await self._send(self.resampler.flush())
        if self.pending:
            await self._send(bytes(self.frame_bytes - len(self.pending)))

    def clear(self) -> int:
        """Drop what is not sent yet (less than a frame); the gateway queues nothing."""
        held = len(self.pending) // 2 * self.in_rate * 2 // (self.frame_bytes * 50)
        self.pending.clear()
        if self.resampler is not None:
            self.resampler.clear()
        return held

    async def _send(self, pcm: bytes) -> None:
        self.pending += pcm
        while len(self.pending) >= self.frame_bytes:
            frame = bytes(self.pending[:self.frame_bytes])
            del self.pending[:self.frame_bytes]
            await self.publish(frame, self.pts_ms)
            self.pts_ms += 20

    async def aclose(self) -> None:
        return None
