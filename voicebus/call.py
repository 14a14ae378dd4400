"""A user on the command line: ``voicebus call`` joins a room like the web page does, speaks a
WAV file (or a sentence said by Piper) into its microphone or types a message (``lk.chat``, as
the page's text box), records the agent's voice, and collects the transcripts and agent states
LiveKit delivers. The tests and ``bench livekit`` use
the same ``Caller``.

The microphone never stops: between utterances it sends silence, as a real one would, so the
agent hears a continuous track and its end-of-speech window runs on real time.

The call outlives its token (livekit-server refreshes it over the signal connection) and a
livekit-server restart: dropped for good, it joins the same room again with a fresh token from
the token service (``RoomKeeper``, docs/operations.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import wave
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
from livekit import rtc

from services.runtime.livekit import (
    AGENT_IDENTITY, ATTR_AGENT_STATE, ATTR_FINAL, ATTR_SEGMENT_ID, ATTR_TRACK_ID, TOPIC_CHAT,
    TOPIC_TRANSCRIPTION, RoomKeeper,
)

MIC_RATE = 48000
MIC_FRAME = MIC_RATE // 100  # 10 ms, what WebRTC itself uses
SILENCE_AHEAD_S = 0.1  # the silence queued ahead of the microphone between turns
RECORD_RATE = 24000
# A sample above this (of 32767) counts as sound: well above Opus's noise on digital silence.
LOUD = 500
# Arrivals of loud agent frames kept (10 ms each: the last ten minutes of the agent's voice).
LOUD_FRAMES_KEPT = 60_000
# Seconds a call keeps trying to get back into its room after a drop before it gives up.
REJOIN_GIVE_UP_S = 120.0


class CallError(RuntimeError):
    pass


@dataclass
class Segment:
    speaker: str
    segment_id: str
    text: str = ""
    final: bool = False
    track_id: str = ""
    streams: int = 0  # partials arrive as streams of their own
    # How the text grew here: (wall-clock ns, characters) at each change, the final's last.
    grew: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class Turn:
    """What one utterance got: timestamps are ``time.monotonic()`` seconds."""

    speech_end: float = 0.0  # the last sample of the utterance left the microphone
    speech_end_wall_ns: int = 0  # the same moment on the wall clock (to match bus events)
    first_sound: float = 0.0  # the agent's first audible sample arrived
    first_sound_wall_ns: int = 0  # the same moment on the wall clock
    states: list[tuple[float, str]] = field(default_factory=list)
    speech_start: float = 0.0  # the first loud sample of the utterance left the microphone
    speech_start_wall_ns: int = 0  # the same moment on the wall clock

    @property
    def v2v_ms(self) -> float:
        return (self.first_sound - self.speech_end) * 1000 if self.first_sound else float("nan")


async def fetch_token(token_url: str, room: str, identity: str, agent: str = "") -> dict[str, str]:
    wanted = {"room": room, "identity": identity, **({"agent": agent} if agent else {})}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{token_url.rstrip('/')}/api/token", json=wanted) as resp:
            body = await resp.json(content_type=None)
            if resp.status != 200:
                raise CallError(f"token service said {resp.status}: {body.get('detail', body)}")
            return body


class Caller:
    def __init__(self, token_url: str, room: str, identity: str = "caller",
                 livekit_url: str = "", agent: str = "") -> None:
        self.token_url = token_url
        self.agent = agent  # the agent profile asked for (empty: the default)
        # The LiveKit node to connect to; empty: the one the token service names.
        self.livekit_url = livekit_url
        self.room_name = room
        self.identity = identity
        self.room = rtc.Room()
        # Speech is queued up to a second ahead: a caller process starved for a moment (a busy
        # test machine: stalls of 200-300 ms were seen) must not leave a gap in its speech that
        # the VAD would take for the end of a sentence, or the STT for a lost word ("what time
        # is it" heard as "what i miss it"). The silence between turns stays SILENCE_AHEAD_S
        # ahead, so speech starts about as soon as it is said. The measures stay exact: they
        # count what is queued before each frame.
        self.source = rtc.AudioSource(MIC_RATE, 1, queue_size_ms=1000)
        self.segments: dict[str, Segment] = {}
        # The same transcripts as the legacy transcription packets (clients of protocol < 3
        # read these): segment id -> (text, final), the latest of each.
        self.legacy: dict[str, tuple[str, bool]] = {}
        self.state = ""
        self.state_changed = asyncio.Event()
        self.final_arrived = asyncio.Event()  # set each time a segment becomes final
        self.turn = Turn()
        self.recording: list[bytes] = []
        # Arrival of every loud agent frame: (time.monotonic(), time.time_ns()) — the second
        # to match bus events; ``sound`` is set at each one.
        self.loud_frames: deque[tuple[float, int]] = deque(maxlen=LOUD_FRAMES_KEPT)
        self.sound = asyncio.Event()
        self._onset: tuple[bytes, int] | None = None  # first loud frame of an utterance, sample
        self._speech: deque[bytes] = deque()
        self._speech_done: asyncio.Event | None = None
        self.mic_sid = ""
        self.agent_track_sid = ""
        self._reading: set[asyncio.Task[None]] = set()  # text streams being read
        self._recorder: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # Staying in the room: the SDK's own reconnection (with the token livekit-server
        # refreshes, so the token's TTL may be shorter than the call), then ours after a drop.
        self.keeper: RoomKeeper | None = None
        self._grant: dict[str, str] | None = None  # join()'s own grant, if it was given one
        self.grant: dict[str, str] = {}  # what the first join used (token, url, expires_at…)
        self.drops: list[str] = []  # why the room dropped us (not our own leave), in order
        self.returns = 0  # times we were back after a drop (ours, or the SDK's reconnect)
        self.back = asyncio.Event()  # set at each return, the microphone published again
        self.gone = ""  # why we gave up getting back in (then every wait fails)

    # ---- joining -------------------------------------------------------------------------------

    async def join(self, grant: dict[str, str] | None = None) -> None:
        """Join with a token from the token service (which sends the agent), or with
        ``grant`` ({"url", "token"}) made elsewhere (a phone caller, as LiveKit SIP joins)."""
        self._grant = grant
        grant = grant or await fetch_token(self.token_url, self.room_name, self.identity,
                                           self.agent)
        self.room.register_text_stream_handler(TOPIC_TRANSCRIPTION, self._on_text)
        self.room.on("participant_attributes_changed", self._on_attributes)
        self.room.on("participant_connected", self._on_participant)
        self.room.on("track_subscribed", self._on_track)
        self.room.on("transcription_received", self._on_legacy_transcription)
        self.room.on("disconnected", self._on_dropped)
        self.grant = grant
        options = rtc.RoomOptions(auto_subscribe=True)
        await self.room.connect(self.livekit_url or grant["url"], grant["token"], options)
        self.keeper = RoomKeeper(self.room, self.room_name, self._credentials, stage="call",
                                 options=options, on_back=self._back, on_gone=self._gave_up,
                                 give_up_after=REJOIN_GIVE_UP_S)
        for participant in self.room.remote_participants.values():
            self._on_participant(participant)
        await self.publish_microphone()
        self._tasks.append(asyncio.create_task(self._microphone(), name="microphone"))

    async def _credentials(self) -> tuple[str, str]:
        """What a rejoin uses: a fresh token, asked for as the first one was (which sends the
        agent again if the session ended meanwhile); a grant made elsewhere is used again."""
        grant = self._grant or await fetch_token(self.token_url, self.room_name, self.identity,
                                                 self.agent)
        return self.livekit_url or grant["url"], grant["token"]

    def _on_dropped(self, reason: int) -> None:
        if reason != rtc.DisconnectReason.CLIENT_INITIATED:
            self.drops.append(rtc.DisconnectReason.Name(reason)
                              if reason in rtc.DisconnectReason.values() else str(reason))

    def _back(self) -> None:
        task = asyncio.create_task(self._return(), name="back-in-room")
        self._tasks.append(task)

    async def _return(self) -> None:
        """Back in the room after a drop: the microphone (republished by the SDK, or published
        again after a rejoin of ours) and the agent's state as it is now."""
        published = list(self.room.local_participant.track_publications.values())
        if published:
            self.mic_sid = published[0].sid
        else:
            self.mic_sid = ""  # the old publication went with the old connection
            await self.publish_microphone()
        for participant in self.room.remote_participants.values():
            self._on_participant(participant)
        self.returns += 1
        self.back.set()

    def _gave_up(self, reason: str) -> None:
        self.gone = reason
        self.state_changed.set()
        self.final_arrived.set()

    async def publish_microphone(self) -> str:
        """(Re)publish the microphone track; returns its sid."""
        if self.mic_sid:
            await self.room.local_participant.unpublish_track(self.mic_sid)
        track = rtc.LocalAudioTrack.create_audio_track("microphone", self.source)
        publication = await self.room.local_participant.publish_track(
            track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
        self.mic_sid = publication.sid
        return self.mic_sid

    async def leave(self) -> None:
        if self.keeper is not None:
            await self.keeper.aclose()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.room.disconnect()
        await self.source.aclose()

    # ---- speaking ------------------------------------------------------------------------------

    async def say(self, pcm: bytes, sample_rate: int) -> Turn:
        """Speak ``pcm`` (mono s16le); return when its last loud sample has left the
        microphone (the quiet after it is still queued).
        Starts a new ``Turn`` record."""
        audio = _resample(pcm, sample_rate, MIC_RATE)
        frames = [audio[i:i + MIC_FRAME * 2] for i in range(0, len(audio), MIC_FRAME * 2)]
        frames[-1] = frames[-1] + bytes(MIC_FRAME * 2 - len(frames[-1]))
        last_loud = max((i for i, f in enumerate(frames) if loud(f)), default=len(frames) - 1)
        first_loud = next((i for i, f in enumerate(frames) if loud(f)), None)
        self.turn = Turn()
        self._onset = None if first_loud is None else \
            (frames[first_loud], first_loud_sample(frames[first_loud]))
        self._speech_done = asyncio.Event()
        self._speech.extend(frames[:last_loud + 1])
        await self._speech_done.wait()
        self._speech.extend(frames[last_loud + 1:])
        # The last loud frame is queued; it leaves the microphone at ``speech_end``.
        await asyncio.sleep(max(0.0, self.turn.speech_end - time.monotonic()))
        return self.turn

    async def send_text(self, text: str) -> Turn:
        """Type ``text`` to the agent, as the page's text box does: a text stream on
        ``lk.chat``. Starts a new ``Turn`` record, timed from the moment it was sent."""
        self.turn = Turn(speech_end=time.monotonic(), speech_end_wall_ns=time.time_ns())
        await self.room.local_participant.send_text(text, topic=TOPIC_CHAT)
        return self.turn

    async def _microphone(self) -> None:
        silence = bytes(MIC_FRAME * 2)
        while True:
            if self._speech:
                pcm = self._speech.popleft()
            elif self.source.queued_duration > SILENCE_AHEAD_S:
                await asyncio.sleep(MIC_FRAME / MIC_RATE)
                continue
            else:
                pcm = silence
            await self.source.capture_frame(rtc.AudioFrame(pcm, MIC_RATE, 1, MIC_FRAME))
            if self._onset is not None and pcm is self._onset[0]:
                # This frame leaves after what is queued before it; its first loud sample
                # leaves that long before the frame's end.
                ahead = self.source.queued_duration - (MIC_FRAME - self._onset[1]) / MIC_RATE
                self.turn.speech_start = time.monotonic() + ahead
                self.turn.speech_start_wall_ns = time.time_ns() + int(ahead * 1e9)
                self._onset = None
            if not self._speech and self._speech_done is not None \
                    and not self._speech_done.is_set():
                # The last speech frame is queued: it leaves after what is queued before it.
                queued = self.source.queued_duration
                self.turn.speech_end = time.monotonic() + queued
                self.turn.speech_end_wall_ns = time.time_ns() + int(queued * 1e9)
                self._speech_done.set()

    # ---- listening -----------------------------------------------------------------------------

    def _on_participant(self, participant: rtc.RemoteParticipant) -> None:
        if state := participant.attributes.get(ATTR_AGENT_STATE):
            self._set_state(state)

    def _on_attributes(self, changed: dict[str, str], participant: rtc.Participant) -> None:
        if ATTR_AGENT_STATE in changed:
            self._set_state(changed[ATTR_AGENT_STATE])

    def _set_state(self, state: str) -> None:
        self.state = state
        self.turn.states.append((time.monotonic(), state))
        self.state_changed.set()

    async def wait_state(self, *states: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while self.state not in states:
            self.state_changed.clear()
            if self.gone:
                raise CallError(f"out of the room: {self.gone}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise CallError(f"agent state stayed {self.state!r}; wanted one of {states}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.state_changed.wait(), left)
        return self.state

    async def wait_reply(self, timeout: float = 30.0) -> Turn:
        """Wait for the agent to think, speak and listen again after the last ``say``."""
        turn = self.turn
        deadline = time.monotonic() + timeout
        await self.wait_state("speaking", timeout=timeout)
        await self.wait_state("listening", timeout=max(0.1, deadline - time.monotonic()))
        # The state (an attribute) and the transcripts (text streams) travel separately: let
        # the streams still open finish, so the reply's transcript is complete (its final is
        # sent as the voice ends; one of an agent that died never comes: a short wait).
        if self._reading:
            await asyncio.wait(set(self._reading), timeout=max(0.1, deadline - time.monotonic()))
        await self.wait_finals(AGENT_IDENTITY, timeout=min(3.0, max(0.1, deadline -
                                                                     time.monotonic())))
        return turn

    async def wait_finals(self, speaker: str, at_least: int = 0, timeout: float = 5.0
                          ) -> list[str]:
        """Until ``speaker`` has ``at_least`` final transcripts and none still growing (at the
        timeout, what there is): an agent's final comes as its voice ends, and travels apart
        from its state."""
        deadline = time.monotonic() + timeout

        def settled() -> bool:
            mine = [s for s in self.segments.values() if s.speaker == speaker]
            return all(s.final for s in mine) and sum(s.final for s in mine) >= at_least

        while not settled() and (left := deadline - time.monotonic()) > 0:
            self.final_arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.final_arrived.wait(), left)
        return self.transcript(speaker)

    async def hear_out(self, quiet_s: float = 0.5, timeout: float = 5.0) -> None:
        """Wait until the agent's voice has been quiet here for ``quiet_s``: its state travels
        as signalling and arrives before the last of its audio, which on a busy machine can
        trail it by a second."""
        deadline = time.monotonic() + timeout
        while (now := time.monotonic()) < deadline:
            last = self.loud_frames[-1][0] if self.loud_frames else 0.0
            if now - last >= quiet_s:
                return
            await asyncio.sleep(min(last + quiet_s, deadline) - now)

    def _on_track(self, track: rtc.Track, _pub: rtc.RemoteTrackPublication,
                  participant: rtc.RemoteParticipant) -> None:
        if isinstance(track, rtc.RemoteAudioTrack) and participant.kind == \
                rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:
            self.agent_track_sid = _pub.sid
            # One voice at a time: a new agent (a handed-over egress) replaces the old track,
            # whose stream must not keep adding its silence to the recording.
            if self._recorder is not None:
                self._recorder.cancel()
            self._recorder = asyncio.create_task(self._record(track), name="agent-voice")
            self._tasks.append(self._recorder)

    async def _record(self, track: rtc.RemoteAudioTrack) -> None:
        stream = rtc.AudioStream.from_track(track=track, sample_rate=RECORD_RATE, num_channels=1)
        try:
            async for event in stream:
                pcm = bytes(event.frame.data)
                audible = loud(pcm)
                if self.state in ("speaking", "thinking") or audible:
                    self.recording.append(pcm)
                if audible:
                    now = time.monotonic()
                    self.loud_frames.append((now, time.time_ns()))
                    # Once the speech has left the microphone (its end is known as soon as
                    # its last frame is queued, a little before): an agent's voice still
                    # trailing from before is not the reply.
                    if not self.turn.first_sound and 0 < self.turn.speech_end <= now:
                        self.turn.first_sound = now
                        self.turn.first_sound_wall_ns = self.loud_frames[-1][1]
                    self.sound.set()
        finally:
            await stream.aclose()

    def _on_legacy_transcription(self, segments: list[rtc.TranscriptionSegment], *_: object
                                 ) -> None:
        for segment in segments:
            if not self.legacy.get(segment.id, ("", False))[1]:  # nothing replaces a final
                self.legacy[segment.id] = (segment.text, segment.final)

    def _on_text(self, reader: rtc.TextStreamReader, sender: str) -> None:
        task = asyncio.create_task(self._read_text(reader, sender))
        self._tasks.append(task)
        self._reading.add(task)
        task.add_done_callback(self._reading.discard)

    async def _read_text(self, reader: rtc.TextStreamReader, sender: str) -> None:
        attrs = reader.info.attributes or {}
        segment_id = attrs.get(ATTR_SEGMENT_ID, reader.info.stream_id)
        segment = self.segments.setdefault(segment_id, Segment(sender, segment_id))
        segment.streams += 1
        mine = segment.streams
        text = ""
        try:
            async for chunk in reader:
                text += chunk
                # A newer stream of the segment replaces this one (streams may finish out of
                # order); nothing replaces a final.
                if mine == segment.streams and not segment.final:
                    segment.text = text
                    segment.track_id = attrs.get(ATTR_TRACK_ID, "")
                    segment.grew.append((time.time_ns(), len(text)))
        except rtc.StreamError:
            # The sender left mid-stream (an agent replica that died, say): keep what came,
            # never final; the replica that takes over speaks on in a stream of its own.
            return
        if mine == segment.streams and not segment.final:
            segment.text = text
            segment.final = attrs.get(ATTR_FINAL) == "true"
            if segment.final:
                self.final_arrived.set()

    def transcript(self, speaker: str) -> list[str]:
        """Final texts said by ``speaker`` (an identity), in order."""
        return [s.text for s in self.segments.values() if s.speaker == speaker and s.final]

    def save_recording(self, path: Path) -> Path:
        with wave.open(str(path), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(RECORD_RATE)
            out.writeframes(b"".join(self.recording))
        return path


def loud(pcm: bytes) -> bool:
    samples = np.frombuffer(pcm, dtype=np.int16)
    return bool(len(samples)) and int(np.abs(samples.astype(np.int32)).max()) > LOUD


def first_loud_sample(pcm: bytes) -> int:
    """Index of the first sample of ``pcm`` that counts as sound (0 if none does)."""
    samples = np.abs(np.frombuffer(pcm, dtype=np.int16).astype(np.int32))
    return int(np.argmax(samples > LOUD))


def _resample(pcm: bytes, rate_in: int, rate_out: int) -> bytes:
    if rate_in == rate_out:
        return pcm
    import soxr

    samples = np.frombuffer(pcm, dtype=np.int16)
    return soxr.resample(samples, rate_in, rate_out).astype(np.int16).tobytes()


async def call(token_url: str, room: str, utterances: list[tuple[bytes, int]], out: Path | None,
               identity: str = "caller", timeout: float = 60.0, agent: str = "",
               texts: tuple[str, ...] = ()) -> list[Turn]:
    """Join, say each utterance (then type each of ``texts``) after the agent has answered the
    one before, print both sides' transcripts and the time to the agent's voice heard here;
    record the agent's voice into ``out``."""
    caller = Caller(token_url, room, identity, agent=agent)
    await caller.join()
    turns = []
    try:
        print(f"joined room {room!r} as {identity!r}; waiting for the agent", flush=True)
        await caller.wait_state("listening", timeout=timeout)
        for greeting in await caller.wait_finals(AGENT_IDENTITY):
            print(f"  agent: {greeting}", flush=True)
        asks = [*utterances, *texts]
        for ask in asks:
            replies = len(caller.transcript(AGENT_IDENTITY))
            turn = await (caller.send_text(ask) if isinstance(ask, str) else caller.say(*ask))
            await caller.wait_reply(timeout)
            await caller.hear_out()  # the end of the reply is still on its way to us
            turns.append(turn)
            user = caller.transcript(identity)
            agent = await caller.wait_finals(AGENT_IDENTITY, replies + 1)
            print(f"  you:   {user[-1] if user else '(nothing recognised)'}", flush=True)
            print(f"  agent: {agent[-1] if agent else '(no transcript)'}", flush=True)
            since = "typed message" if isinstance(ask, str) else "voice"
            print(f"  {since}-to-voice here: {turn.v2v_ms:.0f} ms", flush=True)
    finally:
        if out is not None:
            caller.save_recording(out)
            print(f"the agent's voice is in {out}")
        await caller.leave()
    return turns
