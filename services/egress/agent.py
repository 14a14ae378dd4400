"""The agent as LiveKit's front-ends expect it: one participant of kind ``agent`` with one audio
track (its voice), transcripts of both sides as text streams on ``lk.transcription``, and its
state in the participant attribute ``lk.agent.state``.

``AgentParticipant`` owns the room connection; ``TrackSink`` is the playout's sink into the
track (resampled to the track's 48 kHz); ``Transcripts`` turns bus transcripts and reply deltas
into text streams. Text-stream calls are serialised on one queue so segments arrive in order and
a slow room never blocks the bus callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import numpy as np
import soxr
from livekit import api, rtc

from services.runtime.livekit import (
    AGENT_IDENTITY, ATTR_AGENT_STATE, ATTR_FINAL, ATTR_SEGMENT_ID, ATTR_TRACK_ID,
    TOPIC_TRANSCRIPTION, LiveKitConfig, is_user, join,
)

log = logging.getLogger("voicebus.egress.agent")

TRACK_RATE = 48000  # what WebRTC's Opus runs at: resampling here keeps the SDK from guessing


class AgentParticipant:
    def __init__(self, config: LiveKitConfig, room_name: str, queue_ms: int = 100,
                 on_users: Callable[[int], None] | None = None) -> None:
        self.config = config
        self.on_users = on_users  # told how many users are in the room, on every change
        self.room_name = room_name
        self.room = rtc.Room()
        self.source = rtc.AudioSource(TRACK_RATE, 1, queue_size_ms=queue_ms)
        self.track_sid = ""
        self.state = ""
        self._jobs: asyncio.Queue[Callable[[], Awaitable[object]] | None] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        grants = api.VideoGrants(room_join=True, room=self.room_name, can_publish=True,
                                 can_publish_sources=["microphone"], can_subscribe=False,
                                 can_publish_data=True, can_update_own_metadata=True)
        if self.on_users is not None:
            for change in ("participant_connected", "participant_disconnected"):
                self.room.on(change, lambda _participant: self._count_users())
        await join(self.config, self.room_name, AGENT_IDENTITY, grants=grants, kind="agent",
                   room=self.room)
        self._count_users()  # who was there before the agent
        self._worker = asyncio.create_task(self._run_jobs(), name="agent-room")
        track = rtc.LocalAudioTrack.create_audio_track("agent-voice", self.source)
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        publication = await self.room.local_participant.publish_track(track, options)
        self.track_sid = publication.sid

    def _count_users(self) -> None:
        if self.on_users is not None and self.room.isconnected():
            self.on_users(sum(is_user(p) for p in self.room.remote_participants.values()))

    def set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.submit(lambda: self.room.local_participant.set_attributes(
                {ATTR_AGENT_STATE: state}))

    def submit(self, job: Callable[[], Awaitable[object]]) -> None:
        """Run ``job`` after the ones before it; failures are logged, never raised here."""
        self._jobs.put_nowait(job)

    async def _run_jobs(self) -> None:
        while (job := await self._jobs.get()) is not None:
            try:
                await job()
            except Exception as exc:  # a room hiccup must not end the session
                log.warning("room update failed: %s", exc)

    async def aclose(self) -> None:
        if self._worker is not None:
            self._jobs.put_nowait(None)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._worker, 2.0)
        await self.source.aclose()
        await self.room.disconnect()


class TrackSink:
    """A playout sink into the agent's track. ``clear`` drops what the track has queued."""

    def __init__(self, agent: AgentParticipant, sample_rate: int) -> None:
        self.agent = agent
        self.sample_rate = sample_rate
        self.resampler = soxr.ResampleStream(sample_rate, TRACK_RATE, 1, dtype="int16")

    async def write(self, pcm: bytes) -> None:
        await self._capture(self.resampler.resample_chunk(np.frombuffer(pcm, dtype=np.int16)))

    async def end_turn(self) -> None:
        # The resampler's delay line still holds the turn's last milliseconds: play them now,
        # not at the start of the next turn.
        await self._capture(self.resampler.resample_chunk(np.empty(0, dtype=np.int16),
                                                          last=True))
        self.resampler.clear()

    async def _capture(self, samples: np.ndarray) -> None:
        if len(samples):
            frame = rtc.AudioFrame(samples.tobytes(), TRACK_RATE, 1, len(samples))
            await self.agent.source.capture_frame(frame)

    def clear(self) -> int:
        """Drop what the track has queued; return how much that was, in input samples."""
        queued = self.agent.source.queued_duration
        self.agent.source.clear_queue()
        self.resampler.clear()
        return round(queued * self.sample_rate)

    async def aclose(self) -> None:
        return None


class Transcripts:
    """Both sides of the conversation on ``lk.transcription``, one segment per user utterance
    and per agent reply. Partials of a segment are whole replacements (a new stream with the
    same segment id); the agent's reply streams as it is written, then a final stream carries
    the whole text. Every stream is addressed to the session's user alone: anyone else in the
    room receives none of it (and before the user is known, nothing is sent)."""

    def __init__(self, agent: AgentParticipant) -> None:
        self.agent = agent
        self.user_track = ""
        self.user_identity = ""
        self._writers: dict[int, rtc.TextStreamWriter] = {}

    def user(self, turn: int, text: str, final: bool) -> None:
        if not self.user_identity:
            return
        attrs = self._attrs(f"user-{turn}", self.user_track, final)
        identity = self.user_identity
        self.agent.submit(lambda: self._send(text, attrs, identity))

    def agent_delta(self, turn: int, text: str) -> None:
        if self.user_identity:
            self.agent.submit(lambda: self._append(turn, text))

    def agent_done(self, turn: int, text: str) -> None:
        attrs = self._attrs(f"agent-{turn}", self.agent.track_sid, True)
        self.agent.submit(lambda: self._finish(turn, text, attrs))

    def _attrs(self, segment: str, track: str, final: bool) -> dict[str, str]:
        return {ATTR_SEGMENT_ID: segment, ATTR_TRACK_ID: track,
                ATTR_FINAL: "true" if final else "false"}

    async def _send(self, text: str, attrs: dict[str, str], identity: str) -> None:
        writer = await self.agent.room.local_participant.stream_text(
            topic=TOPIC_TRANSCRIPTION, attributes=attrs, sender_identity=identity,
            destination_identities=[self.user_identity])
        await writer.write(text)
        await writer.aclose()

    async def _append(self, turn: int, text: str) -> None:
        writer = self._writers.get(turn)
        if writer is None:
            attrs = self._attrs(f"agent-{turn}", self.agent.track_sid, False)
            writer = self._writers[turn] = await self.agent.room.local_participant.stream_text(
                topic=TOPIC_TRANSCRIPTION, attributes=attrs,
                destination_identities=[self.user_identity])
        await writer.write(text)

    async def _finish(self, turn: int, text: str, attrs: dict[str, str]) -> None:
        if (writer := self._writers.pop(turn, None)) is not None:
            await writer.aclose()
        if text and self.user_identity:  # an empty or failed reply leaves no line
            await self._send(text, attrs, AGENT_IDENTITY)
