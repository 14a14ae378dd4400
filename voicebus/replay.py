"""Yesterday's session into today's build of one stage, and what changed.

``replay`` starts a new session on the stage(s) it replays into — through each stage's own
handover subject, so no other stage claims it — and publishes what those stages consumed in
the recording (``proto.permissions.CONSUMES``) under the new session id: at the recorded pace
(``speed=1``: VAD edges, silences and barge-ins land where they did) or as fast as the stage
takes it (``speed=0``, "max": before each input, the replay waits until the stage has closed
as many turns as it had at that point of the recording). What the stages say is captured like
any session, so ``diff`` compares the recording with the capture of the new session.

``diff`` compares turn by turn: transcripts (word by word), replies, spoken text and frames,
what was played and cut, verdicts and errors; timings are shown, never counted as changes.
"""

from __future__ import annotations

import asyncio
import difflib
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.js.errors import BucketNotFoundError, KeyNotFoundError

from proto import codec
from proto import events as ev
from proto import subjects as sj
from proto.permissions import CONSUMES, SPEAKS_FOR
from services.runtime.ledger import STATE_BUCKET
from voicebus import record
from voicebus.client import Tap

TARGETS = ("stt", "llm", "tts", "egress", "all")
# Events that close a turn for a stage: the pace of a "max" replay.
CLOSING = {"stt": (ev.Transcript,), "llm": (ev.ReplyDone,), "tts": (ev.SynthesisDone,),
           "egress": (ev.Playback,)}


class ReplayError(ValueError):
    pass


def stages_of(into: str) -> tuple[str, ...]:
    if into not in TARGETS:
        raise ReplayError(f"--into {into!r}: one of {', '.join(TARGETS)}")
    return ("stt", "llm", "tts", "egress") if into == "all" else (into,)


def producers_of(stages: tuple[str, ...]) -> set[str]:
    return {p for s in stages for p in (s, *SPEAKS_FOR.get(s, ()))}


# Stages that wait for another's StageReady: the judge (egress) greets once the stages that
# speak (LLM, TTS) have claimed the session. Replayed without them, it would wait for a claim
# that never comes while the recorded greeting plays, and decide no greeting at all.
WAITS_FOR = {"egress": ("llm", "tts")}


def inputs_of(stages: tuple[str, ...]) -> set[tuple[str, str]]:
    """(producer, kind) of every topic the stages consume that none of them produces."""
    own = producers_of(stages)
    wanted: set[tuple[str, str]] = set()
    for stage in stages:
        for item in CONSUMES[stage]:
            topics = ([item] if isinstance(item, sj.Topic)
                      else [t for t in sj.TOPICS.values() if t.producer == item])
            # (A usage reading is no stage's input: a replay's own usage is its stages'.)
            wanted |= {(t.producer, t.kind) for t in topics if t.producer not in own
                       and t.kind not in ("ready", "error", "handover", "usage")}
        wanted |= {(producer, "ready") for producer in WAITS_FOR.get(stage, ())
                   if producer not in own}
    return wanted


def _is_closing(event: ev.Event, stages: tuple[str, ...]) -> bool:
    return any(isinstance(event, CLOSING[s]) and getattr(event, "final", True) for s in stages)


@dataclass
class Replay:
    session: str
    stages: tuple[str, ...]
    published: int = 0
    waits: list[str] = field(default_factory=list)


async def replay(nc: Any, recording: record.Recording, into: str, *, speed: float = 1.0,
                 session: str = "", settle_s: float = 3.0, timeout: float = 60.0) -> Replay:
    stages = stages_of(into)
    new = session or f"{recording.header.session[:50]}-r{secrets.token_hex(3)}"
    sj.check_session(new)
    js = nc.jetstream()
    if await _exists(js, new):
        raise ReplayError(f"session {new!r} exists on this bus: replay into a new id (--as)")
    events = recording.events()
    start = next((e for _, _, e in events if isinstance(e, ev.SessionStart)), None)
    if start is None:
        raise ReplayError("the recording has no session start")
    inputs = inputs_of(stages)
    own = producers_of(stages)
    tap = Tap(nc)
    for producer in own:
        await tap.watch(sj.producer_all(new, producer))
    done = Replay(new, stages)
    try:
        await _dispatch(nc, tap, new, start, stages, timeout)
        origin_ns, began = events[0][1], time.monotonic()
        closed_before = 0  # turns the recorded stages had closed by this point
        for subject, stored_ns, event in events:
            _, topic = sj.parse(subject)
            if topic.producer in own and _is_closing(event, stages):
                closed_before += 1
            if (topic.producer, topic.kind) not in inputs:
                continue
            if speed > 0:
                delay = (stored_ns - origin_ns) / 1e9 / speed - (time.monotonic() - began)
                if delay > 0:
                    await asyncio.sleep(delay)
            else:
                await _keep_up(tap, new, stages, closed_before, done)
            await nc.publish(topic.subject(new), codec.encode(_moved(event, new)))
            done.published += 1
        await _settle(tap, new, settle_s, timeout)
    finally:
        end = ev.SessionEnd(session=new, seq=1, ts_ns=time.time_ns(), reason="replay done")
        await nc.publish(sj.CTL_END.subject(new), codec.encode(end))
        await nc.flush()
        await tap.close()
    return done


def _moved(event: ev.Event, session: str) -> ev.Event:
    """``event`` as if sent now in ``session``: its clock readings shift with its ``ts_ns``
    (a replayed end of speech must not make today's voice-to-voice a day long)."""
    now = time.time_ns()
    timing = getattr(event, "timing", None)
    if timing is not None and event.ts_ns:
        shift = now - event.ts_ns
        timing = msgspec.structs.replace(timing, **{
            name: value + shift for name in ("last_speech_ts_ns", "first_frame_ts_ns")
            if (value := getattr(timing, name))})
        return msgspec.structs.replace(event, session=session, ts_ns=now, timing=timing)
    return msgspec.structs.replace(event, session=session, ts_ns=now)


async def _exists(js: Any, session: str) -> bool:
    """Captured, imported, or known to the stages (its start is in the session state, even
    with capture off): a replay must never speak into a live or past session."""
    if (await record.sessions(js)).get(session) or session in await record.imported(js):
        return True
    try:
        await (await js.key_value(STATE_BUCKET)).get(f"{session}.start")
        return True
    except (KeyNotFoundError, BucketNotFoundError):
        return False


async def _dispatch(nc: Any, tap: Tap, new: str, start: ev.SessionStart,
                    stages: tuple[str, ...], timeout: float) -> None:
    # No room (the replay must not join the user's LiveKit room) and no file edges; the
    # greeting is kept, so a replay into egress greets as the recording did.
    fresh = ev.SessionStart(session=new, seq=1, ts_ns=time.time_ns(), greeting=start.greeting)
    for stage in stages:
        await tap.watch(sj.READY[stage].subject(new))
        await nc.publish(sj.HANDOVER[stage].subject(new), codec.encode(fresh))
    await tap.wait_for(lambda: {r.stage for r in tap.of(ev.StageReady, new)} >= set(stages),
                       timeout, f"{', '.join(stages)} to take the replay")


async def _keep_up(tap: Tap, session: str, stages: tuple[str, ...], closed: int,
                   done: Replay, patience_s: float = 10.0) -> None:
    def caught_up() -> bool:
        return sum(_is_closing(e, stages) for _, e in tap.events
                   if e.session == session) >= closed

    try:
        await tap.wait_for(caught_up, patience_s)
    except TimeoutError:
        done.waits.append(f"the stage did not close turn #{closed} within {patience_s:.0f}s")


async def _settle(tap: Tap, session: str, quiet_s: float, timeout: float) -> None:
    """Until the stages have been quiet for ``quiet_s`` (at most ``timeout``)."""
    deadline = time.monotonic() + timeout
    seen = -1
    while time.monotonic() < deadline:
        now = len(tap.events)
        if now == seen:
            return
        seen = now
        await asyncio.sleep(quiet_s)


# ---- diff --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    turn: int
    what: str
    before: str
    after: str

    def line(self) -> str:
        return f"turn {self.turn} {self.what}:\n  - {self.before}\n  + {self.after}"


def _facts(events: list[ev.AnyEvent], producers: set[str]) -> dict[tuple[int, str], str]:
    """What a session's stages said, by (turn, what): the comparable facts of a diff."""
    facts: dict[tuple[int, str], str] = {}
    errors: dict[tuple[int, str], list[str]] = {}
    for event in events:
        match event:
            case ev.Transcript(final=True) if "stt" in producers:
                facts[(event.turn, "transcript")] = event.text
            case ev.ReplyDone() if "llm" in producers:
                facts[(event.turn, "reply")] = event.text + (f" [error: {event.error}]"
                                                             if event.error else "")
            case ev.SynthesisDone() if "tts" in producers:
                # Its length is a timing, not a fact: a neural voice (Piper) says the same
                # text a few percent longer or shorter from one run to the next.
                facts[(event.turn, "spoken")] = repr(event.text) + (", cut" if event.interrupted
                                                                    else "")
            case ev.Playback(final=True) if "egress" in producers:
                facts[(event.turn, "played")] = "cut" if event.interrupted else "whole"
            case ev.Verdict() if "floor" in producers:
                facts[(event.turn, "verdict")] = f"{event.action} ({event.reason or '-'})"
            case ev.Cancel() if "floor" in producers:
                facts[(event.turn, "cancel")] = event.reason
            case ev.StageError() if event.stage in producers:
                errors.setdefault((event.turn, f"{event.stage} error"), []).append(event.message)
    facts.update({key: "; ".join(messages) for key, messages in errors.items()})
    return facts


def _word_diff(before: str, after: str) -> str:
    a, b = before.split(), after.split()
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b).get_opcodes():
        if op == "equal":
            out.extend(a[i1:i2])
        else:
            out.extend([f"[-{w}-]" for w in a[i1:i2]] + [f"{{+{w}+}}" for w in b[j1:j2]])
    return " ".join(out)


def timings(events: list[ev.AnyEvent], producers: set[str]) -> dict[str, list[float]]:
    """Compute time per stage, the agent's audio and voice-to-voice, per turn in order (shown
    beside a diff, never a change: they vary from run to run)."""
    out: dict[str, list[float]] = {}
    last_speech_ns, playing = 0, set()
    for event in events:
        timing = getattr(event, "timing", None)
        match event:
            case ev.SpeechEnded() if timing is not None:
                last_speech_ns = timing.last_speech_ts_ns
            case ev.Transcript(final=True) if "stt" in producers and timing is not None:
                out.setdefault("stt_compute_ms", []).append(round(timing.compute_ms, 1))
            case ev.ReplyDelta(index=0) if "llm" in producers and timing is not None:
                out.setdefault("llm_first_ms", []).append(round(timing.compute_ms, 1))
            case ev.SynthesisDone() if "tts" in producers:
                out.setdefault("tts_audio_ms", []).append(event.frames * ev.FRAME_MS)
                if timing is not None:
                    out.setdefault("tts_ms", []).append(round(timing.tts_ms, 1))
            case ev.Playback() if "egress" in producers and event.turn not in playing:
                playing.add(event.turn)  # its first report: the reply began to play
                if last_speech_ns:  # an answer to the user (not a greeting or a prompt)
                    out.setdefault("v2v_ms", []).append(
                        round((event.ts_ns - last_speech_ns) / 1e6, 1))
                    last_speech_ns = 0
    return out


def diff(recorded: record.Recording, replayed: record.Recording) -> dict[str, Any]:
    """The changes from ``recorded`` to ``replayed``, for the stages the replay ran."""
    entries = replayed.events()
    after_events = [e for _, _, e in entries]
    # The stages that ran are those a replay handed the session to; everything else in its
    # capture is what the replay fed them (the recording's own events, unchanged), the claims
    # of the stages a judge waits for among them (WAITS_FOR). A replay never dispatches
    # (ctl.start); a live session does, and hands over only when a replica drains: its
    # stages are those that claimed it.
    topics = [sj.parse(subject)[1] for subject, _, _ in entries]
    replayed_into = {t.producer for t in topics if t.kind == "handover"}
    if sj.CTL_START in topics or not replayed_into:
        replayed_into = {e.stage for e in after_events if isinstance(e, ev.StageReady)}
    ran = tuple(sorted(replayed_into))
    producers = producers_of(ran)
    before_events = [e for _, _, e in recorded.events()]
    before, after = _facts(before_events, producers), _facts(after_events, producers)
    changes = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key, "(nothing)"), after.get(key, "(nothing)")
        if old != new:
            turn, what = key
            if what == "transcript" and key in before and key in after:
                new = _word_diff(old, new)
            changes.append(Change(turn, what, old, new))
    return {"recorded": recorded.header.session, "replayed": replayed.header.session,
            "stages": sorted(producers), "changes": [c.__dict__ for c in changes],
            "timings": {"recorded": timings(before_events, producers),
                        "replayed": timings(after_events, producers)},
            "changed": bool(changes)}


def render(result: dict[str, Any]) -> str:
    lines = [f"--- {result['recorded']} (recorded)", f"+++ {result['replayed']} (replayed)"]
    lines += [Change(**c).line() for c in result["changes"]]
    for name, values in result["timings"]["replayed"].items():
        lines.append(f"timing {name}: {result['timings']['recorded'].get(name, [])} -> {values}")
    lines.append("no changes" if not result["changed"] else
                 f"{len(result['changes'])} change(s)")
    return "\n".join(lines)
