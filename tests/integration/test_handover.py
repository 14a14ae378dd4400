"""Replicas: a session is claimed by one replica per stage, handed over on SIGTERM at a turn
boundary, and carried on by another replica with the history it left in JetStream KV."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import urllib.error
import urllib.request

import pytest
from nats.js.errors import KeyNotFoundError

from proto import codec
from proto import events as ev
from proto import subjects as sj
from tests.conftest import LogTail
from voicebus.client import Tap, dispatch
from voicebus.launcher import Stack

SESSION = "handover"


async def say(nc, turn: int, text: str) -> None:
    """The judge's verdict on a user turn: the LLM answers it."""
    verdict = ev.Verdict(session=SESSION, seq=turn, ts_ns=time.time_ns(), turn=turn,
                         action="answer", text=text)
    await nc.publish(sj.FLOOR_VERDICT.subject(SESSION), codec.encode(verdict))


@pytest.fixture
async def llm_pair(tmp_path):
    """nats-server and two LLM replicas (the history-keeping stage), nothing else."""
    logs = LogTail(tmp_path / "stack.log")
    # The OpenAI provider would show history best, but echo needs no server; the stored
    # history is checked in KV directly.
    stack = Stack(tmp_path, sink=logs, replicas={"llm": 2}, metrics=True)
    await stack.start(stages=("llm",))
    stack.logs = logs  # type: ignore[attr-defined]
    yield stack
    codes = await stack.stop()
    assert all(code == 0 for code in codes.values()), f"{codes}\n{logs.dump()}"


async def test_sigterm_hands_the_session_to_another_replica_with_its_history(llm_pair):
    nc = await llm_pair.connect()
    tap = Tap(nc)
    await tap.watch(sj.session_all(SESSION))
    owners = await dispatch(nc, tap, SESSION, stages=("llm",))
    first = owners["llm"]
    # Both replicas tell an orchestrator's probe they take sessions.
    assert {name: await probe(llm_pair, name, "/readyz") for name in llm_pair.metrics_ports} \
        == {"llm": 200, "llm1": 200}

    await say(nc, 1, "what time is it")
    await tap.wait_for(lambda: tap.of(ev.ReplyDone, SESSION, turn=1), 10, "reply 1")

    code = await llm_pair.procs[first].stop()
    assert code == 0, llm_pair.logs.dump()
    handed = await tap.wait_for(
        lambda: [r for r in tap.of(ev.StageReady, SESSION) if r.replica != first], 10,
        "another replica to claim the session")
    assert handed[0].stage == "llm"
    assert tap.of(ev.SessionStart, SESSION, topic=sj.HANDOVER["llm"]), \
        "no handover start was published"

    await say(nc, 2, "please call my mother")
    done = await tap.wait_for(lambda: tap.of(ev.ReplyDone, SESSION, turn=2), 10, "reply 2")
    assert done[0].text == "Please call my mother... got it."

    kv = await nc.jetstream().key_value("voicebus_history")
    entry = await kv.get(SESSION)
    assert b"what time is it" in entry.value and b"please call my mother" in entry.value
    lease = await (await nc.jetstream().key_value("voicebus_leases")).get(f"llm.{SESSION}")
    assert lease.value.decode() == handed[0].replica
    await tap.close()
    await nc.close()


async def test_a_starved_replica_takes_back_its_expired_lease_and_keeps_the_session(tmp_path):
    logs = LogTail(tmp_path / "stack.log")
    stack = Stack(tmp_path, sink=logs, env={"VOICEBUS_LEASE_TTL": "1"})
    await stack.start(stages=("llm",))
    nc = await stack.connect()
    tap = Tap(nc)
    try:
        await tap.watch(sj.session_all(SESSION))
        await dispatch(nc, tap, SESSION, stages=("llm",))
        leases = await nc.jetstream().key_value("voicebus_leases")
        # Freeze the replica well past its lease's lifetime, as a starved process would be.
        process = stack.procs["llm"].process
        process.send_signal(signal.SIGSTOP)
        await asyncio.sleep(2.5)
        # Expired: nothing holds it (the server's delete marker, or nothing at all, is left).
        with contextlib.suppress(KeyNotFoundError):
            assert (await leases.get(f"llm.{SESSION}")).value is None
        process.send_signal(signal.SIGCONT)

        await say(nc, 1, "what time is it")
        done = await tap.wait_for(lambda: tap.of(ev.ReplyDone, SESSION, turn=1), 10, "reply")
        assert done[0].text == "What time is it... got it."
        entry = await _eventually(lambda: leases.get(f"llm.{SESSION}"), 5)
        assert entry.value == b"llm"
    finally:
        await tap.close()
        await nc.close()
        codes = await stack.stop()
    assert all(code == 0 for code in codes.values()), logs.dump()


async def probe(stack: Stack, replica: str, path: str) -> int:
    """The HTTP status a replica's metrics port answers ``path`` with."""
    url = f"http://127.0.0.1:{stack.metrics_ports[replica]}{path}"

    def get() -> int:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    return await asyncio.to_thread(get)


async def _eventually(fetch, timeout: float):
    """``await fetch()`` until it stops raising KeyNotFoundError (the lease refresh runs every
    third of the lease's lifetime)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await fetch()
        except KeyNotFoundError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_a_restarted_nats_server_is_survived_with_history_intact(tmp_path):
    logs = LogTail(tmp_path / "stack.log")
    stack = Stack(tmp_path, sink=logs)
    await stack.start(stages=("llm",))
    try:
        nc = await stack.connect()
        tap = Tap(nc)
        await tap.watch(sj.session_all(SESSION))
        await dispatch(nc, tap, SESSION, stages=("llm",))
        await say(nc, 1, "what time is it")
        await tap.wait_for(lambda: tap.of(ev.ReplyDone, SESSION, turn=1), 10, "reply 1")
        await tap.close()
        await nc.close()

        await stack.restart_nats()
        await stack.wait_ready(("llm",), timeout=30)  # the replica reconnected and answers

        nc = await stack.connect()
        tap = Tap(nc)
        await tap.watch(sj.session_all(SESSION))
        await say(nc, 2, "please call my mother")
        done = await tap.wait_for(lambda: tap.of(ev.ReplyDone, SESSION, turn=2), 10, "reply 2")
        assert done[0].text == "Please call my mother... got it."
        entry = await (await nc.jetstream().key_value("voicebus_history")).get(SESSION)
        assert b"what time is it" in entry.value and b"please call my mother" in entry.value
        await tap.close()
        await nc.close()
    finally:
        codes = await stack.stop()
    assert codes["llm"] == 0, logs.dump()


async def test_sigterm_while_nats_is_unreachable_exits_cleanly(tmp_path):
    """A replica started while nats-server is down keeps retrying; SIGTERM still stops it at
    once with exit code 0 (an orchestrator must be able to stop it)."""
    from voicebus import auth
    from voicebus.launcher import free_port

    logs = LogTail(tmp_path / "stack.log")
    stack = Stack(tmp_path, sink=logs, nats_port=free_port())  # nothing listens there
    auth.generate(stack.bus_dir)  # its credentials, as if for that server
    proc = await stack.start_stage("llm")
    deadline = time.monotonic() + 30
    while not any("Connect call failed" in line for line in logs.lines):
        assert proc.alive and time.monotonic() < deadline, logs.dump()
        await asyncio.sleep(0.05)
    started = time.monotonic()
    code = await proc.stop(timeout=10)
    assert code == 0, logs.dump()
    assert time.monotonic() - started < 5, logs.dump()
