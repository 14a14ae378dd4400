"""What the launcher hands its processes."""

from __future__ import annotations

import collections
import socket
from pathlib import Path

import pytest

from services.runtime.livekit import DEV_API_KEY, DEV_API_SECRET
from voicebus import launcher
from voicebus.launcher import Stack


def test_livekit_keys_come_from_the_environment_of_make_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEKIT_API_KEY", "prod-key")
    monkeypatch.setenv("LIVEKIT_API_SECRET", "a-secret-of-our-own")
    env = Stack(tmp_path, livekit=True).livekit_env
    assert (env["LIVEKIT_API_KEY"], env["LIVEKIT_API_SECRET"]) == ("prod-key", "a-secret-of-our-own")


def test_keys_given_to_the_stack_win_and_the_dev_keys_are_the_last_resort(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEKIT_API_SECRET", "from-the-shell")
    given = Stack(tmp_path, livekit=True, env={"LIVEKIT_API_SECRET": "given"}).livekit_env
    assert given["LIVEKIT_API_SECRET"] == "given"
    monkeypatch.delenv("LIVEKIT_API_SECRET")
    monkeypatch.delenv("LIVEKIT_API_KEY", raising=False)
    dev = Stack(tmp_path, livekit=True).livekit_env
    assert (dev["LIVEKIT_API_KEY"], dev["LIVEKIT_API_SECRET"]) == (DEV_API_KEY, DEV_API_SECRET)


def test_processes_spread_over_livekit_nodes_each_with_its_node_url(tmp_path: Path) -> None:
    stack = Stack(tmp_path, livekit=True, livekit_nodes=2, livekit_ports=[7001, 7002])
    urls = {name: stack.livekit_env_for(name)["LIVEKIT_URL"]
            for name in ("ingress", "ingress1", "egress", "token", "stt")}
    assert urls == {"ingress": "ws://127.0.0.1:7001", "ingress1": "ws://127.0.0.1:7001",
                    "egress": "ws://127.0.0.1:7002", "token": "ws://127.0.0.1:7002",
                    "stt": "ws://127.0.0.1:7001"}
    # One node: everybody on it, whatever LIVEKIT_NODE_OF says.
    single = Stack(tmp_path, livekit=True, livekit_port=7001)
    assert single.livekit_env_for("egress")["LIVEKIT_URL"] == "ws://127.0.0.1:7001"
    assert Stack(tmp_path).livekit_env_for("egress") == {}


def test_a_media_port_is_free_for_udp_too() -> None:
    """livekit-server's media port must be free for UDP: a port only checked for TCP may be
    another livekit-server's, left running (a killed test run)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        port = launcher.udp_port(taken)  # asked for the taken port: another one
        assert port != taken
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, socket.socket() as tcp:
            udp.bind(("127.0.0.1", port))
            tcp.bind(("127.0.0.1", port))


def test_ports_come_from_below_the_ephemeral_range_and_each_once() -> None:
    """Outgoing connections take their local ports from the kernel's ephemeral range, so a
    server's port is never chosen there; and a port handed out is not handed out again before
    its server binds it."""
    span = launcher.port_range()
    ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [launcher.free_port() for _ in range(200)]
    assert all(port in span and port < ephemeral for port in ports)
    assert len(set(ports)) == len(ports)


def test_the_port_range_can_be_set_and_a_taken_port_is_not_given(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        monkeypatch.setenv(launcher.PORT_RANGE_ENV, f"{taken}-{taken}")
        assert launcher.port_range() == range(taken, taken + 1)
        monkeypatch.setattr(launcher, "_handed_out", collections.deque(maxlen=8))
        with pytest.raises(RuntimeError, match=f"no free port in {taken}-{taken} "):
            launcher.free_port(udp=True)  # held for UDP
        assert launcher.free_port() == taken  # free for TCP
        with pytest.raises(RuntimeError, match="no free port"):
            launcher.free_port()  # handed out already


@pytest.mark.parametrize("wanted", ["20000", "20000-", "a-b", "30000-20000", "80-90"])
def test_a_bad_port_range_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, wanted: str) -> None:
    monkeypatch.setenv(launcher.PORT_RANGE_ENV, wanted)
    with pytest.raises(ValueError, match=launcher.PORT_RANGE_ENV):
        launcher.port_range()
