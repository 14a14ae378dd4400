"""``voicebus bench barge-in``: how fast the agent falls silent when the user cuts in, and
whether it keeps talking through a cough or an "uh-huh".

Starts the whole stack (as ``bench livekit`` does) with a long echo acknowledgement
(``VOICEBUS_ECHO_ACK``), so every reply lasts several seconds. One ``Caller`` joins a room and
runs, per trial, three cases; each starts from a quiet agent that listens, asks a Piper-spoken
question, waits until the agent is speaking and 0.6–1.5 s (seeded) of its reply have been
heard, then:

- **interrupt**: says another question over the reply, and waits for its answer;
- **cough**: sends a 150 ms cough-like burst (seeded band-limited noise), and waits for the
  reply's end;
- **backchannel**: says "Uh-huh." or "Okay." (Piper), and waits for the reply's end.

Measures (clocks: ``time.monotonic()`` in the caller; bus events carry the publisher's
``time.time_ns()``, the caller keeps both for what it hears, so the two are compared on the
wall clock of this one machine):

- ``silence_after_onset_ms``: the interrupting question's first loud sample left the
  microphone → the last loud agent frame arrived before the agent's voice stopped (0 when it was
  already silent), i.e. the last loud frame before the answer to the new question started;
- ``cancel_ms``: that onset → the ``Cancel`` published on the bus;
- ``stale_frames``: loud agent frames that arrived after the ``Cancel`` and before the agent
  was "speaking" again (the new answer): audio of a cancelled reply. Must be 0;
- ``false_interruptions``: cough and backchannel cases whose reply was cut (a ``Cancel`` of its
  turn, or its final ``Playback`` interrupted);
- ``interrupts_heard``: interruptions whose answer (a ``ReplyDone``) holds the new question's
  words.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from proto import events as ev
from proto import subjects as sj
from services.ingress.audio import read_wav
from services.runtime.turns import words
from voicebus.bench.pipeline import stats
from voicebus.call import Caller, CallError, Turn
from voicebus.client import Tap
from voicebus.launcher import Stack
from voicebus.speech import say_to_wav

# The echo LLM repeats the question and adds this: about seven seconds of Piper.
ACK = ("Let me think about that for a moment. Here is a longer answer, so that there is time "
       "to cut in. I will stop talking when you speak.")
FIRST_QUESTIONS = ("Tell me a story about a dog.", "Where is the nearest train station?")
INTERRUPTIONS = ("What time is it?", "Please call my mother.")
BACKCHANNELS = ("Uh-huh.", "Okay.")
HEARD_S = (0.6, 1.5)  # how much of the reply is heard before the user cuts in
COUGH_MS = 150
COUGH_RATE = 16000


@dataclass
class Interruption:
    """One interrupt case, measured."""

    silence_ms: float
    cancel_ms: float | None  # None: no Cancel was seen
    stale: int | None  # None: no Cancel, so nothing to count against
    heard: bool


@dataclass
class QuietCase:
    """One cough or backchannel case: whether the reply was cut, and what STT made of it."""

    name: str
    cut: bool
    heard: str = ""


@dataclass
class Results:
    interruptions: list[Interruption] = field(default_factory=list)
    quiet_cases: list[QuietCase] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


# ---- the arithmetic (pure; unit-tested) ---------------------------------------------------------

def to_monotonic(wall_ns: int, ref: tuple[float, int]) -> float:
    """A wall-clock instant in ``time.monotonic()`` seconds, given one moment read on both
    clocks (``ref`` = (monotonic s, wall ns))."""
    return ref[0] + (wall_ns - ref[1]) / 1e9


def silence_after_onset_ms(onset: float, loud_arrivals: Iterable[float], until: float) -> float:
    """Onset → the last loud agent frame that arrived in [onset, until); 0 when none did (the
    agent was silent from the onset on). ``until``: the agent's next reply started."""
    heard = [t for t in loud_arrivals if onset <= t < until]
    return (max(heard) - onset) * 1000 if heard else 0.0


def stale_frames(loud_arrivals_ns: Iterable[int], cancel_ns: int, until_ns: int) -> int:
    """Loud agent frames that arrived after the Cancel and before the next reply started."""
    return sum(1 for t in loud_arrivals_ns if cancel_ns < t < until_ns)


def heard_in(question: str, reply: str) -> bool:
    """The reply holds the question's words, in order (the echo LLM repeats what it heard)."""
    asked, said = words(question), words(reply)
    return bool(asked) and any(said[i:i + len(asked)] == asked
                               for i in range(len(said) - len(asked) + 1))


def reply_cut(tap: Tap, room: str, turn: int) -> bool:
    """Reply ``turn`` was cancelled: a Cancel of that turn, or its final Playback interrupted."""
    return bool(tap.of(ev.Cancel, room, turn=turn)
                or tap.of(ev.Playback, room, turn=turn, final=True, interrupted=True))


def first_cancel(tap: Tap, room: str, turn: int, after_ns: int) -> ev.Cancel | None:
    cancels = [c for c in tap.of(ev.Cancel, room) if c.turn >= turn and c.ts_ns >= after_ns]
    return min(cancels, key=lambda c: c.ts_ns, default=None)


def next_speaking(tap: Tap, room: str, after_ns: int, after_turn: int = -1) -> ev.AgentState | None:
    """The first "speaking" state after ``after_ns`` of a turn later than ``after_turn``."""
    states = [s for s in tap.of(ev.AgentState, room, state="speaking")
              if s.ts_ns > after_ns and s.turn > after_turn]
    return min(states, key=lambda s: s.ts_ns, default=None)


def pending(tap: Tap, room: str) -> list[str]:
    """What the agent still owes, in words (empty: nothing): a final for the user's speech (the
    VAD's last edge is a start, or an end later than the last final), an answer to a final with
    words, or the playout of an answer (a cancelled turn owes nothing)."""
    owed = []
    edges = [e for _, e in tap.events
             if isinstance(e, (ev.SpeechStarted, ev.SpeechEnded)) and e.session == room]
    finals = tap.of(ev.Transcript, room, final=True)
    last_final_ns = max((t.ts_ns for t in finals), default=0)
    if edges and (isinstance(edges[-1], ev.SpeechStarted) or edges[-1].ts_ns > last_final_ns):
        owed.append("a final transcript of the user's speech")
    cut = max((c.turn for c in tap.of(ev.Cancel, room)), default=-1)
    verdicts = {v.turn: v for v in tap.of(ev.Verdict, room)}
    done = {d.turn: d for d in tap.of(ev.ReplyDone, room)}
    played = {p.turn for p in tap.of(ev.Playback, room, final=True)}
    owed += [f"a verdict on turn {t.turn}" for t in finals if t.turn not in verdicts]
    owed += [f"an answer to turn {v.turn}" for v in verdicts.values()
             if v.action != "ignore" and v.turn not in done and v.turn > cut]
    owed += [f"the playout of turn {d.turn}" for d in done.values()
             if d.text and not (d.error or d.interrupted) and d.turn not in played
             and d.turn > cut]
    return owed


def transcribed(tap: Tap, room: str, after_ns: int) -> str:
    """What STT made of the user's sound since ``after_ns``: its partials (each different one,
    in order), then its final."""
    said = [t for t in tap.of(ev.Transcript, room) if t.ts_ns >= after_ns and t.text]
    partials = list(dict.fromkeys(t.text for t in said if not t.final))
    finals = [t.text for t in said if t.final]
    parts = ([f"partials {', '.join(map(repr, partials))}"] if partials else []) + \
        ([f"final {finals[0]!r}"] if finals else [])
    return "; ".join(parts) or "nothing"


def summarise(results: Results, trials: int) -> dict[str, Any]:
    rows = results.interruptions
    silence = [r.silence_ms for r in rows]
    counted = [r.stale for r in rows if r.stale is not None]
    return {
        "trials": trials,
        "silence_after_onset_ms": {**stats(silence),
                                   "max": round(max(silence), 2) if silence else float("nan")},
        "cancel_ms": stats([r.cancel_ms for r in rows if r.cancel_ms is not None]),
        "stale_frames": sum(counted),
        "stale_frames_counted_in": len(counted),  # interruptions with a Cancel to count from
        "interrupts_heard": sum(r.heard for r in rows),
        "interrupts_measured": len(rows),
        "false_interruptions": sum(case.cut for case in results.quiet_cases),
        "no_interrupt_cases": len(results.quiet_cases),
        "falsely_cut": [f"{case.name} (heard: {case.heard})"
                        for case in results.quiet_cases if case.cut],
        "failures": results.failures,
    }


def cough(rng: np.random.Generator, rate: int = COUGH_RATE, ms: int = COUGH_MS) -> bytes:
    """A cough-like burst: noise band-limited to 300–3500 Hz under a 10 ms attack and a fast
    decay, peaking at half of full scale (mono s16le at ``rate``)."""
    n = rate * ms // 1000
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / rate)
    spectrum[(freqs < 300) | (freqs > 3500)] = 0
    burst = np.fft.irfft(spectrum, n)
    t = np.arange(n) / rate
    envelope = np.minimum(1.0, t / 0.010) * np.exp(-t / 0.050)
    envelope *= np.minimum(1.0, (ms / 1000 - t) / 0.005)  # no click at the end
    burst *= envelope
    burst *= 0.5 * 32767 / np.abs(burst).max()
    return burst.astype(np.int16).tobytes()


# ---- the run ------------------------------------------------------------------------------------

@dataclass
class Bench:
    caller: Caller
    tap: Tap
    room: str
    timeout: float

    async def settle(self) -> None:
        """Until every reply owed is played out and the agent, as the user sees it, listens."""
        try:
            await self.tap.wait_for(lambda: not pending(self.tap, self.room), self.timeout * 2)
        except TimeoutError:
            owed = ", ".join(pending(self.tap, self.room))
            raise TimeoutError(f"the agent still owed {owed} after {self.timeout * 2:.0f} s") \
                from None
        await self.caller.wait_state("listening", timeout=self.timeout)

    async def first_sound(self, turn: Turn) -> float:
        """When the first loud sample of the answer to ``turn`` arrived."""
        deadline = time.monotonic() + self.timeout
        while not turn.first_sound:
            self.caller.sound.clear()
            if turn.first_sound:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise CallError("the reply stayed silent")
            try:
                await asyncio.wait_for(self.caller.sound.wait(), left)
            except asyncio.TimeoutError:
                raise CallError("the reply stayed silent") from None
        return turn.first_sound

    async def ask_and_listen(self, question: tuple[bytes, int], heard_s: float) -> int:
        """Ask, wait until ``heard_s`` of the reply have been heard; return the reply's turn."""
        asked = await self.caller.say(*question)
        await self.caller.wait_state("speaking", timeout=self.timeout)
        state = await self.tap.wait_for(
            lambda: next_speaking(self.tap, self.room, asked.speech_end_wall_ns), self.timeout,
            "the reply's speaking state on the bus")
        first = await self.first_sound(asked)
        await asyncio.sleep(max(0.0, first + heard_s - time.monotonic()))  # the user listens
        if self.tap.of(ev.Playback, self.room, turn=state.turn, final=True):
            raise CallError(f"reply {state.turn} was over before the user spoke again")
        return state.turn

    async def interrupt(self, question: tuple[bytes, int], heard_s: float,
                        interruption: tuple[bytes, int], text: str,
                        failures: list[str]) -> Interruption:
        reply = await self.ask_and_listen(question, heard_s)
        said = await self.caller.say(*interruption)
        onset, onset_ns = said.speech_start, said.speech_start_wall_ns
        answer: ev.ReplyDone | None = None
        try:
            answer = await self.tap.wait_for(
                lambda: next((d for d in self.tap.of(ev.ReplyDone, self.room)
                              if d.ts_ns > onset_ns and heard_in(text, d.text)),
                             None),
                self.timeout, f"an answer to {text!r}")
        except TimeoutError as exc:
            failures.append(str(exc))
        await self.settle()  # the answer (if any) played out; the agent listens again
        cancel = first_cancel(self.tap, self.room, reply, onset_ns)
        answering = next_speaking(self.tap, self.room, onset_ns, after_turn=reply)
        until_ns = answering.ts_ns if answering else time.time_ns()
        ref = (time.monotonic(), time.time_ns())
        arrivals = list(self.caller.loud_frames)
        silence = silence_after_onset_ms(onset, (m for m, _ in arrivals),
                                         to_monotonic(until_ns, ref))
        if cancel is None:
            failures.append(f"no Cancel of reply {reply}")
            return Interruption(silence, None, None, answer is not None)
        stale = stale_frames((w for _, w in arrivals), cancel.ts_ns, until_ns)
        return Interruption(silence, (cancel.ts_ns - onset_ns) / 1e6, stale, answer is not None)

    async def no_interrupt(self, question: tuple[bytes, int], heard_s: float,
                           sound: tuple[bytes, int], name: str) -> QuietCase:
        reply = await self.ask_and_listen(question, heard_s)
        said = await self.caller.say(*sound)
        await self.tap.wait_for(
            lambda: self.tap.of(ev.Playback, self.room, turn=reply, final=True),
            self.timeout * 2, f"reply {reply} to be played out")
        await self.settle()
        return QuietCase(name, reply_cut(self.tap, self.room, reply),
                         transcribed(self.tap, self.room, said.speech_start_wall_ns))


async def run_bargein_bench(trials: int, seed: int = 1, timeout: float = 30.0) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="voicebus-bench-bargein-"))
    log_path = workdir / "stack.log"
    log_file = log_path.open("w")
    env = {"VOICEBUS_ECHO_ACK": ACK}
    stack = Stack(workdir, sink=lambda line: log_file.write(line + "\n"), env=env, livekit=True)

    async def speak(texts: Sequence[str], name: str) -> list[tuple[bytes, int]]:
        out = []
        for i, text in enumerate(texts):
            pcm, rate, _ = read_wav(await say_to_wav(text, workdir / f"{name}{i}.wav", lead_ms=0))
            out.append((pcm, rate))
        return out

    firsts = await speak(FIRST_QUESTIONS, "q")
    interruptions = await speak(INTERRUPTIONS, "i")
    backchannels = await speak(BACKCHANNELS, "b")
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    room = f"bench-{secrets.token_hex(3)}"
    results = Results()
    await stack.start()
    nc = await stack.connect()
    tap = Tap(nc)
    await tap.watch(sj.session_all(room))
    caller = Caller(stack.token_url, room, "bench-user")
    bench = Bench(caller, tap, room, timeout)
    try:
        await caller.join()
        await caller.wait_state("listening", timeout=timeout)
        for trial in range(trials):
            first, other = firsts[trial % len(firsts)], firsts[(trial + 1) % len(firsts)]
            pick = trial % len(INTERRUPTIONS)
            said = BACKCHANNELS[trial % len(BACKCHANNELS)]
            cases: list[tuple[str, Callable[[list[str]], Awaitable[Any]]]] = [
                ("interrupt", lambda notes: bench.interrupt(
                    first, rng.uniform(*HEARD_S), interruptions[pick], INTERRUPTIONS[pick],
                    notes)),
                ("cough", lambda notes: bench.no_interrupt(
                    other, rng.uniform(*HEARD_S), (cough(noise), COUGH_RATE),
                    f"trial {trial + 1} cough")),
                (said, lambda notes: bench.no_interrupt(
                    first, rng.uniform(*HEARD_S), backchannels[trial % len(backchannels)],
                    f"trial {trial + 1} {said}")),
            ]
            for name, case in cases:
                notes: list[str] = []
                stop = False
                try:
                    outcome = await case(notes)
                except (CallError, TimeoutError) as exc:
                    outcome = None
                    notes.append(str(exc))
                    try:
                        await bench.settle()  # the next case starts from a listening agent
                    except (CallError, TimeoutError) as again:
                        notes.append(f"the agent did not settle ({again}); stopping")
                        stop = True
                results.failures.extend(f"trial {trial + 1} {name}: {n}" for n in notes)
                if isinstance(outcome, Interruption):
                    results.interruptions.append(outcome)
                elif isinstance(outcome, QuietCase):
                    results.quiet_cases.append(outcome)
                if stop:
                    return _result(results, trials, env, seed, log_path)
    finally:
        await caller.leave()
        await tap.close()
        await nc.close()
        await stack.stop()
        log_file.close()
    return _result(results, trials, env, seed, log_path)


def _result(results: Results, trials: int, env: dict[str, str], seed: int,
            log_path: Path) -> dict[str, Any]:
    return {**summarise(results, trials), "settings": dict(env), "seed": seed,
            "log": str(log_path)}
