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
    if not _SESSION_RE.match(session):
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
STT_PARTIAL = Topic("stt", "partial", (ev.Transcript,))
STT_FINAL = Topic("stt", "final", (ev.Transcript,))
LLM_DELTA = Topic("llm", "delta", (ev.ReplyDelta,))
LLM_DONE = Topic("llm", "done", (ev.ReplyDone,))
TTS_AUDIO = Topic("tts", "audio", (ev.AudioFrame,))
TTS_DONE = Topic("tts", "done", (ev.SpeechDone,))
EGRESS_PLAYBACK = Topic("egress", "playback", (ev.Playback,))
CTL_START = Topic("ctl", "start", (ev.SessionStart,))
CTL_END = Topic("ctl", "end", (ev.SessionEnd,))
CTL_CANCEL = Topic("ctl", "cancel", (ev.Cancel,))
CTL_STATE = Topic("ctl", "state", (ev.AgentState,))

STAGES = ("ingress", "stt", "llm", "tts", "egress")
# Per-stage status topics: voice.S.<stage>.ready / voice.S.<stage>.error
READY = {stage: Topic(stage, "ready", (ev.StageReady,)) for stage in STAGES}
ERROR = {stage: Topic(stage, "error", (ev.StageError,)) for stage in STAGES}

TOPICS: dict[tuple[str, str], Topic] = {
    (t.producer, t.kind): t
    for t in (
        INGRESS_AUDIO, INGRESS_VAD, INGRESS_TRACK, STT_PARTIAL, STT_FINAL, LLM_DELTA, LLM_DONE, TTS_AUDIO,
        TTS_DONE, EGRESS_PLAYBACK, CTL_START, CTL_END, CTL_CANCEL, CTL_STATE,
        *READY.values(), *ERROR.values(),
    )
}


def session_all(session: str) -> str:
    """Everything of one session: tap, record, replay."""
    return f"{PREFIX}.{check_session(session)}.>"


def producer_all(session: str, producer: str) -> str:
    """Everything one producer says in one session, in publish order on one subscription."""
    return f"{PREFIX}.{check_session(session)}.{producer}.*"


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
