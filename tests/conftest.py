"""Shared fixtures: real processes only (nats-server, livekit-server, the five stages, the token
service), on free ports."""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from services.tts.config import TtsConfig
from services.tts.providers.piper import PiperTts
from voicebus import speech
from voicebus.client import Tap
from voicebus.launcher import PORT_RANGE_ENV, Stack, port_range


# Piper varies each utterance at random; tests want the same audio for the same text, in this
# process (questions) and in every stage process started from it (replies).
os.environ["VOICEBUS_PIPER_DETERMINISTIC"] = "true"


def _ports_of_this_worker() -> None:
    """Parallel workers (``make test`` runs pytest-xdist's) each take their servers' ports from
    a slice of the range of their own, for them and every process they start: two stacks
    starting at once never pick the same port."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or workers < 2:
        return
    span = port_range()  # VOICEBUS_PORT_RANGE's, when one is set
    size = len(span) // workers
    low = span.start + int(worker.removeprefix("gw")) * size
    os.environ[PORT_RANGE_ENV] = f"{low}-{low + size - 1}"


_ports_of_this_worker()


class _KeptPiper(PiperTts):
    """A voice ``say_to_wav`` does not close: the next call uses it again."""

    async def aclose(self) -> None:
        pass


class _OnePiperPerSettings:
    """``say_to_wav`` (tests' questions) loads Piper's voice on every call unless given one:
    ~2 s each, more on a busy machine, some 50 times a run. Here the calls share one voice per
    setting (deterministic: the same text is the same audio, loaded once or every time); the
    stages still load their own."""

    voices: dict[tuple[str, float, bool], PiperTts] = {}

    @classmethod
    def from_config(cls, cfg: TtsConfig) -> PiperTts:
        key = (cfg.piper_voice, cfg.piper_length_scale, cfg.piper_deterministic)
        if key not in cls.voices:
            cls.voices[key] = _KeptPiper.from_config(cfg)
        return cls.voices[key]


speech.PiperTts = _OnePiperPerSettings  # type: ignore[misc,assignment]


class LogTail:
    """Keeps every process's output for a failing test to show (and writes it to a file)."""

    def __init__(self, path: Path) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=400)
        self.file = path.open("w")

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        self.file.write(line + "\n")
        self.file.flush()

    def dump(self) -> str:
        return "\n".join(self.lines)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory):
    """nats-server with JetStream plus the five stages, each its own OS process."""
    async for running in running_stack(tmp_path_factory, livekit=False):
        yield running


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def lk_stack(tmp_path_factory: pytest.TempPathFactory):
    """Everything ``make up`` runs: nats-server, livekit-server, the five stages, the demo
    tools and the token service, each its own OS process."""
    async for running in running_stack(tmp_path_factory, livekit=True, tools=("demo",)):
        yield running


async def running_stack(tmp_path_factory: pytest.TempPathFactory, livekit: bool,
                        env: dict[str, str] | None = None, **options: Any):
    """A started stack for a fixture to yield; on teardown every process must exit with 0.
    ``options`` go to ``Stack`` (e.g. ``nats_cluster``)."""
    workdir = tmp_path_factory.mktemp("stack")
    logs = LogTail(workdir / "stack.log")
    # File edges on, for WAV files anywhere in this run's temporary folders.
    stack = Stack(workdir, sink=logs, metrics=True, livekit=livekit, env=env or {},
                  audio_dir=tmp_path_factory.getbasetemp(), **options)
    stack.logs = logs  # type: ignore[attr-defined]
    try:
        await stack.start()
    except Exception:
        await stack.stop()
        raise RuntimeError(f"stack failed to start; logs:\n{logs.dump()}") from None
    yield stack
    codes = await stack.stop()
    # Every stage must exit cleanly on SIGTERM (drain, then 0).
    assert all(code == 0 for code in codes.values()), f"{codes}\n{logs.dump()}"


@pytest_asyncio.fixture(loop_scope="module")
async def bus(stack: Stack):
    nc = await stack.connect()
    yield nc
    await nc.drain()


@pytest_asyncio.fixture(loop_scope="module")
async def tap(bus):
    tap = Tap(bus)
    yield tap
    await tap.close()


@pytest.fixture
async def bare_stack(tmp_path):
    """nats-server only; each test starts the stage it needs with its own environment."""
    logs = LogTail(tmp_path / "stack.log")
    stack = Stack(tmp_path, sink=logs, audio_dir=tmp_path)
    stack.logs = logs  # type: ignore[attr-defined]
    await stack.start(stages=())
    nc = await stack.connect()
    tap = Tap(nc)
    yield stack, nc, tap
    await tap.close()
    await nc.close()
    codes = await stack.stop()
    assert all(code == 0 for code in codes.values()), f"{codes}\n{logs.dump()}"
