"""``voicebus bench livekit``: voice-to-voice as a user in a LiveKit room hears it.

Starts the whole stack (nats-server, livekit-server, the five stages, the token service) as
separate processes; one ``Caller`` gets a token, joins, and asks T Piper-spoken questions, each
after the agent has answered the one before. Per turn:

- ``v2v_ms``: the user's last speech sample left the microphone → the agent's first audible
  sample arrived at the user (measured in the caller process);
- ``pipeline_v2v_ms``, ``eos_ms``, ``overhead_ms``, ``compute_ms``: the bus's view of the same
  turn, exactly as ``bench pipeline`` computes them;
- ``onset_ms``: the reply's first frame → its first audible frame on the bus (the silence a
  voice starts with: the user cannot hear it, so it is part of V2V but not of transport);
- ``transport_ms`` = v2v − (pipeline v2v + onset): both LiveKit legs (WebRTC, Opus, jitter
  buffers) plus egress's playout buffer and the agent track's queue.
"""

from __future__ import annotations

import secrets
import tempfile
from pathlib import Path
from typing import Any


from proto import events as ev
from proto import subjects as sj
from services.ingress.audio import read_wav
from voicebus.bench.pipeline import PROMPTS, measure_turn, stats, turn_losses
from voicebus.call import Caller, loud
from voicebus.client import Tap, timing
from voicebus.launcher import Stack
from voicebus.speech import say_to_wav


def _bus_view(tap: Tap, room: str, speech_end_ns: int) -> dict[str, float] | None:
    """The bus's measures of the reply the user heard: the first one whose audio went out after
    the utterance ended (an utterance the VAD split in two still has one reply heard first)."""
    replies = [d for d in tap.of(ev.SynthesisDone, room)
               if d.frames and timing(d).first_frame_ts_ns > speech_end_ns]
    if not replies:
        return None
    reply = min(replies, key=lambda d: timing(d).first_frame_ts_ns)
    measures = measure_turn(tap, room, reply.turn)
    audible = [f.ts_ns for f in tap.of(ev.AudioFrame, room, turn=reply.turn) if loud(f.pcm)]
    if measures is None or not audible:
        return None
    return {**measures, "onset": (min(audible) - timing(reply).first_frame_ts_ns) / 1e6}


def _what_the_bus_saw(tap: Tap, room: str, since_ns: int) -> str:
    finals = [(t.turn, t.text, t.ts_ns - since_ns) for t in tap.of(ev.Transcript, room)
              if t.final and t.ts_ns > since_ns - 5_000_000_000]
    done = [(d.turn, d.frames, timing(d).first_frame_ts_ns - since_ns)
            for d in tap.of(ev.SynthesisDone, room) if d.ts_ns > since_ns - 5_000_000_000]
    return f"finals (turn, text, ns after speech end) {finals}; speech done {done}"


async def run_livekit_bench(turns: int, timeout: float = 30.0) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="voicebus-bench-lk-"))
    log_path = workdir / "stack.log"
    log_file = log_path.open("w")
    stack = Stack(workdir, sink=lambda line: log_file.write(line + "\n"), livekit=True)
    utterances = []
    for i in range(turns):
        pcm, rate, _ = read_wav(await say_to_wav(PROMPTS[i % len(PROMPTS)],
                                                 workdir / f"q{i}.wav", lead_ms=0))
        utterances.append((pcm, rate))
    room = f"bench-{secrets.token_hex(3)}"
    rows: list[dict[str, float]] = []
    failures: list[str] = []
    await stack.start()
    nc = await stack.connect()
    tap = Tap(nc)
    await tap.watch(sj.session_all(room))
    caller = Caller(stack.token_url, room, "bench-user")
    try:
        await caller.join()
        await caller.wait_state("listening", timeout=timeout)
        for index, (pcm, rate) in enumerate(utterances, start=1):
            try:
                heard = await caller.say(pcm, rate)
                await caller.wait_reply(timeout)
                # The state reached us through LiveKit; the bus's report of the same moment may
                # still be on its way through this (busy) process's tap.
                bus = await tap.wait_for(lambda: _bus_view(tap, room, heard.speech_end_wall_ns),
                                         10, "the reply's final Playback on the bus")
            except Exception as exc:  # report the turn as failed; keep measuring the rest
                failures.append(f"turn {index}: {exc} "
                                f"({_what_the_bus_saw(tap, room, caller.turn.speech_end_wall_ns)})")
                continue
            if not heard.first_sound:
                failures.append(f"turn {index}: silent at the user")
                continue
            rows.append(heard_row(bus, heard.v2v_ms))
    finally:
        await caller.leave()
        await tap.close()
        await nc.close()
        await stack.stop()
        log_file.close()
    return {**summarise(tap, room, turns, rows, failures), "logs": str(log_path)}


def heard_row(bus: dict[str, float], v2v_ms: float) -> dict[str, float]:
    """One turn: the bus's measures, with V2V as the user heard it and what transport took."""
    return {**bus, "pipeline_v2v": bus["v2v"], "v2v": v2v_ms,
            "transport": v2v_ms - bus["v2v"] - bus["onset"]}


def summarise(tap: Tap, room: str, turns: int, rows: list[dict[str, float]],
              failures: list[str]) -> dict[str, Any]:
    """The pipeline bench's keys for one session, plus the user's view."""
    opened = max((t.turn for t in tap.of(ev.Transcript, room, final=True)), default=0)
    losses = [turn_losses(tap, room, t) for t in range(1, opened + 1)]
    column = lambda key: stats([row[key] for row in rows])  # noqa: E731
    return {
        "sessions": 1,
        "turns_expected": turns,
        "turns_completed": len(rows),
        "turns_opened": opened,  # more than expected: the VAD split an utterance
        "frames_dropped": sum(lost for lost, _ in losses),
        "underruns": sum(under for _, under in losses),
        "errors": len(tap.of(ev.StageError)),
        "v2v_ms": column("v2v"),
        "pipeline_v2v_ms": column("pipeline_v2v"),
        "onset_ms": column("onset"),
        "transport_ms": column("transport"),
        "eos_ms": column("eos"),
        "hold_ms": column("hold"),
        "overhead_ms": column("overhead"),
        "overhead_split_ms": {"to_final": column("to_final"), "after_final": column("after_final")},
        "compute_ms": {stage: column(stage) for stage in ("stt", "llm", "tts")},
        "failures": failures,
    }
