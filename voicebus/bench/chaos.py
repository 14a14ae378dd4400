"""``voicebus bench chaos``: replicas killed (or stopped) in the middle of calls.

Starts the whole stack with two replicas of every stage; makes ``calls`` calls through LiveKit,
one after the other, each a new room and a ``Caller`` asking ``turns`` questions. ``kills``
times, at a moment drawn at random (seeded) around one of the questions, the replica that owns
that call for a stage (chosen in turn among ``--stage``) gets ``--signal``; an orchestrator's
restart follows at once. Per question, *answered* means the agent's reply holding the
question's words was played to its end. Reported:

- ``turns_lost``: questions not answered (a kill can cost the turn in flight; the target is
  ``turns_lost <= kills``);
- ``recovery_ms``: the signal → the stage's ``<stage>.ready`` for that session from another
  replica (the dead one's lease expired and a replica took the session over, or it was handed
  over);
- ``stale_frames``: loud agent frames that reached the user after a ``Cancel`` and before the
  agent's next "speaking" state: audio of a cut turn (must be 0);
- ``v2v_ms``: the silence the user heard after each answered question (the question's last
  sample → the agent's first audible sample), for questions with a kill around them
  (``killed``) and without (``calm``); ``added_silence_ms``: each ``killed`` one minus the
  ``calm`` median — what a kill (or a handover) cost the user in waiting;
- the same per stage.

``--stage nats`` (on ``--nats-cluster 3``) kills nodes of the NATS cluster instead: each time
the node most of the stack's connections are on, restarted at once; its ``recovery_ms`` runs
until every connection it had is back on the surviving nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from proto import events as ev
from proto import subjects as sj
from services.ingress.audio import read_wav
from voicebus.bench.bargein import heard_in, next_speaking, stale_frames
from voicebus.bench.pipeline import PROMPTS, stats
from voicebus.call import Caller
from voicebus.client import Tap
from voicebus.launcher import Stack
from voicebus.speech import say_to_wav

SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM}


@dataclass
class Kill:
    stage: str
    call: int
    turn: int
    delay_s: float  # after the question's last sample left the microphone
    replica: str = ""
    at_ns: int = 0
    recovery_ms: float | None = None
    cost_the_turn: bool = False  # its question went unanswered


@dataclass
class Chaos:
    stack: Stack
    tap: Tap
    sig: signal.Signals
    timeout: float
    kills: list[Kill] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    restarts: list[asyncio.Task[None]] = field(default_factory=list)
    pending: list[asyncio.Task[None]] = field(default_factory=list)  # kills under way
    waits: list[tuple[float, bool]] = field(default_factory=list)  # (V2V ms, killed around it)
    nats_restart: asyncio.Task[None] | None = None  # the last NATS node killed, coming back

    async def kill(self, kill: Kill, room: str) -> None:
        await asyncio.sleep(kill.delay_s)
        if kill.stage == "nats":
            await self.kill_nats_node(kill)
            return
        owners = [r.replica for r in self.tap.of(ev.StageReady, room, stage=kill.stage)]
        proc = self.stack.procs.get(owners[-1]) if owners else None
        if proc is None or not proc.alive:
            self.failures.append(f"call {kill.call}: no live {kill.stage} owner to kill")
            return
        kill.replica, kill.at_ns = owners[-1], time.time_ns()
        proc.process.send_signal(self.sig)
        self.restarts.append(asyncio.create_task(self.restart(kill)))

    async def restart(self, kill: Kill) -> None:
        """What an orchestrator does: the process is gone, start it again."""
        await self.stack.procs[kill.replica].process.wait()
        index = int(kill.replica.removeprefix(kill.stage) or 0)
        await self.stack.start_stage(kill.stage, index)

    async def kill_nats_node(self, kill: Kill) -> None:
        # One node at a time: the last one killed is back before the next goes (two of three
        # down is a lost quorum, which no deployment survives by design).
        if self.nats_restart is not None:
            await self.nats_restart
        nodes = [n for n in range(self.stack.nats_cluster)
                 if self.stack.nats_name(n) in self.stack.procs]
        clients = await asyncio.gather(*(self.stack.nats_clients(n) for n in nodes))
        total = sum(len(c) for c in clients)
        node = nodes[max(range(len(nodes)), key=lambda i: len(clients[i]))]
        kill.replica, kill.at_ns = self.stack.nats_name(node), time.time_ns()
        await self.stack.kill_nats_node(node)
        self.nats_restart = asyncio.create_task(self.reconnected(kill, nodes, node, total))
        self.restarts.append(self.nats_restart)

    async def reconnected(self, kill: Kill, nodes: list[int], dead: int, total: int) -> None:
        """Every connection the cluster had is back on the surviving nodes; then the dead node
        is started again."""
        left = [n for n in nodes if n != dead]
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            counts = await asyncio.gather(*(self.stack.nats_clients(n) for n in left),
                                          return_exceptions=True)
            if sum(len(c) for c in counts if isinstance(c, list)) >= total:
                kill.recovery_ms = (time.time_ns() - kill.at_ns) / 1e6
                break
            await asyncio.sleep(0.05)
        await self.stack.restart_nats_node(dead)

    def recovered(self, kill: Kill, room: str) -> bool:
        """Whether another replica has announced the session since the kill (and when); for a
        NATS node, whether its connections are all back."""
        if kill.stage == "nats":
            return kill.recovery_ms is not None
        ready = [r.ts_ns for r in self.tap.of(ev.StageReady, room, stage=kill.stage)
                 if r.replica != kill.replica and r.ts_ns > kill.at_ns]
        if kill.at_ns and ready:
            kill.recovery_ms = (min(ready) - kill.at_ns) / 1e6
        return kill.recovery_ms is not None

    async def answered(self, room: str, question: str, since_ns: int) -> bool:
        def played() -> bool:
            for done in self.tap.of(ev.ReplyDone, room):
                if done.ts_ns > since_ns and heard_in(question, done.text):
                    end = self.tap.of(ev.Playback, room, turn=done.turn, final=True)
                    if end and not end[0].interrupted and end[0].played_ms > 0:
                        return True
            return False

        try:
            await self.tap.wait_for(played, self.timeout, "the answer")
            return True
        except TimeoutError:
            return False


def plan(calls: int, turns: int, kills: int, stages: list[str], rng: random.Random) -> list[Kill]:
    """Kills dealt round the calls, each call's questions taken in a shuffled order (no question
    gets a second kill before every question of its call has one), the stages in turn."""
    orders = [rng.sample(range(turns), turns) for _ in range(calls)]
    return [Kill(stages[j % len(stages)], j % calls, orders[j % calls][(j // calls) % turns],
                 round(rng.uniform(0.0, 1.5), 2))
            for j in range(kills)]


async def one_call(chaos: Chaos, index: int, questions: list[tuple[str, bytes, int]],
                   kills: list[Kill]) -> tuple[int, int]:
    """(questions answered, loud frames of cut turns) of one call. A question that goes
    unanswered is charged to the kills made around it."""
    room = f"chaos-{index}-{secrets.token_hex(2)}"
    await chaos.tap.watch(sj.session_all(room))
    caller = Caller(chaos.stack.token_url, room, f"user-{index}")
    answered = 0
    try:
        await caller.join()
        try:
            await caller.wait_state("listening", timeout=chaos.timeout)
        except Exception as exc:  # noqa: BLE001 — the call never started: all its turns lost
            chaos.failures.append(f"call {index}: the agent never listened: {exc}")
            return 0, 0
        for number, (text, pcm, rate) in enumerate(questions):
            asked_ns = time.time_ns()
            turn = await caller.say(pcm, rate)
            around = [k for k in kills if k.turn == number]
            for kill in around:
                chaos.pending.append(asyncio.create_task(chaos.kill(kill, room)))
            if await chaos.answered(room, text, asked_ns):
                answered += 1
                if turn.first_sound:
                    chaos.waits.append((turn.v2v_ms, bool(around)))
            else:
                for kill in around:
                    kill.cost_the_turn = True
                heard = [(t.turn, t.text) for t in chaos.tap.of(ev.Transcript, room)
                         if t.final and t.ts_ns > asked_ns]
                said = [(d.turn, d.text, d.error) for d in chaos.tap.of(ev.ReplyDone, room)
                        if d.ts_ns > asked_ns]
                chaos.failures.append(f"call {index}, question {number + 1} ({text!r}) was not "
                                      f"answered within {chaos.timeout:.0f}s; heard {heard}, "
                                      f"replied {said}")
            try:
                await caller.wait_state("listening", timeout=chaos.timeout)
            except Exception as exc:  # noqa: BLE001 — counted; the next question is still asked
                chaos.failures.append(f"call {index}: {exc}")
        await asyncio.gather(*chaos.pending)
        for kill in (k for k in kills if k.at_ns):  # the last takeovers, announced or not
            with contextlib.suppress(TimeoutError):
                await chaos.tap.wait_for(lambda k=kill: chaos.recovered(k, room), chaos.timeout,
                                         f"{kill.stage} to recover")
    finally:
        await caller.leave()
    arrivals = [ns for _, ns in caller.loud_frames]
    stale = 0
    for cancel in chaos.tap.of(ev.Cancel, room):
        after = next_speaking(chaos.tap, room, cancel.ts_ns, after_turn=cancel.turn)
        until = after.ts_ns if after else time.time_ns()
        if cut := stale_frames(arrivals, cancel.ts_ns, until):
            stale += cut
            late = [round((ns - cancel.ts_ns) / 1e6) for ns in arrivals
                    if cancel.ts_ns < ns < until]
            chaos.failures.append(f"call {index}: {cut} loud frame(s) after the Cancel of turn "
                                  f"{cancel.turn} ({cancel.reason}), ms after it: {late[:10]}")
    return answered, stale


async def run_chaos_bench(calls: int, kills: int, stage: str = "all", sig: str = "KILL",
                          turns: int = 3, seed: int = 1, timeout: float = 20.0,
                          nats_cluster: int = 1) -> dict[str, Any]:
    stages = list(sj.STAGES) if stage == "all" else [stage]
    if stage == "nats" and nats_cluster < 3:
        raise ValueError("--stage nats needs --nats-cluster 3 or more: a node must be lost "
                         "without losing the JetStream quorum")
    workdir = Path(tempfile.mkdtemp(prefix="voicebus-bench-chaos-"))
    log_path = workdir / "stack.log"
    log_file = log_path.open("w")
    stack = Stack(workdir, sink=lambda line: log_file.write(line + "\n"), livekit=True,
                  replicas={s: 2 for s in sj.STAGES}, nats_cluster=nats_cluster)
    questions = []
    for i in range(turns):
        text = PROMPTS[i % len(PROMPTS)]
        pcm, rate, _ = read_wav(await say_to_wav(text, workdir / f"q{i}.wav", lead_ms=0))
        questions.append((text, pcm, rate))
    schedule = plan(calls, turns, kills, stages, random.Random(seed))
    await stack.start()
    nc = await stack.connect()
    chaos = Chaos(stack, Tap(nc), SIGNALS[sig], timeout)
    answered = stale = 0
    try:
        for index in range(calls):
            got, cut = await one_call(chaos, index, questions,
                                      [k for k in schedule if k.call == index])
            answered, stale = answered + got, stale + cut
            chaos.kills.extend(k for k in schedule if k.call == index)
        await asyncio.gather(*chaos.restarts, return_exceptions=True)
    finally:
        await chaos.tap.close()
        await nc.close()
        await stack.stop()
        log_file.close()
    return summarise(chaos, calls, turns, answered, stale, sig, stage) | {
        "seed": seed, "nats_cluster": nats_cluster, "logs": str(log_path)}


def summarise(chaos: Chaos, calls: int, turns: int, answered: int, stale: int, sig: str,
              stage: str) -> dict[str, Any]:
    done = [k for k in chaos.kills if k.at_ns]
    per_stage: dict[str, Any] = {}
    for name in sorted({k.stage for k in done}):
        mine = [k for k in done if k.stage == name]
        per_stage[name] = {
            "kills": len(mine),
            "turns_lost": sum(1 for k in mine if k.cost_the_turn),
            "recovery_ms": stats([k.recovery_ms for k in mine if k.recovery_ms is not None]),
            "not_recovered": sum(1 for k in mine if k.recovery_ms is None),
        }
    return {
        "calls": calls, "kills": len(done), "signal": sig, "stage": stage,
        "turns_expected": calls * turns, "turns_answered": answered,
        "turns_lost": calls * turns - answered,
        "recovery_ms": stats([k.recovery_ms for k in done if k.recovery_ms is not None]),
        "not_recovered": sum(1 for k in done if k.recovery_ms is None),
        "stale_frames": stale,
        **waiting(chaos.waits),
        "per_stage": per_stage,
        "failures": chaos.failures,
    }


def waiting(waits: list[tuple[float, bool]]) -> dict[str, Any]:
    """The user's wait for each answer, with and without a kill around its question."""
    calm = [ms for ms, killed in waits if not killed]
    killed = [ms for ms, was in waits if was]
    baseline = stats(calm)["p50"] if calm else None
    added = [ms - baseline for ms in killed] if baseline is not None else []
    return {"v2v_ms": {"calm": stats(calm), "killed": stats(killed)},
            "added_silence_ms": stats(added)}
