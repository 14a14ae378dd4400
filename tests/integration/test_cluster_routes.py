"""A NATS cluster's routes: mutual TLS with the cluster's own CA. The launcher's nodes route to
each other over it; a server holding a certificate from any other CA is refused as a route, so
it never sees a message of the bus (routes carry them all, and JetStream's replication)."""

from __future__ import annotations

import asyncio
import json
import urllib.request

from tests.conftest import LogTail
from voicebus.launcher import Stack, free_port, make_certificates, nats_server_binary, spawn


def monitor(stack: Stack, node: int, endpoint: str) -> dict:
    url = f"http://127.0.0.1:{stack.monitor_ports[node]}/{endpoint}"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


async def routed_to(stack: Stack, node: int) -> set[str]:
    routez = await asyncio.to_thread(monitor, stack, node, "routez")
    return {route.get("remote_name", "") for route in routez.get("routes") or []}


async def until(condition, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.1)


async def test_routes_need_a_certificate_of_the_clusters_ca(tmp_path) -> None:
    logs = LogTail(tmp_path / "stack.log")
    stack = Stack(tmp_path / "cluster", sink=logs, nats_cluster=3)
    (tmp_path / "cluster").mkdir()
    await stack.start(stages=())
    rogue_logs: list[str] = []
    rogue = None
    try:
        varz = await asyncio.to_thread(monitor, stack, 0, "varz")
        assert varz["cluster"].get("tls_required") and varz["cluster"].get("tls_verify"), varz
        await until(lambda: _equals(routed_to(stack, 0), {"n1", "n2"}), 30, "the routes")

        # A server that claims the cluster's name and trusts its CA (a CA's certificate is no
        # secret), but holds a certificate of another CA.
        certs = make_certificates(tmp_path / "rogue", "node")
        config = tmp_path / "rogue.conf"
        config.write_text(json.dumps({"cluster": {
            "name": "voicebus", "listen": f"127.0.0.1:{free_port()}",
            "routes": [f"nats-route://127.0.0.1:{stack.route_ports[0]}"],
            "tls": {"cert_file": certs["node.pem"], "key_file": certs["node.key"],
                    "ca_file": stack.route_certificates["ca.pem"], "verify": True,
                    "timeout": 2}}}))
        rogue = await spawn("rogue", [nats_server_binary(), "-c", str(config), "-a", "127.0.0.1",
                                      "-p", str(free_port()), "--name", "rogue"],
                            {}, rogue_logs.append)

        async def refused() -> bool:  # by the cluster's node, for the certificate
            return any(line.startswith("nats ") and "TLS route handshake error" in line
                       and "unknown authority" in line for line in logs.lines)

        await until(refused, 30, "the rogue's route to be refused")
        assert await routed_to(stack, 0) == {"n1", "n2"}
    finally:
        if rogue is not None:
            await rogue.stop()
        await stack.stop()


async def _equals(got, want) -> bool:
    return await got == want
