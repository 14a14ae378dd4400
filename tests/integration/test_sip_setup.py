"""``voicebus sip setup`` against a real livekit-server (with the Redis its SIP API needs): it
makes the inbound trunk and the dispatch rule, a second run updates them in place, and bad
settings or a server without Redis get a clear error and no trunk."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest
import pytest_asyncio
from livekit import api
from livekit.protocol import sip as lksip

from tests.conftest import LogTail
from voicebus.launcher import Stack

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def livekit(tmp_path_factory):
    """livekit-server and its Redis (no stages: the SIP API is livekit-server's alone)."""
    workdir = tmp_path_factory.mktemp("sip")
    stack = Stack(workdir, sink=LogTail(workdir / "stack.log"), livekit=True,
                  livekit_redis=True)
    await stack.start_nats()
    await stack.start_livekit()
    yield stack
    await stack.stop()


async def sip_setup(stack: Stack, *args: str, **env: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voicebus", "sip", "setup", "--livekit-url", stack.livekit_url,
        *args, env={**os.environ, **stack.livekit_env, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    return process.returncode or 0, out.decode(), err.decode()


async def listed(stack: Stack) -> tuple[list, list]:
    env = stack.livekit_env
    async with api.LiveKitAPI(stack.livekit_url.replace("ws", "http", 1),
                              env["LIVEKIT_API_KEY"], env["LIVEKIT_API_SECRET"]) as lkapi:
        trunks = await lkapi.sip.list_inbound_trunk(lksip.ListSIPInboundTrunkRequest())
        rules = await lkapi.sip.list_dispatch_rule(lksip.ListSIPDispatchRuleRequest())
    return list(trunks.items), list(rules.items)


async def test_setup_makes_the_trunk_and_rule_and_a_second_run_updates_them(livekit) -> None:
    code, out, err = await sip_setup(livekit, "--number", "+15550199",
                                     "--allowed-address", "192.0.2.0/24",
                                     "--auth-username", "exotel",
                                     VOICEBUS_SIP_AUTH_PASSWORD="s3cret-from-env")
    assert code == 0, err
    first = json.loads(out)
    assert first["trunk_created"] and first["dispatch_rule_created"]
    assert "s3cret" not in out + err  # the password is the provider's secret: never printed
    trunks, rules = await listed(livekit)
    (trunk,) = [t for t in trunks if t.name == "voicebus"]
    assert (list(trunk.numbers), list(trunk.allowed_addresses), trunk.auth_username) == \
        (["+15550199"], ["192.0.2.0/24"], "exotel")
    (rule,) = [r for r in rules if r.name == "voicebus"]
    assert rule.rule.dispatch_rule_individual.room_prefix == "call-"
    assert list(rule.trunk_ids) == [first["trunk_id"]]

    code, out, err = await sip_setup(livekit, "--number", "+15550123",
                                     "--allowed-address", "198.51.100.7",
                                     "--room-prefix", "phone-")
    assert code == 0, err
    second = json.loads(out)
    assert (second["trunk_id"], second["dispatch_rule_id"]) == \
        (first["trunk_id"], first["dispatch_rule_id"])
    assert not (second["trunk_created"] or second["dispatch_rule_created"])
    trunks, rules = await listed(livekit)
    assert [list(t.numbers) for t in trunks] == [["+15550123"]]
    assert [r.rule.dispatch_rule_individual.room_prefix for r in rules] == ["phone-"]


async def test_an_open_trunk_or_a_bad_room_prefix_is_refused_before_asking_the_server(
        livekit) -> None:
    before = await listed(livekit)
    code, _, err = await sip_setup(livekit, "--name", "open")
    assert code == 2 and "--allowed-address" in err
    code, _, err = await sip_setup(livekit, "--name", "half", "--auth-username", "u")
    assert code == 2 and "both a username and a password" in err
    code, _, err = await sip_setup(livekit, "--name", "bad", "--allowed-address", "10.0.0.1",
                                   "--room-prefix", "no spaces.")
    assert code == 2 and "room prefix" in err
    assert await listed(livekit) == before


async def test_without_redis_livekit_refuses_and_the_command_says_why(tmp_path) -> None:
    stack = Stack(tmp_path, sink=LogTail(tmp_path / "stack.log"), livekit=True)
    await stack.start_nats()
    await stack.start_livekit()
    try:
        code, _, err = await sip_setup(stack, "--allowed-address", "192.0.2.1")
    finally:
        await stack.stop()
    assert code == 1 and "redis required" in err, err
