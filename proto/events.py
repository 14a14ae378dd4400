"""Event types of the voicebus bus contract.

Every event is a frozen msgspec Struct tagged with a stable wire name (``kind``). Renaming a
class never changes the wire; new fields get defaults and go last.
"""

from __future__ import annotations

import bisect
import time
from typing import Annotated, Literal

import msgspec

SESSION_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
SessionId = Annotated[str, msgspec.Meta(pattern=SESSION_PATTERN)]
# 20 ms of 48 kHz stereo s16le is 3 840 bytes; nothing legitimate is larger than this.
MAX_PCM_BYTES = 8192
Pcm = Annotated[bytes, msgspec.Meta(max_length=MAX_PCM_BYTES)]
Turn = Annotated[int, msgspec.Meta(ge=0)]
Text = Annotated[str, msgspec.Meta(max_length=16384)]

# Audio on the bus is s16le mono in 20 ms frames; ingress frames are 16 kHz.
FRAME_MS = 20
INGRESS_RATE = 16000


def frame_bytes(sample_rate: int) -> int:
    """Size of one 20 ms s16le mono frame at ``sample_rate``."""
    return sample_rate * FRAME_MS // 1000 * 2


def frame_problem(frame: "AudioFrame", sample_rate: int | None = None) -> str | None:
    """Why ``frame`` is not a valid bus frame (at ``sample_rate``, if one is required)."""
    if sample_rate is not None and frame.sample_rate != sample_rate:
        return f"{frame.sample_rate} Hz where {sample_rate} Hz is due"
    if not 8000 <= frame.sample_rate <= 48000 or frame.channels != 1:
        return f"{frame.sample_rate} Hz x{frame.channels}: not mono 8-48 kHz"
    if len(frame.pcm) != frame_bytes(frame.sample_rate):
        return f"{len(frame.pcm)} bytes is not 20 ms at {frame.sample_rate} Hz"
    return None
# A whole reply (done events) may be longer than one delta.
LongText = Annotated[str, msgspec.Meta(max_length=262144)]


class Event(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="kind"):
    """Base of every bus event.

    ``seq`` is monotonic per producer and session; ``ts_ns`` is the wall clock at creation, which
    is how latency across processes is measured.
    """

    session: SessionId
    seq: int = 0
    ts_ns: int = 0


# ---- ingress -------------------------------------------------------------------------------


class AudioFrame(Event, frozen=True, tag="audio"):
    """20 ms of PCM s16le. From ingress: 16 kHz mono. From TTS: the voice's native rate.

    ``pts_ms`` is the audio clock of the first sample. TTS frames carry the ``turn`` they speak
    and ``text_offset``, how many characters of the reply this frame's end has reached.
    """

    pcm: Pcm
    sample_rate: int
    channels: int = 1
    pts_ms: int = 0
    turn: Turn = 0
    text_offset: int = 0


class SpeechStarted(Event, frozen=True, tag="vad.start"):
    """The user started speaking at audio time ``pts_ms``."""

    pts_ms: int


class SpeechEnded(Event, frozen=True, tag="vad.end"):
    """The user stopped speaking at audio time ``pts_ms`` (end of the last speech audio).

    ``last_speech_ts_ns`` is when the frame holding the last speech sample was published, so
    consumers can measure the end-of-speech window as it was really experienced.
    """

    pts_ms: int
    speech_ms: int = 0
    last_speech_ts_ns: int = 0


class InputTrack(Event, frozen=True, tag="ingress.track"):
    """The user's microphone as ingress hears it. ``active``: subscribed, frames flow and an STT
    replica listens (the agent is ready to hear the user); false when the track, or the user,
    went away. ``track_sid`` is what transcripts of this user name as their track."""

    participant: str
    track_sid: str = ""
    active: bool = False


# ---- stt -----------------------------------------------------------------------------------


class Transcript(Event, frozen=True, tag="stt.transcript"):
    """What the user said. A final transcript ends the user turn and opens ``turn``.

    ``compute_ms`` on a final is the provider time between end of speech and the final.
    ``frames_dropped`` counts audio frames of this utterance that never arrived.
    ``speech_ms`` on a final is how long the user spoke (the VAD's measure, all utterances of
    the turn). ``idle`` > 0 marks a final with no speech at all: the user stayed silent for
    that many idle periods in a row while the agent listened. ``hold_ms``: how long the final
    was held back for more speech by the end-of-turn rule (a wait by design, like the VAD's).
    """

    turn: Turn
    text: Text
    final: bool = False
    confidence: float = 0.0
    compute_ms: float = 0.0
    frames_dropped: int = 0
    provider: str = ""
    speech_ms: int = 0
    idle: int = 0
    hold_ms: int = 0


# ---- llm -----------------------------------------------------------------------------------


class ReplyDelta(Event, frozen=True, tag="llm.delta"):
    """A piece of the agent's reply for ``turn``.

    ``compute_ms`` is the time since the LLM stage received the final transcript.
    """

    turn: Turn
    text: Text
    index: int = 0
    compute_ms: float = 0.0


class ReplyDone(Event, frozen=True, tag="llm.done"):
    """The reply for ``turn`` is complete (or was cut short: ``interrupted``, ``error``).

    ``ignored``: the final was not taken as the user's turn (a backchannel such as "uh-huh"
    while the agent held the floor), so there is no reply and the agent's reply goes on.
    ``end_session``: the agent says goodbye with this reply (user idle); the session ends once
    it has been played.
    """

    turn: Turn
    text: LongText = ""
    compute_ms: float = 0.0
    interrupted: bool = False
    error: str = ""
    provider: str = ""
    ignored: bool = False
    end_session: bool = False


# ---- tts -----------------------------------------------------------------------------------


class WordMark(msgspec.Struct, frozen=True, array_like=True):
    """Where a spoken word ends: ``end_ms`` on the turn's ``pts_ms`` clock, ``text_end`` the
    number of characters of the reply up to and including the word."""

    end_ms: Annotated[int, msgspec.Meta(ge=0)]
    text_end: Annotated[int, msgspec.Meta(ge=0)]


def heard_offset(played_ms: int, marks: list[WordMark], estimate: int) -> int:
    """How much of a reply was heard after ``played_ms`` of its audio: up to the last word that
    ended by then, when the words were timed that far; else ``estimate`` (the frames' offset)."""
    if not marks or played_ms > marks[-1].end_ms:
        return estimate
    index = bisect.bisect_right([mark.end_ms for mark in marks], played_ms)
    return marks[index - 1].text_end if index else 0


class SpeechDone(Event, frozen=True, tag="tts.done"):
    """All audio of ``turn`` has been published.

    ``first_frame_ts_ns`` is when the first frame went out; ``llm_ms`` is the LLM time until
    the text of the first spoken chunk was complete; ``tts_ms`` the synthesis time of that chunk.
    ``words`` are the word ends the TTS provider timed (Cartesia does), in order; empty when the
    provider gives no timings, and then a frame's ``text_offset`` is a proportional estimate.
    """

    turn: Turn
    frames: int = 0
    first_frame_ts_ns: int = 0
    llm_ms: float = 0.0
    tts_ms: float = 0.0
    text: LongText = ""
    interrupted: bool = False
    words: Annotated[list[WordMark], msgspec.Meta(max_length=65536)] = []


# ---- egress --------------------------------------------------------------------------------


class Playback(Event, frozen=True, tag="egress.playback"):
    """What the user actually heard of ``turn`` so far."""

    turn: Turn
    played_ms: int = 0
    text_offset: int = 0
    final: bool = False
    interrupted: bool = False
    frames_dropped: int = 0
    underruns: int = 0


# ---- control -------------------------------------------------------------------------------


class SessionStart(Event, frozen=True, tag="ctl.start"):
    """Dispatch: each stage's queue group hands this to one replica, which owns the session.

    ``wav_in``/``wav_out`` are the file edges used before LiveKit is wired in; ``handover`` marks
    a start re-published by a replica that is shutting down, for its ``stage`` only.
    ``greeting``: what the agent says (as turn 0) once it first hears the user; empty for none.
    """

    room: str = ""
    wav_in: tuple[str, ...] = ()
    wav_out: str = ""
    handover: bool = False
    stage: str = ""
    greeting: Text = ""


class SessionEnd(Event, frozen=True, tag="ctl.end"):
    reason: str = ""


class Cancel(Event, frozen=True, tag="ctl.cancel"):
    """Barge-in: every stage drops queued and in-flight work of turns <= ``turn``.

    Turn 0 is the greeting; user turns count from 1."""

    turn: Turn
    reason: str = ""


AgentStateName = Literal["initializing", "listening", "thinking", "speaking", "idle"]


class AgentState(Event, frozen=True, tag="ctl.state"):
    state: AgentStateName
    turn: Turn = 0


class StageReady(Event, frozen=True, tag="ctl.ready"):
    """A replica of ``stage`` has claimed the session and subscribed to its inputs."""

    stage: str
    replica: str


class StageError(Event, frozen=True, tag="ctl.error"):
    """A stage could not do its work for ``turn`` (every provider failed, bad config…)."""

    stage: str
    turn: Turn = 0
    message: str = ""
    retryable: bool = False


AnyEvent = (
    AudioFrame
    | SpeechStarted
    | SpeechEnded
    | Transcript
    | ReplyDelta
    | ReplyDone
    | SpeechDone
    | Playback
    | SessionStart
    | SessionEnd
    | Cancel
    | AgentState
    | StageReady
    | StageError
    | InputTrack
)


def now_ns() -> int:
    return time.time_ns()
