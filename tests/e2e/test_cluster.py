"""The stack on a 3-node NATS cluster (real nats-server processes, routes on loopback, JetStream
replicated 3 times): a call goes on when the node most stages are connected to dies between
two turns, and the session's state in KV outlives it."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
import pytest_asyncio
from livekit import api

from proto import events as ev
from proto import subjects as sj
from services.llm.provider import ChatMessage
from services.llm.service import HISTORY_BUCKET
from services.runtime.bus import JS_ELECTION_S, Bus
from services.ingress.audio import read_wav
from tests.conftest import running_stack
from voicebus.call import Caller
from voicebus.client import Tap, dispatch, end_session
from voicebus.speech import say_to_wav

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

SESSION = "clustered"


# How long the history's stream may be without a leader after its node died: the stages wait
# that out (Bus.jetstream), and so does this test's own read of what they kept.
ELECTION_S = JS_ELECTION_S


async def kept(nc, session: str, turns: list[int]) -> list[int]:
    """The user turns of the session's history in KV, once they are ``turns`` (or what they
    are after ``ELECTION_S``). The LLM stores a turn as its reply is written; after a node's
    death that write may wait out the stream's election, and outlast the reply's playback."""
    async def read():
        return await (await nc.jetstream().key_value(HISTORY_BUCKET)).get(session)

    deadline = time.monotonic() + ELECTION_S
    while True:
        entry = await Bus.jetstream(read, within=ELECTION_S)
        messages = msgspec.msgpack.decode(entry.value, type=list[ChatMessage])
        stored = [m.turn for m in messages if m.role == "user"]
        if stored == turns or time.monotonic() > deadline:
            return stored
        await asyncio.sleep(0.1)  # the next look; the store's own retries are what we wait for


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster(tmp_path_factory: pytest.TempPathFactory):
    async for stack in running_stack(tmp_path_factory, livekit=False, nats_cluster=3):
        yield stack


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

        clients = await asyncio.gather(*(stack.nats_clients(n) for n in range(3)))
        node = max(range(3), key=lambda n: len(clients[n]))
        assert clients[node], clients
        await stack.kill_nats_node(node)

        await tap.wait_for(lambda: tap.of(ev.Playback, SESSION, turn=2, final=True), 60,
                           "reply 2 to be played")
        history = await kept(nc, SESSION, [1, 2])
        status = await Bus.jetstream(lambda: nc.jetstream().stream_info(f"KV_{HISTORY_BUCKET}"),
                                     within=ELECTION_S)
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
    assert history == [1, 2]
    assert status.config.num_replicas == 3


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def spread(tmp_path_factory: pytest.TempPathFactory):
    """Everything spread: 3 NATS nodes, 2 livekit-server nodes sharing a Redis, every stage
    and the token service (ingress on one LiveKit node, egress and the token service on the
    other: launcher.LIVEKIT_NODE_OF)."""
    async for stack in running_stack(tmp_path_factory, livekit=True, nats_cluster=3,
                                     livekit_nodes=2):
        yield stack


async def test_calls_on_both_livekit_nodes_go_on_when_the_stages_nats_node_dies(
        spread, tmp_path) -> None:
    stack = spread
    assert len(stack.livekit_urls) == 2 and stack.redis_port
    question = read_wav(await say_to_wav("What time is it?", tmp_path / "q1.wav", lead_ms=0))
    again = read_wav(await say_to_wav("Please call my mother.", tmp_path / "q2.wav", lead_ms=0))
    nc = await stack.connect()
    tap = Tap(nc)
    callers: list[Caller] = []
    try:
        await tap.watch(sj.every_stage("error"))
        # One room on each LiveKit node. LiveKit would place a new room on a node at random,
        # so each is created on the node that hosts none yet (CreateRoom's node_id); LiveKit
        # may still move a room whose node looks stale under load, hence the loop.
        nodes = await stack.livekit_node_ids()
        assert len(nodes) == 2, nodes
        env = stack.livekit_env
        hosts: dict[str, str] = {}
        async with api.LiveKitAPI(stack.livekit_urls[0].replace("ws://", "http://"),
                                  env["LIVEKIT_API_KEY"], env["LIVEKIT_API_SECRET"]) as lkapi:
            while len(used := {hosts.get(c.room_name) for c in callers} - {None}) < 2:
                assert len(callers) < 6, f"rooms kept off a node: {hosts}"
                index = len(callers)
                node = next(n for n in nodes if n not in used)
                await lkapi.room.create_room(api.CreateRoomRequest(name=f"spread-{index}",
                                                                   node_id=node))
                await tap.watch(sj.session_all(f"spread-{index}"))
                caller = Caller(stack.token_url, f"spread-{index}", f"user-{index}",
                                livekit_url=stack.livekit_urls[index % 2])
                callers.append(caller)
                await caller.join()
                hosts = await stack.livekit_room_nodes()
        # Every agent greeted its user (all at once: one greeting's time, not one per room).
        await asyncio.gather(*(c.wait_state("listening", timeout=60) for c in callers))
        rooms = [c.room_name for c in callers]
        assert set(hosts) >= set(rooms), hosts

        async def ask(caller: Caller, pcm: tuple[bytes, int], turn: int) -> None:
            await caller.say(*pcm)
            await caller.wait_reply(timeout=60)
            await tap.wait_for(lambda: tap.of(ev.Playback, caller.room_name, turn=turn,
                                              final=True), 30, f"{caller.room_name} reply")

        await asyncio.gather(*(ask(c, question[:2], 1) for c in callers))
        # The NATS node the most stages use dies; every call's next turn is answered.
        clients = await asyncio.gather(*(stack.nats_clients(n) for n in range(3)))
        node = max(range(3), key=lambda n: len(clients[n]))
        assert clients[node], clients
        await stack.kill_nats_node(node)
        await asyncio.gather(*(ask(c, again[:2], 2) for c in callers))
        history = await kept(nc, rooms[0], [1, 2])
    finally:
        for caller in callers:
            await caller.leave()
        await tap.close()
        await nc.close()

    for room in rooms:
        # Each turn was heard (its first words: how well the rest is heard through Opus on a
        # loaded machine is bench stt's business, not this failover's).
        finals = {t.turn: t.text.lower() for t in tap.of(ev.Transcript, room, final=True)}
        assert "time" in finals.get(1, "") and "call" in finals.get(2, ""), (room, finals)
    assert not tap.of(ev.StageError), [e.message for e in tap.of(ev.StageError)]
    assert history == [1, 2]
