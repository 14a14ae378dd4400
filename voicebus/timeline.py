"""A recorded session as a conversation: who spoke when, what each side said, what the user
actually heard of each reply, what was interrupted, and how long each turn took from the end of
the user's speech to the agent's voice. The session page (``/sessions/<id>`` of the token
service) and its JSON show exactly this.

It is built from the capture alone (``record.captured``): no stage is asked and nothing is
kept, so every figure is something a stage published. Times are milliseconds from the
session's first event on the publishers' wall clocks (``ts_ns``), the same clocks the latency
measures use; audio frames count but are not shown.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import msgspec

import proto
from proto import codec
from proto import events as ev
from proto import subjects as sj
from voicebus.record import Entry

# The latency waterfall of a turn, in the order the work flows.
WATERFALL = ("end of speech", "STT final", "verdict", "LLM first delta", "TTS first audio",
             "playback start")
# A drafted turn's reply is prepared while the STT holds its final back: the same points and
# two more, in the order they happened (the reply may be ready before the final).
DRAFTED = ("end of speech", "words settled", "draft", "LLM first delta", "TTS first audio",
           "STT final", "verdict", "playback start")
# Turns the agent takes on its own, by the judge's action (the rest answer, or ignore, the user).
OWN_TURNS = {"greet": "greeting", "prompt": "prompt", "goodbye": "goodbye"}
MAX_DETAIL = 200


class Span(msgspec.Struct, kw_only=True):
    """Someone speaking. The user: between the VAD's edges, ending at the last speech sample.
    The agent: its reply as played, from where its first ``Playback`` says it began to its
    last report."""

    who: Literal["user", "agent"]
    turn: int | None
    start_ms: float
    end_ms: float
    interrupted: bool = False


class Partial(msgspec.Struct):
    at_ms: float
    text: str


class Step(msgspec.Struct, kw_only=True):
    """One point of a turn's waterfall: when it happened, since the turn's first point, and
    since the point before."""

    name: str
    at_ms: float
    since_ms: float
    delta_ms: float


class Heard(msgspec.Struct, kw_only=True):
    """What the user heard of a reply: ``text`` was played, ``unheard`` was not (cut, or the
    session ended first)."""

    played_ms: int
    text: str
    unheard: str
    interrupted: bool
    final: bool


class Use(msgspec.Struct, kw_only=True):
    """What one provider of a stage did (``Usage`` events): in one turn, or summed over the
    session. ``cost_usd``: the sum of the priced events' costs (None: none was priced)."""

    stage: str
    provider: str
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    characters: int = 0
    audio_in_s: float = 0.0
    audio_out_s: float = 0.0
    cost_usd: float | None = None
    failed: bool = False  # (a turn's) the provider failed on it
    turns: int = 0  # (the session's) turns it worked on


class Turn(msgspec.Struct, kw_only=True):
    turn: int
    kind: str  # user, greeting, prompt, goodbye (the agent's own turns) or idle
    said: str = ""  # the user's final transcript
    partials: list[Partial] = []
    speech_ms: int = 0
    stt_compute_ms: float = 0.0
    verdict: str = ""  # the judge's action: answer, ignore, greet, prompt, goodbye
    reason: str = ""
    reply: str = ""
    error: str = ""
    heard: Heard | None = None
    interrupted: bool = False
    cancelled_ms: float | None = None  # when the judge cut this reply
    waterfall: list[Step] = []
    usage: list[Use] = []  # each stage's providers' work on the turn


class State(msgspec.Struct):
    at_ms: float
    state: str
    turn: int


class Mark(msgspec.Struct, kw_only=True):
    """One event worth a line in the log: where it was published, for which turn, what."""

    at_ms: float
    source: str  # producer.kind of its subject
    kind: str  # the event's type
    turn: int | None = None
    detail: str = ""


class Timeline(msgspec.Struct, kw_only=True):
    session: str
    contract: int
    start_ns: int  # wall clock of the first event (0 when nothing decoded)
    duration_ms: float
    ended: str = ""  # the SessionEnd's reason
    messages: int  # captured messages, audio frames included
    rejected: int = 0  # messages that did not decode on their subject (left out)
    spans: list[Span] = []
    states: list[State] = []
    turns: list[Turn] = []
    marks: list[Mark] = []
    usage: list[Use] = []  # per stage and provider, the whole session


@dataclass
class _Facts:
    """Everything published about one turn, as it arrives."""

    partials: list[ev.Transcript] = field(default_factory=list)
    final: ev.Transcript | None = None
    idle: ev.UserIdle | None = None
    verdict: ev.Verdict | None = None
    settled: ev.Transcript | None = None  # the words, before the final (a draft's cue)
    draft: ev.Verdict | None = None
    deltas: list[ev.ReplyDelta] = field(default_factory=list)
    done: ev.ReplyDone | None = None
    first_audio_ns: int = 0
    synthesis: ev.SynthesisDone | None = None
    plays: list[ev.Playback] = field(default_factory=list)
    cancel: ev.Cancel | None = None
    usage: list[ev.Usage] = field(default_factory=list)


def build(session: str, entries: Iterable[Entry]) -> Timeline:
    """The timeline of ``session`` from its captured messages (in capture order)."""
    decoded: list[tuple[str, ev.AnyEvent]] = []
    messages = rejected = 0
    for entry in entries:
        messages += 1
        try:
            decoded.append((entry.subject, codec.decode_on(entry.subject, entry.data)))
        except codec.Rejected:
            rejected += 1
    stamps = [e.ts_ns for _, e in decoded if e.ts_ns > 0]
    origin = min(stamps, default=0)
    builder = _Builder(origin, max(stamps, default=0))
    for subject, event in decoded:
        builder.add(subject, event)
    users = builder.user_spans()
    return Timeline(session=session, contract=proto.CONTRACT_VERSION, start_ns=origin,
                    duration_ms=builder.ms(builder.last_ns), ended=builder.ended,
                    messages=messages, rejected=rejected, spans=builder.spans(users),
                    states=builder.states, turns=builder.turns(users),
                    marks=sorted(builder.marks, key=lambda m: m.at_ms),
                    usage=_totals(u for f in builder.facts.values() for u in f.usage))


class _Builder:
    def __init__(self, origin_ns: int, last_ns: int) -> None:
        self.origin_ns = origin_ns
        self.last_ns = last_ns
        self.facts: dict[int, _Facts] = {}
        self.speech: list[tuple[ev.SpeechStarted, ev.SpeechEnded | None]] = []
        self.transcripts: list[ev.Transcript] = []
        self.states: list[State] = []
        self.marks: list[Mark] = []
        self.ended = ""

    def ms(self, ns: int) -> float:
        return round((ns - self.origin_ns) / 1e6, 1) if ns else 0.0

    def turn(self, number: int) -> _Facts:
        return self.facts.setdefault(number, _Facts())

    def mark(self, subject: str, event: ev.Event, detail: str = "", turn: int | None = None
             ) -> None:
        _, topic = sj.parse(subject)
        self.marks.append(Mark(at_ms=self.ms(event.ts_ns), source=f"{topic.producer}.{topic.kind}",
                               kind=type(event).__name__, turn=turn, detail=detail[:MAX_DETAIL]))

    def add(self, subject: str, event: ev.AnyEvent) -> None:
        match event:
            case ev.AudioFrame(turn=turn) if sj.parse(subject)[1] is sj.TTS_AUDIO:
                facts = self.turn(turn)
                if not facts.first_audio_ns or event.ts_ns < facts.first_audio_ns:
                    facts.first_audio_ns = event.ts_ns
            case ev.AudioFrame():
                pass  # the user's microphone: its speech is known from the VAD's edges
            case ev.SpeechStarted() | ev.SpeechEnded():
                self.add_speech(subject, event)
            case ev.Transcript():
                self.add_transcript(subject, event)
            case ev.ReplyDelta(turn=turn):
                self.turn(turn).deltas.append(event)
            case ev.Playback(turn=turn):
                self.add_playback(subject, event, self.turn(turn))
            case _:
                self.add_decision(subject, event)

    def add_speech(self, subject: str, event: ev.SpeechStarted | ev.SpeechEnded) -> None:
        if isinstance(event, ev.SpeechStarted):
            self.speech.append((event, None))
            self.mark(subject, event, "the user starts speaking")
        else:
            if self.speech and self.speech[-1][1] is None:
                self.speech[-1] = (self.speech[-1][0], event)
            self.mark(subject, event, f"the user stops speaking ({event.speech_ms} ms of speech)")

    def add_transcript(self, subject: str, event: ev.Transcript) -> None:
        self.transcripts.append(event)
        facts = self.turn(event.turn)
        if event.final:
            facts.final = facts.final or event
        else:
            facts.partials.append(event)
            if event.settled:
                facts.settled = facts.settled or event
        self.mark(subject, event, event.text, event.turn)

    def add_playback(self, subject: str, event: ev.Playback, facts: _Facts) -> None:
        if not facts.plays:
            self.mark(subject, event, "the reply starts playing", event.turn)
        facts.plays.append(event)
        if event.final:
            cut = ", cut" if event.interrupted else ""
            self.mark(subject, event, f"played {event.played_ms} ms{cut}", event.turn)

    def add_decision(self, subject: str, event: ev.AnyEvent) -> None:
        """The judge's decisions, the replies' ends, the session's life: kept and logged."""
        match event:
            case ev.Verdict(turn=turn, draft=True):
                self.turn(turn).draft = self.turn(turn).draft or event
                self.mark(subject, event, "draft (prepared, not played)", turn)
            case ev.Verdict(turn=turn):
                self.turn(turn).verdict = self.turn(turn).verdict or event
                self.mark(subject, event, _join(event.action, event.reason), turn)
            case ev.Cancel(turn=turn):
                self.turn(turn).cancel = self.turn(turn).cancel or event
                self.mark(subject, event, _join("cut", event.reason), turn)
            case ev.UserIdle(turn=turn):
                self.turn(turn).idle = event
                self.mark(subject, event, f"the user is silent ({event.count})", turn)
            case ev.ReplyDone(turn=turn):
                self.turn(turn).done = self.turn(turn).done or event
                self.mark(subject, event, _join("reply complete", "interrupted" if
                                                event.interrupted else event.error), turn)
            case ev.SynthesisDone(turn=turn):
                self.turn(turn).synthesis = self.turn(turn).synthesis or event
                self.mark(subject, event, f"{event.frames} frames synthesized", turn)
            case ev.AgentState(state=state, turn=turn):
                self.states.append(State(self.ms(event.ts_ns), state, turn))
                self.mark(subject, event, state, turn)
            case ev.SessionEnd(reason=reason):
                self.ended = self.ended or reason
                self.mark(subject, event, reason)
            case ev.Usage(turn=turn):
                self.turn(turn).usage.append(event)
                self.mark(subject, event, usage_line(use_of(event)), turn)
            case _:
                self.mark(subject, event, _describe(event))

    # ---- the results ---------------------------------------------------------------------------

    def user_spans(self) -> list[Span]:
        """Each utterance belongs to the turn of the first transcript after it began."""
        spans = []
        for started, ended in self.speech:
            turn = next((t.turn for t in self.transcripts if t.ts_ns >= started.ts_ns), None)
            if ended is None:  # the session ended as the user spoke
                start_ns, end_ns = started.ts_ns, max(self.last_ns, started.ts_ns)
            else:
                # Anchored at the last speech sample, as long as the VAD measured it: the edges'
                # own stamps are late by the VAD's detection and silence windows.
                end_ns = ended.timing.last_speech_ts_ns if ended.timing and \
                    ended.timing.last_speech_ts_ns else ended.ts_ns
                start_ns = end_ns - max(0, ended.pts_ms - started.pts_ms) * 1_000_000
            spans.append(Span(who="user", turn=turn, start_ms=self.ms(start_ns),
                              end_ms=self.ms(end_ns)))
        return spans

    def spans(self, users: list[Span]) -> list[Span]:
        spans = list(users)
        for number, facts in sorted(self.facts.items()):
            if facts.plays:
                first, last = facts.plays[0], facts.plays[-1]
                spans.append(Span(who="agent", turn=number, start_ms=self.ms(_play_start(first)),
                                  end_ms=self.ms(last.ts_ns), interrupted=last.interrupted))
        return sorted(spans, key=lambda s: s.start_ms)

    def turns(self, users: list[Span]) -> list[Turn]:
        user_ends: dict[int, float] = {}
        for span in users:
            if span.turn is not None:
                user_ends[span.turn] = max(span.end_ms, user_ends.get(span.turn, span.end_ms))
        return [self.make_turn(number, facts, user_ends.get(number))
                for number, facts in sorted(self.facts.items())]

    def make_turn(self, number: int, facts: _Facts, speech_end_ms: float | None) -> Turn:
        final, verdict, done = facts.final, facts.verdict, facts.done
        text = (facts.synthesis.text if facts.synthesis and facts.synthesis.text else
                done.text if done and done.text else "".join(d.text for d in facts.deltas))
        heard = _heard(text, facts.plays[-1]) if facts.plays else None
        interrupted = bool(facts.cancel or (heard and heard.interrupted) or
                           (done and done.interrupted) or
                           (facts.synthesis and facts.synthesis.interrupted))
        return Turn(
            turn=number, kind=_kind(number, facts),
            said=final.text if final else "",
            partials=[Partial(self.ms(p.ts_ns), p.text) for p in facts.partials],
            speech_ms=final.speech_ms if final else 0,
            stt_compute_ms=round(final.timing.compute_ms, 1) if final and final.timing else 0.0,
            verdict=verdict.action if verdict else "", reason=verdict.reason if verdict else "",
            reply=text, error=done.error if done else "", heard=heard, interrupted=interrupted,
            cancelled_ms=self.ms(facts.cancel.ts_ns) if facts.cancel else None,
            waterfall=self.waterfall(facts, speech_end_ms),
            usage=[use_of(u) for u in facts.usage])

    def waterfall(self, facts: _Facts, speech_end_ms: float | None) -> list[Step]:
        synthesis = facts.synthesis
        first_audio_ns = facts.first_audio_ns or (
            synthesis.timing.first_frame_ts_ns if synthesis and synthesis.timing else 0)
        at = {
            "end of speech": speech_end_ms,
            "words settled": self.ms(facts.settled.ts_ns) if facts.settled else None,
            "draft": self.ms(facts.draft.ts_ns) if facts.draft else None,
            "STT final": self.ms(facts.final.ts_ns) if facts.final else None,
            "verdict": self.ms(facts.verdict.ts_ns) if facts.verdict else None,
            "LLM first delta": self.ms(min(d.ts_ns for d in facts.deltas)) if facts.deltas
            else None,
            "TTS first audio": self.ms(first_audio_ns) if first_audio_ns else None,
            "playback start": self.ms(_play_start(facts.plays[0])) if facts.plays else None,
        }
        names = DRAFTED if facts.draft else WATERFALL
        points = sorted(((at[name], names.index(name), name) for name in names
                         if at[name] is not None))
        steps: list[Step] = []
        for at_ms, _, name in points:
            first = steps[0].at_ms if steps else at_ms
            before = steps[-1].at_ms if steps else at_ms
            steps.append(Step(name=name, at_ms=at_ms, since_ms=round(at_ms - first, 1),
                              delta_ms=round(at_ms - before, 1)))
        return steps


def use_of(event: ev.Usage) -> Use:
    return Use(stage=event.stage, provider=event.provider, requests=event.requests,
               input_tokens=event.input_tokens, output_tokens=event.output_tokens,
               cached_tokens=event.cached_tokens, characters=event.characters,
               audio_in_s=event.audio_in_s, audio_out_s=event.audio_out_s,
               cost_usd=event.cost_usd, failed=event.failed, turns=1)


def _totals(events: Iterable[ev.Usage]) -> list[Use]:
    """The session's usage per stage and provider, in pipeline order."""
    totals: dict[tuple[str, str], Use] = {}
    for event in events:
        one = use_of(event)
        total = totals.setdefault((one.stage, one.provider), Use(stage=one.stage,
                                                                 provider=one.provider))
        for unit in ("requests", "input_tokens", "output_tokens", "cached_tokens",
                     "characters", "turns"):
            setattr(total, unit, getattr(total, unit) + getattr(one, unit))
        total.audio_in_s = round(total.audio_in_s + one.audio_in_s, 3)
        total.audio_out_s = round(total.audio_out_s + one.audio_out_s, 3)
        if one.cost_usd is not None:
            total.cost_usd = round((total.cost_usd or 0.0) + one.cost_usd, 9)
    order = {stage: index for index, stage in enumerate(sj.PROVIDER_STAGES)}
    return sorted(totals.values(), key=lambda u: (order.get(u.stage, 9), u.provider))


def usage_line(use: Use) -> str:
    """``llm openai: 2 requests, 120 input tokens (100 cached), 12 output tokens, $0.000031``"""
    def plural(count: int, what: str) -> str:
        return f"{count} {what}{'' if count == 1 else 's'}"

    parts = [plural(use.turns, "turn")] if use.turns > 1 else []
    parts.append(plural(use.requests, "request"))
    if use.input_tokens or use.output_tokens:
        cached = f" ({use.cached_tokens} cached)" if use.cached_tokens else ""
        parts += [f"{use.input_tokens} input tokens{cached}", f"{use.output_tokens} output tokens"]
    if use.characters:
        parts.append(plural(use.characters, "character"))
    if use.audio_in_s:
        parts.append(f"{use.audio_in_s:.2f} s of audio in")
    if use.audio_out_s:
        parts.append(f"{use.audio_out_s:.2f} s of audio out")
    if use.cost_usd is not None:
        parts.append(f"${use.cost_usd:.6f}")
    return f"{use.stage} {use.provider}: {', '.join(parts)}" + (" (failed)" if use.failed else "")


def usage_report(session: str, entries: Iterable[Entry]) -> list[str]:
    """``voicebus record usage``: a line per provider per turn, then per provider in all."""
    built = build(session, entries)
    lines = [f"turn {turn.turn}\t{usage_line(use)}" for turn in built.turns for use in turn.usage]
    lines += [f"total\t{usage_line(use)}" for use in built.usage]
    return lines or [f"no usage recorded in {session}"]


def _play_start(play: ev.Playback) -> int:
    """When a reply began to play, from its first report: egress writes each frame to the
    user when it is due and reports right after, so a report of ``played_ms`` comes as its
    last frame begins, ``played_ms`` less one frame after the first did."""
    return play.ts_ns - max(0, play.played_ms - ev.FRAME_MS) * 1_000_000


def _heard(text: str, last: ev.Playback) -> Heard:
    cut = min(max(last.text_offset, 0), len(text))
    return Heard(played_ms=last.played_ms, text=text[:cut], unheard=text[cut:],
                 interrupted=last.interrupted, final=last.final)


def _kind(number: int, facts: _Facts) -> str:
    if facts.verdict is not None:
        return OWN_TURNS.get(facts.verdict.action, "user")
    if facts.idle is not None:
        return "idle"
    return "greeting" if number == 0 else "user"


def _join(*parts: str) -> str:
    return ": ".join(p for p in parts if p)


def _describe(event: ev.AnyEvent) -> str:
    """A line for the log. Never a file path (a development session's files stay private)."""
    match event:
        case ev.FileSessionStart():
            return "session start (development file session)"
        case ev.SessionStart(room=room):
            return f"session start in room {room}" if room else "session start"
        case ev.StageReady(stage=stage, replica=replica):
            return f"{stage} ready ({replica})"
        case ev.StageError(stage=stage, message=message):
            return f"{stage} failed: {message}"
        case ev.InputTrack(participant=participant, active=active):
            return f"{participant}'s microphone {'on' if active else 'off'}"
        case ev.UserText(participant=participant):
            return f"{participant} typed a message"  # its words are in the turn's transcript
        case ev.ToolUse(name=name, done=False):
            return f"calls {name}"
        case ev.ToolUse(name=name, error=error) if error:
            return f"{name} failed: {error[:120]}"
        case ev.ToolUse(name=name, ms=ms):
            return f"{name} answered in {ms:.0f} ms"
        case ev.Dtmf(digit=digit):
            return f"key {digit}"
    return ""
