"""Who may call voicebus's own SIP gateway: trunks, softphone users and limits, from the trunks
file named by VOICEBUS_SIP_CONFIG (services/sip/trunks.go, docs/telephony.md "Trunks,
registration and admission").

nats-server runs alone (an answered call needs the bus, not the stages); the gateway runs with a
trunks file written here and its metrics on, and the counters of its /metrics are the proof of
what it refused. Every SIP peer is SIPp (scripts/install-sipp.sh): 127.0.0.1 is the carrier's
allowed address, 127.0.0.2 (loopback too, in no allow list) is everyone else."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from proto import events as ev
from proto import subjects as sj
from tests.conftest import LogTail
from tests.integration.test_sip_gateway import sipp  # noqa: F401  (the fixture)
from tests.integration.test_sip_gateway import SCENARIO, Gateway, info_request, tool
from voicebus.client import Tap
from voicebus.launcher import Stack, free_port, udp_port

pytestmark = pytest.mark.e2e

CARRIER, OUTSIDER = "127.0.0.1", "127.0.0.2"
ALICE_PASSWORD = "alice-Secret-7"
RATE, BURST = 5, 10
PHONES_GREETING = "Hello from the phones trunk."
ENV_GREETING = "Hello from the environment."
CONFIG = f"""
max_calls = 50
invite_rate = {RATE}
invite_burst = {BURST}
realm = "voicebus-test"

[[trunks]]
name = "carrier"
allow = ["{CARRIER}/32"]

[[trunks]]
name = "phones"
greeting = "{PHONES_GREETING}"
  [[trunks.users]]
  username = "alice"
  password_env = "TEST_ALICE_PASSWORD"
"""


# ---- the processes ----------------------------------------------------------------------------

@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def bus(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """nats-server only."""
    workdir = tmp_path_factory.mktemp("bus")
    logs = LogTail(workdir / "stack.log")
    stack = Stack(workdir, sink=logs)
    try:
        await stack.start(stages=())
    except Exception:
        await stack.stop()
        raise RuntimeError(f"nats-server failed to start:\n{logs.dump()}") from None
    yield stack
    codes = await stack.stop()
    assert all(code == 0 for code in codes.values()), f"{codes}\n{logs.dump()}"


@contextlib.asynccontextmanager
async def running_gateway(bus: Stack, config: str, folder: Path,
                          **env: str) -> AsyncIterator[Gateway]:
    """The gateway with ``config`` as its trunks file and /metrics on; on leaving, SIGTERM and it
    must exit with 0."""
    binary = tool("scripts/install-sip-gateway.sh")
    path = folder / f"trunks-{random.getrandbits(32):x}.toml"
    path.write_text(config)
    port, metrics_port = udp_port(), free_port()
    process = await asyncio.create_subprocess_exec(
        binary, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **bus.role_env("sip"), "VOICEBUS_SIP_LISTEN": f"{CARRIER}:{port}",
             "VOICEBUS_SIP_CONFIG": str(path), "VOICEBUS_METRICS_PORT": str(metrics_port),
             "VOICEBUS_LOG_LEVEL": "info", "VOICEBUS_GREETING": ENV_GREETING, **env})
    gw = Gateway(process, port)
    gw.metrics_port = metrics_port  # type: ignore[attr-defined]
    try:
        await gw.line(r"voicebus-sip ready", 30)
        yield gw
    finally:
        if process.returncode is None:
            process.terminate()
        try:
            code = await asyncio.wait_for(process.wait(), 15)
        except asyncio.TimeoutError:
            process.kill()
            code = await process.wait()
        await gw._reader
    assert code == 0, "\n".join(gw.lines)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gateway(bus: Stack, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    async with running_gateway(bus, CONFIG, tmp_path_factory.mktemp("gateway"),
                               TEST_ALICE_PASSWORD=ALICE_PASSWORD) as gw:
        yield gw


async def counters(gw: Gateway) -> dict[str, float]:
    """The gateway's voicebus_sip_* series from /metrics."""
    url = f"http://127.0.0.1:{gw.metrics_port}/metrics"  # type: ignore[attr-defined]
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    found = {}
    for line in text.splitlines():
        if line.startswith("voicebus_sip_"):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def problems(c: dict[str, float], kind: str) -> float:
    return c.get(f'voicebus_sip_problems_total{{kind="{kind}"}}', 0.0)


def all_problems(c: dict[str, float]) -> float:
    return sum(v for k, v in c.items() if k.startswith("voicebus_sip_problems_total"))


def refused_calls(c: dict[str, float]) -> float:
    return c.get('voicebus_sip_calls_total{direction="inbound",outcome="refused"}', 0.0)


async def counters_until(gw: Gateway, ok: Callable[[dict[str, float]], bool], timeout: float,
                         what: str) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        c = await counters(gw)
        if ok(c):
            return c
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: counters {c}\n" + "\n".join(gw.lines))
        await asyncio.sleep(0.1)


async def run_sipp(sipp: str, xml: str, folder: Path, *args: str, local: str = CARRIER,
                   target: Gateway | None = None) -> tuple[asyncio.subprocess.Process, int]:
    """SIPp with this scenario, from ``local``, towards ``target`` (none: SIPp is the server).
    Returns the process and SIPp's SIP port."""
    scenario = folder / f"scenario-{random.getrandbits(32):x}.xml"
    scenario.write_text(xml)
    port = free_port(udp=True, host=local)
    towards = [f"{CARRIER}:{target.port}"] if target is not None else []
    process = await asyncio.create_subprocess_exec(
        sipp, *towards, "-sf", str(scenario), "-i", local, "-p", str(port),
        "-mp", str(free_port(udp=True, host=local)), "-t", "u1", "-nostdin", "-timeout", "120s",
        "-trace_err", *args,
        cwd=folder, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    return process, port


def udp_bound(port: int) -> bool:
    """Someone holds this UDP port (read from /proc/net/udp: probing by binding could take the
    port from under the process about to bind it)."""
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for row in f.read().splitlines()[1:]:
                if int(row.split()[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


async def listening(process: asyncio.subprocess.Process, port: int) -> None:
    """Wait until SIPp (as a server) holds its UDP port: a REGISTER sent before would be lost."""
    deadline = time.monotonic() + 30
    while not udp_bound(port):
        if process.returncode is not None or time.monotonic() > deadline:
            raise AssertionError(f"SIPp does not listen on UDP port {port}")
        await asyncio.sleep(0.05)


async def finished(process: asyncio.subprocess.Process, timeout: float = 120) -> str:
    """SIPp's output once it exited with 0 (every call of the scenario went as written)."""
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
    text = out.decode(errors="replace")
    assert process.returncode == 0, text[-4000:]
    return text


# ---- SIPp scenarios ---------------------------------------------------------------------------

HEAD = '<?xml version="1.0" encoding="ISO-8859-1" ?>\n<!DOCTYPE scenario SYSTEM "sipp.dtd">\n'

# A REGISTER, challenged; the answer with this password; then the final response expected.
REGISTER = HEAD + """<scenario name="softphone registers">
  <send retrans="500">
    <![CDATA[
      REGISTER sip:[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:{user}@[remote_ip]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:{user}@[remote_ip]>
      Call-ID: [call_id]
      CSeq: 1 REGISTER
      Contact: <sip:{user}@[local_ip]:[local_port]>
      Expires: 600
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="401" auth="true"/>
  <send retrans="500">
    <![CDATA[
      REGISTER sip:[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:{user}@[remote_ip]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:{user}@[remote_ip]>
      Call-ID: [call_id]
      CSeq: 2 REGISTER
      Contact: <sip:{user}@[local_ip]:[local_port]>
      [authentication username={user} password={password}]
      Expires: 600
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="{final}"/>
</scenario>
"""

OPTIONS = HEAD + """<scenario name="keep-alive">
  <send retrans="500">
    <![CDATA[
      OPTIONS sip:[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:carrier@[local_ip]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 OPTIONS
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200"/>
</scenario>
"""

# The ACK to a final response other than 2xx: same Via (branch) as the INVITE.
ACK_REFUSAL = """  <send>
    <![CDATA[
      ACK sip:agent@[remote_ip]:[remote_port] SIP/2.0
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      CSeq: {cseq} ACK
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
"""


def invite(caller: str, cseq: int = 1, auth: str = "") -> str:
    """SCENARIO's INVITE (no media port of ours needed: nothing is played), from ``caller``."""
    head = SCENARIO.split('  <recv response="100"')[0]
    head = head.split('<scenario name="voicebus caller">\n')[1]
    head = head.replace("CSeq: 1 INVITE", f"CSeq: {cseq} INVITE").format(caller=caller, rtp_port=9)
    if auth:
        forwards = "      Max-Forwards: 70\n"
        head = head.replace(forwards, f"      {auth}\n{forwards}", 1)
    return head


def refused(optional: list[int], final: int) -> str:
    """An INVITE from +15550100, then one of these final responses (or ``final``), then the ACK."""
    body = invite("+15550100") + '  <recv response="100" optional="true"/>\n'
    for code in optional:
        body += f'  <recv response="{code}" optional="true" next="ack"/>\n'
    body += f'  <recv response="{final}"/>\n  <label id="ack"/>\n' + ACK_REFUSAL.format(cseq=1)
    return HEAD + '<scenario name="refused">\n' + body + "</scenario>\n"


def answered_call(caller: str, auth: str = "") -> str:
    """An INVITE (with the digest round first when ``auth``), answered; the caller hangs up when
    the test sends it an INFO."""
    cseq, body = 1, ""
    if auth:
        body = (invite(caller) + '  <recv response="100" optional="true"/>\n'
                '  <recv response="401" auth="true"/>\n' + ACK_REFUSAL.format(cseq=1))
        cseq = 2
    ack = f"""  <send>
    <![CDATA[
      ACK [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "Caller" <sip:{caller}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:agent@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: {cseq} ACK
      Contact: <sip:{caller}@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
"""
    rest = SCENARIO.split('  <recv response="100"', 1)[1]
    rest = ('  <recv response="100"' + rest).format(caller=caller, rtp_port=9, ack=ack)
    rest = rest.replace("CSeq: 2 BYE", f"CSeq: {cseq + 1} BYE")
    body += invite(caller, cseq, auth) + rest.replace("</scenario>\n", "")
    return HEAD + '<scenario name="answered">\n' + body + "</scenario>\n"


# ---- the tests --------------------------------------------------------------------------------

@pytest.mark.asyncio(loop_scope="module")
async def test_options_keep_alive_is_answered_200_and_no_problem(gateway, sipp, tmp_path) -> None:
    before = await counters(gateway)
    process, _ = await run_sipp(sipp, OPTIONS, tmp_path, "-m", "3", target=gateway)
    await finished(process)
    assert all_problems(await counters(gateway)) == all_problems(before)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_user_registers_with_the_right_password_and_not_with_a_wrong_one(
        gateway, sipp, tmp_path) -> None:
    before = await counters(gateway)
    right = REGISTER.format(user="alice", password=ALICE_PASSWORD, final=200)
    process, _ = await run_sipp(sipp, right, tmp_path, "-m", "1", target=gateway)
    await finished(process)
    await gateway.line(r'msg="softphone registration" user=alice', 10)
    bad_auth = problems(before, "register_bad_auth")
    assert problems(await counters(gateway), "register_bad_auth") == bad_auth

    wrong = REGISTER.format(user="alice", password="not-the-password", final=403)
    process, _ = await run_sipp(sipp, wrong, tmp_path, "-m", "1", target=gateway)
    await finished(process)
    after = await counters(gateway)
    assert problems(after, "register_bad_auth") == bad_auth + 1
    assert ALICE_PASSWORD not in "\n".join(gateway.lines)


@pytest.mark.asyncio(loop_scope="module")
async def test_an_invite_from_an_address_in_no_allow_list_is_forbidden(
        gateway, sipp, tmp_path) -> None:
    before = await counters(gateway)
    since = len(gateway.lines)
    process, _ = await run_sipp(sipp, refused([], 403), tmp_path, "-m", "1", local=OUTSIDER,
                                target=gateway)
    await finished(process)
    after = await counters(gateway)
    assert problems(after, "invite_forbidden") == problems(before, "invite_forbidden") + 1
    assert refused_calls(after) == refused_calls(before) + 1
    assert not any("session started" in line for line in gateway.lines[since:])


@pytest.mark.asyncio(loop_scope="module")
async def test_a_softphone_user_is_challenged_then_answered_with_its_trunks_greeting(
        bus, gateway, sipp, tmp_path) -> None:
    """alice calls from an address in no allow list: 401, the INVITE again with her
    credentials, answered; the session starts with the greeting of her trunk."""
    nc = await bus.connect()
    tap = Tap(nc)
    since = len(gateway.lines)
    auth = f"[authentication username=alice password={ALICE_PASSWORD}]"
    process, port = await run_sipp(sipp, answered_call("alice", auth), tmp_path, "-m", "1",
                                   local=OUTSIDER, target=gateway)
    try:
        await tap.watch(sj.everything())
        answered = await gateway.line(
            r'msg="call answered" session=(\S+) caller=alice call_id=(\S+)', 30, since)
        session, call_id = answered.groups()
        await tap.wait_for(lambda: tap.of(ev.PhoneSessionStart, session, topic=sj.CTL_START), 10,
                           "the session start")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(info_request(port, call_id).replace(b"127.0.0.1", OUTSIDER.encode()),
                     (OUTSIDER, port))
        await finished(process, 30)
        await gateway.line(rf'msg="call ended" session={session}', 10, since)
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
        await tap.close()
        await nc.close()
    (start,) = tap.of(ev.PhoneSessionStart, session, topic=sj.CTL_START)
    assert (start.caller, start.greeting) == ("alice", PHONES_GREETING)


@pytest.mark.asyncio(loop_scope="module")
async def test_an_invite_flood_is_rate_limited_and_the_gateway_still_takes_a_call(
        bus, gateway, sipp, tmp_path) -> None:
    """200 INVITEs at 100/s from one address in no allow list: every one gets a final response,
    403 within the token bucket (invite_rate, invite_burst) and 503 beyond it; the log gets a
    line or two, not 200; then the carrier's call is answered as usual."""
    before = await counters(gateway)
    since = len(gateway.lines)
    began = time.monotonic()
    flood, _ = await run_sipp(sipp, refused([403], 503), tmp_path, "-m", "200",
                              "-r", "100", "-l", "200", local=OUTSIDER, target=gateway)
    await finished(flood, 180)
    took = time.monotonic() - began
    after = await counters(gateway)
    forbidden = problems(after, "invite_forbidden") - problems(before, "invite_forbidden")
    limited = problems(after, "invite_rate_limited") - problems(before, "invite_rate_limited")
    assert forbidden + limited == 200, (forbidden, limited)
    # The bucket lets at most the burst plus the rate over the flood's time through.
    assert forbidden <= BURST + RATE * took, (forbidden, took)
    assert limited >= 200 - (BURST + RATE * took) and limited > 0
    assert refused_calls(after) - refused_calls(before) == 200
    flood_lines = gateway.lines[since:]
    assert 1 <= sum("INVITE refused" in line for line in flood_lines) <= 2, flood_lines
    assert len(flood_lines) <= 10, flood_lines
    assert gateway.process.returncode is None

    # The carrier's call is answered, with VOICEBUS_GREETING (the carrier has no greeting).
    nc = await bus.connect()
    tap = Tap(nc)
    since = len(gateway.lines)
    process, port = await run_sipp(sipp, answered_call("+15550100"), tmp_path, "-m", "1",
                                   target=gateway)
    try:
        await tap.watch(sj.everything())
        answered = await gateway.line(r'msg="call answered" session=(\S+) caller=\S+ call_id=(\S+)',
                                      30, since)
        session, call_id = answered.groups()
        await tap.wait_for(lambda: tap.of(ev.PhoneSessionStart, session, topic=sj.CTL_START), 10,
                           "the session start")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(info_request(port, call_id), (CARRIER, port))
        await finished(process, 30)
        await gateway.line(rf'msg="call ended" session={session}', 10, since)
    finally:
        if process.returncode is None:
            process.kill()
            await process.communicate()
        await tap.close()
        await nc.close()
    (start,) = tap.of(ev.PhoneSessionStart, session, topic=sj.CTL_START)
    assert start.greeting == ENV_GREETING


# The registrar: challenges the first REGISTER, checks the digest of the second (SIPp's
# verifyauth) and says 200 only when it is right (403 otherwise: the gateway never logs
# "registered" then).
REGISTRAR = HEAD + """<scenario name="registrar">
  <recv request="REGISTER"/>
  <send>
    <![CDATA[
      SIP/2.0 401 Unauthorized
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      WWW-Authenticate: Digest realm="trunk.test", nonce="[pid]n[call_number]x", algorithm=MD5
      Content-Length: 0

    ]]>
  </send>
  <recv request="REGISTER">
    <action>
      <verifyauth assign_to="authvalid" username="{user}" password="{password}"/>
    </action>
  </recv>
  <nop hide="true" test="authvalid" next="good"/>
  <send>
    <![CDATA[
      SIP/2.0 403 Forbidden
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0

    ]]>
  </send>
  <recv request="NEVER" timeout="100"/>
  <label id="good"/>
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      [last_Contact:]
      Expires: 3600
      Content-Length: 0

    ]]>
  </send>
</scenario>
"""

# A registrar that refuses every REGISTER.
REFUSING_REGISTRAR = HEAD + """<scenario name="refusing registrar">
  <recv request="REGISTER"/>
  <send>
    <![CDATA[
      SIP/2.0 403 Forbidden
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0

    ]]>
  </send>
</scenario>
"""


@pytest.mark.asyncio(loop_scope="module")
async def test_the_gateway_registers_to_a_trunk_with_digest_and_retries_a_failing_one(
        bus, sipp, tmp_path) -> None:
    """Two registering trunks: SIPp as a registrar that challenges and verifies the digest
    (password from password_env) sees a valid Authorization; one that refuses every REGISTER is
    retried with backoff, each failure counted and only the first logged."""
    password = "trunk-Secret-9"
    registrar, registrar_port = await run_sipp(
        sipp, REGISTRAR.format(user="gw-user", password=password), tmp_path, "-m", "1")
    refusing, refusing_port = await run_sipp(sipp, REFUSING_REGISTRAR, tmp_path)
    await listening(registrar, registrar_port)
    await listening(refusing, refusing_port)
    config = f"""
[[trunks]]
name = "exotel"
allow = ["{CARRIER}/32"]
  [trunks.register]
  registrar = "sip:{CARRIER}:{registrar_port}"
  username = "gw-user"
  password_env = "TEST_TRUNK_PASSWORD"
  expiry = 3600

[[trunks]]
name = "refusing"
allow = ["192.0.2.1"]
  [trunks.register]
  registrar = "sip:{CARRIER}:{refusing_port}"
  username = "other"
  password = "whatever"
"""
    try:
        async with running_gateway(bus, config, tmp_path, TEST_TRUNK_PASSWORD=password) as gw:
            await gw.line(r"msg=registered trunk=exotel registrar=sip:127\.0\.0\.1:\d+ "
                          r"username=gw-user", 60)
            await finished(registrar, 30)
            await counters_until(gw, lambda c: problems(c, "trunk_register_failed") >= 2, 60,
                                 "two failed registrations to the refusing trunk")
            failed = [line for line in gw.lines if "registration to trunk refusing failed" in line]
            assert len(failed) == 1, gw.lines
            assert not any("registration to trunk exotel failed" in line for line in gw.lines)
            assert password not in "\n".join(gw.lines)
    finally:
        for process in (registrar, refusing):
            if process.returncode is None:
                process.kill()
                await process.communicate()


def start_failure(tmp_path: Path, config: str | None, listen: str = "127.0.0.1:0") -> str:
    """The gateway's complaint when it refuses to start (exit 1, before any connection)."""
    env = {**os.environ, "VOICEBUS_SIP_LISTEN": listen, "VOICEBUS_NATS_URL": "nats://127.0.0.1:1"}
    env.pop("VOICEBUS_SIP_CONFIG", None)
    if config is not None:
        path = tmp_path / f"bad-{random.getrandbits(32):x}.toml"
        path.write_text(config)
        env["VOICEBUS_SIP_CONFIG"] = str(path)
    done = subprocess.run([tool("scripts/install-sip-gateway.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    return done.stderr


def test_the_gateway_refuses_to_start_open_or_with_a_bad_trunks_file(tmp_path) -> None:
    said = start_failure(tmp_path, None, listen="0.0.0.0:0")
    assert "VOICEBUS_SIP_CONFIG" in said and "allow" in said, said
    said = start_failure(tmp_path, '[[trunks]]\nname = "t"\nallow = ["10.0.0.0/8"]\nalow = []\n')
    assert "unknown key trunks.alow" in said, said
    said = start_failure(tmp_path, '[[trunks]]\nname = "t"\nallow = ["10.0.0.0/33"]\n')
    assert 'trunks[0] (t).allow: "10.0.0.0/33" is not an IP address or CIDR' in said, said
    said = start_failure(tmp_path, '[[trunks]]\nname = "t"\n[[trunks.users]]\nusername = "bob"\n')
    assert "trunks[0] (t).users[0] (bob): needs password or password_env" in said, said
    assert re.search(r"^voicebus-sip: ", said, re.M), said
