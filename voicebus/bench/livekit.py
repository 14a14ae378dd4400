"""``voicebus bench livekit``: voice-to-voice as a user in a LiveKit room hears it.

Starts the whole stack (nats-server, livekit-server, the five stages, the token service) as
separate processes; one ``Caller`` gets a token, joins, and asks T Piper-spoken questions, each
after the agent has answered the one before. Per turn:

- ``v2v_ms``: the user's last speech sample left the microphone → the agent's first audible
  sample arrived at the user (measured in the caller process);
- ``pipeline_v2v_ms``, ``eos_ms``, ``overhead_ms``, ``compute_ms``: the bus's view of the same
  turn, exactly as ``bench pipeline`` computes them;
- ``onset_ms``: the reply's first sample → its first audible sample, on the audio's clock (the
  silence a voice starts with: the user cannot hear it, so it is part of V2V but not of
  transport);
- ``transport_ms`` = v2v − (pipeline v2v + onset): both LiveKit legs (WebRTC, Opus, jitter
  buffers) plus egress's playout buffer and the agent track's queue, split in ``legs_ms``:
  ``in`` the user's last speech sample left the microphone → ingress published its frame;
  ``to_track`` the reply ready on the bus (its first frame; for a drafted reply, the verdict
  that confirmed it) → egress wrote it into the agent's track (its first ``Playback``); ``out``
  that write → the first audible sample reached the user, less the onset. The three add up to
  ``transport_ms`` when the VAD placed the end of speech where the caller's last loud frame was.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path
from typing import Any


from proto import events as ev
from proto import subjects as sj
from services.ingress.audio import read_wav
from voicebus.bench.pipeline import PROMPTS, measure_turn, stats, turn_losses
from voicebus.call import Caller, Turn, first_loud_sample, loud
from voicebus.client import Tap, timing
from voicebus.launcher import Stack, offline_ear
from voicebus.speech import say_to_wav


def _bus_view(tap: Tap, room: str, speech_end_ns: int) -> dict[str, float] | None:
    """The bus's measures of the reply the user heard: the first one whose audio went out after
    the utterance ended (an utterance the VAD split in two still has one reply heard first),
    with the wall-clock moments the transport legs are measured between."""
    replies = [d for d in tap.of(ev.SynthesisDone, room)
               if d.frames and timing(d).first_frame_ts_ns > speech_end_ns]
    if not replies:
        return None
    reply = min(replies, key=lambda d: timing(d).first_frame_ts_ns)
    measures = measure_turn(tap, room, reply.turn)
    frames = tap.of(ev.AudioFrame, room, turn=reply.turn)
    # On the audio's clock, not the bus's: TTS publishes a sentence's frames in one burst.
    audible = [f.pts_ms + first_loud_sample(f.pcm) * 1000 / f.sample_rate
               for f in frames if loud(f.pcm)]
    written = [p.ts_ns for p in tap.of(ev.Playback, room, turn=reply.turn, final=False)
               if p.played_ms]
    # The utterance's end of speech: the first one published after the user stopped (the
    # VAD may place the last speech sample a little before the caller's last loud frame).
    edges = [e for e in tap.of(ev.SpeechEnded, room) if e.ts_ns > speech_end_ns]
    if measures is None or not audible or not written or not edges:
        return None
    first = timing(reply).first_frame_ts_ns
    # A drafted reply may play once its final confirms it: it is ready then, not before.
    confirmed = tap.of(ev.Verdict, room, turn=reply.turn, draft=False)
    ready = max(first, confirmed[0].ts_ns) if measures["drafted"] and confirmed else first
    return {**measures, "onset": min(audible) - min(f.pts_ms for f in frames),
            "at_bus_ns": timing(min(edges, key=lambda e: e.ts_ns)).last_speech_ts_ns,
            "at_reply_ns": ready, "at_track_ns": min(written)}


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
    # The stack ``voicebus up`` runs: its offline ear too.
    stack = Stack(workdir, sink=lambda line: log_file.write(line + "\n"), livekit=True,
                  env=offline_ear())
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
    # Not the user's audio nor the reply's text: this process is the user too, and decoding
    # 50 frames a second it does not need would delay what it hears.
    for topic in (sj.INGRESS_VAD, sj.STT_PARTIAL, sj.STT_FINAL, sj.FLOOR_VERDICT,
                  sj.FLOOR_CANCEL, sj.LLM_DONE, sj.TTS_AUDIO, sj.TTS_DONE, sj.EGRESS_PLAYBACK):
        await tap.watch(topic.subject(room))
    await tap.watch(sj.every_stage("error"))
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
            rows.append(heard_row(bus, heard))
    finally:
        await caller.leave()
        await tap.close()
        await nc.close()
        await stack.stop()
        log_file.close()
    return {**summarise(tap, room, turns, rows, failures),
            "stt": stack.env.get("VOICEBUS_STT_PROVIDER") or os.environ.get(
                "VOICEBUS_STT_PROVIDER") or os.environ.get("VOICEBUS_STT_PROVIDERS", ""),
            "logs": str(log_path)}


def heard_row(bus: dict[str, float], heard: Turn) -> dict[str, float]:
    """One turn: the bus's measures, with V2V as the user heard it and what transport took,
    leg by leg."""
    return {**bus, "pipeline_v2v": bus["v2v"], "v2v": heard.v2v_ms,
            "transport": heard.v2v_ms - bus["v2v"] - bus["onset"],
            "in": (bus["at_bus_ns"] - heard.speech_end_wall_ns) / 1e6,
            "to_track": (bus["at_track_ns"] - bus["at_reply_ns"]) / 1e6,
            "out": (heard.first_sound_wall_ns - bus["at_track_ns"]) / 1e6 - bus["onset"]}


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
        "drafted": int(sum(row["drafted"] for row in rows)),
        "v2v_ms": column("v2v"),
        "pipeline_v2v_ms": column("pipeline_v2v"),
        "onset_ms": column("onset"),
        "transport_ms": column("transport"),
        "legs_ms": {leg: column(leg) for leg in ("in", "to_track", "out")},
        "eos_ms": column("eos"),
        "hold_ms": column("hold"),
        "overhead_ms": column("overhead"),
        "overhead_split_ms": {"to_final": column("to_final"), "after_final": column("after_final")},
        "compute_ms": {stage: column(stage) for stage in ("stt", "llm", "tts")},
        "failures": failures,
        # Each turn's own figures, in order: which prompt paid what (p95 is one or two turns).
        "per_turn": [{key: round(row[key], 1) for key in
                      ("v2v", "pipeline_v2v", "eos", "hold", "stt", "llm", "tts", "in",
                       "to_track", "out", "drafted")} for row in rows],
    }
