"""Record the regression sessions of this folder with the current build (run by hand, when the
bus contract changes or a new case is wanted; the suite only replays them):

    .venv/bin/python -m tests.sessions.make

Each case is a file session on a fresh offline stack — Piper speaks the user's lines into the
microphone edge — captured by the stack and exported as ``<name>.vbus``.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from proto import events as ev
from proto import subjects as sj
from voicebus import record
from voicebus.client import Tap, dispatch, end_session
from voicebus.launcher import Stack
from voicebus.speech import say_to_wav

HERE = Path(__file__).resolve().parent
# name: (what the user says, one line a turn; the greeting, if any)
CASES: dict[str, tuple[tuple[str, ...], str]] = {
    "two-questions": (("What time is it?", "Please call my mother."), ""),
}


async def make(name: str, lines: tuple[str, ...], greeting: str, work: Path) -> Path:
    wavs = [await say_to_wav(text, work / f"{name}-{i}.wav", lead_ms=400)
            for i, text in enumerate(lines)]
    stack = Stack(work / name, sink=lambda line: None, audio_dir=work)
    await stack.start()
    try:
        nc = await stack.connect()
        tap = Tap(nc)
        await tap.watch(sj.session_all(name))
        await dispatch(nc, tap, name, wav_in=[str(w) for w in wavs], greeting=greeting)
        replies = len(lines) + bool(greeting)
        await tap.wait_for(lambda: len(tap.of(ev.Playback, name, final=True)) >= replies, 120,
                           "every reply played")
        await end_session(nc, name)
        await nc.flush()
        recording = await record.export(nc.jetstream(), name)
        await tap.close()
        await nc.drain()
    finally:
        await stack.stop()
    out = HERE / f"{name}.vbus"
    out.write_bytes(record.dumps(recording))
    return out


async def main(names: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        for name in names or list(CASES):
            lines, greeting = CASES[name]
            out = await make(name, lines, greeting, Path(folder))
            print(f"{out.relative_to(HERE.parents[1])}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
