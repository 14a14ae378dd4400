"""Egress playout on a virtual clock: pacing, prebuffer, barge-in, progress, underruns, sinks."""

from __future__ import annotations

import asyncio
import wave
from collections.abc import Callable
from pathlib import Path

import pytest

from services.egress.playout import NullSink, PhoneSink, Playout, PlayoutReport, WavSink

RATE = 16000
FRAME = RATE // 50 * 2  # 20 ms, 640 bytes


def frame(turn: int, n: int) -> bytes:
    """A recognisable 20 ms frame: turn and index in the first bytes."""
    return bytes([turn, n]) + bytes(FRAME - 2)


class VirtualTime:
    """Time moves only when the playout sleeps; ``at(t, fn)`` runs ``fn`` when time passes t,
    i.e. something happening while the playout waits for its next frame."""

    def __init__(self) -> None:
        self.now = 0.0
        self._events: list[tuple[float, Callable[[], object]]] = []

    def clock(self) -> float:
        return self.now

    def at(self, when: float, fn: Callable[[], object]) -> None:
        self._events.append((when, fn))
        self._events.sort(key=lambda e: e[0])

    async def sleep(self, delay: float) -> None:
        target = self.now + delay
        while self._events and self._events[0][0] <= target:
            when, fn = self._events.pop(0)
            self.now = max(self.now, when)
            fn()
        self.now = target
        await asyncio.sleep(0)


class RecordingSink:
    def __init__(self, vt: VirtualTime) -> None:
        self.vt = vt
        self.writes: list[tuple[float, bytes]] = []
        self.closed = False
        self.wrote = asyncio.Event()

    async def write(self, pcm: bytes) -> None:
        self.writes.append((round(self.vt.now, 6), pcm))
        self.wrote.set()

    async def aclose(self) -> None:
        self.closed = True

    def frames(self) -> list[bytes]:
        return [pcm for _, pcm in self.writes]

    def times(self) -> list[float]:
        return [t for t, _ in self.writes]


class Harness:
    def __init__(self, **kwargs: object) -> None:
        self.vt = VirtualTime()
        self.sink = RecordingSink(self.vt)
        self.reports: list[PlayoutReport] = []
        self.final = asyncio.Event()
        self.playout = Playout(self.sink, RATE, clock=self.vt.clock, sleep=self.vt.sleep,
                               on_progress=self.on_progress, **kwargs)  # type: ignore[arg-type]
        self.task: asyncio.Task[None] | None = None

    def on_progress(self, report: PlayoutReport) -> None:
        self.reports.append(report)
        if report.final:
            self.final.set()

    def start(self) -> None:
        self.task = asyncio.create_task(self.playout.run())

    def push_turn(self, turn: int, frames: int, finish: bool = True, first: int = 0) -> None:
        for n in range(first, first + frames):
            self.playout.push(turn, frame(turn, n), text_offset=n + 1)
        if finish:
            self.playout.finish(turn)

    async def finals(self, count: int) -> list[PlayoutReport]:
        async with asyncio.timeout(5):
            while sum(r.final for r in self.reports) < count:
                self.final.clear()
                await self.final.wait()
        return [r for r in self.reports if r.final]

    async def close(self) -> None:
        await self.playout.aclose()
        assert self.task is not None
        async with asyncio.timeout(5):
            await self.task


async def settle() -> None:
    """Let every ready task run until it blocks (scheduler passes, not wall time)."""
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.fixture
async def h():
    harness = Harness()
    yield harness
    if harness.task is not None and not harness.task.done():
        await harness.close()


async def test_frames_play_in_order_on_a_drift_free_schedule(h: Harness) -> None:
    h.push_turn(1, 10)
    h.start()
    (final,) = await h.finals(1)
    assert h.sink.frames() == [frame(1, n) for n in range(10)]
    assert h.sink.times() == pytest.approx([n * 0.02 for n in range(10)])
    assert final == PlayoutReport(1, 200, 10, True, False, 0)
    assert h.vt.now == pytest.approx(0.2)  # the final comes when the last frame has played


async def test_turns_play_in_order_one_after_the_other(h: Harness) -> None:
    h.push_turn(2, 3)
    h.push_turn(1, 2)
    h.start()
    finals = await h.finals(2)
    assert [r.turn for r in finals] == [1, 2]
    assert h.sink.frames() == [frame(1, 0), frame(1, 1), frame(2, 0), frame(2, 1), frame(2, 2)]
    assert h.sink.times() == pytest.approx([0, 0.02, 0.04, 0.06, 0.08])


async def test_prebuffer_is_respected() -> None:
    h = Harness(prebuffer_ms=60)
    h.start()
    h.push_turn(1, 2, finish=False)  # 40 ms < 60 ms: not yet
    await settle()
    assert h.sink.writes == []
    h.vt.now = 1.0
    h.push_turn(1, 1, finish=False, first=2)
    await asyncio.wait_for(h.sink.wrote.wait(), 5)
    assert h.sink.writes[0] == (1.0, frame(1, 0))
    h.push_turn(2, 1)  # a newer turn ends turn 1 even though its SpeechDone was lost
    finals = await h.finals(2)
    assert [(r.turn, r.played_ms, r.interrupted) for r in finals] == [(1, 60, False), (2, 20, False)]
    await h.close()


async def test_a_finished_turn_shorter_than_the_prebuffer_plays(h: Harness) -> None:
    h.start()
    h.push_turn(1, 1)
    (final,) = await h.finals(1)
    assert h.sink.frames() == [frame(1, 0)]
    assert final.played_ms == 20


async def test_cancel_mid_turn_stops_at_once_and_the_next_turn_plays(h: Harness) -> None:
    h.push_turn(1, 20, finish=False)
    returned: list[PlayoutReport | None] = []

    def barge_in() -> None:
        # Between frames 4 and 5: cancel, then stragglers of turn 1 and the next reply arrive.
        returned.append(h.playout.cancel(1))
        h.push_turn(1, 5, first=20)
        h.push_turn(2, 3)

    h.vt.at(0.09, barge_in)
    h.start()
    finals = await h.finals(2)

    assert h.sink.frames() == [frame(1, n) for n in range(5)] + [frame(2, n) for n in range(3)]
    # Turn 2 starts as soon as the loop sees the cancel (its 60 ms were already buffered).
    assert h.sink.times()[5:] == pytest.approx([0.1, 0.12, 0.14])
    cut = PlayoutReport(1, 100, 5, True, True, 0)
    assert returned == [cut]
    assert finals == [cut, PlayoutReport(2, 60, 3, True, False, 0)]
    assert h.playout.stale_dropped == 5
    assert sum(r.turn == 1 for r in h.reports if r.final) == 1


async def test_cancel_covers_queued_turns_and_late_frames(h: Harness) -> None:
    h.push_turn(1, 3)
    h.push_turn(2, 3)
    assert h.playout.cancel(2) is None  # nothing was playing yet
    h.playout.push(2, frame(2, 9), 10)  # a straggler of a cancelled turn
    h.playout.cancel(3)  # before turn 3 even began to arrive
    h.playout.push(3, frame(3, 0), 1)
    h.playout.finish(3)  # turn 3 lost all its frames, yet still gets exactly one final
    h.playout.finish(3)
    h.push_turn(4, 1)
    h.start()
    finals = await h.finals(4)
    assert [(r.turn, r.played_ms, r.interrupted) for r in finals] == [
        (1, 0, True), (2, 0, True), (3, 0, True), (4, 20, False)]
    assert h.sink.frames() == [frame(4, 0)]
    assert h.playout.stale_dropped == 2


async def test_progress_reports_are_spaced_and_end_with_one_final(h: Harness) -> None:
    h.push_turn(1, 30)
    h.start()
    await h.finals(1)
    progress = [r for r in h.reports if not r.final]
    assert [r.played_ms for r in progress] == [20, 280, 540]
    assert [r.text_offset for r in progress] == [1, 14, 27]
    assert h.reports[-1] == PlayoutReport(1, 600, 30, True, False, 0)
    assert sum(r.final for r in h.reports) == 1


async def test_underrun_is_counted_and_playout_waits_without_writing(h: Harness) -> None:
    h.push_turn(1, 3, finish=False)
    h.start()
    async with asyncio.timeout(5):
        while len(h.sink.writes) < 3:
            h.sink.wrote.clear()
            await h.sink.wrote.wait()
    await settle()
    assert len(h.sink.writes) == 3  # nothing (no silence either) while the buffer is dry
    h.vt.now = 1.0
    h.push_turn(1, 3, first=3)
    (final,) = await h.finals(1)
    assert h.sink.frames() == [frame(1, n) for n in range(6)]
    assert h.sink.times()[3:] == pytest.approx([1.0, 1.02, 1.04])  # schedule restarts
    assert final == PlayoutReport(1, 120, 6, True, False, 1)


async def test_aclose_stops_the_loop_and_closes_the_sink(h: Harness) -> None:
    h.push_turn(1, 100)
    h.start()
    await asyncio.wait_for(h.sink.wrote.wait(), 5)
    await h.close()
    assert h.sink.closed
    assert len(h.sink.writes) < 100
    h.playout.push(1, frame(1, 100), 0)  # after close: dropped, never played
    assert h.playout.stale_dropped == 1


async def test_aclose_without_run_closes_the_sink() -> None:
    sink = RecordingSink(VirtualTime())
    await Playout(sink, RATE).aclose()
    assert sink.closed


async def test_real_clock_smoke() -> None:
    # Real asyncio.sleep and monotonic clock, 5 ms frames: the loop really paces.
    sink = NullSink()
    finals: list[PlayoutReport] = []
    done = asyncio.Event()

    def on_progress(r: PlayoutReport) -> None:
        if r.final:
            finals.append(r)
            done.set()

    playout = Playout(sink, RATE, frame_ms=5, prebuffer_ms=10, on_progress=on_progress)
    for n in range(10):
        playout.push(1, bytes(RATE // 200 * 2), n)
    playout.finish(1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    task = asyncio.create_task(playout.run())
    await asyncio.wait_for(done.wait(), 5)
    assert loop.time() - started >= 0.045  # 50 ms of audio took at least ~50 ms
    assert finals == [PlayoutReport(1, 50, 9, True, False, 0)]
    await playout.aclose()
    await task


async def test_wav_sink_writes_exact_frames(tmp_path: Path) -> None:
    path = tmp_path / "out.wav"
    sink = WavSink(path, 22050)
    frames = [bytes([n]) * 882 for n in range(5)]
    for pcm in frames:
        await sink.write(pcm)
    await sink.aclose()
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 22050)
        assert wav.getnframes() == 5 * 441
        assert wav.readframes(wav.getnframes()) == b"".join(frames)


async def test_wav_sink_creates_no_file_when_nothing_plays(tmp_path: Path) -> None:
    path = tmp_path / "silent.wav"
    sink = WavSink(path, 16000)
    await sink.aclose()
    assert not path.exists()


async def test_a_turn_aware_sink_is_told_each_played_turn_end_before_the_next_starts():
    h = Harness(prebuffer_ms=20)
    events: list[object] = []

    async def write(pcm: bytes) -> None:
        events.append(pcm[0])  # the frame's turn

    async def end_turn() -> None:
        events.append("end")

    h.sink.write = write  # type: ignore[method-assign]
    h.sink.end_turn = end_turn  # type: ignore[attr-defined]
    h.start()
    h.push_turn(1, 2)
    h.push_turn(2, 2)
    await h.finals(2)
    # A cancelled turn is not "played to its end": the sink is cleared instead (egress).
    h.push_turn(3, 50, finish=False)
    await settle()
    h.playout.cancel(3)
    await h.finals(3)
    await h.close()
    assert events[:6] == [1, 1, "end", 2, 2, "end"], events
    assert events.count("end") == 2, events


class QueueSink(RecordingSink):
    """A sink that holds the last ``held`` frames unplayed, like the agent's track queue."""

    def __init__(self, vt: VirtualTime, held: int) -> None:
        super().__init__(vt)
        self.held = held
        self.cleared: list[bytes] = []

    def clear(self) -> int:
        dropped = self.writes[-self.held:] if self.held else []
        del self.writes[len(self.writes) - len(dropped):]
        self.cleared += [pcm for _, pcm in dropped]
        return sum(len(pcm) // 2 for _, pcm in dropped)


async def test_pause_silences_at_once_and_resume_plays_on_from_what_was_not_heard() -> None:
    h = Harness()
    h.sink = QueueSink(h.vt, held=2)
    h.playout.sink = h.sink
    h.push_turn(1, 10)
    h.vt.at(0.09, h.playout.pause)  # between frames 4 and 5; frames 3 and 4 still queued
    h.start()
    await settle()
    assert h.sink.frames() == [frame(1, n) for n in range(3)]
    assert h.sink.cleared == [frame(1, 3), frame(1, 4)]
    h.vt.now = 2.0  # the user talks for a while: nothing plays, nothing is final
    await settle()
    assert len(h.sink.writes) == 3 and not any(r.final for r in h.reports)
    h.playout.resume()
    (final,) = await h.finals(1)
    # Every frame reached the sink and stayed there exactly once, in order: nothing skipped.
    assert h.sink.frames() == [frame(1, n) for n in range(10)]
    assert h.sink.times()[3] == pytest.approx(2.0)
    assert final == PlayoutReport(1, 200, 10, True, False, 0)
    await h.close()


async def test_a_pause_holds_back_a_turn_not_yet_started_and_cancel_ends_a_paused_turn(h: Harness) -> None:
    h.playout.pause()
    h.push_turn(1, 5)
    h.start()
    await settle()
    assert h.sink.writes == []
    cut = h.playout.cancel(1)
    (final,) = await h.finals(1)
    assert cut is None and final == PlayoutReport(1, 0, 0, True, True, 0)
    h.playout.resume()
    h.push_turn(2, 2)
    finals = await h.finals(2)
    assert finals[-1] == PlayoutReport(2, 40, 2, True, False, 0)
    assert h.sink.frames() == [frame(2, 0), frame(2, 1)]


async def test_text_offset_after_a_pause_is_what_was_heard() -> None:
    h = Harness(progress_ms=20)
    h.sink = QueueSink(h.vt, held=2)
    h.playout.sink = h.sink
    h.push_turn(1, 10)

    def pause_then_cut() -> None:
        h.playout.pause()
        h.playout.cancel(1)

    h.vt.at(0.09, pause_then_cut)
    h.start()
    (final,) = await h.finals(1)
    # Frames 0-2 were heard (offsets 1..3); 3 and 4 were dropped from the queue unplayed.
    assert (final.played_ms, final.text_offset, final.interrupted) == (60, 3, True)


class GatedSink(QueueSink):
    """The track's queue is full: a write waits until ``gate`` opens (then the frame is queued)."""

    def __init__(self, vt: VirtualTime, held: int) -> None:
        super().__init__(vt, held)
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = asyncio.Event()

    async def write(self, pcm: bytes) -> None:
        if not self.gate.is_set():
            self.waiting.set()
            await self.gate.wait()
        await super().write(pcm)


async def test_a_pause_during_a_write_keeps_every_frame_in_order() -> None:
    h = Harness()
    h.sink = GatedSink(h.vt, held=2)
    h.playout.sink = h.sink
    h.push_turn(1, 10)
    h.vt.at(0.09, h.sink.gate.clear)  # frame 5's write will block
    h.start()
    await asyncio.wait_for(h.sink.waiting.wait(), 5)
    h.playout.pause()  # while frame 5 waits to be queued
    h.sink.gate.set()
    await settle()
    # Frame 5 was queued after the pause began; it and frame 4 were taken back, in order.
    assert h.sink.frames() == [frame(1, n) for n in range(4)]
    assert h.sink.cleared == [frame(1, 4), frame(1, 5)]
    h.playout.resume()
    (final,) = await h.finals(1)
    assert h.sink.frames() == [frame(1, n) for n in range(10)]
    assert final.text_offset == 10 and not final.interrupted
    await h.close()


async def test_a_held_turn_waits_for_its_release_and_then_plays_whole(h: Harness) -> None:
    h.playout.hold(1)
    h.start()
    h.push_turn(1, 5)                  # a draft, all ready
    await settle()
    h.vt.now = 0.3                     # its final comes 300 ms later
    assert h.sink.writes == [] and not h.reports
    h.playout.release(1)
    (final,) = await h.finals(1)
    assert h.sink.frames() == [frame(1, n) for n in range(5)]
    assert h.sink.times()[0] == pytest.approx(0.3)  # at once, from what was ready
    assert final.played_ms == 100 and not final.interrupted


async def test_a_held_turn_that_is_cancelled_never_reaches_the_sink(h: Harness) -> None:
    h.playout.hold(1)
    h.start()
    h.push_turn(1, 5)
    await settle()
    h.playout.cancel(1)
    h.playout.release(1)
    h.push_turn(1, 2)                  # stragglers of the dropped draft
    h.push_turn(2, 2)                  # the turn that carries its words on
    finals = await h.finals(2)
    assert [(r.turn, r.played_ms, r.interrupted) for r in finals] == [(1, 0, True),
                                                                      (2, 40, False)]
    assert h.sink.frames() == [frame(2, 0), frame(2, 1)]


async def test_a_lead_writes_ahead_of_real_time_and_a_late_frame_within_it_is_no_underrun() -> None:
    h = Harness(lead_ms=40)
    h.push_turn(1, 3, finish=False)
    # The next frames come at 50 ms: after the written ones would have run out at real time
    # (40 ms), but before the track has played what was written ahead (60 ms).
    h.vt.at(0.05, lambda: h.push_turn(1, 2, finish=True, first=3))
    h.start()
    (final,) = await h.finals(1)
    assert h.sink.frames() == [frame(1, n) for n in range(5)]
    # The first 40 ms (and the frame due as they run out) go at once, the rest when it comes.
    assert h.sink.times() == pytest.approx([0.0, 0.0, 0.0, 0.06, 0.06])
    assert final.underruns == 0 and final.played_ms == 100
    await h.close()


async def test_the_phone_sink_sends_whole_20_ms_frames_at_the_calls_rate() -> None:
    sent: list[tuple[bytes, int]] = []

    async def publish(pcm: bytes, pts_ms: int) -> None:
        sent.append((pcm, pts_ms))

    sink = PhoneSink(publish, 22050, 8000)
    for _ in range(10):  # 200 ms of Piper's rate, in 20 ms writes
        await sink.write(bytes(22050 * 2 // 50))
    await sink.end_turn()  # the resampler's tail, then padding to a whole frame
    assert {len(pcm) for pcm, _ in sent} == {320}
    assert [pts for _, pts in sent] == list(range(0, 20 * len(sent), 20))
    assert 10 <= len(sent) <= 11 and not sink.pending
    # At the call's own rate (no resampler): 10 ms is held back until a frame is whole, and a
    # barge-in drops it, saying how much (in samples).
    narrow, before = PhoneSink(publish, 8000, 8000), len(sent)
    await narrow.write(bytes(160))
    assert len(sent) == before
    assert narrow.clear() == 80 and not narrow.pending
