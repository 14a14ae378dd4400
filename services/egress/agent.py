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

from livekit import api, rtc

from services.runtime.livekit import (
    AGENT_IDENTITY, ATTR_AGENT_STATE, ATTR_FINAL, ATTR_SEGMENT_ID, ATTR_TRACK_ID,
    TOPIC_TRANSCRIPTION, LiveKitConfig, RoomKeeper, is_user, join,
)
from services.runtime.resample import StreamResampler

log = logging.getLogger("voicebus.egress.agent")

TRACK_RATE = 48000  # what WebRTC's Opus runs at: resampling here keeps the SDK from guessing
# The client protocol from which LiveKit clients read transcripts from text streams; older
# ones read the legacy transcription packets.
TEXT_STREAM_PROTOCOL = 3
# Seconds one room update (an attribute, a transcript stream) may take.
JOB_TIMEOUT_S = 10.0


# The agent's attribute saying everyone in the room is heard (a meeting): the page then shows
# other people's lines too.
ATTR_MEETING = "voicebus.meeting"


class AgentParticipant:
    def __init__(self, config: LiveKitConfig, room_name: str, queue_ms: int = 100,
                 on_users: Callable[[int], None] | None = None,
                 on_gone: Callable[[str], None] | None = None,
                 give_up_after: float = 0.0) -> None:
        self.meeting = False  # marked for the page once a meeting is heard
        self.config = config
        self.on_users = on_users  # told how many users are in the room, on every change
        # Told when the room could not be rejoined for ``give_up_after`` seconds (0: never).
        self.on_gone = on_gone
        self.give_up_after = give_up_after
        self.room_name = room_name
        self.room = rtc.Room()
        self.source = rtc.AudioSource(TRACK_RATE, 1, queue_size_ms=queue_ms)
        self.track_sid = ""
        self.state = ""
        self.keeper: RoomKeeper | None = None
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
        # After a livekit-server restart (or an outage) the agent joins again, voice and all.
        self.keeper = RoomKeeper.minting(
            self.config, self.room, self.room_name, AGENT_IDENTITY, grants=grants,
            stage="egress", kind="agent", on_back=self._back, on_gone=self.on_gone,
            give_up_after=self.give_up_after)
        self._count_users()  # who was there before the agent
        self._worker = asyncio.create_task(self._run_jobs(), name="agent-room")
        await self._publish()

    async def _publish(self) -> None:
        track = rtc.LocalAudioTrack.create_audio_track("agent-voice", self.source)
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        publication = await self.room.local_participant.publish_track(track, options)
        self.track_sid = publication.sid

    def _back(self) -> None:
        """Back in the room after a drop (``RoomKeeper``): the server may be a new one. The
        voice: the SDK republished it under a new sid, or (a rejoin of ours) it is published
        again; the state is set again; the users are counted again."""
        published = list(self.room.local_participant.track_publications.values())
        if published:
            self.track_sid = published[0].sid
        else:
            self.submit(self._publish)
        if self.state:
            state = self.state
            self.submit(lambda: self.room.local_participant.set_attributes(
                {ATTR_AGENT_STATE: state}))
        if self.meeting:
            self.submit(lambda: self.room.local_participant.set_attributes({ATTR_MEETING: "true"}))
        self._count_users()

    def _count_users(self) -> None:
        # Only while connected: the SDK lists everyone as gone while it reconnects, which says
        # nothing about the users; they are counted again once the agent is back (``_back``).
        if self.on_users is not None and \
                self.room.connection_state == rtc.ConnectionState.CONN_CONNECTED:
            self.on_users(sum(is_user(p) for p in self.room.remote_participants.values()))

    def mark_meeting(self) -> None:
        """Everyone in the room is heard: the page may show other people's lines (without this
        mark it shows only the agent's and its user's own, so nobody else in a one-user room
        can put words on it)."""
        if not self.meeting:
            self.meeting = True
            self.submit(lambda: self.room.local_participant.set_attributes({ATTR_MEETING: "true"}))

    def set_state(self, state: str) -> None:
        if state != self.state:
            self.state = state
            self.submit(lambda: self.room.local_participant.set_attributes(
                {ATTR_AGENT_STATE: state}))

    def submit(self, job: Callable[[], Awaitable[object]]) -> None:
        """Run ``job`` after the ones before it; failures are logged, never raised here."""
        self._jobs.put_nowait(job)

    async def flush(self, timeout: float = JOB_TIMEOUT_S) -> None:
        """Until what was submitted so far (and since) has gone out, or ``timeout``: the last
        words of a session are sent before its end takes the agent out of the room."""
        if self._worker is not None and not self._worker.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._jobs.join(), timeout)

    async def _run_jobs(self) -> None:
        while (job := await self._jobs.get()) is not None:
            try:
                if self.room.connection_state == rtc.ConnectionState.CONN_DISCONNECTED:
                    continue  # out of the room (rejoining): what it would say is set again after
                # Bounded: a call into a room that drops under it must not stall the queue.
                await asyncio.wait_for(job(), JOB_TIMEOUT_S)
            except Exception as exc:  # a room hiccup must not end the session
                log.warning("room update failed: %s", exc or type(exc).__name__)
            finally:
                self._jobs.task_done()
        self._jobs.task_done()  # the None that ended the loop

    async def aclose(self) -> None:
        if self.keeper is not None:
            await self.keeper.aclose()
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
        # Each 20 ms frame's output at once (soxr's streaming mode would hold 40-60 ms back).
        self.resampler = StreamResampler(sample_rate, TRACK_RATE)

    async def write(self, pcm: bytes) -> None:
        await self._capture(self.resampler.process(pcm))

    async def end_turn(self) -> None:
        # The resampler's delay line still holds the turn's last milliseconds: play them now,
        # not at the start of the next turn.
        await self._capture(self.resampler.flush())

    async def _capture(self, pcm: bytes) -> None:
        if pcm:
            frame = rtc.AudioFrame(pcm, TRACK_RATE, 1, len(pcm) // 2)
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
    and per agent reply, addressed to the users the agent hears alone (the session's user; in
    a meeting, everyone heard: anyone else in the room receives none of it, and before a user
    is known nothing is sent). A user segment is sent as its speaker's, naming their track.

    A user segment's partials are whole replacements (a new stream with the same segment id).
    An agent segment is in step with the voice: one stream that grows by the words as they are
    played (``agent_heard``), then a final stream with what the user heard — the whole reply,
    or up to the last word played when it was cut. For a user whose client speaks a protocol
    older than 3 (livekit-client before text streams), the same text also goes out as the
    legacy transcription packets that ``useVoiceAssistant().agentTranscriptions`` reads."""

    def __init__(self, agent: AgentParticipant) -> None:
        self.agent = agent
        self.user_track = ""
        self.user_identity = ""
        # Everyone heard (a meeting: every speaker), and each one's microphone track.
        self.audience: dict[str, None] = {}
        self.tracks: dict[str, str] = {}
        self._replies: dict[int, _Reply] = {}
        # A turn whose words the next one carries on shows in the segment of the turn it
        # began in: the next turn → that first turn.
        self._carried: dict[int, int] = {}

    def user_continues(self, turn: int) -> None:
        """``turn`` ended unanswered and ``turn + 1`` carries its words on."""
        self._carried[turn + 1] = self._carried.pop(turn, turn)

    def hear(self, identity: str, track_sid: str = "", meeting: bool = False) -> None:
        """``identity`` is heard (their microphone ``track_sid``, or what they typed): one of
        several in a ``meeting``, else the session's one user (who may have come back under a
        new identity: the old one gets nothing more)."""
        self.user_identity = identity
        if not meeting:
            self.audience.clear()
        self.audience[identity] = None
        if track_sid:
            self.user_track = self.tracks[identity] = track_sid

    def user(self, turn: int, text: str, final: bool, speaker: str = "") -> None:
        identity = speaker or self.user_identity
        if not identity:
            return
        segment = self._carried.pop(turn, turn) if final else self._carried.get(turn, turn)
        attrs = self._attrs(f"user-{segment}", self.tracks.get(identity, self.user_track), final)
        self.agent.submit(lambda: self._send(text, attrs, identity))

    def agent_text(self, turn: int, text: str, whole: bool = False) -> None:
        """More of reply ``turn``'s text (``whole``: all of it, from its ReplyDone)."""
        reply = self._replies.setdefault(turn, _Reply())
        reply.text = text if whole else reply.text + text

    def agent_heard(self, turn: int, offset: int) -> None:
        """Reply ``turn`` has been played up to character ``offset``: its words up to there
        join the segment."""
        reply = self._replies.get(turn)
        if reply is None or not self.audience:
            return
        upto = word_boundary(reply.text, offset)
        if upto > reply.sent:
            words, reply.sent = reply.text[reply.sent:upto], upto
            self.agent.submit(lambda: self._append(turn, reply, words))

    def agent_played(self, turn: int, offset: int, interrupted: bool) -> None:
        """Reply ``turn`` is over: played whole, or cut after ``offset`` characters."""
        reply = self._replies.pop(turn, None)
        if reply is None:
            return
        heard = reply.text[:word_boundary(reply.text, offset)].rstrip() if interrupted \
            else reply.text
        attrs = self._attrs(f"agent-{turn}", self.agent.track_sid, True)
        self.agent.submit(lambda: self._finish(turn, reply, heard, attrs))

    def _attrs(self, segment: str, track: str, final: bool) -> dict[str, str]:
        return {ATTR_SEGMENT_ID: segment, ATTR_TRACK_ID: track,
                ATTR_FINAL: "true" if final else "false"}

    async def _send(self, text: str, attrs: dict[str, str], identity: str) -> None:
        writer = await self.agent.room.local_participant.stream_text(
            topic=TOPIC_TRANSCRIPTION, attributes=attrs, sender_identity=identity,
            destination_identities=list(self.audience))
        await writer.write(text)
        await writer.aclose()

    async def _append(self, turn: int, reply: _Reply, words: str) -> None:
        if reply.writer is None:
            attrs = self._attrs(f"agent-{turn}", self.agent.track_sid, False)
            reply.writer = await self.agent.room.local_participant.stream_text(
                topic=TOPIC_TRANSCRIPTION, attributes=attrs,
                destination_identities=list(self.audience))
        await reply.writer.write(words)
        await self._legacy(turn, reply.text[:reply.sent], final=False)

    async def _finish(self, turn: int, reply: _Reply, heard: str,
                      attrs: dict[str, str]) -> None:
        if reply.writer is not None:
            await reply.writer.aclose()
        if heard and self.audience:  # nothing heard (empty, failed, cut at once): no line
            await self._send(heard, attrs, AGENT_IDENTITY)
            await self._legacy(turn, heard, final=True)

    async def _legacy(self, turn: int, text: str, final: bool) -> None:
        # The protocol a client announced is in the participant's info (no public accessor).
        listeners = (self.agent.room.remote_participants.get(who) for who in self.audience)
        if not any(user is not None and user._info.client_protocol < TEXT_STREAM_PROTOCOL
                   for user in listeners):
            return
        segment = rtc.TranscriptionSegment(id=f"agent-{turn}", text=text, start_time=0,
                                           end_time=0, final=final, language="")
        await self.agent.room.local_participant.publish_transcription(rtc.Transcription(
            participant_identity=AGENT_IDENTITY, track_sid=self.agent.track_sid,
            segments=[segment]))


_PUNCTUATION = ".,;:!?"


class _Reply:
    """An agent reply as the user hears it: its text, how much of it has been sent."""

    __slots__ = ("text", "sent", "writer")

    def __init__(self) -> None:
        self.text = ""
        self.sent = 0
        self.writer: rtc.TextStreamWriter | None = None


def word_boundary(text: str, offset: int) -> int:
    """The end of the last whole word of ``text`` before ``offset`` (a word being spoken at
    ``offset`` is not yet heard), never after a space: what is sent never ends in one."""
    if offset >= len(text):
        return len(text)
    end = max(0, offset)
    if end and not (text[end].isspace() or text[end] in _PUNCTUATION or
                    text[end - 1].isspace() or text[end - 1] in _PUNCTUATION):
        end = max(0, text.rfind(" ", 0, end))  # inside a word: back to before it
    while end and text[end - 1].isspace():
        end -= 1
    return end
