"""Ingress stage: the user's audio in, 16 kHz mono 20 ms frames and VAD edges out; and in a
room, what the user types (``chat.py``), out as ``UserText``.

``feed`` is the core: any async iterator of 16 kHz mono frames, paced in real time. The sources:
the LiveKit microphone of the room's user; a phone caller's voice from the SIP gateway
(``sip.audio``, 8 kHz frames, resampled here); and, for development only, the file source,
which plays ``FileSessionStart.wav_in`` like a polite user: say one file, stay silent until the
agent has finished its reply, say the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterable, AsyncIterator
from typing import ClassVar, Literal

from nats.js.errors import KeyNotFoundError

from proto import events as ev
from proto import subjects as sj
from proto.events import Timing
from services.ingress.audio import (
    FRAME_BYTES, FRAME_MS, SAMPLE_RATE, AudioFormatError, paced, to_frames, wav_frames,
)
from services.ingress.chat import ChatInbox, ChatLimits
from services.ingress.microphone import MicrophoneSource
from services.ingress.vad import VadEdge, VadSegmenter, frames_to_end
from services.runtime import metrics, tracing
from services.runtime.audio import frame_problem
from services.runtime.config import audio_file
from services.runtime.livekit import (INGRESS_IDENTITY, TOPIC_CHAT, LiveKitConfig, RoomKeeper,
                                      listener_grants)
from services.runtime.service import SessionWorker, StageService

SILENCE = bytes(FRAME_BYTES)
# The phone caller's voice waiting for the VAD: 2 s of frames. More means ingress has fallen
# behind by that much; the oldest is dropped (and counted) rather than the call lagging on.
PHONE_QUEUE = 100
# Who a phone session's user is, for InputTrack (the caller's number stays out of events).
PHONE_USER = "caller"


def user_key(session: str) -> str:
    return f"{session}.user"


class IngressConfig(LiveKitConfig, frozen=True, kw_only=True):
    vad_threshold: float = 0.5
    vad_neg_threshold: float = 0.35
    vad_min_speech_ms: int = 64
    # Audio quieter than this (dBFS) is silence without running the model (-200: only
    # digital silence is skipped).
    vad_energy_floor_dbfs: float | None = -60.0
    # End of speech: this much silence after the last speech audio ends an utterance (the STT's
    # end-of-turn hold then decides whether the turn is over; docs/turn-taking.md).
    vad_silence_ms: int = 200
    # The file source waits at most this long (seconds) for the agent's reply to a file.
    reply_timeout: float = 20.0
    # Seconds to hold audio back while no STT replica has claimed the session yet.
    stt_wait: float = 10.0
    # What the user may type (LiveKit's lk.chat): characters a message, messages at once, and
    # messages a minute after that; more is dropped and counted (docs/security.md).
    chat_max_chars: int = ev.MAX_CHAT_CHARS
    chat_burst: int = 5
    chat_per_minute: float = 20.0
    # Whose microphone is heard in a room: "user", the session's one user (the first heard;
    # anyone else in the room is not listened to), or "everyone" (a meeting: each user's
    # speech is a stream of its own, transcribed and answered as theirs; docs/turn-taking.md).
    listen: Literal["user", "everyone"] = "user"

    def chat_limits(self) -> ChatLimits:
        return ChatLimits(max_chars=min(self.chat_max_chars, ev.MAX_CHAT_CHARS),
                          burst=self.chat_burst, per_minute=self.chat_per_minute)


class Listener:
    """One speaker's audio on its way to the bus: its VAD, its audio clock, its utterance."""

    def __init__(self, config: IngressConfig, speaker: str) -> None:
        self.speaker = speaker
        self.vad = VadSegmenter(
            threshold=config.vad_threshold, neg_threshold=config.vad_neg_threshold,
            min_speech_ms=config.vad_min_speech_ms, silence_ms=config.vad_silence_ms,
            energy_floor_dbfs=config.vad_energy_floor_dbfs)
        self.pts = 0
        # Publish time of recent frames by pts, to stamp SpeechEnded with its last speech frame.
        self.sent_at: dict[int, int] = {}
        self.utterance = -1  # its number in the stage's ledger while speaking


class IngressWorker(SessionWorker[IngressConfig]):
    async def subscribe_inputs(self) -> None:
        self.replies: set[int] = set()
        self.stt_listening = asyncio.Event()
        self.microphone: MicrophoneSource | None = None
        self.chat: ChatInbox | None = None
        # Typed messages on their way to the bus, one after the other, in the order typed.
        self.typed: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        start = self.start_event
        self.wav_in = start.wav_in if isinstance(start, ev.FileSessionStart) else ()
        await self.subscribe(sj.READY["stt"].subject(self.session), self.handle)
        # A new egress replica (session start, handover) must learn whose microphone it is.
        await self.subscribe(sj.READY["egress"].subject(self.session), self.handle)
        if self.wav_in:
            await self.subscribe(sj.EGRESS_PLAYBACK.subject(self.session), self.handle)
        self.phone: asyncio.Queue[bytes | None] | None = None
        if isinstance(start, ev.PhoneSessionStart):
            self.phone = asyncio.Queue(PHONE_QUEUE)
            await self.subscribe(sj.SIP_AUDIO.subject(self.session), self.on_phone_audio)
            await self.subscribe(sj.SIP_DTMF.subject(self.session), self.on_phone_key)

    async def on_claimed(self) -> None:
        # A handed-over file source starts again from its first file: the file edges are a
        # development aid; the LiveKit microphone has no position to resume from.
        if self.wav_in:
            self.spawn(self.play_files(), "file-source")
        elif self.phone is not None:
            self.spawn(self.hear_phone(), "phone")
        elif self.start_event.room:
            self.spawn(self.hear_room(self.start_event.room), "microphone")

    def handle(self, event: ev.Event) -> None:
        match event:
            case ev.StageReady(stage="stt"):
                self.stt_listening.set()
            case ev.StageReady(stage="egress"):
                if self.microphone is not None:
                    for identity, sid in self.microphone.heard():
                        self.on_track_change(identity, sid, True)
                elif self.phone is not None:
                    self.spawn(self.announce_phone(), "input-track")
            case ev.Playback(final=True):
                self.replies.add(event.turn)

    async def stop(self) -> None:
        if self.chat is not None:
            await self.chat.aclose()
        if self.microphone is not None:
            await self.microphone.aclose()
        if self.phone is not None:
            with contextlib.suppress(asyncio.QueueFull):
                self.phone.put_nowait(None)  # the caller's stream ends

    def on_phone_audio(self, frame: ev.Event) -> None:
        """A frame of the caller's voice from the SIP gateway."""
        assert self.phone is not None and isinstance(self.start_event, ev.PhoneSessionStart)
        if not isinstance(frame, ev.AudioFrame) or \
                (problem := frame_problem(frame, self.start_event.sample_rate)) is not None:
            self.bus.reject("bad_audio", "not an audio frame" if not isinstance(
                frame, ev.AudioFrame) else problem, sj.SIP_AUDIO.subject(self.session))
            return
        if self.phone.full():
            self.phone.get_nowait()
            metrics.FRAMES_DROPPED.labels("ingress").inc()
        self.phone.put_nowait(frame.pcm)

    def on_phone_key(self, event: ev.Event) -> None:
        if isinstance(event, ev.Dtmf):
            self.on_key(event.digit)

    def on_key(self, digit: str) -> None:
        """A key the user pressed: on to the STT, which makes the keys a turn."""
        if len(digit) != 1 or digit not in ev.DTMF_KEYS:
            self.bus.reject("bad_dtmf", f"{digit[:8]!r} is not a keypad key",
                            "livekit sip_dtmf")
            return
        self.spawn(self.emit(sj.INGRESS_DTMF, ev.Dtmf, digit=digit), "dtmf")

    async def hear_phone(self) -> None:
        """The caller's voice: 8 kHz frames in real time, resampled to the bus's 16 kHz. The
        caller is heard from the first frame (the gateway has answered the call)."""
        assert self.phone is not None and isinstance(self.start_event, ev.PhoneSessionStart)
        queue = self.phone

        async def caller() -> AsyncIterator[bytes]:
            while (pcm := await queue.get()) is not None:
                yield pcm

        await self.announce_phone()
        await self.feed(to_frames(caller(), self.start_event.sample_rate, 1))

    async def announce_phone(self) -> None:
        await self.wait_for_stt()
        await self.emit(sj.INGRESS_TRACK, ev.InputTrack, participant=PHONE_USER,
                        track_sid="phone", active=True)

    async def hear_room(self, room: str) -> None:
        self.microphone = MicrophoneSource(
            self.config, room, vad_silence_ms=self.config.vad_silence_ms,
            on_change=self.on_track_change, owner=await self._session_user(),
            on_owner=self._keep_user, on_dtmf=self.on_key,
            on_voice=self.on_voice if self.config.listen == "everyone" else None)
        self.chat = ChatInbox(self.microphone.room, self.microphone.admits, self.on_text,
                              self.on_chat_refused, self.config.chat_limits())
        self.spawn(self.pass_on_typed(), "chat")
        try:
            await self.microphone.start()
        except Exception as exc:  # unreachable server, refused join…: say so on the bus
            await self.stage_error(str(exc), retryable=True)
            return
        # Back into the room after livekit-server restarts (or the network drops us), for as
        # long as this task lives (the session); then the users' microphones are asked for again.
        keeper = RoomKeeper.minting(self.config, self.microphone.room, room, INGRESS_IDENTITY,
                                    grants=listener_grants(room), stage="ingress",
                                    on_back=self.microphone.listen_again)
        try:
            if not self.microphone.everyone:
                await self.feed(self.microphone.frames())
            else:
                await asyncio.Future()  # each speaker is fed by a task of their own
        finally:
            await keeper.aclose()

    def on_voice(self, speaker: str, frames: AsyncIterator[bytes]) -> None:
        """A speaker heard for the first time in a meeting: their frames go out as theirs."""
        self.spawn(self.feed(frames, speaker), f"voice-{speaker}")

    async def _session_user(self) -> str:
        """Who the session's user is, if a replica before us heard one (KV ``<session>.user``)."""
        try:
            entry = await self.bus.get(self.service.state, user_key(self.session))
        except KeyNotFoundError:
            return ""
        return (entry.value or b"").decode()

    def _keep_user(self, identity: str) -> None:
        self.log.info("the session's user is %s", identity)
        self.spawn(self.bus.put(self.service.state, user_key(self.session), identity.encode()),
                   "user")

    def on_text(self, participant: str, text: str) -> None:
        """A message the session's user typed: on to the STT, which makes it a turn."""
        self.typed.put_nowait((participant, text))

    def on_chat_refused(self, reason: str, detail: str) -> None:
        self.bus.reject(reason, detail, f"livekit {TOPIC_CHAT}")

    async def pass_on_typed(self) -> None:
        while True:
            participant, text = await self.typed.get()
            await self.wait_for_stt()  # a message nobody listens to would be lost
            await self.emit(sj.INGRESS_TEXT, ev.UserText, text=text, participant=participant,
                            speaker=participant if self.config.listen == "everyone" else "")

    def on_track_change(self, participant: str, track_sid: str, active: bool) -> None:
        self.spawn(self.announce_track(participant, track_sid, active), "input-track")

    async def announce_track(self, participant: str, track_sid: str, active: bool) -> None:
        # "Active" promises the agent can hear the user: only once STT listens too.
        if active:
            await self.wait_for_stt()
            mic = self.microphone
            if mic is None or not mic.hears(participant, track_sid):
                return  # gone (or replaced) while we waited: its end was announced already
        await self.emit(sj.INGRESS_TRACK, ev.InputTrack, participant=participant,
                        track_sid=track_sid, active=active,
                        speaker=participant if self.config.listen == "everyone" else "")

    async def wait_for_stt(self) -> None:
        """Hold the user's audio until an STT replica listens to this session: what it would
        miss (the start of speech) cannot be recovered. A lease means it is subscribed."""
        if await self.service.is_listening("stt", self.session):
            return
        try:
            async with asyncio.timeout(self.config.stt_wait):  # a session's end still stops it
                await self.stt_listening.wait()
        except TimeoutError:
            self.log.warning("no STT replica claimed the session within %.0fs; sending anyway",
                             self.config.stt_wait)

    async def play_files(self) -> None:
        try:
            for path in self.wav_in:
                audio_file(path, self.config.audio_dir)
            await self.feed(paced(self.file_user()))
        except (AudioFormatError, OSError, ValueError) as exc:
            await self.stage_error(str(exc), retryable=False, doing="playing the input file")

    async def file_user(self) -> AsyncIterator[bytes]:
        for path in self.wav_in:
            replies_before = len(self.replies)
            async for frame in wav_frames(path):
                yield frame
            deadline = time.monotonic() + self.config.reply_timeout
            while len(self.replies) == replies_before and time.monotonic() < deadline:
                yield SILENCE
            if len(self.replies) == replies_before:
                self.log.warning("no reply to %s within %.0fs", path, self.config.reply_timeout)
        # A little trailing silence, as a microphone would give, then the source ends.
        for _ in range(frames_to_end(self.config.vad_silence_ms, FRAME_MS)):
            yield SILENCE

    async def feed(self, frames: AsyncIterable[bytes], speaker: str = "") -> None:
        """Publish every frame of one speaker (the session's one user: "") and the VAD edges
        it produces."""
        await self.wait_for_stt()
        horizon = 5000 // FRAME_MS  # remember publish times for the last 5 s
        who = Listener(self.config, speaker)
        async for pcm in frames:
            frame = await self.emit(sj.INGRESS_AUDIO, ev.AudioFrame, pcm=pcm,
                                    sample_rate=SAMPLE_RATE, pts_ms=who.pts, speaker=speaker)
            who.sent_at[who.pts] = frame.ts_ns
            who.sent_at.pop(who.pts - horizon * FRAME_MS, None)
            for edge in who.vad.push(pcm, who.pts):
                await self._publish_edge(who, edge)
            who.pts += FRAME_MS

    async def _publish_edge(self, who: Listener, edge: VadEdge) -> None:
        # The user's utterance is this stage's turn in flight: a replica told to stop hands
        # the session over only once the utterance has ended (its SpeechEnded sent), or the
        # STT would wait for an end that the next replica, hearing silence, never sends.
        if edge.kind == "start":
            who.utterance = self.ledger.newest + 1
            self.ledger.open(who.utterance)
            await self.emit(sj.INGRESS_VAD, ev.SpeechStarted, pts_ms=edge.pts_ms,
                            speaker=who.speaker)
            return
        self.ledger.close(who.utterance)
        last_ts = who.sent_at.get(edge.last_speech_frame_pts_ms, 0)
        # A turn's trace begins here: from the user's last word to the VAD being sure of it.
        trace = tracing.stage_span("end_of_speech", session=self.session, start_ns=last_ts,
                                   utterance=who.utterance, speech_ms=edge.speech_ms)
        await self.emit(sj.INGRESS_VAD, ev.SpeechEnded, pts_ms=edge.pts_ms, trace=trace,
                        speech_ms=edge.speech_ms, timing=Timing(last_speech_ts_ns=last_ts),
                        speaker=who.speaker)


class IngressService(StageService[IngressConfig]):
    stage: ClassVar[str] = "ingress"
    Config = IngressConfig
    Worker = IngressWorker
