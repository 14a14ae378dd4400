"""Egress stage: TTS frames in, real-time playout into a sink, ``Playback`` progress out; and
the one judge of turn-taking (``floor.py``).

For a session with a room, the sink is the agent participant's audio track, and egress also
speaks for the agent in the room: transcripts of both sides and the agent's state (see
``agent.py``). For a development file session the sink is a WAV file; otherwise nothing.

The judge hears the user's speech edges, transcripts and user-idle turns, pauses the agent's
voice the moment the user speaks over it, and publishes its decisions as the ``floor``
producer: verdicts, cancels, the agent's state and the end of a session after a goodbye.
Nothing of a cut turn plays afterwards.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import os
import time
from typing import ClassVar

import msgspec

from proto import events as ev
from proto import subjects as sj
from services.egress.agent import AgentParticipant, TrackSink, Transcripts
from services.egress.floor import Floor
from services.egress.playout import NullSink, PhoneSink, Playout, PlayoutReport, Sink, WavSink
from services.egress.presence import Presence
from services.egress.traces import TurnTraces
from services.runtime import metrics
from services.runtime.audio import frame_problem
from services.runtime.bus import SeqGaps
from services.runtime.config import audio_file
from services.runtime.ledger import RECORD_CODEC, FloorRecord, TurnLedger, aged, floor_key
from services.runtime.livekit import LiveKitConfig
from services.runtime.service import SessionWorker, StageService
from services.runtime.turns import DEFAULT_BACKCHANNEL, Addressing, AnswerMode, TurnRules


class EgressConfig(LiveKitConfig, frozen=True, kw_only=True):
    # Audio buffered before a turn starts playing: absorbs jitter between TTS frames.
    egress_prebuffer_ms: int = 40
    # How often Playback progress is published while the agent speaks.
    egress_progress_ms: int = 250
    # Audio the agent's LiveKit track may hold ahead of real time (dropped at once on cancel).
    egress_track_queue_ms: int = 100
    # How far ahead of real time playout writes into the track (its queue holds that much): a
    # wake-up of the playout loop that comes late, on a busy machine, does not starve the
    # track, whose underrun would make the listener's jitter buffer grow for good.
    egress_lead_ms: int = 40
    # User-idle turns in a row answered with a re-prompt; the next one gets the goodbye.
    idle_prompts: int = 1
    # Seconds the agent may stay "thinking": from a verdict it speaks to the first word of the
    # reply from TTS. Past it the reply is given up (lost on the bus, a stage gone quiet) and
    # the agent listens again, so the next question is answered. 0: wait for ever.
    egress_reply_timeout: float = 20.0
    # Turn-taking (services/runtime/turns.py), the judge's alone. The user's speech over the
    # agent's reply interrupts it only after this long…
    interrupt_min_speech_ms: int = 200
    # …and with at least this many words that are not backchannel (0: duration alone).
    interrupt_min_words: int = 1
    # Comma-separated words and two-word phrases that never interrupt ("go on", "uh-huh").
    backchannel_words: str = DEFAULT_BACKCHANNEL
    # Seconds a session waits for its first user to join the room ("nobody joined")…
    session_join_grace: float = 60.0
    # …and for a user to be back after the last one left ("room empty": a reload, a blip).
    session_empty_grace: float = 10.0
    # A meeting (ingress's VOICEBUS_LISTEN=everyone): answer every speaker's turns
    # ("everyone"), or only those that name the agent and the follow-ups of the person it has
    # just answered ("addressed"; docs/turn-taking.md).
    answer: AnswerMode = "everyone"
    # What people call the agent: comma-separated names ("Nova, hey nova").
    agent_name: str = "agent"
    # Seconds after a reply to someone during which they may go on without naming the agent.
    answer_follow_up_s: float = 8.0

    def turn_rules(self) -> TurnRules:
        return TurnRules.parse(self.interrupt_min_speech_ms, self.interrupt_min_words,
                               self.backchannel_words)

    def addressing(self) -> Addressing:
        return Addressing(self.answer, self.agent_name, self.answer_follow_up_s)


# Seconds after the user's speech ended that a reply paused by it waits for the final's verdict.
PAUSE_VERDICT_TIMEOUT_S = 5.0
# Frames of a reply remembered for its transcript: more than the track ever queues (2.5 s).
WRITTEN_KEPT = 128


def _end_ms(mark: ev.WordMark) -> int:
    return mark.end_ms


def heard_offset(played_ms: int, marks: list[ev.WordMark], estimate: int) -> int:
    """How much of a reply was heard after ``played_ms`` of its audio: up to the last word that
    ended by then, when the words were timed that far; else ``estimate`` (the frames' offset)."""
    if not marks or played_ms > marks[-1].end_ms:
        return estimate
    index = bisect.bisect_right(marks, played_ms, key=_end_ms)  # per frame: no list built
    return marks[index - 1].text_end if index else 0


# The stages the agent speaks through, and how long a greeting waits for them at most.
SPEAKERS = frozenset({"llm", "tts"})
SPEAKERS_WAIT_S = 2.0


class EgressWorker(SessionWorker[EgressConfig]):
    async def subscribe_inputs(self) -> None:
        self.playout: Playout | None = None
        self.wav_out = ""
        self.gaps = SeqGaps()
        self.dropped = 0
        self.agent: AgentParticipant | None = None
        self.transcripts: Transcripts | None = None
        self.speaking: set[int] = set()
        self.words: dict[int, list[ev.WordMark]] = {}  # per turn, from SynthesisDone
        # Drafts whose reply had nothing to play: they end once their final confirms them.
        self.silent_drafts: dict[int, PlayoutReport] = {}
        # Per turn being played: (ms written, text offset) of its last frames (transcripts).
        self._written: dict[int, collections.deque[tuple[int, int]]] = {}
        self.unsaved: FloorRecord | None = None
        self.saver: asyncio.Task[None] | None = None
        self.turns = TurnTraces()
        record = aged(await self.load_floor(), time.time_ns() // 1_000_000)
        self.ledger = TurnLedger.from_record(record)
        start = self.start_event
        # A user was here if the judge ever decided a turn (its record, from a replica that
        # died: the agent listens only once a user's microphone is heard): then an empty room
        # is a departure, not a session nobody joined.
        self.presence = Presence(self.config.session_join_grace, self.config.session_empty_grace,
                                 self.end_session, seen=record.judged >= 0)
        if start.room and not isinstance(start, ev.FileSessionStart):
            # A room the agent cannot rejoin (livekit-server gone) for as long as a session
            # waits for its first user is a session nobody can be in: it ends.
            self.agent = AgentParticipant(self.config, start.room,
                                          queue_ms=self.config.egress_track_queue_ms,
                                          on_users=self.presence.update,
                                          on_gone=self.end_session,
                                          give_up_after=self.config.session_join_grace)
            self.transcripts = Transcripts(self.agent)
        # A session without a room greets too when its start asks (a replay of a call): the
        # microphone's InputTrack is the cue, as in a room.
        # A fresh session greets only once the LLM and TTS have claimed it; a session taken
        # over from another replica had them long ago.
        self.speakers_ready: set[str] = set()
        self.floor = Floor(self.config.turn_rules(), self, self.ledger,
                           greeting=bool(start.greeting),
                           idle_prompts=self.config.idle_prompts, record=record,
                           ready=record != FloorRecord(),
                           addressing=self.config.addressing(), now=time.monotonic())
        self.ready_timer: asyncio.TimerHandle | None = None
        self.vad_timer: asyncio.TimerHandle | None = None
        # The watchdog on a reply that never comes, and the newest turn TTS said anything of.
        self.reply_timer: asyncio.TimerHandle | None = None
        self.tts_turn = -1
        for subject in (sj.producer_all(self.session, "tts"), sj.INGRESS_VAD.subject(self.session),
                        sj.producer_all(self.session, "stt"), sj.producer_all(self.session, "llm")):
            await self.subscribe(subject, self.handle)
        await self.subscribe(sj.INGRESS_TRACK.subject(self.session), self.handle)
        await self.subscribe(sj.INGRESS_TEXT.subject(self.session), self.handle)

    async def on_claimed(self) -> None:
        self.wav_out = ""
        if not self.floor.ready:
            self.spawn(self._speakers_claimed(), "speakers")
        if self.agent is not None:
            self.spawn(self.join_room(self.agent), "agent")
        elif isinstance(self.start_event, ev.FileSessionStart) and self.start_event.wav_out:
            try:
                self.wav_out = audio_file(self.start_event.wav_out, self.config.audio_dir)
                if not os.access(os.path.dirname(self.wav_out), os.W_OK):
                    raise ValueError(f"cannot write to {os.path.dirname(self.wav_out)}")
            except ValueError as exc:
                await self.stage_error(f"not recording the reply: {exc}", retryable=False)

    def handle(self, event: ev.Event) -> None:
        match event:
            case ev.AudioFrame() | ev.SynthesisDone():
                self.on_tts(event)
            case ev.SpeechStarted() | ev.SpeechEnded():
                self.on_vad(event)
            case ev.Transcript(final=True):
                self._show_user(event)
                self.turns.final(event.turn)
                self.floor.final_transcript(event.turn, event.text, event.speech_ms,
                                            continued=event.continued, typed=event.typed,
                                            speaker=event.speaker, now=time.monotonic())
            case ev.Transcript(settled=True):
                self._show_user(event)
                self.floor.settled_transcript(event.turn, event.text, event.speaker,
                                              time.monotonic())
            case ev.Transcript():
                self._show_user(event)
                self.floor.partial_transcript(event.text, time.monotonic())
            case ev.UserIdle():
                self.floor.user_idle(event.turn, event.count)
            case ev.ReplyDelta() if self.transcripts is not None and event.text:
                self.transcripts.agent_text(event.turn, event.text)
            case ev.ReplyDone():
                if event.end_call:
                    self.floor.end_call(event.turn)
                if self.transcripts is not None:
                    self.transcripts.agent_text(event.turn, event.text, whole=True)
            case ev.InputTrack():
                self.on_input_track(event)
            case ev.StageReady(stage=stage) if stage in SPEAKERS:
                self.speakers_ready.add(stage)
                if self.speakers_ready >= SPEAKERS:
                    self.floor.agent_ready()
            case ev.UserText(participant=participant) if self.transcripts is not None \
                    and participant:
                # Ingress passes on only the messages of users it hears: the transcripts go to
                # whoever typed, with a microphone or without one.
                self.transcripts.hear(participant, meeting=bool(event.speaker))

    # ---- the agent's voice ----------------------------------------------------------------------

    def _playout_for(self, sample_rate: int) -> Playout:
        if self.playout is None:
            path = self.wav_out
            sink: Sink = WavSink(path, sample_rate) if path else NullSink()
            if self.agent is not None:
                sink = TrackSink(self.agent, sample_rate)
            elif isinstance(self.start_event, ev.PhoneSessionStart):
                sink = PhoneSink(self._to_phone, sample_rate, self.start_event.sample_rate)
            self.playout = Playout(
                sink, sample_rate, prebuffer_ms=self.config.egress_prebuffer_ms,
                progress_ms=self.config.egress_progress_ms, on_progress=self.on_progress,
                lead_ms=self.config.egress_lead_ms if self.agent is not None else 0,
                on_played=self.on_played if self.transcripts is not None else None,
            )
            if self.floor.paused:
                self.playout.pause()
            if self.floor.drafting is not None:
                self.playout.hold(self.floor.drafting[0])
            self.spawn(self.playout.run(), "playout")
        return self.playout

    async def _to_phone(self, pcm: bytes, pts_ms: int) -> None:
        """The agent's voice to the SIP gateway, one 20 ms frame at the call's rate."""
        assert isinstance(self.start_event, ev.PhoneSessionStart)
        await self.emit(sj.EGRESS_AUDIO, ev.AudioFrame, pcm=pcm, pts_ms=pts_ms,
                        sample_rate=self.start_event.sample_rate)

    def on_tts(self, event: ev.AudioFrame | ev.SynthesisDone) -> None:
        self.tts_turn = max(self.tts_turn, event.turn)
        if lost := self.gaps.lost(event):
            self.dropped += lost
            metrics.FRAMES_DROPPED.labels("egress").inc(lost)
        if isinstance(event, ev.AudioFrame):
            self.on_frame(event)
        else:
            self.on_done(event)

    def on_frame(self, frame: ev.AudioFrame) -> None:
        if problem := frame_problem(frame):
            self.bus.reject("bad_audio", problem, sj.TTS_AUDIO.subject(self.session))
            return
        if not self.ledger.begin(frame.turn):
            return  # a straggler of a reply that was cut, ignored or overtaken
        self.turns.first_audio(frame.turn)
        playout = self._playout_for(frame.sample_rate)
        if frame.sample_rate != playout.sample_rate:
            self.bus.reject("rate_change", f"{frame.sample_rate} Hz on a {playout.sample_rate} Hz "
                            "output", sj.TTS_AUDIO.subject(self.session))
            return
        playout.push(frame.turn, frame.pcm, frame.text_offset)

    def on_done(self, done: ev.SynthesisDone) -> None:
        if done.turn <= self.ledger.newest and not self.ledger.is_open(done.turn):
            return  # over already (played, or cut): a repeat from a replica that took over
        if done.words:
            self.words[done.turn] = done.words
        if self.playout is None or not self.playout.has(done.turn):
            # Nothing to play (an empty, failed or cut reply): the turn is over for the user
            # too, and the agent listens again; for a draft, once its final confirms it.
            cut = done.interrupted or self.ledger.is_cut(done.turn)
            report = PlayoutReport(done.turn, 0, 0, True, cut, 0)
            if self._drafted(done.turn) and not cut:
                self.silent_drafts[done.turn] = report
            else:
                self.on_progress(report)
            return
        self.playout.finish(done.turn)

    def on_played(self, turn: int, played_ms: int, estimate: int) -> None:
        """A frame of reply ``turn`` went into the track: its transcript grows by the words
        the user has heard, which are behind what was written by what the track has queued."""
        assert self.transcripts is not None and self.agent is not None
        written = self._written.setdefault(turn, collections.deque(maxlen=WRITTEN_KEPT))
        written.append((played_ms, estimate))
        audible = played_ms - round(self.agent.source.queued_duration * 1000)
        offset = next((o for ms, o in reversed(written) if ms <= audible), 0)
        self.transcripts.agent_heard(turn, heard_offset(audible, self.words.get(turn, []),
                                                        offset))

    def on_progress(self, report: PlayoutReport) -> None:
        if report.final:
            if self.transcripts is not None:
                self._written.pop(report.turn, None)
                heard = heard_offset(report.played_ms, self.words.get(report.turn, []),
                                     report.text_offset)
                # Nothing played (an empty or failed reply): nothing was heard either.
                self.transcripts.agent_played(report.turn, heard,
                                              report.interrupted or not report.played_ms)
            self.speaking.discard(report.turn)
            self.floor.played(report.turn, report.interrupted, time.monotonic())
            self.turns.forget(report.turn)
        elif report.turn not in self.speaking:
            self.speaking.add(report.turn)
            self.turns.playing(self.session, report.turn)
            self.floor.playing(report.turn)
        self.spawn(self._publish(report), f"progress-{report.turn}")

    async def _publish(self, report: PlayoutReport) -> None:
        dropped = 0
        # Timed words, when the TTS gave them, say exactly what was heard.
        heard = heard_offset(report.played_ms, self.words.get(report.turn, []), report.text_offset)
        if report.final:
            dropped, self.dropped = self.dropped, 0
            self.words.pop(report.turn, None)
        await self.emit(sj.EGRESS_PLAYBACK, ev.Playback, turn=report.turn,
                        played_ms=report.played_ms, text_offset=heard,
                        final=report.final, interrupted=report.interrupted,
                        frames_dropped=dropped, underruns=report.underruns)
        if report.final:
            # Closed once it is said: a handover after this loses nothing still to be played.
            self.ledger.close(report.turn)

    # ---- turn-taking: the user's side -----------------------------------------------------------

    def on_vad(self, event: ev.SpeechStarted | ev.SpeechEnded) -> None:
        if self.vad_timer is not None:
            self.vad_timer.cancel()
            self.vad_timer = None
        loop = asyncio.get_running_loop()
        self.turns.vad(event)
        if isinstance(event, ev.SpeechStarted):
            self.floor.speech_started(time.monotonic(), event.speaker)
            # Duration alone may decide (VOICEBUS_INTERRUPT_MIN_WORDS=0): judge again then.
            self.vad_timer = loop.call_later(self.floor.rules.min_speech_ms / 1000,
                                             self._speech_long_enough)
        else:
            self.floor.speech_ended(event.speaker)
            # The final normally comes within the STT's end-of-turn hold; if it never does,
            # a paused reply must not stay paused for ever.
            self.vad_timer = loop.call_later(PAUSE_VERDICT_TIMEOUT_S, self.floor.give_up_pause)

    def _speech_long_enough(self) -> None:
        self.vad_timer = None
        self.floor.check(time.monotonic())

    def _show_user(self, transcript: ev.Transcript) -> None:
        if self.transcripts is None:
            return
        if transcript.continued:
            # Its words go on in the next turn: one segment for both, final at the next's end.
            self.transcripts.user_continues(transcript.turn)
        elif transcript.text:
            self.transcripts.user(transcript.turn, transcript.text, transcript.final,
                                  transcript.speaker)

    async def _speakers_claimed(self) -> None:
        """The LLM and TTS may have claimed the session before this replica subscribed (their
        StageReady then passed unheard): a held lease says so, as a stage subscribes before it
        takes the lease."""
        for stage in SPEAKERS - self.speakers_ready:
            if await self.service.leases.holder(stage, self.session) is not None:
                self.speakers_ready.add(stage)
        if self.speakers_ready >= SPEAKERS:
            self.floor.agent_ready()

    def on_input_track(self, track: ev.InputTrack) -> None:
        if track.active and self.transcripts is not None:
            self.transcripts.hear(track.participant, track.track_sid, meeting=bool(track.speaker))
            if track.speaker and self.agent is not None:
                self.agent.mark_meeting()
        self.floor.user_track(track.active)
        if not track.active and track.speaker and track.speaker in self.floor.speakers:
            # In a meeting a microphone that went away mid-sentence ends that speaker's speech
            # (no SpeechEnded may come for it: their ingress replica may have gone too).
            self.floor.speech_ended(track.speaker)
        if track.active and not self.floor.ready and self.ready_timer is None:
            # Should a StageReady never come (published before this replica subscribed), the
            # greeting goes anyway after a while rather than never.
            self.ready_timer = asyncio.get_running_loop().call_later(
                SPEAKERS_WAIT_S, self.floor.agent_ready)

    # ---- what the judge asks (FloorActions) -----------------------------------------------------

    def pause(self) -> None:
        if self.playout is not None:
            self.playout.pause()

    def resume(self) -> None:
        if self.playout is not None:
            self.playout.resume()

    def interrupt(self, turn: int, reason: str = "barge-in") -> None:
        if self.playout is not None:
            self.playout.cancel(turn)
            clear = getattr(self.playout.sink, "clear", None)
            if clear is not None:
                clear()  # not paused first (the user spoke before the reply began): drop it now
        self.log.info("%s: reply %d cut", reason, turn)
        trace = self.turns.interrupted(self.session, turn, reason)
        self.spawn(self.emit(sj.FLOOR_CANCEL, ev.Cancel, turn=turn, reason=reason, trace=trace),
                   "cancel")

    def draft(self, turn: int, text: str, speaker: str = "") -> None:
        if self.playout is not None:
            self.playout.hold(turn)
        metrics.DRAFTS.labels("prepared").inc()
        self.spawn(self.emit(sj.FLOOR_VERDICT, ev.Verdict, turn=turn, action="answer", text=text,
                             draft=True, speaker=speaker), f"draft-{turn}")

    def withdraw(self, turn: int, reason: str) -> None:
        """Nothing of the draft was heard: its audio goes, the track keeps what it plays."""
        self.silent_drafts.pop(turn, None)
        if self.playout is not None:
            self.playout.cancel(turn)
            self.playout.release(turn)
        metrics.DRAFTS.labels("dropped").inc()
        self.log.debug("draft %d dropped: %s", turn, reason)
        self.spawn(self.emit(sj.FLOOR_CANCEL, ev.Cancel, turn=turn, reason=reason), "cancel")

    def _drafted(self, turn: int) -> bool:
        """Reply ``turn`` is a draft its final has not confirmed yet."""
        return self.floor.drafting is not None and self.floor.drafting[0] == turn

    def verdict(self, turn: int, action: ev.VerdictAction, text: str, reason: str,
                speaker: str = "") -> None:
        if self.playout is not None:
            self.playout.release(turn)  # a confirmed draft plays from what is ready
        if (silent := self.silent_drafts.pop(turn, None)) is not None:
            self.on_progress(silent)
        if reason == "out of reach":
            metrics.REJECTED.labels("egress", "turn_out_of_reach").inc()
            self.log.warning("turn %d is out of reach of the last one judged (%d): ignored",
                             turn, self.ledger.newest)
        trace = self.turns.judged(self.session, turn, action)
        if action != "ignore" and self.config.egress_reply_timeout > 0:
            if self.reply_timer is not None:
                self.reply_timer.cancel()
            self.reply_timer = asyncio.get_running_loop().call_later(
                self.config.egress_reply_timeout, self._reply_overdue, turn)
        self.spawn(self.emit(sj.FLOOR_VERDICT, ev.Verdict, turn=turn, action=action, text=text,
                             reason=reason, trace=trace, speaker=speaker), f"verdict-{turn}")

    def _reply_overdue(self, turn: int) -> None:
        """Nothing of reply ``turn`` came from TTS in time: its verdict or the reply was lost
        (a NATS node died as it passed, a stage went quiet). Give it up and listen."""
        self.reply_timer = None
        if self.floor.reply != turn or self.tts_turn >= turn:
            return  # answered meanwhile, or over
        metrics.TURNS.labels("egress", "reply_lost").inc()
        self.log.warning("no reply to turn %d after %.0f s: given up, the agent listens", turn,
                         self.config.egress_reply_timeout)
        self.floor.abandon_reply("no reply")

    def show(self, state: ev.AgentStateName, turn: int) -> None:
        """The agent's state for LiveKit's front-ends (attribute) and for the bus."""
        if self.agent is None:
            return
        self.agent.set_state(state)
        self.spawn(self.emit(sj.FLOOR_STATE, ev.AgentState, state=state, turn=turn), "state")

    def end_session(self, reason: str) -> None:
        self.log.info("ending the session: %s", reason)
        self.spawn(self._end_session(reason), "end")

    async def _end_session(self, reason: str) -> None:
        # The goodbye's final transcript is still queued for the room: the end takes the agent
        # out of it, so it waits until that line has gone out. A worker closed meanwhile by a
        # handover still ends the session (its successor's record no longer holds the
        # goodbye), and is not handed over; one closed by an end from elsewhere says nothing.
        self.ended = True
        try:
            if self.agent is not None:
                await self.agent.flush()
        finally:
            if not self.service.has_ended(self.session):
                await self.emit(sj.FLOOR_END, ev.SessionEnd, reason=reason)

    def record(self, record: FloorRecord) -> None:
        # Writes are coalesced: only the newest record matters, and never two at once.
        self.unsaved = msgspec.structs.replace(record, written_ms=time.time_ns() // 1_000_000)
        if self.saver is None or self.saver.done():
            self.saver = self.spawn(self._save_records(), "floor-record")

    async def _save_records(self) -> None:
        while (record := self.unsaved) is not None:
            self.unsaved = None
            try:
                await self.bus.put(self.service.state, floor_key(self.session),
                                   RECORD_CODEC[0].encode(record))
            except Exception as exc:  # the next decision writes it again
                self.log.warning("could not keep the judge's record: %s", exc)

    # ---- the agent in the room ------------------------------------------------------------------

    async def on_taken_over(self, record: FloorRecord) -> None:
        """The replica that died was playing the reply that holds the floor, if any: its audio
        in flight is gone. The reply is cut (TTS stops it) and the agent listens again."""
        if record.reply >= 0:
            self.floor.abandon_reply("replica lost")

    async def join_room(self, agent: AgentParticipant) -> None:
        try:
            await agent.start()
        except Exception as exc:  # unreachable server, refused publish…: say so on the bus
            await self.stage_error(str(exc), retryable=True)
            return
        self.floor.refresh()  # "initializing", unless the user's microphone is heard already

    async def stop(self) -> None:
        self.presence.cancel()
        for timer in (self.vad_timer, self.reply_timer, self.ready_timer):
            if timer is not None:
                timer.cancel()
        if self.playout is not None:
            await self.playout.aclose()
        if self.agent is not None:
            await self.agent.aclose()


class EgressService(StageService[EgressConfig]):
    stage: ClassVar[str] = "egress"
    Config = EgressConfig
    Worker = EgressWorker
