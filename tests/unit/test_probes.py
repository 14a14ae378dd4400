"""The metrics port's probes: /healthz while the process serves, /readyz only while the
readiness check (set by the stage once it joined $SRV discovery) holds."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest

from services.runtime import metrics


def status(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    metrics.serve(free)
    return free


def test_alive_but_not_ready_until_the_stage_says_so(port):
    metrics.set_readiness(lambda: False)
    assert status(port, "/healthz")[0] == 200
    assert status(port, "/readyz") == (503, b"not ready\n")


def test_ready_follows_the_check_both_ways(port):
    state = {"draining": False}
    metrics.set_readiness(lambda: not state["draining"])
    assert status(port, "/readyz") == (200, b"ok\n")
    state["draining"] = True
    assert status(port, "/readyz")[0] == 503
    metrics.set_readiness(lambda: False)


def test_metrics_are_still_served_beside_the_probes(port):
    code, body = status(port, "/metrics")
    assert code == 200 and b"voicebus_ready" in body
