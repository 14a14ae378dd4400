"""``voicebus bench sip``: real SIP calls into voicebus's own gateway; the bench is the phone.

Starts nats-server, the five stages and the SIP gateway as separate processes (the launcher,
``sip=True``) and runs the phone (``services/sip/cmd/phone``, Go, diago as the calling user
agent) against ``sip:agent@127.0.0.1:<port>``: N concurrent calls, each asking T Piper-spoken
questions as 20 ms PCMU RTP in real time once the agent has greeted (``GREETING``) and fallen
quiet, and each next one once the reply has ended (``--gap`` of quiet). The phone
knows only SIP and RTP. Per turn:

- ``v2v_ms``: on the phone, the packet carrying the question's last speech sent → the first
  packet from the gateway carrying voice (a decoded sample above 500/32767) received;
- ``pipeline_v2v_ms``, ``eos_ms``, ``overhead_ms``, ``compute_ms``…: the bus's view of the same
  turn, exactly as ``bench pipeline`` computes them (a tap on the bus, in this process);
- ``legs_ms``: ``in`` the phone's last speech packet → ingress published the frame holding the
  last speech sample (RTP, the gateway's 20 ms tick, ingress); ``out`` the reply ready on the bus
  → its first voiced packet at the phone (the voice's own onset, egress's playout, the gateway,
  RTP). ``in`` + ``pipeline_v2v`` + ``out`` = ``v2v``.

A turn is completed when the phone heard voice after its question and the bus shows the reply
that voice belongs to (no earlier reply still playing). ``--calls 1,20,50`` runs each count in
turn on one stack and reports the capacity: the largest count that ``carried`` (every call
answered, every turn completed, no frame dropped, no stage error) with V2V p95 within 1.5 times
that of the smallest count (docs/benchmarks.md, "How we measure").
"""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import soxr

from proto import events as ev
from proto import subjects as sj
from services.ingress.audio import read_wav
from voicebus.bench.pipeline import (PROMPTS, PROVIDER_SETS, cpu_seconds, measure_turn,
                                     sessions_per_core, stats, turn_losses)
from voicebus.client import Tap, timing
from voicebus.launcher import Stack, offline_ear, sip_phone_binary
from voicebus.speech import say_to_wav

PHONE_RATE = 8000
# The agent's greeting: a caller waits for it before speaking, and it comes only once every
# stage has the call, so no question is lost to a stage still starting. One that does not come
# within GREETING_WAIT_S is counted (greetings_missed) and the phone asks anyway.
GREETING = "Hello."
GREETING_WAIT_S = 10.0
# The guide's capacity rule: V2V p95 within this factor of the smallest run's.
CAPACITY_FACTOR = 1.5
DEFAULT_SPREAD_S = 5.0
DEFAULT_GAP_S = 1.5
DEFAULT_TIMEOUT_S = 30.0


async def phone_questions(folder: Path, turns: int) -> list[Path]:
    """The bench's questions (Piper), 8 kHz mono s16le as a phone sends them."""
    paths = []
    for i, text in enumerate(PROMPTS[:max(1, min(turns, len(PROMPTS)))]):
        pcm, rate, _ = read_wav(await say_to_wav(text, folder / f"q{i}.wav", lead_ms=0))
        at_8k = soxr.resample(np.frombuffer(pcm, np.int16), rate, PHONE_RATE).astype("<i2")
        path = folder / f"q{i}.s16"
        path.write_bytes(at_8k.tobytes())
        paths.append(path)
    return paths


async def call_out(uri: str, calls: int, turns: int, questions: list[Path], prefix: str,
                   heard: Path, log: Any, *, spread_s: float, gap_s: float,
                   timeout_s: float) -> tuple[list[dict[str, Any]], int]:
    """Run the phone; its JSON lines and exit code. Its diagnostics go to ``log``."""
    heard.mkdir(parents=True, exist_ok=True)
    argv = [sip_phone_binary(), "-uri", uri, "-calls", str(calls), "-turns", str(turns),
            "-audio", ",".join(map(str, questions)), "-from", prefix,
            "-greeting", f"{GREETING_WAIT_S}s", "-spread", f"{spread_s}s", "-gap", f"{gap_s}s",
            "-timeout", f"{timeout_s}s", "-record", str(heard)]
    phone = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                 stderr=log)
    # Every wait in the phone is bounded: the greeting, each reply and its end.
    limit = spread_s + (turns + 1) * (2 * timeout_s + gap_s + 15) + 60
    try:
        out, _ = await asyncio.wait_for(phone.communicate(), limit)
    except asyncio.TimeoutError:
        phone.kill()
        out, _ = await phone.communicate()
    lines = []
    for raw in out.decode(errors="replace").splitlines():
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            continue  # not ours: the phone prints only JSON on stdout
    return lines, phone.returncode if phone.returncode is not None else -1


def sessions_of(tap: Tap, callers: list[str]) -> dict[str, str]:
    """Caller → the session the gateway started for its call (``PhoneSessionStart.caller``)."""
    wanted = set(callers)
    return {start.caller: start.session for start in tap.of(ev.PhoneSessionStart)
            if start.caller in wanted}


def bus_view(tap: Tap, session: str, speech_end_ns: int) -> dict[str, float] | None:
    """The bus's measures of the reply to a question that ended at ``speech_end_ns``: the first
    user turn's reply whose audio went out after it, with the moment it was ready to play."""
    replies = [d for d in tap.of(ev.SynthesisDone, session)
               if d.turn >= 1 and d.frames and timing(d).first_frame_ts_ns > speech_end_ns]
    if not replies:
        return None
    reply = min(replies, key=lambda d: timing(d).first_frame_ts_ns)
    measures = measure_turn(tap, session, reply.turn)
    if measures is None:
        return None
    ready = timing(reply).first_frame_ts_ns
    # A drafted reply may play once its final confirms it: it is ready then, not before.
    confirmed = tap.of(ev.Verdict, session, turn=reply.turn, draft=False)
    if measures["drafted"] and confirmed:
        ready = max(ready, confirmed[0].ts_ns)
    return {**measures, "ready_ns": float(ready), "turn": float(reply.turn)}


def turn_row(tap: Tap, session: str, phone: dict[str, Any]) -> dict[str, float] | str:
    """One answered question with the phone's and the bus's measures, or why it does not count."""
    bus = bus_view(tap, session, phone["speech_end_ns"])
    if bus is None:
        return "no reply to it on the bus"
    out = (phone["first_voice_ns"] - bus["ready_ns"]) / 1e6
    if out < 0:  # heard before this reply was ready: another reply's voice
        return f"voice heard {-out:.0f} ms before the reply was ready on the bus"
    v2v = phone["v2v_ms"]
    return {**bus, "pipeline_v2v": bus["v2v"], "v2v": v2v, "out": out,
            "in": v2v - bus["v2v"] - out, "reply": phone.get("reply_ms", 0.0)}


def gateway_drops(log_path: Path, sessions: set[str]) -> int:
    """Caller frames the gateway dropped (over its 200 ms backlog), from its "call ended"
    lines for these sessions."""
    dropped = 0
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("sip") and "call ended" in line:
            session = re.search(r"session=(\S+)", line)
            count = re.search(r"frames_dropped=(\d+)", line)
            if session and count and session.group(1) in sessions:
                dropped += int(count.group(1))
    return dropped


async def wait_for_bus(tap: Tap, lines: list[dict[str, Any]], sessions: dict[str, str]) -> None:
    """Until the bus has reported every reply the phone heard (its final Playback goes out as
    the reply ends; this process's tap may still be reading it), at most 15 s."""
    heard = [(sessions.get(t["from"]), t) for t in lines if t.get("type") == "turn" and t["ok"]]

    def reported() -> bool:
        return all(s is not None and isinstance(turn_row(tap, s, t), dict) for s, t in heard)

    try:
        await tap.wait_for(reported, 15, "the bus's report of every reply heard")
    except TimeoutError:
        pass  # summarise() names the turns without one


def summarise(tap: Tap, lines: list[dict[str, Any]], sessions: dict[str, str], calls: int,
              turns: int) -> dict[str, Any]:
    rows: list[dict[str, float]] = []
    failures: list[str] = []
    for t in (t for t in lines if t.get("type") == "turn"):
        where = f"{t['from']} turn {t['turn']}"
        session = sessions.get(t["from"])
        if not t["ok"]:
            failures.append(f"{where}: {t.get('error', 'no answer')}")
        elif session is None:
            failures.append(f"{where}: no session on the bus for this caller")
        elif isinstance(row := turn_row(tap, session, t), str):
            failures.append(f"{where}: {row}")
        else:
            rows.append(row)
    call_lines = [c for c in lines if c.get("type") == "call"]
    failures += [f"{c['from']}: {c['error']}" for c in call_lines if c.get("error")]
    dropped = underruns = 0
    dropped_at: list[str] = []
    for session in sessions.values():
        opened = max((t.turn for t in tap.of(ev.Transcript, session, final=True)), default=0)
        for turn in range(1, opened + 1):
            lost, under = turn_losses(tap, session, turn)
            dropped, underruns = dropped + lost, underruns + under
            if lost:
                where = drop_sides(tap, session, turn)
                dropped_at.append(f"{session} turn {turn}: {lost} ({where})")
    column = lambda key: stats([row[key] for row in rows])  # noqa: E731
    ungreeted = [c["from"] for c in call_lines if c.get("answered") and not c.get("greeted")]
    return {
        "calls": calls,
        "sessions": len(sessions),
        "calls_answered": sum(1 for c in call_lines if c.get("answered")),
        "calls_failed": sum(1 for c in call_lines if c.get("error")) + calls - len(call_lines),
        # Who hung up: the phone (BYE, as it should after its last question) or the gateway.
        "hangups": {who: sum(1 for c in call_lines if c.get("hangup") == who)
                    for who in ("bye", "remote")},
        # Calls the agent did not greet within GREETING_WAIT_S (their sessions, to look up).
        "greetings_missed": len(ungreeted),
        "ungreeted_sessions": [sessions.get(caller, caller) for caller in ungreeted],
        "turns_expected": calls * turns,
        "turns_completed": len(rows),
        "frames_dropped": dropped,
        "frames_dropped_at": dropped_at,  # which turns lost audio between stages
        "underruns": underruns,
        "errors": sum(len(tap.of(ev.StageError, s)) for s in sessions.values()),
        "drafted": int(sum(row["drafted"] for row in rows)),
        "v2v_ms": column("v2v"),
        "pipeline_v2v_ms": column("pipeline_v2v"),
        "legs_ms": {leg: column(leg) for leg in ("in", "out")},
        "eos_ms": column("eos"),
        "hold_ms": column("hold"),
        "overhead_ms": column("overhead"),
        "overhead_split_ms": {"to_final": column("to_final"), "after_final": column("after_final")},
        "compute_ms": {stage: column(stage) for stage in ("stt", "llm", "tts")},
        "reply_heard_ms": column("reply"),
        "setup_ms": stats([c["setup_ms"] for c in call_lines if c.get("answered")]),
        "failures": failures,
    }


def drop_sides(tap: Tap, session: str, turn: int) -> str:
    """Where a turn's dropped frames were counted: the STT (ingress's frames) or egress (the
    TTS's)."""
    heard = sum(t.frames_dropped for t in tap.of(ev.Transcript, session, turn=turn, final=True))
    played = sum(p.frames_dropped for p in tap.of(ev.Playback, session, turn=turn, final=True))
    return f"stt {heard}, egress {played}"


def phone_health(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """The phone's own load: its CPU, and how late it sent (a late phone measures itself)."""
    calls = [c for c in lines if c.get("type") == "call"]
    done = next((d for d in lines if d.get("type") == "done"), {})
    return {"cpu_s": done.get("cpu_s"), "wall_s": done.get("wall_s"),
            "packets_sent": sum(c.get("packets_sent", 0) for c in calls),
            "packets_heard": sum(c.get("packets_heard", 0) for c in calls),
            "packets_late": sum(c.get("packets_late", 0) for c in calls),
            "late_max_ms": max((c.get("late_max_ms", 0.0) for c in calls), default=0.0)}


def carried(run: dict[str, Any]) -> bool:
    """Every call answered, every turn completed, nothing dropped, no stage error."""
    return (run["calls_answered"] == run["calls"] and not run["calls_failed"]
            and run["turns_completed"] == run["turns_expected"]
            and run["frames_dropped"] == 0 and run["gateway_frames_dropped"] == 0
            and run["errors"] == 0)


def capacity(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The largest call count carried with V2V p95 within CAPACITY_FACTOR of the first run's."""
    reference = runs[0]["v2v_ms"]["p95"]
    fits = [run["calls"] for run in runs if run["carried"]
            and run["v2v_ms"]["p95"] <= CAPACITY_FACTOR * reference]
    return {"calls": max(fits, default=0), "reference_calls": runs[0]["calls"],
            "reference_v2v_p95_ms": reference,
            "rule": f"carried, and v2v p95 <= {CAPACITY_FACTOR} x the reference run's"}


async def run_sip_bench(calls: list[int], turns: int, providers: str = "offline",
                        spread_s: float = DEFAULT_SPREAD_S, gap_s: float = DEFAULT_GAP_S,
                        timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="voicebus-bench-sip-"))
    log_path = workdir / "stack.log"
    log_file = log_path.open("w")
    # offline: the stack `voicebus up` runs behind the gateway (its offline ear too).
    models = offline_ear() if providers == "offline" else PROVIDER_SETS[providers]
    env = {"VOICEBUS_GREETING": GREETING, **models,
           "VOICEBUS_STT_WARM_DECODERS": str(min(12, max(calls)))}
    stack = Stack(workdir, sink=lambda line: log_file.write(line + "\n"), sip=True, env=env)
    questions = await phone_questions(workdir, turns)
    runs: list[dict[str, Any]] = []
    await stack.start()
    nc = await stack.connect()
    tap = Tap(nc)
    # Not the audio: this process would decode 50 frames a second per call for nothing.
    for topic in (sj.CTL_START, sj.INGRESS_VAD, sj.STT_FINAL, sj.FLOOR_VERDICT, sj.TTS_DONE,
                  sj.EGRESS_PLAYBACK):
        await tap.watch(topic.every_session())
    await tap.watch(sj.every_stage("error"))
    uri = f"sip:agent@127.0.0.1:{stack.sip_port}"
    try:
        for rung, count in enumerate(calls):
            runs.append(await one_run(stack, tap, uri, count, turns, questions,
                                      workdir / f"heard-{count}", f"r{rung}c", log_path,
                                      log_file, spread_s=spread_s, gap_s=gap_s,
                                      timeout_s=timeout_s))
    finally:
        await tap.close()
        await nc.close()
        await stack.stop()
        log_file.close()
    common = {"providers": providers, "spread_s": spread_s, "gap_s": gap_s,
              "logs": str(log_path)}
    if len(runs) == 1:
        return {**runs[0], **common}
    return {"runs": runs, "capacity": capacity(runs), **common}


async def one_run(stack: Stack, tap: Tap, uri: str, calls: int, turns: int,
                  questions: list[Path], heard: Path, prefix: str, log_path: Path,
                  log_file: Any, *, spread_s: float, gap_s: float,
                  timeout_s: float) -> dict[str, Any]:
    """``calls`` concurrent calls of ``turns`` questions on the running stack."""
    log_file.flush()
    cpu_before = cpu_seconds(stack)
    started = time.monotonic()
    lines, code = await call_out(uri, calls, turns, questions, prefix, heard, log_file,
                                 spread_s=spread_s, gap_s=gap_s, timeout_s=timeout_s)
    elapsed = time.monotonic() - started
    callers = [f"{prefix}{i}" for i in range(calls)]
    sessions = sessions_of(tap, callers)
    await wait_for_bus(tap, lines, sessions)
    cpu_after = cpu_seconds(stack)
    log_file.flush()
    run = summarise(tap, lines, sessions, calls, turns)
    if code not in (0, 1):  # 1: some call or turn failed (counted above); else the phone broke
        run["failures"].append(f"the phone exited with {code}")
    cpu = {name: round(cpu_after[name] - cpu_before.get(name, 0.0), 2) for name in cpu_after}
    # The calls' length as the phone lived them (INVITE → BYE): per process, how many such
    # calls one core would carry at once (bench pipeline's measure, the gateway included).
    minutes = sum(c.get("duration_s", 0.0) for c in lines if c.get("type") == "call") / 60
    run.update(call_minutes=round(minutes, 2), sessions_per_core=sessions_per_core(cpu, minutes),
               gateway_frames_dropped=gateway_drops(log_path, set(sessions.values())),
               phone=phone_health(lines), heard_wavs=str(heard), wall_s=round(elapsed, 1),
               cpu_s={"total": round(sum(cpu.values()), 2), **cpu})
    run["carried"] = carried(run)
    return run


def heard_voice_s(wav: Path, threshold: int = 500) -> float:
    """Seconds of voiced 20 ms frames in a WAV the phone recorded (what a call heard)."""
    with wave.open(str(wav), "rb") as f:
        pcm = np.frombuffer(f.readframes(f.getnframes()), np.int16)
    frames = pcm[:len(pcm) - len(pcm) % 160].reshape(-1, 160)
    return float((np.abs(frames.astype(np.int32)).max(axis=1) > threshold).sum()) * 0.02
