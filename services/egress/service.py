"""Egress stage: TTS frames in, real-time playout into a sink, ``Playback`` progress out.

The sink is a WAV file (``SessionStart.wav_out``) or nothing; the LiveKit track plugs in here
too. A ``Cancel`` stops playout at once, and nothing of a cancelled turn plays afterwards.
"""

from __future__ import annotations

import os
from typing import ClassVar

from proto import events as ev
from proto import subjects as sj
from services.egress.playout import NullSink, Playout, PlayoutReport, Sink, WavSink
from services.runtime import metrics
from services.runtime.bus import SeqGaps
from services.runtime.config import BaseConfig, audio_file
from services.runtime.service import SessionWorker, StageService



class EgressConfig(BaseConfig, frozen=True, kw_only=True):
    # Audio buffered before a turn starts playing: absorbs jitter between TTS frames.
    egress_prebuffer_ms: int = 40
    # How often Playback progress is published while the agent speaks.
    egress_progress_ms: int = 250


class EgressWorker(SessionWorker[EgressConfig]):
    async def start(self) -> None:
        self.playout: Playout | None = None
        self.wav_out = ""
        self.gaps = SeqGaps()
        self.dropped = 0
        await self.subscribe(sj.producer_all(self.session, "tts"), self.on_tts)

    async def begin(self) -> None:
        self.wav_out = ""
        if self.start_event.wav_out:
            try:
                self.wav_out = audio_file(self.start_event.wav_out, self.config.audio_dir)
                if not os.access(os.path.dirname(self.wav_out), os.W_OK):
                    raise ValueError(f"cannot write to {os.path.dirname(self.wav_out)}")
            except ValueError as exc:
                self.log.error("not recording the reply: %s", exc)
                await self.emit(sj.ERROR["egress"], ev.StageError, stage="egress",
                                message=str(exc), retryable=False)

    def _playout_for(self, sample_rate: int) -> Playout:
        if self.playout is None:
            path = self.wav_out
            sink: Sink = WavSink(path, sample_rate) if path else NullSink()
            self.playout = Playout(
                sink, sample_rate, prebuffer_ms=self.config.egress_prebuffer_ms,
                progress_ms=self.config.egress_progress_ms, on_progress=self.on_progress,
            )
            self.spawn(self.playout.run(), "playout")
        return self.playout

    def on_tts(self, event: ev.Event) -> None:
        if lost := self.gaps.lost(event):
            self.dropped += lost
            metrics.FRAMES_DROPPED.labels("egress").inc(lost)
        if isinstance(event, ev.AudioFrame):
            self.on_frame(event)
        elif isinstance(event, ev.SpeechDone):
            self.on_done(event)

    def on_frame(self, frame: ev.AudioFrame) -> None:
        if problem := ev.frame_problem(frame):
            self.bus.reject("bad_audio", problem, sj.TTS_AUDIO.subject(self.session))
            return
        playout = self._playout_for(frame.sample_rate)
        if frame.sample_rate != playout.sample_rate:
            self.bus.reject("rate_change", f"{frame.sample_rate} Hz on a {playout.sample_rate} Hz "
                            "output", sj.TTS_AUDIO.subject(self.session))
            return
        self.idle.clear()
        playout.push(frame.turn, frame.pcm, frame.text_offset)

    def on_done(self, done: ev.SpeechDone) -> None:
        if done.frames == 0 or self.playout is None:
            # Nothing to play (an empty or failed reply): the turn is over for the user too.
            self.spawn(self._publish(PlayoutReport(done.turn, 0, 0, True, done.interrupted, 0)),
                       f"done-{done.turn}")
            return
        self.playout.finish(done.turn)

    async def on_cancel(self, cancel: ev.Cancel) -> None:
        if self.playout is not None:
            self.playout.cancel(cancel.turn)

    def on_progress(self, report: PlayoutReport) -> None:
        self.spawn(self._publish(report), f"progress-{report.turn}")

    async def _publish(self, report: PlayoutReport) -> None:
        dropped = 0
        if report.final:
            dropped, self.dropped = self.dropped, 0
            self.idle.set()
        await self.emit(sj.EGRESS_PLAYBACK, ev.Playback, turn=report.turn,
                        played_ms=report.played_ms, text_offset=report.text_offset,
                        final=report.final, interrupted=report.interrupted,
                        frames_dropped=dropped, underruns=report.underruns)

    async def stop(self) -> None:
        if self.playout is not None:
            await self.playout.aclose()


class EgressService(StageService[EgressConfig]):
    stage: ClassVar[str] = "egress"
    Config = EgressConfig
    Worker = EgressWorker
