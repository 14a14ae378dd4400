"""The stack on a 3-node NATS cluster (real nats-server processes, routes on loopback, JetStream
replicated 3 times): a call goes on when the node most stages are connected to dies between
two turns, and the session's state in KV outlives it."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import msgspec
import pytest
import pytest_asyncio

from proto import events as ev
from proto import subjects as sj
from services.llm.provider import ChatMessage
from services.llm.service import HISTORY_BUCKET
from tests.conftest import running_stack
from voicebus.client import Tap, dispatch, end_session
from voicebus.speech import say_to_wav

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

SESSION = "clustered"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory):
    async for stack in running_stack(tmp_path_factory, livekit=False, nats_cluster=3):
        yield stack


def _stage_clients(monitor_port: int) -> list[str]:
    """The stages connected to one node, from its monitoring endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/connz?limit=1000",
                                timeout=5) as resp:
        connz = json.load(resp)
    return [c.get("name", "") for c in connz.get("connections", [])
            if c.get("name", "").startswith("voicebus-")]


async def test_a_call_goes_on_when_its_nats_node_dies(cluster, tmp_path) -> None:
    stack = cluster
    assert len(stack.nats_url.split(",")) == 3
    # The second question comes after 3 s of quiet: the node dies in it, and the stages have
    # long reconnected to another node when the user speaks again.
    first = await say_to_wav("What time is it?", tmp_path / "q1.wav", lead_ms=400)
    second = await say_to_wav("Please call my mother.", tmp_path / "q2.wav", lead_ms=3000)
    nc = await stack.connect()
    tap = Tap(nc)
    try:
        await tap.watch(sj.session_all(SESSION))
        await dispatch(nc, tap, SESSION, wav_in=[str(first), str(second)],
                       wav_out=str(tmp_path / "reply.wav"))
        await tap.wait_for(lambda: tap.of(ev.Playback, SESSION, turn=1, final=True), 60,
                           "reply 1 to be played")

        clients = await asyncio.gather(*(asyncio.to_thread(_stage_clients, port)
                                         for port in stack.monitor_ports))
        node = max(range(3), key=lambda n: len(clients[n]))
        assert clients[node], clients
        await stack.kill_nats_node(node)

        await tap.wait_for(lambda: tap.of(ev.Playback, SESSION, turn=2, final=True), 60,
                           "reply 2 to be played")
        history = await (await nc.jetstream().key_value(HISTORY_BUCKET)).get(SESSION)
        status = await nc.jetstream().stream_info(f"KV_{HISTORY_BUCKET}")
    finally:
        await end_session(nc, SESSION)
        await tap.close()
        await nc.close()

    # The turn after the node's death was heard, answered and played whole.
    (final,) = tap.of(ev.Transcript, SESSION, turn=2, final=True)
    assert "mother" in final.text.lower(), final.text
    (played,) = tap.of(ev.Playback, SESSION, turn=2, final=True)
    assert played.played_ms > 0 and not played.interrupted
    assert not tap.of(ev.StageError, SESSION)
    # The history in KV holds both turns, and its bucket kept its 3 copies' worth of nodes.
    messages = msgspec.msgpack.decode(history.value, type=list[ChatMessage])
    assert [m.turn for m in messages if m.role == "user"] == [1, 2]
    assert status.config.num_replicas == 3
