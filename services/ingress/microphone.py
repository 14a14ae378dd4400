"""The user's microphone from a LiveKit room, as 16 kHz mono 20 ms frames.

Ingress joins the session's room as a hidden participant that publishes nothing, subscribes to
the microphone of the session's user, and hands the frames to the ingress core. The session's
user is the first user heard, by microphone or by a typed message (``chat.py``): a standard
participant that is not one of ours; nobody else in the room is listened to while they are
there. Once they have left, the next user who publishes a microphone is the session's user (a
reloaded page comes back under a new identity). The user may leave, come back, or republish
the track: their newest microphone wins, and when a track goes away mid-sentence the source
adds the silence a muted microphone would have given, so the user's turn still ends.

In a meeting (``everyone``: VOICEBUS_LISTEN=everyone) every user's microphone is heard, each as
a stream of frames of its own (a ``Voice``), handed to ingress by ``on_voice`` when the speaker
is first heard; typed messages and keys are taken from any user too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from livekit import rtc

from services.ingress.audio import FRAME_BYTES, FRAME_MS, SAMPLE_RATE, Framer
from services.ingress.vad import frames_to_end
from services.runtime import metrics
from services.runtime.livekit import (INGRESS_IDENTITY, TOPIC_TRANSCRIPTION, LiveKitConfig,
                                      is_user, join, listener_grants)

log = logging.getLogger("voicebus.ingress.microphone")

# (participant identity, track sid, active) — a microphone came or went.
TrackChange = Callable[[str, str, bool], None]


# Seconds the session's user has to come back after an outage before someone else may be heard.
OWNER_RETURN_GRACE_S = 20.0
# A speaker heard for the first time (meetings): their identity and their frames.
VoiceFound = Callable[[str, AsyncIterator[bytes]], None]


class Voice:
    """One speaker's microphone as 16 kHz frames: their newest track; when it goes away, the
    silence a muted microphone would have given, so an utterance under way still ends."""

    def __init__(self, *, trailing_frames: int, max_queued_ms: int) -> None:
        self.trailing_frames = trailing_frames
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(max_queued_ms // FRAME_MS)
        self.current: tuple[str, str] | None = None  # (identity, track sid) being heard
        self._reader: asyncio.Task[None] | None = None
        self.dropped = 0

    def hear(self, identity: str, sid: str, track: rtc.RemoteAudioTrack) -> None:
        previous = self._reader
        self.current = (identity, sid)
        self._reader = asyncio.create_task(self._read(track, previous), name="microphone")
        self._reader.add_done_callback(_log_failure)

    def lose(self) -> None:
        self.current = None
        self._reader = asyncio.create_task(self._silence(self._reader), name="trailing-silence")

    async def frames(self) -> AsyncIterator[bytes]:
        while True:
            yield await self.queue.get()

    async def aclose(self) -> None:
        await _cancel(self._reader)
        self._reader = None

    async def _read(self, track: rtc.RemoteAudioTrack, previous: asyncio.Task[None] | None) -> None:
        await _cancel(previous)
        # The SDK resamples and downmixes for us; Framer makes exact 20 ms frames. The SDK is
        # asked for 10 ms ones: its 10 ms playout pulls hand each over at once, where a 20 ms
        # frame waited for its second half (measured: ~5-10 ms less on this leg).
        stream = rtc.AudioStream.from_track(track=track, sample_rate=SAMPLE_RATE, num_channels=1,
                                            frame_size_ms=FRAME_MS // 2)
        framer = Framer(FRAME_BYTES)
        try:
            async for event in stream:
                for frame in framer.push(bytes(event.frame.data)):
                    self._put(frame)
        finally:
            await stream.aclose()

    async def _silence(self, previous: asyncio.Task[None] | None) -> None:
        await _cancel(previous)
        for _ in range(self.trailing_frames):
            self._put(bytes(FRAME_BYTES))

    def _put(self, frame: bytes) -> None:
        if self.queue.full():
            # The bus side stalled (NATS down): keep the newest audio, count what is lost.
            self.queue.get_nowait()
            self.dropped += 1
            metrics.FRAMES_DROPPED.labels("ingress").inc()
        self.queue.put_nowait(frame)


class MicrophoneSource:
    def __init__(self, config: LiveKitConfig, room_name: str, *, vad_silence_ms: int,
                 on_change: TrackChange, max_queued_ms: int = 2000, owner: str = "",
                 on_owner: Callable[[str], None] | None = None,
                 on_dtmf: Callable[[str], None] | None = None,
                 on_voice: VoiceFound | None = None) -> None:
        self.config = config
        self.room_name = room_name
        # Everyone in the room is heard (a meeting), each speaker a Voice of their own.
        self.everyone = on_voice is not None
        self.on_voice = on_voice
        # The session's user: the first user heard (or the one a replica before us heard).
        # Unless everyone is heard, nobody else in the room is listened to: one user a session.
        self.owner = owner
        self.on_owner = on_owner
        self.room = rtc.Room()
        self.on_change = on_change
        self.on_dtmf = on_dtmf
        self._voice_args = {"trailing_frames": frames_to_end(vad_silence_ms, FRAME_MS),
                            "max_queued_ms": max_queued_ms}
        # By speaker identity in a meeting; the one user's under "" otherwise.
        self.voices: dict[str, Voice] = {}
        self._closed = False
        self._ignored: set[asyncio.Task[str]] = set()
        self._owner_wait: asyncio.TimerHandle | None = None  # the user's return, after an outage

    @property
    def current(self) -> tuple[str, str] | None:
        """The one user's microphone being heard (identity, track sid), if any."""
        voice = self.voices.get("")
        return voice.current if voice is not None else None

    def heard(self) -> list[tuple[str, str]]:
        """Every microphone being heard now: (identity, track sid)."""
        return [voice.current for voice in self.voices.values() if voice.current is not None]

    def hears(self, identity: str, sid: str) -> bool:
        return (identity, sid) in self.heard()

    async def start(self) -> None:
        self.room.on("track_published", self._on_published)
        self.room.on("track_subscribed", self._on_subscribed)
        self.room.on("track_unsubscribed", lambda _track, pub, who: self._on_gone(pub, who))
        self.room.on("track_unpublished", self._on_gone)
        self.room.on("participant_disconnected", self._on_left)
        self.room.on("sip_dtmf_received", self._on_dtmf)
        # Transcripts other participants send to the whole room are not for the microphone:
        # drained quietly (the SDK logs each unclaimed stream at INFO).
        self.room.register_text_stream_handler(TOPIC_TRANSCRIPTION, self._on_transcription)
        await join(self.config, self.room_name, INGRESS_IDENTITY,
                   grants=listener_grants(self.room_name), room=self.room)
        if self.owner and self.owner not in self.room.remote_participants:
            self.owner = ""  # the user a replica before us heard has left since
        self._listen_to_whoever_is_there()

    def listen_again(self) -> None:
        """Back in the room after an outage: ask for the microphones of whoever is there (a
        rejoin finds them without a new-track event; the SDK's own reconnection loses the
        subscriptions asked for meanwhile). Idempotent. The session's user may be slower to
        come back than we are (their client asks the token service first): theirs it stays for
        ``OWNER_RETURN_GRACE_S``, or a second person in the room could take their session."""
        if self.owner and self.owner not in self.room.remote_participants \
                and self._owner_wait is None:
            self._owner_wait = asyncio.get_running_loop().call_later(
                OWNER_RETURN_GRACE_S, self._owner_not_back, self.owner)
        self._listen_to_whoever_is_there()

    def _owner_not_back(self, owner: str) -> None:
        self._owner_wait = None
        if self.owner == owner and owner not in self.room.remote_participants \
                and not self._closed:
            log.info("%s did not come back after the outage: the next user is heard", owner)
            self.owner = ""
            self._listen_to_whoever_is_there()

    def _listen_to_whoever_is_there(self) -> None:
        for participant in list(self.room.remote_participants.values()):
            for publication in list(participant.track_publications.values()):
                self._on_published(publication, participant)

    def frames(self) -> AsyncIterator[bytes]:
        """The one user's frames (unless everyone is heard: then ``on_voice`` hands out each
        speaker's)."""
        return self._voice("").frames()

    def _voice(self, key: str) -> Voice:
        voice = self.voices.get(key)
        if voice is None:
            voice = self.voices[key] = Voice(**self._voice_args)
            if self.everyone and self.on_voice is not None:
                self.on_voice(key, voice.frames())
        return voice

    async def aclose(self) -> None:
        self._closed = True  # the disconnect's own track events must not start anything
        if self._owner_wait is not None:
            self._owner_wait.cancel()
        for voice in self.voices.values():
            await voice.aclose()
        await self.room.disconnect()

    # ---- room events (plain callbacks: never block the SDK's event loop work) ------------------

    def _on_transcription(self, reader: rtc.TextStreamReader, sender: str) -> None:
        task = asyncio.create_task(reader.read_all(), name="ignored-transcript")
        self._ignored.add(task)
        task.add_done_callback(self._ignored.discard)

    def _on_dtmf(self, dtmf: rtc.SipDTMF) -> None:
        """A key pressed on a phone (LiveKit SIP's DTMF packet): a user's who is heard."""
        who = dtmf.participant
        if self.on_dtmf is not None and who is not None and (
                self.owner == who.identity or (self.everyone and is_user(who))):
            self.on_dtmf(dtmf.digit)

    def _hears(self, participant: rtc.RemoteParticipant) -> bool:
        return is_user(participant) and (self.everyone or self.owner in ("", participant.identity))

    def admits(self, identity: str) -> bool:
        """Whether what ``identity`` sends (a typed message) is heard: the same rule as for the
        microphone, and a user heard first this way is the session's user."""
        participant = self.room.remote_participants.get(identity)
        if self._closed or participant is None or not self._hears(participant):
            return False
        if not self.owner and not self.everyone:
            self._claim(identity)
        return True

    def _claim(self, identity: str) -> None:
        self.owner = identity
        if self.on_owner is not None:
            self.on_owner(identity)

    def _on_published(self, publication: rtc.RemoteTrackPublication,
                      participant: rtc.RemoteParticipant) -> None:
        if self._hears(participant) and publication.source == rtc.TrackSource.SOURCE_MICROPHONE:
            publication.set_subscribed(True)
        elif is_user(participant):
            log.info("not listening to %s: the session's user is %s", participant.identity,
                     self.owner)

    def _on_subscribed(self, track: rtc.Track, publication: rtc.RemoteTrackPublication,
                       participant: rtc.RemoteParticipant) -> None:
        if not self._hears(participant) and is_user(participant):
            publication.set_subscribed(False)  # lost the race to be the session's user
            return
        if self._closed or not (self._hears(participant)
                                and isinstance(track, rtc.RemoteAudioTrack)):
            return
        if not self.owner and not self.everyone:
            self._claim(participant.identity)
        voice = self._voice(participant.identity if self.everyone else "")
        voice.hear(participant.identity, publication.sid, track)
        log.info("hearing %s (track %s)", participant.identity, publication.sid)
        self.on_change(participant.identity, publication.sid, True)

    def _on_gone(self, publication: rtc.RemoteTrackPublication,
                 participant: rtc.RemoteParticipant) -> None:
        if self.hears(participant.identity, publication.sid):
            self._lost(participant.identity, publication.sid)

    def _on_left(self, participant: rtc.RemoteParticipant) -> None:
        for identity, sid in self.heard():
            if identity == participant.identity:
                self._lost(identity, sid)
        # While we are out of the room (an outage) everyone seems to leave: the session's user
        # stays theirs until we are back and see who is there (``listen_again``).
        connected = self.room.connection_state == rtc.ConnectionState.CONN_CONNECTED
        if participant.identity == self.owner and connected and not self._closed \
                and not self.everyone:
            # One user at a time: once the session's user has left (a reload comes back under
            # a new identity), the next user who publishes a microphone is the session's user.
            self.owner = ""
            self._listen_to_whoever_is_there()

    def _lost(self, identity: str, sid: str) -> None:
        if self._closed:
            return
        log.info("%s's microphone went away (track %s)", identity, sid)
        for voice in self.voices.values():
            if voice.current == (identity, sid):
                voice.lose()
        self.on_change(identity, sid, False)


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("reading the microphone failed: %r", exc)
