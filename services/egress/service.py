"""Egress stage: TTS frames in, real-time playout into a sink, ``Playback`` progress out.

For a session with a room, the sink is the agent participant's audio track, and egress also
speaks for the agent in the room: transcripts of both sides and the agent's state (see
``agent.py``). Otherwise the sink is a WAV file (``SessionStart.wav_out``) or nothing. A
``Cancel`` stops playout at once, and nothing of a cancelled turn plays afterwards.

Egress is where barge-in is decided (``floor.py``): it hears the user's speech edges and
transcripts, pauses the agent's voice the moment the user speaks over it, and either resumes
or cuts the reply and publishes the ``Cancel``.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import ClassVar

from proto import events as ev
from proto import subjects as sj
from services.egress.agent import AgentParticipant, TrackSink, Transcripts
from services.egress.floor import Floor
from services.egress.playout import NullSink, Playout, PlayoutReport, Sink, WavSink
from services.runtime import metrics
from services.runtime.bus import SeqGaps
from services.runtime.config import audio_file
from services.runtime.livekit import LiveKitConfig
from services.runtime.service import SessionWorker, StageService


class EgressConfig(LiveKitConfig, frozen=True, kw_only=True):
    # Audio buffered before a turn starts playing: absorbs jitter between TTS frames.
    egress_prebuffer_ms: int = 40
    # How often Playback progress is published while the agent speaks.
    egress_progress_ms: int = 250
    # Audio the agent's LiveKit track may hold ahead of real time (dropped at once on cancel).
    egress_track_queue_ms: int = 100


# Seconds after the user's speech ended that a reply paused by it waits for the final's verdict.
PAUSE_VERDICT_TIMEOUT_S = 5.0


class EgressWorker(SessionWorker[EgressConfig]):
    async def start(self) -> None:
        self.playout: Playout | None = None
        self.wav_out = ""
        self.gaps = SeqGaps()
        self.dropped = 0
        self.agent: AgentParticipant | None = None
        self.transcripts: Transcripts | None = None
        self.speaking: set[int] = set()
        self.words: dict[int, list[ev.WordMark]] = {}  # per turn, from SpeechDone
        start = self.start_event
        if start.room and not start.wav_out:
            self.agent = AgentParticipant(self.config, start.room,
                                          queue_ms=self.config.egress_track_queue_ms)
            self.transcripts = Transcripts(self.agent)
        # A handed-over session has had its greeting (or the user is past it).
        self.floor = Floor(self.config.turn_rules(), self,
                           greeting=bool(self.agent and start.greeting and not start.handover))
        self.cut_upto = -1  # replies cut by barge-in: their late frames never play
        self.vad_timer: asyncio.TimerHandle | None = None
        await self.subscribe(sj.producer_all(self.session, "tts"), self.on_tts)
        await self.subscribe(sj.INGRESS_VAD.subject(self.session), self.on_vad)
        await self.subscribe(sj.producer_all(self.session, "stt"), self.on_transcript)
        await self.subscribe(sj.producer_all(self.session, "llm"), self.on_reply)
        if self.agent is not None:
            await self.subscribe(sj.INGRESS_TRACK.subject(self.session), self.on_input_track)

    async def begin(self) -> None:
        self.wav_out = ""
        if self.agent is not None:
            self.spawn(self.join_room(self.agent), "agent")
        elif self.start_event.wav_out:
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
            if self.agent is not None:
                sink = TrackSink(self.agent, sample_rate)
            self.playout = Playout(
                sink, sample_rate, prebuffer_ms=self.config.egress_prebuffer_ms,
                progress_ms=self.config.egress_progress_ms, on_progress=self.on_progress,
            )
            if self.floor.paused:
                self.playout.pause()
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
        if frame.turn <= self.cut_upto:
            return  # a straggler of a reply the user interrupted
        playout = self._playout_for(frame.sample_rate)
        if frame.sample_rate != playout.sample_rate:
            self.bus.reject("rate_change", f"{frame.sample_rate} Hz on a {playout.sample_rate} Hz "
                            "output", sj.TTS_AUDIO.subject(self.session))
            return
        self.idle.clear()
        playout.push(frame.turn, frame.pcm, frame.text_offset)

    def on_done(self, done: ev.SpeechDone) -> None:
        if done.words:
            self.words[done.turn] = done.words
        if done.frames == 0 or self.playout is None:
            # Nothing to play (an empty, failed or cut reply): the turn is over for the user
            # too, and the agent listens again.
            cut = done.interrupted or done.turn <= self.cut_upto
            self.on_progress(PlayoutReport(done.turn, 0, 0, True, cut, 0))
            return
        self.playout.finish(done.turn)

    async def on_cancel(self, cancel: ev.Cancel) -> None:
        self.cut_upto = max(self.cut_upto, cancel.turn)
        if self.playout is not None:
            cut = self.playout.cancel(cancel.turn)
            if cut is not None and isinstance(self.playout.sink, TrackSink):
                self.playout.sink.clear()  # what the track still holds must not play either

    def on_progress(self, report: PlayoutReport) -> None:
        if report.final:
            self.speaking.discard(report.turn)
            self.floor.played(report.turn)
        elif report.turn not in self.speaking:
            self.speaking.add(report.turn)
            self.floor.playing(report.turn)
        self.spawn(self._publish(report), f"progress-{report.turn}")

    # ---- turn-taking (FloorActions) -------------------------------------------------------------

    def on_vad(self, event: ev.Event) -> None:
        if self.vad_timer is not None:
            self.vad_timer.cancel()
            self.vad_timer = None
        if isinstance(event, ev.SpeechStarted):
            self.floor.speech_started(time.monotonic())
            # Duration alone may decide (VOICEBUS_INTERRUPT_MIN_WORDS=0): judge again then.
            self.vad_timer = asyncio.get_running_loop().call_later(
                self.floor.rules.min_speech_ms / 1000, self._speech_long_enough)
        elif isinstance(event, ev.SpeechEnded):
            self.floor.speech_ended()
            # The final normally comes within the STT's end-of-turn hold; if it never does,
            # a paused reply must not stay paused for ever.
            self.vad_timer = asyncio.get_running_loop().call_later(
                PAUSE_VERDICT_TIMEOUT_S, self.floor.give_up_pause)

    def _speech_long_enough(self) -> None:
        self.vad_timer = None
        self.floor.check(time.monotonic())

    def pause(self) -> None:
        if self.playout is not None:
            self.playout.pause()

    def resume(self) -> None:
        if self.playout is not None:
            self.playout.resume()

    def interrupt(self, turn: int) -> None:
        self.cut_upto = max(self.cut_upto, turn)
        if self.playout is not None:
            self.playout.cancel(turn)
            clear = getattr(self.playout.sink, "clear", None)
            if clear is not None:
                clear()  # not paused first (the user spoke before the reply began): drop it now
        self.log.info("barge-in: reply %d cut", turn)
        self.spawn(self.emit(sj.CTL_CANCEL, ev.Cancel, turn=turn, reason="barge-in"), "cancel")

    def show(self, state: ev.AgentStateName, turn: int) -> None:
        """The agent's state for LiveKit's front-ends (attribute) and for the bus."""
        if self.agent is None:
            return
        self.agent.set_state(state)
        self.spawn(self.emit(sj.CTL_STATE, ev.AgentState, state=state, turn=turn), "state")

    # ---- the agent in the room ------------------------------------------------------------------

    async def join_room(self, agent: AgentParticipant) -> None:
        try:
            await agent.start()
        except Exception as exc:  # unreachable server, refused publish…: say so on the bus
            self.log.error("%s", exc)
            await self.emit(sj.ERROR["egress"], ev.StageError, stage="egress",
                            message=str(exc), retryable=True)
            return
        self.floor.refresh()  # "initializing", unless the user's microphone is heard already

    def on_input_track(self, track: ev.InputTrack) -> None:
        assert self.transcripts is not None
        if track.active:
            self.transcripts.user_identity = track.participant
            self.transcripts.user_track = track.track_sid
        self.floor.user_track(track.active)

    def on_transcript(self, event: ev.Event) -> None:
        if not isinstance(event, ev.Transcript):
            return
        if event.text and self.transcripts is not None:
            self.transcripts.user(event.turn, event.text, event.final)
        if event.final:
            self.floor.final_transcript(event.turn, event.text, event.speech_ms, event.idle)
        else:
            self.floor.partial_transcript(event.turn, event.text, time.monotonic())

    def on_reply(self, event: ev.Event) -> None:
        if isinstance(event, ev.ReplyDelta) and event.text:
            self.floor.reply_text(event.turn)
            if self.transcripts is not None:
                self.transcripts.agent_delta(event.turn, event.text)
        elif isinstance(event, ev.ReplyDone):
            if event.text and not event.ignored:
                self.floor.reply_text(event.turn)
            if self.transcripts is not None and not event.ignored:
                self.transcripts.agent_done(event.turn, event.text)

    async def _publish(self, report: PlayoutReport) -> None:
        dropped = 0
        # Timed words, when the TTS gave them, say exactly what was heard.
        heard = ev.heard_offset(report.played_ms, self.words.get(report.turn, []),
                                report.text_offset)
        if report.final:
            dropped, self.dropped = self.dropped, 0
            self.words.pop(report.turn, None)
            if self.playout is None or not self.playout.busy:
                self.idle.set()  # a handover now loses nothing still to be played
        await self.emit(sj.EGRESS_PLAYBACK, ev.Playback, turn=report.turn,
                        played_ms=report.played_ms, text_offset=heard,
                        final=report.final, interrupted=report.interrupted,
                        frames_dropped=dropped, underruns=report.underruns)

    async def stop(self) -> None:
        if self.vad_timer is not None:
            self.vad_timer.cancel()
        if self.playout is not None:
            await self.playout.aclose()
        if self.agent is not None:
            await self.agent.aclose()


class EgressService(StageService[EgressConfig]):
    stage: ClassVar[str] = "egress"
    Config = EgressConfig
    Worker = EgressWorker
