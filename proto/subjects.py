"""Subject names of the bus: ``voice.<session>.<producer>.<kind>``.

Subjects are built and parsed only here. Each ``Topic`` names one producer/kind pair and the
event types allowed on it, so a consumer can reject an event that arrived on the wrong subject.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from proto import events as ev

PREFIX = "voice"
_SESSION_RE = re.compile(ev.SESSION_PATTERN)


class BadSubject(ValueError):
    """A subject that is not ``voice.<session>.<producer>.<kind>`` with a known topic."""


def check_session(session: str) -> str:
    if not _SESSION_RE.fullmatch(session):
        raise BadSubject(f"invalid session id {session[:80]!r}: must match {ev.SESSION_PATTERN}")
    return session


@dataclass(frozen=True, slots=True)
class Topic:
    producer: str
    kind: str
    events: tuple[type[ev.Event], ...]

    def subject(self, session: str) -> str:
        return f"{PREFIX}.{check_session(session)}.{self.producer}.{self.kind}"

    def every_session(self) -> str:
        """Wildcard for this topic across all sessions (e.g. a queue-group claim)."""
        return f"{PREFIX}.*.{self.producer}.{self.kind}"


INGRESS_AUDIO = Topic("ingress", "audio", (ev.AudioFrame,))
INGRESS_VAD = Topic("ingress", "vad", (ev.SpeechStarted, ev.SpeechEnded))
INGRESS_TRACK = Topic("ingress", "track", (ev.InputTrack,))
INGRESS_DTMF = Topic("ingress", "dtmf", (ev.Dtmf,))
INGRESS_TEXT = Topic("ingress", "text", (ev.UserText,))
STT_PARTIAL = Topic("stt", "partial", (ev.Transcript,))
STT_FINAL = Topic("stt", "final", (ev.Transcript,))
STT_IDLE = Topic("stt", "idle", (ev.UserIdle,))
# The one judge of turn-taking (it runs in egress): its decisions, and the state they make.
FLOOR_VERDICT = Topic("floor", "verdict", (ev.Verdict,))
FLOOR_CANCEL = Topic("floor", "cancel", (ev.Cancel,))
FLOOR_STATE = Topic("floor", "state", (ev.AgentState,))
FLOOR_END = Topic("floor", "end", (ev.SessionEnd,))
LLM_DELTA = Topic("llm", "delta", (ev.ReplyDelta,))
LLM_DONE = Topic("llm", "done", (ev.ReplyDone,))
LLM_TOOL = Topic("llm", "tool", (ev.ToolUse,))
# The agent's requests to the SIP gateway about its call (keys, transfer); answered by reply.
LLM_PHONE = Topic("llm", "phone", (ev.PhoneAction,))
TTS_AUDIO = Topic("tts", "audio", (ev.AudioFrame,))
TTS_DONE = Topic("tts", "done", (ev.SynthesisDone,))
EGRESS_PLAYBACK = Topic("egress", "playback", (ev.Playback,))
# A phone call through the SIP gateway: the caller's voice in, the agent's voice out.
SIP_AUDIO = Topic("sip", "audio", (ev.AudioFrame,))
SIP_DTMF = Topic("sip", "dtmf", (ev.Dtmf,))
EGRESS_AUDIO = Topic("egress", "audio", (ev.AudioFrame,))
# Dispatch: the token service (or an operator's tool) starts and ends sessions.
CTL_START = Topic("ctl", "start", (ev.SessionStart,))
CTL_END = Topic("ctl", "end", (ev.SessionEnd,))

STAGES = ("ingress", "stt", "llm", "tts", "egress")
# Per-stage topics of the replicas' own protocol: voice.S.<stage>.ready / .error / .handover
READY = {stage: Topic(stage, "ready", (ev.StageReady,)) for stage in STAGES}
ERROR = {stage: Topic(stage, "error", (ev.StageError,)) for stage in STAGES}
HANDOVER = {stage: Topic(stage, "handover", (ev.SessionStart,)) for stage in STAGES}
# What the providers of a stage did per turn (``Usage``): voice.S.<stage>.usage
PROVIDER_STAGES = ("stt", "llm", "tts")
USAGE = {stage: Topic(stage, "usage", (ev.Usage,)) for stage in PROVIDER_STAGES}
# Where a session's end may come from: dispatch (the room is gone) or the judge (user idle).
SESSION_ENDS = (CTL_END, FLOOR_END)

# Every subject has exactly one producer: the stage named in it (``floor`` is egress's judge,
# ``ctl`` is dispatch).
TOPICS: dict[tuple[str, str], Topic] = {
    (t.producer, t.kind): t
    for t in (
        INGRESS_AUDIO, INGRESS_VAD, INGRESS_TRACK, INGRESS_DTMF, INGRESS_TEXT, STT_PARTIAL,
        STT_FINAL, STT_IDLE, FLOOR_VERDICT, FLOOR_CANCEL, FLOOR_STATE, FLOOR_END, LLM_DELTA,
        LLM_DONE, LLM_TOOL, LLM_PHONE, TTS_AUDIO, TTS_DONE, EGRESS_PLAYBACK, SIP_AUDIO, SIP_DTMF,
        EGRESS_AUDIO, CTL_START, CTL_END,
        *READY.values(), *ERROR.values(), *HANDOVER.values(), *USAGE.values(),
    )
}


# Requests to a service rather than a session's events (no session exists yet): outside
# ``voice.>``, so no wildcard over sessions (tap, record) takes them for a session's talk.
# ``voicebus dial`` asks the SIP gateway to call someone (``DialRequest`` → ``DialReply``); the
# gateway's replicas share the queue group, so one of them places the call.
SIP_DIAL = "voicebus.sip.dial"
SIP_DIAL_QUEUE = "sip"


def session_all(session: str) -> str:
    """Everything of one session: tap, record, replay."""
    return f"{PREFIX}.{check_session(session)}.>"


def producer_all(session: str, producer: str) -> str:
    """Everything one producer says in one session, in publish order on one subscription."""
    return f"{PREFIX}.{check_session(session)}.{producer}.*"


def every_stage(kind: str) -> str:
    """One kind of every producer in every session (e.g. ``ready``, ``error``)."""
    return f"{PREFIX}.*.*.{kind}"


def everything() -> str:
    return f"{PREFIX}.>"


@functools.lru_cache(maxsize=8192)
def parse(subject: str) -> tuple[str, Topic]:
    """Split a subject into (session, topic); raise ``BadSubject`` for anything else.

    Cached: every audio frame of a session arrives on the same few subjects."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[0] != PREFIX:
        raise BadSubject(f"not a voicebus subject: {subject[:120]!r}")
    topic = TOPICS.get((parts[2], parts[3]))
    if topic is None:
        raise BadSubject(f"unknown topic {parts[2]}.{parts[3]}")
    return check_session(parts[1]), topic
