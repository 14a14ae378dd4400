"""``voicebus bench pipeline``: voice-to-voice over the bus, N concurrent sessions.

Starts nats-server and the five stages as separate processes, lets N file users each ask T
questions (Piper-spoken), and measures from the events on the bus:

- ``v2v_ms``: the frame holding the user's last speech sample published → the first reply frame
  published (both stamped by the publishing process);
- ``eos_ms``: the end-of-speech window as it really passed (last speech frame → SpeechEnded);
- ``hold_ms``: the end-of-turn hold the STT applied for more speech (0 for a question);
- per-stage compute on the critical path: STT finalisation, LLM time until the first spoken
  chunk's text was complete, TTS synthesis of that chunk;
- ``overhead_ms`` = v2v − eos − hold − stt − llm − tts: what the bus and the processes add. A
  drafted turn (a statement's reply prepared during the hold, ``docs/turn-taking.md``) can
  play only once its final confirms it: its v2v ends at the later of the first reply frame and
  the confirming verdict, and only the LLM and TTS time that outlasted the hold counts;
  ``drafted`` says how many turns were;
- what capture costs (``--record off|events|all``): CPU seconds of every process over the
  run (nats-server's writes included), and the recording stream's bytes per minute of call;
- ``gc``: each stage process's garbage collections over the run, sessions' ends included (each
  user hangs up once answered), from its ``voicebus_gc_pause_seconds``.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from proto import events as ev
from proto import subjects as sj
from voicebus import record
from voicebus.client import Tap, dispatch, end_session, timing
from voicebus.launcher import Stack
from voicebus.speech import say_to_wav

PROMPTS = (
    "What time is it?",
    "Tell me a story about a dog.",
    "Please call my mother.",
    "Where is the nearest train station?",
    "Thank you very much.",
)
# Session starts are spread over this many seconds (about one question-and-answer cycle), so
# that, as with real users, not everyone speaks in the same instant.
DEFAULT_SPREAD_S = 5.0


def stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "n": 0}
    arr = np.asarray(values, dtype=float)
    return {"p50": round(float(np.percentile(arr, 50)), 2),
            "p95": round(float(np.percentile(arr, 95)), 2), "n": len(values)}


def cpu_seconds(stack: Stack) -> dict[str, float]:
    """CPU time (user + system) each process of the stack has used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, proc in stack.procs.items():
        try:
            fields = Path(f"/proc/{proc.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited
        out[name] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


GC_KEYS = ("collections", "full", "full_ms", "over_10ms", "ms")


def _metrics_page(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        return page.read().decode()


def gc_figures(text: str) -> dict[str, float]:
    """One process's garbage collections so far, from the ``voicebus_gc_pause_seconds`` of its
    /metrics page."""
    out = dict.fromkeys(GC_KEYS, 0.0)
    for family in text_string_to_metric_families(text):
        if family.name != "voicebus_gc_pause_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_count"):
                out["collections"] += sample.value
                out["over_10ms"] += sample.value
                if sample.labels["generation"] == "2":
                    out["full"] += sample.value
            elif sample.name.endswith("_sum"):
                out["ms"] += sample.value * 1000
                if sample.labels["generation"] == "2":
                    out["full_ms"] += sample.value * 1000
            elif sample.name.endswith("_bucket") and float(sample.labels["le"]) == 0.01:
                out["over_10ms"] -= sample.value
    return out


async def gc_pauses(stack: Stack) -> dict[str, dict[str, float]]:
    """Per stage process: its garbage collections so far (``Stack(metrics=True)``)."""
    out = {}
    for name, port in stack.metrics_ports.items():
        try:
            out[name] = gc_figures(await asyncio.to_thread(_metrics_page, port))
        except OSError:
            continue  # exited
    return out


async def sessions_closed(stack: Stack, timeout: float = 10.0) -> None:
    """Until every stage process reports no session (``voicebus_sessions_active``), so that
    what closing them cost is in the figures; at most ``timeout`` seconds."""
    def open_sessions() -> float:
        total = 0.0
        for port in stack.metrics_ports.values():
            try:
                text = _metrics_page(port)
            except OSError:
                continue  # exited
            for family in text_string_to_metric_families(text):
                if family.name == "voicebus_sessions_active":
                    total += sum(sample.value for sample in family.samples)
        return total

    deadline = time.monotonic() + timeout
    while await asyncio.to_thread(open_sessions) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)


def gc_between(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
               ) -> dict[str, dict[str, float]]:
    """What the run's garbage collections cost each process: how many, how many were full and
    their milliseconds, how many held it over 10 ms, and the milliseconds of all of them."""
    return {name: {key: round(now[key] - before.get(name, {}).get(key, 0.0), 2)
                   for key in GC_KEYS} for name, now in sorted(after.items())}


async def capture_bytes(nc: Any) -> int:
    try:
        return (await nc.jetstream().stream_info(record.STREAM)).state.bytes
    except Exception:  # no stream: capture off
        return 0


# --providers: the models the stages run. "offline" is the stack's own (PocketSphinx, echo,
# Piper); "instant" answers at once (a fixed transcript, echo, a tone: services/*/providers/
# instant.py), so the CPU measured is the system's, and the sessions one core carries are the
# stages' own limit, before any model.
PROVIDER_SETS = {
    "offline": {},
    "instant": {"VOICEBUS_STT_PROVIDER": "instant", "VOICEBUS_LLM_PROVIDER": "echo",
                "VOICEBUS_TTS_PROVIDER": "instant"},
}


async def run_pipeline_bench(sessions: int, turns: int, replicas: dict[str, int] | None = None,
                             spread_s: float = DEFAULT_SPREAD_S,
                             capture: str = "", providers: str = "offline") -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="voicebus-bench-"))
    log_path = workdir / "stack.log"
    log_file = log_path.open("w")
    # Enough warm decoders that no replica stalls loading one mid-run (each is ~90 MB).
    replicas = {stage: n for stage, n in (replicas or {}).items() if n > 1}
    warm = min(12, math.ceil(sessions / replicas.get("stt", 1)))
    env = {"VOICEBUS_STT_WARM_DECODERS": str(warm), **PROVIDER_SETS[providers]}
    if capture:
        env["VOICEBUS_RECORD"] = capture
    stack = Stack(workdir, sink=lambda line: log_file.write(line + "\n"),
                  replicas=replicas, env=env, metrics=True,
                  audio_dir=workdir)  # the questions are WAV files: file edges on, there
    wavs = [await say_to_wav(PROMPTS[i % len(PROMPTS)], workdir / f"q{i}.wav", lead_ms=300)
            for i in range(turns)]
    await stack.start()
    nc = await stack.connect()
    tap = Tap(nc)
    for subject in (sj.INGRESS_VAD.every_session(), sj.STT_FINAL.every_session(),
                    sj.FLOOR_VERDICT.every_session(),
                    sj.TTS_DONE.every_session(), sj.EGRESS_PLAYBACK.every_session(),
                    sj.every_stage("ready"), sj.every_stage("error")):
        await tap.watch(subject)
    names = [f"bench-{i}" for i in range(sessions)]
    started = time.monotonic()
    cpu_before, gc_before = cpu_seconds(stack), await gc_pauses(stack)
    try:
        async def one(index: int, name: str) -> None:
            await asyncio.sleep(index * spread_s / sessions)
            await dispatch(nc, tap, name, wav_in=[str(w) for w in wavs], timeout=60)

        pending = set(names)

        def answered() -> set[str]:
            played = collections.Counter(p.session for p in tap.of(ev.Playback, final=True))
            return {name for name in pending if played[name] >= turns}

        async def hang_ups() -> None:
            """Each user hangs up once answered, as callers do: the others may still be talking
            while the stages close that session."""
            deadline = time.monotonic() + spread_s + 30 + turns * 25
            while pending:
                done = await tap.wait_for(answered, max(0.0, deadline - time.monotonic()),
                                          "every turn to be played")
                for name in done:
                    await end_session(nc, name)
                pending.difference_update(done)

        hanging_up = asyncio.create_task(hang_ups())
        try:
            await asyncio.gather(*(one(i, n) for i, n in enumerate(names)))
            await hanging_up
        except TimeoutError:
            pass  # report what completed; turns_completed tells the shortfall
        finally:
            hanging_up.cancel()
        elapsed = time.monotonic() - started
        for name in pending:
            await end_session(nc, name)
        await sessions_closed(stack)
        cpu_after, gc_after = cpu_seconds(stack), await gc_pauses(stack)
        stored = await capture_bytes(nc)
    finally:
        await tap.close()
        await nc.close()
        await stack.stop()
        log_file.close()
    result = summarise(tap, names, turns)
    cpu = {name: round(cpu_after[name] - cpu_before.get(name, 0.0), 2) for name in cpu_after}
    minutes = call_minutes(tap, names)
    result.update(wall_s=round(elapsed, 1), replicas=replicas, spread_s=spread_s,
                  providers=providers, sessions_per_core=sessions_per_core(cpu, minutes),
                  capture=capture or os.environ.get("VOICEBUS_RECORD", "all"),
                  cpu_s={"total": round(sum(cpu.values()), 2), **cpu},
                  gc=gc_between(gc_before, gc_after),
                  call_minutes=round(minutes, 2), capture_bytes=stored,
                  capture_bytes_per_call_minute=round(stored / minutes) if minutes else 0,
                  logs=str(log_path))
    return result


def sessions_per_core(cpu: dict[str, float], minutes: float) -> dict[str, float | None]:
    """Per process: how many calls like these one core would carry at once, from the CPU it
    spent per second of call (its idle work, lease refreshes and the like, included).
    Replicas of a stage are summed: their sessions share one figure."""
    per_stage: dict[str, float] = {}
    for name, seconds in cpu.items():
        stage = name.rstrip("0123456789")
        per_stage[stage] = per_stage.get(stage, 0.0) + seconds
    call_s = minutes * 60
    return {stage: round(call_s / seconds, 1) if seconds else None
            for stage, seconds in sorted(per_stage.items())}


def call_minutes(tap: Tap, names: list[str]) -> float:
    """The calls' length: each session from its first VAD edge (its microphone began before,
    by the WAV's lead) to its last reply played."""
    total = 0.0
    for name in names:
        stamps = [e.ts_ns for e in tap.of(ev.SpeechStarted, name)] + \
                 [p.ts_ns for p in tap.of(ev.Playback, name, final=True)]
        if stamps:
            total += (max(stamps) - min(stamps)) / 60e9
    return total


def measure_turn(tap: Tap, name: str, turn: int) -> dict[str, float] | None:
    """The bus's view of one turn (milliseconds), or None if it did not complete."""
    final = tap.of(ev.Transcript, name, turn=turn, final=True)
    done = tap.of(ev.SynthesisDone, name, turn=turn)
    played = tap.of(ev.Playback, name, turn=turn, final=True)
    # The end of speech that produced this final: the last one published before it.
    edges = [e for e in tap.of(ev.SpeechEnded, name) if final and e.ts_ns <= final[0].ts_ns]
    if not (final and done and played and done[0].frames and edges):
        return None
    edge, heard, reply = timing(edges[-1]), timing(final[0]), timing(done[0])
    stt_ms, llm_ms, tts_ms = heard.compute_ms, reply.llm_ms, reply.tts_ms
    hold = heard.hold_ms  # the end-of-turn rule's wait for more speech: by design too
    ready_ns = reply.first_frame_ts_ns
    drafted = tap.of(ev.Verdict, name, turn=turn, draft=True)
    confirmed = tap.of(ev.Verdict, name, turn=turn, draft=False)
    if drafted and confirmed:
        # Made during the hold; playable from the confirmation on. What of the LLM and TTS
        # time the hold did not cover is still on the path.
        ready_ns = max(ready_ns, confirmed[0].ts_ns)
        spare = max(0.0, hold - (drafted[0].ts_ns - edges[-1].ts_ns) / 1e6 + stt_ms)
        llm_ms, tts_ms = _outlasting(llm_ms, tts_ms, spare)
    v2v = (ready_ns - edge.last_speech_ts_ns) / 1e6
    eos = (edges[-1].ts_ns - edge.last_speech_ts_ns) / 1e6
    return {
        "v2v": v2v, "eos": eos, "hold": hold, "stt": stt_ms, "llm": llm_ms,
        "tts": tts_ms, "overhead": v2v - eos - hold - stt_ms - llm_ms - tts_ms,
        # Where the overhead is: before the final transcript, or after it.
        "to_final": (final[0].ts_ns - edges[-1].ts_ns) / 1e6 - hold - stt_ms,
        "after_final": (ready_ns - final[0].ts_ns) / 1e6 - llm_ms - tts_ms,
        "drafted": float(bool(drafted)),
    }


def _outlasting(llm_ms: float, tts_ms: float, spare_ms: float) -> tuple[float, float]:
    """The part of the LLM's and then the TTS's time left once ``spare_ms`` has covered it."""
    llm_left = max(0.0, llm_ms - spare_ms)
    return llm_left, max(0.0, tts_ms - max(0.0, spare_ms - llm_ms))


def turn_losses(tap: Tap, name: str, turn: int) -> tuple[int, int]:
    """(frames dropped, playout underruns) reported for one turn."""
    final = tap.of(ev.Transcript, name, turn=turn, final=True)
    played = tap.of(ev.Playback, name, turn=turn, final=True)
    dropped = sum(f.frames_dropped for f in final) + sum(p.frames_dropped for p in played)
    return dropped, sum(p.underruns for p in played)


def summarise(tap: Tap, names: list[str], turns: int) -> dict[str, Any]:
    rows = []
    dropped = underruns = 0
    for name in names:
        for turn in range(1, turns + 1):
            lost, under = turn_losses(tap, name, turn)
            dropped, underruns = dropped + lost, underruns + under
            if (row := measure_turn(tap, name, turn)) is not None:
                rows.append(row)
    column = lambda key: stats([row[key] for row in rows])  # noqa: E731
    return {
        "sessions": len(names),
        "turns_expected": len(names) * turns,
        "turns_completed": len(rows),
        "frames_dropped": dropped,
        "underruns": underruns,
        "errors": len(tap.of(ev.StageError)),
        "drafted": int(sum(row["drafted"] for row in rows)),
        "v2v_ms": column("v2v"),
        "eos_ms": column("eos"),
        "hold_ms": column("hold"),
        "overhead_ms": column("overhead"),
        "overhead_split_ms": {"to_final": column("to_final"), "after_final": column("after_final")},
        "compute_ms": {stage: column(stage) for stage in ("stt", "llm", "tts")},
    }
