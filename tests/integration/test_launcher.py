"""The launcher: a taken port stops the launch, and no child outlives the launcher, however it
dies."""

from __future__ import annotations

import ast
import json
import asyncio
import os
import re
import signal
import socket
import sys
import textwrap
import time
import wave

import pytest

from voicebus.launcher import PortTaken, Stack, free_port

# A launcher as `voicebus up` runs it, small: nats-server and one stage; it prints its
# children's pids and waits.
LAUNCHER = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from voicebus.launcher import Stack

    async def main():
        stack = Stack(Path(sys.argv[1]), sink=lambda line: None)
        await stack.start(stages=("llm",))
        print(" ".join(str(p.process.pid) for p in stack.procs.values()), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: it only waits for its (gone) parent to be reaped by init.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


async def gone(pids: list[int], timeout: float) -> list[int]:
    """The pids still alive after ``timeout`` s (polled: the kernel reaps on its own time)."""
    deadline = time.monotonic() + timeout
    while (left := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return left


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGHUP])
async def test_no_child_outlives_the_launcher(tmp_path, sig) -> None:
    launcher = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LAUNCHER, str(tmp_path), stdout=asyncio.subprocess.PIPE)
    assert launcher.stdout is not None
    line = await asyncio.wait_for(launcher.stdout.readline(), 120)
    children = [int(pid) for pid in line.split()]
    assert len(children) == 2 and all(alive(pid) for pid in children)
    launcher.send_signal(sig)
    await launcher.wait()
    left = await gone(children, 20)
    for pid in left:  # do not leave them behind for the next test
        os.kill(pid, signal.SIGKILL)
    assert left == [], f"children alive after the launcher got {sig.name}"


async def test_a_taken_port_stops_the_launch(tmp_path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        stack = Stack(tmp_path, sink=lambda line: None, nats_port=port)
        with pytest.raises(PortTaken, match=f"port {port} for nats-server is already in use"):
            await stack.start(stages=())
        assert stack.procs == {}  # nothing was started that would join the other server


async def test_voicebus_up_stops_everything_cleanly_on_sigterm() -> None:
    """What a process manager does: SIGTERM. Every stage hands nothing over (they all stop),
    leaves its room, drains, and exits 0, as on Ctrl-C; the launcher exits 0 too."""
    up = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voicebus", "up", "--port", "0", "--livekit-port", "0",
        "--nats-port", "0", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert up.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(180):
        while not any("voicebus is up" in line for line in lines):
            line = (await up.stdout.readline()).decode()
            assert line, "voicebus up ended before it was up:\n" + "".join(lines[-40:])
            lines.append(line)
    started = time.monotonic()
    up.send_signal(signal.SIGTERM)
    rest, _ = await asyncio.wait_for(up.communicate(), 60)
    took = time.monotonic() - started
    out = "".join(lines) + rest.decode()
    assert up.returncode == 0, out[-4000:]
    stopped = next(line for line in out.splitlines() if line.startswith("stopped: "))
    codes = ast.literal_eval(stopped.removeprefix("stopped: "))  # a dict of exit codes
    assert set(codes) >= {"nats", "livekit", "token", "ingress", "stt", "llm", "tts", "egress",
                          "sip"}
    assert re.search(r"from a SIP phone: sip:agent@127\.0\.0\.1:\d+", out), out[-2000:]
    assert all(code == 0 for code in codes.values()), stopped
    assert took < 30, f"stopping took {took:.1f}s"


async def test_a_rolling_redeploy_replaces_every_replica_and_the_session_goes_on(tmp_path) -> None:
    """`voicebus redeploy llm` as the operator's request to a running stack: each of the two
    replicas is replaced by a new process, one at a time; the session is handed over to a new
    replica with its history, and the next question is answered."""

    from proto import codec
    from proto import events as ev
    from proto import subjects as sj
    from tests.conftest import LogTail
    from voicebus.client import Tap, dispatch
    from voicebus.launcher import OPERATOR_REDEPLOY

    logs = LogTail(tmp_path / "stack.log")
    stack = Stack(tmp_path, sink=logs, replicas={"llm": 2})
    await stack.start(stages=("llm",))
    nc = await stack.connect()
    tap = Tap(nc)
    await tap.watch(sj.session_all("rolling"))
    await stack.serve_operator(nc)

    async def ask(turn: int, text: str) -> ev.ReplyDone:
        verdict = ev.Verdict(session="rolling", turn=turn, action="answer", text=text)
        await nc.publish(sj.FLOOR_VERDICT.subject("rolling"), codec.encode(verdict))
        done = await tap.wait_for(lambda: tap.of(ev.ReplyDone, "rolling", turn=turn), 15,
                                  f"reply {turn}")
        return done[0]

    try:
        await dispatch(nc, tap, "rolling", stages=("llm",))
        await ask(1, "what time is it")
        reply = await nc.request(OPERATOR_REDEPLOY, b"llm", timeout=120)
        report = json.loads(reply.data)
        assert [(r["old"], r["new"], r["exit_code"]) for r in report["replaced"]] == \
            [("llm", "llm2", 0), ("llm1", "llm3", 0)], report
        owner = [r.replica for r in tap.of(ev.StageReady, "rolling", stage="llm")][-1]
        assert owner in ("llm2", "llm3")
        assert (await ask(2, "call my mother")).text == "Call my mother... got it."
        wrong = json.loads((await nc.request(OPERATOR_REDEPLOY, b"nope", timeout=10)).data)
        assert "no stage 'nope'" in wrong["error"]
    finally:
        await tap.close()
        await nc.close()
        codes = await stack.stop()
    assert all(code == 0 for code in codes.values()), logs.dump()


async def test_voicebus_up_asks_what_it_is_given_then_stops_with_once(tmp_path) -> None:
    """`make up SAY=...`: once the stack is up, a call says the sentence and types the text, the
    agent answers both out loud, the reply is recorded, and `--once` stops it all with exit 0."""
    out = tmp_path / "reply.wav"
    up = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voicebus", "up", "--port", "0", "--livekit-port", "0",
        "--nats-port", "0", "--sip-port", "-1", "--say", "What time is it?",
        "--text", "Thank you.", "--out", str(out), "--once",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        printed, _ = await asyncio.wait_for(up.communicate(), 300)
    finally:
        if up.returncode is None:  # timed out: its stack must not run on through the suite
            up.send_signal(signal.SIGINT)
            await asyncio.wait_for(up.wait(), 60)
    lines = printed.decode()
    assert up.returncode == 0, lines[-4000:]
    said = re.findall(r"^  you:   (.*)$", lines, re.M)
    assert len(said) == 2 and "time" in said[0].lower() and said[1] == "Thank you.", lines[-3000:]
    answers = re.findall(r"^  agent: (.*)$", lines, re.M)
    assert len(answers) == 3, lines[-3000:]  # the greeting, then one answer each
    assert "time" in answers[1].lower() and "thank you" in answers[2].lower(), answers
    with wave.open(str(out)) as wav:
        assert wav.getnframes() / wav.getframerate() > 1.0  # the agent's voice, both replies


@pytest.mark.parametrize("command", [["tap"], ["record", "list"], ["redeploy", "llm"]])
async def test_an_operator_command_without_a_bus_says_so_at_once(command: list[str]) -> None:
    """Pointed at a port where no nats-server listens, a tool says it cannot connect and exits
    1 within seconds (nats-py alone retried a first connection for two minutes, silently)."""
    port = free_port()
    tool = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voicebus", *command, "--nats", f"nats://127.0.0.1:{port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        _, err = await asyncio.wait_for(tool.communicate(), 60)
    finally:
        if tool.returncode is None:
            tool.kill()
            await tool.wait()
    assert tool.returncode == 1, err.decode()
    assert f"cannot connect to nats://127.0.0.1:{port}" in err.decode(), err.decode()
