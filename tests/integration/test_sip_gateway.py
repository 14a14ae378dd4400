"""voicebus's own SIP gateway (services/sip, Go) against every stage and a real SIP peer.

nats-server and the five stages run as processes (the offline ear, whisper), the gateway is
built by scripts/install-sip-gateway.sh and runs as the role ``sip``, and SIPp (Debian's
sip-tester, installed by scripts/install-sipp.sh when missing) places the call: INVITE
with an SDP offering PCMU (and telephone-event) whose media address is a UDP port this test
owns. The test is the caller's phone: it sends the Piper-spoken question as 20 ms PCMU RTP
packets, then silence, and decodes what the gateway sends back, which whisper must hear as the
agent's answer. Then the caller hangs up (SIPp's BYE, released by an INFO this test sends it)
and the session ends on the bus with "caller hung up"."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
import soxr

from proto import events as ev
from proto import subjects as sj
from services.ingress.audio import Resampler, read_wav
from tests.conftest import LogTail, running_stack
from tests.e2e.test_phone import hear
from voicebus.client import Tap
from voicebus.launcher import Stack, free_port, offline_ear, udp_port
from voicebus.speech import say_to_wav

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CALLER = "+15550100"


# ---- G.711 μ-law (ITU-T G.711, the table-free form) ------------------------------------------

def ulaw_encode(pcm: np.ndarray) -> bytes:
    x = pcm.astype(np.int32)
    sign = np.where(x < 0, 0x80, 0)
    mag = np.minimum(np.abs(x), 32635) + 0x84
    exponent = np.floor(np.log2(mag)).astype(np.int32) - 7
    mantissa = (mag >> (exponent + 3)) & 0x0F
    return (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def ulaw_decode(data: bytes) -> np.ndarray:
    u = ~np.frombuffer(data, np.uint8).astype(np.int32) & 0xFF
    sign, exponent, mantissa = u & 0x80, (u >> 4) & 0x07, u & 0x0F
    mag = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(sign != 0, -mag, mag).astype(np.int16)


def test_ulaw_round_trip() -> None:
    pcm = np.array([0, 1, -1, 100, -100, 1000, -1000, 32767, -32768], np.int16)
    back = ulaw_decode(ulaw_encode(pcm))
    assert np.all(np.abs(back.astype(int) - pcm) <= np.maximum(8, np.abs(pcm.astype(int)) // 16))
    assert ulaw_encode(np.zeros(4, np.int16)) == b"\xff" * 4


# ---- the processes ----------------------------------------------------------------------------

def tool(script: str) -> str:
    done = subprocess.run([str(ROOT / script)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.fail(f"{script} failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


class Gateway:
    """The gateway process, its log lines collected as they come."""

    def __init__(self, process: asyncio.subprocess.Process, port: int,
                 metrics_port: int = 0) -> None:
        self.process, self.port, self.lines = process, port, []
        self.metrics_port = metrics_port
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            print("gateway:", line, file=sys.stderr)
            self._changed.set()

    async def line(self, pattern: str, timeout: float, since: int = 0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines[since:]:
                if m := re.search(pattern, line):
                    return m
            if self.process.returncode is not None or time.monotonic() > deadline:
                raise AssertionError(f"no gateway log line {pattern!r}:\n" + "\n".join(self.lines))
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.05, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                pass

    async def metric(self, name: str, **labels: str) -> float:
        """A counter's value from the gateway's /metrics (0 before its first count)."""
        def scrape() -> str:
            url = f"http://127.0.0.1:{self.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.read().decode()

        want = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
        for line in (await asyncio.to_thread(scrape)).splitlines():
            series, _, value = line.rpartition(" ")
            if series == (f"{name}{{{want}}}" if want else name):
                return float(value)
        return 0.0

    async def problems(self, kind: str) -> float:
        return await self.metric("voicebus_sip_problems_total", kind=kind)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def phone_stack(tmp_path_factory: pytest.TempPathFactory):
    async for running in running_stack(tmp_path_factory, livekit=False, env=offline_ear()):
        yield running


async def start_gateway(stack, **env: str) -> Gateway:
    """A gateway process as the role ``sip``, with its metrics on a port of its own."""
    binary = tool("scripts/install-sip-gateway.sh")
    port, metrics_port = udp_port(), free_port()
    env = {**os.environ, **stack.role_env("sip"), "VOICEBUS_SIP_LISTEN": f"127.0.0.1:{port}",
           "VOICEBUS_LOG_LEVEL": "info", "VOICEBUS_METRICS_PORT": str(metrics_port), **env}
    process = await asyncio.create_subprocess_exec(binary, env=env, stderr=asyncio.subprocess.PIPE)
    gw = Gateway(process, port, metrics_port)
    try:
        await gw.line(r"voicebus-sip ready", 20)
    except BaseException:  # not ready: it must not outlive the test, retrying the bus for ever
        process.kill()
        await process.wait()
        raise
    return gw


async def stop_gateway(gw: Gateway) -> None:
    """SIGTERM; it must exit with 0."""
    gw.process.terminate()
    try:
        code = await asyncio.wait_for(gw.process.wait(), 10)
    except asyncio.TimeoutError:
        gw.process.kill()
        code = await gw.process.wait()
    await gw._reader
    assert code == 0, "\n".join(gw.lines)


# The gateway's RTP port pool (VOICEBUS_SIP_RTP_PORTS): a call's media port comes from here.
RTP_POOL = (31000, 31199)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gateway(phone_stack):
    gw = await start_gateway(phone_stack, VOICEBUS_SIP_RTP_PORTS="%d-%d" % RTP_POOL)
    yield gw
    await stop_gateway(gw)


@pytest.fixture(scope="module")
def sipp() -> str:
    return tool("scripts/install-sipp.sh")


# The caller's ACK to the 200, the same in every scenario (filled in with the rest).
ACK = """  <send>
    <![CDATA[
      ACK [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "Caller" <sip:{caller}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:agent@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Contact: <sip:{caller}@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
"""

SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="voicebus caller">
  <send retrans="500">
    <![CDATA[
      INVITE sip:agent@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "Caller" <sip:{caller}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:agent@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: <sip:{caller}@[local_ip]:[local_port]>
      Max-Forwards: 70
      Subject: voicebus gateway test
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=caller 53655765 2353687637 IN IP4 127.0.0.1
      s=-
      c=IN IP4 127.0.0.1
      t=0 0
      m=audio {rtp_port} RTP/AVP 0 101
      a=rtpmap:0 PCMU/8000
      a=rtpmap:101 telephone-event/8000
      a=fmtp:101 0-15
      a=ptime:20
      a=sendrecv

    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
  <recv response="200" rtd="true" rrs="true"/>
{ack}  <!-- The test says when to hang up: an INFO it sends in this call. -->
  <recv request="INFO" timeout="150000" ontimeout="hangup"/>
  <label id="hangup"/>
  <send retrans="500">
    <![CDATA[
      BYE [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "Caller" <sip:{caller}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:agent@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 2 BYE
      Contact: <sip:{caller}@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200" crlf="true"/>
</scenario>
"""


# ---- RTP ---------------------------------------------------------------------------------------

class Phone(asyncio.DatagramProtocol):
    """The caller's media: what it hears (PCMU payloads) and where it sends."""

    def __init__(self) -> None:
        self.heard: list[bytes] = []
        self.other_types: set[int] = set()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[override]
        if len(data) < 12 or data[0] >> 6 != 2:
            return
        offset = 12 + 4 * (data[0] & 0x0F)
        if data[0] & 0x10:  # header extension
            offset += 4 + 4 * struct.unpack("!H", data[offset + 2:offset + 4])[0]
        payload_type = data[1] & 0x7F
        if payload_type == 0:
            self.heard.append(data[offset:])
        else:
            self.other_types.add(payload_type)


DTMF_EVENTS = {**{str(d): d for d in range(10)}, "*": 10, "#": 11}


async def send_rtp(phone: Phone, to: tuple[str, int], audio: bytes, stop: asyncio.Event,
                   keys: asyncio.Queue[str]) -> None:
    """``audio`` (8 kHz s16le) as 20 ms PCMU packets in real time, then silence until ``stop``;
    a key put in ``keys`` is sent in place of the audio as RFC 4733 telephone-event packets
    (payload type 101): 3 packets of the event, then 3 of its end, as phones do."""
    ssrc, seq, ts = random.getrandbits(32), random.getrandbits(16), random.getrandbits(32)
    began, n, key, key_packet, key_ts = time.monotonic(), 0, None, 0, 0
    while not stop.is_set():
        if key is None and not keys.empty():
            key, key_packet, key_ts = keys.get_nowait(), 0, ts
        if key is not None:
            end = key_packet >= 3
            duration = 160 * min(key_packet + 1, 3)
            payload = struct.pack("!BBH", DTMF_EVENTS[key], (0x80 if end else 0) | 10, duration)
            marker, pt, stamp = 0x80 if key_packet == 0 else 0, 101, key_ts
            key_packet += 1
            if key_packet == 6:
                key = None
        else:
            chunk = audio[n * 320:(n + 1) * 320].ljust(320, b"\0")
            payload = ulaw_encode(np.frombuffer(chunk, np.int16))
            marker, pt, stamp = 0x80 if n == 0 else 0, 0, ts
        assert phone.transport is not None
        phone.transport.sendto(struct.pack("!BBHII", 0x80, marker | pt, seq, stamp, ssrc) + payload, to)
        n, seq, ts = n + 1, (seq + 1) & 0xFFFF, (ts + 160) & 0xFFFFFFFF
        await asyncio.sleep(max(0.0, began + n * 0.02 - time.monotonic()))


def info_request(sipp_port: int, call_id: str) -> bytes:
    return ("INFO sip:caller@127.0.0.1:{p} SIP/2.0\r\n"
            "Via: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bK-test-{r}\r\n"
            "From: <sip:agent@127.0.0.1>;tag=test{r}\r\n"
            "To: <sip:caller@127.0.0.1:{p}>\r\n"
            "Call-ID: {c}\r\nCSeq: 7 INFO\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
            ).format(p=sipp_port, c=call_id, r=random.getrandbits(32)).encode()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_sip_call_is_answered_by_the_agent_and_the_hang_up_ends_the_session(
        phone_stack, gateway, sipp, tmp_path) -> None:
    stack = phone_stack
    pcm, rate, channels = read_wav(await say_to_wav("What time is it?", tmp_path / "q.wav",
                                                    lead_ms=400))
    resampler = Resampler(rate, channels)
    at_16k = resampler.process(pcm) + resampler.flush()
    question = soxr.resample(np.frombuffer(at_16k, np.int16), 16000, 8000).astype(np.int16)

    rtp_port, sipp_port, sipp_media = udp_port(), udp_port(), udp_port()
    loop = asyncio.get_running_loop()
    transport, phone = await loop.create_datagram_endpoint(Phone, local_addr=("127.0.0.1", rtp_port))
    scenario = tmp_path / "caller.xml"
    scenario.write_text(SCENARIO.format(caller=CALLER, rtp_port=rtp_port,
                                        ack=ACK.format(caller=CALLER)))
    nc = await stack.connect()
    tap = Tap(nc)
    stop = asyncio.Event()
    sender: asyncio.Task | None = None
    keys: asyncio.Queue[str] = asyncio.Queue()
    call = await asyncio.create_subprocess_exec(
        sipp, f"127.0.0.1:{gateway.port}", "-sf", str(scenario), "-m", "1", "-l", "1",
        "-i", "127.0.0.1", "-p", str(sipp_port), "-mp", str(sipp_media), "-t", "u1",
        "-nostdin", "-timeout", "170s", "-trace_err", "-trace_screen",
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        await tap.watch(sj.everything())
        answered = await gateway.line(
            r"call answered.*session=(\S+).*caller=(\S+).*call_id=(\S+).*local=(\S+):(\d+)", 30)
        session, caller, call_id, media_host, media_port = answered.groups()
        assert RTP_POOL[0] <= int(media_port) <= RTP_POOL[1] and int(media_port) % 2 == 0
        assert caller == CALLER
        await tap.wait_for(lambda: len(tap.of(ev.StageReady, session)) == 5, 30, "every stage")
        sender = asyncio.create_task(send_rtp(phone, (media_host, int(media_port)),
                                              question.tobytes() + bytes(16000), stop, keys))
        (played,) = await tap.wait_for(
            lambda: tap.of(ev.Playback, session, turn=1, final=True), 60, "the answer played")
        # Every frame egress played has reached the phone as a packet (20 ms each).
        await tap.wait_for(lambda: len(phone.heard) * 20 >= played.played_ms - 20, 10,
                           "the answer's last packets")
        for key in "5#":  # the caller's keys (RFC 4733)
            keys.put_nowait(key)
        await tap.wait_for(lambda: len(tap.of(ev.Dtmf, session, topic=sj.SIP_DTMF)) == 2, 10,
                           "the keys")
        stop.set()
        await sender
        # The caller hangs up: SIPp sends BYE once it has the INFO.
        transport.sendto(info_request(sipp_port, call_id), ("127.0.0.1", sipp_port))
        out, _ = await asyncio.wait_for(call.communicate(), 20)
        await tap.wait_for(lambda: tap.of(ev.SessionEnd, session, topic=sj.CTL_END), 10,
                           "the hang-up on the bus")
        await gateway.line(rf'msg="call ended" session={session}', 10)
    finally:
        stop.set()
        if sender is not None:
            await asyncio.gather(sender, return_exceptions=True)
        if call.returncode is None:
            call.kill()
            await call.communicate()
        await tap.close()
        await nc.close()
        transport.close()

    assert call.returncode == 0, out.decode(errors="replace")[-4000:]
    (start,) = tap.of(ev.PhoneSessionStart, session, topic=sj.CTL_START)
    assert (start.caller, start.greeting, start.sample_rate) == (CALLER, "", 8000)
    frames = tap.of(ev.AudioFrame, session, topic=sj.SIP_AUDIO)
    assert frames and {len(f.pcm) for f in frames} == {320}
    assert [f.pts_ms for f in frames] == list(range(0, 20 * len(frames), 20))
    (final,) = tap.of(ev.Transcript, session, turn=1, final=True)
    assert "time" in final.text.lower(), final.text
    assert [k.digit for k in tap.of(ev.Dtmf, session, topic=sj.SIP_DTMF)] == ["5", "#"]
    (end,) = tap.of(ev.SessionEnd, session, topic=sj.CTL_END)
    assert end.reason == "caller hung up"
    # What the caller heard over RTP: the agent's answer.
    assert len(phone.heard) > 25 and {len(p) for p in phone.heard} == {160}, phone.other_types
    said = await hear(b"".join(ulaw_decode(p).tobytes() for p in phone.heard))
    assert "time" in said, said


def invite_only(scenario: str, offer: str, after_200: str) -> str:
    """SCENARIO's INVITE with another media line, followed by ``after_200``."""
    head = scenario.split("  <recv response=\"100\"")[0]
    head = re.sub(r"m=audio .*?a=sendrecv", offer, head, flags=re.S)
    return head + after_200 + "</scenario>\n"


AGENT_HANGS_UP = """  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="200" rrs="true"/>
{ack}  <recv request="BYE" timeout="60000"/>
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0

    ]]>
  </send>
"""

REFUSED = """  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="488"/>
  <send>
    <![CDATA[
      ACK sip:agent@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "Caller" <sip:{caller}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:agent@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
"""


async def run_sipp(sipp: str, gateway: Gateway, xml: str, tmp_path: Path, transport: str = "u1"):
    scenario = tmp_path / f"scenario-{random.getrandbits(32):x}.xml"
    scenario.write_text(xml)
    return await asyncio.create_subprocess_exec(
        sipp, f"127.0.0.1:{gateway.port}", "-sf", str(scenario), "-m", "1", "-l", "1",
        "-i", "127.0.0.1", "-p", str(udp_port()), "-mp", str(udp_port()), "-t", transport,
        "-nostdin", "-timeout", "90s", "-trace_err",
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)


@pytest.mark.asyncio(loop_scope="module")
async def test_the_agents_end_of_the_call_hangs_up_over_tcp(
        phone_stack, gateway, sipp, tmp_path) -> None:
    """floor.end (the judge's end of the session) makes the gateway send BYE; over SIP TCP."""
    since = len(gateway.lines)
    offer = "m=audio 9 RTP/AVP 8 0\n      a=rtpmap:8 PCMA/8000\n      a=rtpmap:0 PCMU/8000\n      a=sendrecv"
    xml = invite_only(SCENARIO, offer, AGENT_HANGS_UP).format(
        caller=CALLER, rtp_port=9, ack=ACK.format(caller=CALLER))
    call = await run_sipp(sipp, gateway, xml, tmp_path, transport="t1")
    judge = await phone_stack.connect(role="egress")  # egress speaks for the judge (floor)
    nc = await phone_stack.connect()
    tap = Tap(nc)
    try:
        await tap.watch(sj.everything())
        answered = await gateway.line(r'msg="call answered" session=(\S+).*codec=(\S+)', 30, since)
        session, codec_name = answered.groups()
        assert codec_name == "pcma"  # the caller's first choice
        await tap.wait_for(lambda: len(tap.of(ev.StageReady, session)) == 5, 30, "every stage")
        end = ev.SessionEnd(session=session, seq=1, ts_ns=time.time_ns(), reason="goodbye")
        from proto import codec
        await judge.publish(sj.FLOOR_END.subject(session), codec.encode(end))
        await judge.flush()
        out, _ = await asyncio.wait_for(call.communicate(), 20)
        await gateway.line(rf'msg="call ended" session={session}', 10, since)
    finally:
        if call.returncode is None:
            call.kill()
            await call.communicate()
        await tap.close()
        await nc.close()
        await judge.close()
    assert call.returncode == 0, out.decode(errors="replace")[-4000:]
    assert not tap.of(ev.SessionEnd, session, topic=sj.CTL_END)  # the gateway's BYE, not the caller's


@pytest.mark.asyncio(loop_scope="module")
async def test_a_call_without_a_common_codec_is_refused_with_488(gateway, sipp, tmp_path) -> None:
    since = len(gateway.lines)
    offer = "m=audio 9 RTP/AVP 9\n      a=rtpmap:9 G722/8000\n      a=sendrecv"
    xml = invite_only(SCENARIO, offer, REFUSED).format(
        caller=CALLER, rtp_port=9, ack=ACK.format(caller=CALLER))
    # Garbage first: the gateway must live on (and then refuse the call properly).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as junk:
        for data in (b"\x00\xff" * 40, b"INVITE sip:x SIP/2.0\r\n\r\n", b"SIP/2.0 200\r\n\r\n",
                     b"INVITE sip:a@b SIP/2.0\r\nContent-Length: 99999\r\n\r\nv=0"):
            junk.sendto(data, ("127.0.0.1", gateway.port))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"OPTIONS garbage\r\n\r\n" + bytes(range(256)))
    await writer.drain()
    writer.close()
    call = await run_sipp(sipp, gateway, xml, tmp_path)
    out, _ = await asyncio.wait_for(call.communicate(), 30)
    assert call.returncode == 0, out.decode(errors="replace")[-4000:]
    await gateway.line(r"cannot answer", 5, since)
    assert not any("session started" in line for line in gateway.lines[since:])
    assert gateway.process.returncode is None


# ---- media, hold and outbound calls --------------------------------------------------------------
#
# The caller's RTP through the jitter buffer (loss, reordering), RTP from an address the phone's
# SDP did not name, a hold by re-INVITE, a CANCEL while the gateway rings, and calls the gateway
# places itself (`voicebus dial`, a DialRequest on the bus) to SIPp answering as the callee.

async def question_8k(tmp_path: Path) -> np.ndarray:
    """The Piper-spoken question at 8 kHz, as a phone would send it."""
    pcm, rate, channels = read_wav(await say_to_wav("What time is it?", tmp_path / "q.wav",
                                                    lead_ms=400))
    resampler = Resampler(rate, channels)
    at_16k = resampler.process(pcm) + resampler.flush()
    return soxr.resample(np.frombuffer(at_16k, np.int16), 16000, 8000).astype(np.int16)


class RtpStream:
    """One sender's RTP: PCMU packets of 20 ms with its own SSRC, sequence and clock."""

    def __init__(self, rng: random.Random) -> None:
        self.ssrc, self.seq, self.ts = rng.getrandbits(32), rng.getrandbits(16), rng.getrandbits(32)

    def packet(self, pcm: bytes) -> bytes:
        data = struct.pack("!BBHII", 0x80, 0, self.seq, self.ts, self.ssrc) + ulaw_encode(
            np.frombuffer(pcm.ljust(320, b"\0")[:320], np.int16))
        self.seq, self.ts = (self.seq + 1) & 0xFFFF, (self.ts + 160) & 0xFFFFFFFF
        return data


async def paced(slots: int | None, stop: asyncio.Event, slot) -> None:
    """Call ``slot(n)`` every 20 ms of real time (catching up after a stall, as a phone's clock
    does) until ``stop`` or ``slots`` slots."""
    began, n = time.monotonic(), 0
    while not stop.is_set() and (slots is None or n < slots):
        slot(n)
        n += 1
        await asyncio.sleep(max(0.0, began + n * 0.02 - time.monotonic()))


class Lossy:
    """``audio`` then silence, with every 20th packet lost and some neighbours swapped (the
    packet held back one slot and sent right after its successor), from a fixed seed."""

    def __init__(self, sock: asyncio.DatagramTransport, to: tuple[str, int], audio: bytes,
                 seed: int) -> None:
        self.sock, self.to, self.audio = sock, to, audio
        self.rng = random.Random(seed)
        self.stream = RtpStream(self.rng)
        self.held: bytes | None = None
        self.dropped = self.swapped = 0

    def slot(self, n: int) -> None:
        packet = self.stream.packet(self.audio[n * 320:(n + 1) * 320])
        out: list[bytes] = []
        if n % 20 == 19:
            self.dropped += 1
        elif self.held is None and self.rng.random() < 0.1:
            self.held, packet = packet, b""
            self.swapped += 1
        else:
            out.append(packet)
        if self.held is not None and packet:
            out.append(self.held)
            self.held = None
        for data in out:
            self.sock.sendto(data, self.to)


class PlacedCall:
    """A call SIPp places to the gateway with ``scenario``; the test is the phone's media."""

    def __init__(self, stack, gateway: Gateway, sipp: str, tmp_path: Path, scenario: str,
                 caller: str = CALLER) -> None:
        self.stack, self.gateway, self.sipp, self.tmp_path = stack, gateway, sipp, tmp_path
        self.scenario, self.caller = scenario, caller
        self.rtp_port, self.sipp_port, self.sipp_media = udp_port(), udp_port(), udp_port()

    async def __aenter__(self) -> PlacedCall:
        loop = asyncio.get_running_loop()
        self.transport, self.phone = await loop.create_datagram_endpoint(
            Phone, local_addr=("127.0.0.1", self.rtp_port))
        xml = self.tmp_path / f"call-{self.sipp_port}.xml"
        xml.write_text(self.scenario.format(caller=self.caller, rtp_port=self.rtp_port,
                                            ack=ACK.format(caller=self.caller),
                                            flags=self.tmp_path))
        self.nc = await self.stack.connect()
        self.tap = Tap(self.nc)
        await self.tap.watch(sj.everything())
        since = len(self.gateway.lines)
        self.sipp_process = await asyncio.create_subprocess_exec(
            self.sipp, f"127.0.0.1:{self.gateway.port}", "-sf", str(xml), "-m", "1", "-l", "1",
            "-i", "127.0.0.1", "-p", str(self.sipp_port), "-mp", str(self.sipp_media),
            "-t", "u1", "-nostdin", "-timeout", "170s", "-trace_err",
            cwd=self.tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        answered = await self.gateway.line(
            rf"call answered.*session=(\S+).*caller={re.escape(self.caller)}.*call_id=(\S+)"
            r".*local=(\S+):(\d+)", 30, since)
        self.session, self.call_id, host, port = answered.groups()
        self.media = (host, int(port))
        await self.tap.wait_for(lambda: len(self.tap.of(ev.StageReady, self.session)) == 5, 30,
                                "every stage")
        return self

    def info(self) -> None:
        """Release SIPp's next step (the scenarios wait for an INFO of the test's)."""
        self.transport.sendto(info_request(self.sipp_port, self.call_id),
                              ("127.0.0.1", self.sipp_port))

    async def hang_up(self) -> None:
        self.info()
        out, _ = await asyncio.wait_for(self.sipp_process.communicate(), 30)
        assert self.sipp_process.returncode == 0, out.decode(errors="replace")[-4000:]
        await self.tap.wait_for(lambda: self.tap.of(ev.SessionEnd, self.session,
                                                    topic=sj.CTL_END), 10, "the hang-up")

    async def __aexit__(self, *exc_info) -> None:
        if self.sipp_process.returncode is None:
            self.sipp_process.kill()
            await self.sipp_process.communicate()
        await self.tap.close()
        await self.nc.close()
        self.transport.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_question_through_loss_and_reordering_is_heard_and_answered(
        phone_stack, gateway, sipp, tmp_path) -> None:
    """5 % of the packets lost (every 20th) and one in ten held back behind its successor: the
    jitter buffer puts them in order and conceals the losses, and whisper still hears the
    question, which the agent answers."""
    question = await question_8k(tmp_path)
    lost_before = await gateway.problems("rtp_lost")
    stop = asyncio.Event()
    async with PlacedCall(phone_stack, gateway, sipp, tmp_path, SCENARIO) as call:
        lossy = Lossy(call.transport, call.media, question.tobytes(), seed=16)
        sender = asyncio.create_task(paced(None, stop, lossy.slot))
        try:
            (final,) = await call.tap.wait_for(
                lambda: call.tap.of(ev.Transcript, call.session, turn=1, final=True), 90,
                "the question's transcript")
            await call.tap.wait_for(
                lambda: call.tap.of(ev.Playback, call.session, turn=1, final=True), 90,
                "the answer played")
        finally:
            stop.set()
            await sender
        await call.hang_up()
        frames = call.tap.of(ev.AudioFrame, call.session, topic=sj.SIP_AUDIO)
    assert "time" in final.text.lower(), final.text
    assert lossy.dropped >= 5 and lossy.swapped >= 5, (lossy.dropped, lossy.swapped)
    # Each loss was concealed (the last may have had no successors to prove it).
    assert await gateway.problems("rtp_lost") - lost_before >= lossy.dropped - 1
    assert [f.pts_ms for f in frames] == list(range(0, 20 * len(frames), 20))


@pytest.mark.asyncio(loop_scope="module")
async def test_rtp_from_another_address_is_not_heard_and_is_counted(
        phone_stack, gateway, sipp, tmp_path) -> None:
    """While the phone sends silence, someone else sends the spoken question to the call's media
    port: none of it reaches the bus, and every packet is counted. Then the phone's own tone
    does reach it."""
    question = await question_8k(tmp_path)
    wrong_before = await gateway.problems("rtp_wrong_source")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    async with PlacedCall(phone_stack, gateway, sipp, tmp_path, SCENARIO) as call:
        phone_stream, tone = RtpStream(random.Random(1)), [False]
        loud = (np.full(160, 8000, np.int16)).tobytes()
        phone = asyncio.create_task(paced(None, stop, lambda n: call.transport.sendto(
            phone_stream.packet(loud if tone[0] else bytes(320)), call.media)))
        intruder, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                          local_addr=("127.0.0.1", 0))
        intruder_stream, audio = RtpStream(random.Random(2)), question.tobytes()
        slots = len(audio) // 320
        try:
            await paced(slots, asyncio.Event(), lambda n: intruder.sendto(
                intruder_stream.packet(audio[n * 320:(n + 1) * 320]), call.media))

            async def counted() -> bool:
                return await gateway.problems("rtp_wrong_source") - wrong_before >= slots
            deadline = time.monotonic() + 30
            while not await counted():
                assert time.monotonic() < deadline, "the intruder's packets were not all counted"
                await asyncio.sleep(0.1)  # polling /metrics: nothing to wait on but the count
            # The frames of the intruder's time (and the jitter buffer's depth after it).
            seen = len(call.tap.of(ev.AudioFrame, call.session, topic=sj.SIP_AUDIO))
            await call.tap.wait_for(lambda: len(call.tap.of(
                ev.AudioFrame, call.session, topic=sj.SIP_AUDIO)) >= seen + 10, 10, "frames")
            during = call.tap.of(ev.AudioFrame, call.session, topic=sj.SIP_AUDIO)
            tone[0] = True  # the phone itself speaks up: that is heard
            await call.tap.wait_for(lambda: any(
                np.abs(np.frombuffer(f.pcm, np.int16)).max() > 4000
                for f in call.tap.of(ev.AudioFrame, call.session, topic=sj.SIP_AUDIO)), 10,
                "the phone's own tone")
        finally:
            stop.set()
            await phone
            intruder.close()
        await call.hang_up()
        vad = call.tap.of(ev.SpeechStarted, call.session)
    assert len(during) > slots  # the whole time the intruder spoke
    assert all(not any(f.pcm) for f in during), "the intruder's audio reached the bus"
    assert not vad or vad[0].pts_ms >= during[-1].pts_ms, "the VAD heard the intruder"
    assert await gateway.problems("rtp_wrong_source") - wrong_before == slots


HOLD_AND_RESUME = SCENARIO.split("{ack}")[0] + """{ack}  <!-- Hold when the test says (INFO), resume when it says again, then hang up. -->
  <recv request="INFO" timeout="60000"/>
{hold}  <nop><action><exec command="touch {flags}/held"/></action></nop>
  <recv request="INFO" timeout="60000"/>
{resume}  <nop><action><exec command="touch {flags}/resumed"/></action></nop>
  <recv request="INFO" timeout="60000"/>
  <send retrans="500">
    <![CDATA[
      BYE [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "Caller" <sip:{caller}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:agent@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 4 BYE
      Contact: <sip:{caller}@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200" crlf="true"/>
</scenario>
"""

REINVITE = """  <send retrans="500">
    <![CDATA[
      INVITE [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "Caller" <sip:{{caller}}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:agent@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: {cseq} INVITE
      Contact: <sip:{{caller}}@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=caller 53655765 {version} IN IP4 127.0.0.1
      s=-
      c=IN IP4 127.0.0.1
      t=0 0
      m=audio {{rtp_port}} RTP/AVP 0 101
      a=rtpmap:0 PCMU/8000
      a=rtpmap:101 telephone-event/8000
      a=fmtp:101 0-15
      a=ptime:20
      a={direction}

    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="200"/>
  <send>
    <![CDATA[
      ACK [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "Caller" <sip:{{caller}}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:agent@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: {cseq} ACK
      Contact: <sip:{{caller}}@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
"""


def agent_frame(session: str, seq: int, value: int, samples: int = 160) -> bytes:
    from proto import codec

    return codec.encode(ev.AudioFrame(session=session, seq=seq, ts_ns=time.time_ns(),
                                      pcm=np.full(samples, value, np.int16).tobytes(),
                                      sample_rate=8000, pts_ms=20 * seq))


async def wait_for_file(path: Path, timeout: float) -> None:
    """SIPp touches a file when it reached a step of its scenario."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"SIPp never reached {path.name}"
        await asyncio.sleep(0.05)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_hold_and_its_resume_keep_the_call_and_the_session(
        phone_stack, gateway, sipp, tmp_path) -> None:
    """The phone holds the call with a re-INVITE (a=inactive: diago itself would go on sending)
    and resumes it (a=sendrecv). The call and its session go on; the agent's audio is not sent
    while the phone holds, and is again once it resumed."""
    scenario = HOLD_AND_RESUME.replace("{hold}", REINVITE.format(
        cseq=2, version=2353687638, direction="inactive")).replace("{resume}", REINVITE.format(
            cseq=3, version=2353687639, direction="sendrecv"))
    egress = await phone_stack.connect(role="egress")
    try:
        async with PlacedCall(phone_stack, gateway, sipp, tmp_path, scenario,
                              caller="+15550142") as call:
            since = len(gateway.lines)
            call.info()
            await gateway.line(rf"call on hold.*session={call.session}|"
                               rf"session={call.session}.*call on hold", 20, since)
            await wait_for_file(tmp_path / "held", 20)
            subject = sj.EGRESS_AUDIO.subject(call.session)
            for seq in range(1, 26):  # the agent speaks while the phone holds: not sent
                await egress.publish(subject, agent_frame(call.session, seq, 8000))
            # A frame of the wrong shape after them: once the gateway says so, it has dealt
            # with every frame before it (one subscription, in order).
            await egress.publish(subject, agent_frame(call.session, 26, 0, samples=10))
            await egress.flush()
            await gateway.line(rf"wrong shape.*session={call.session}|"
                               rf"session={call.session}.*wrong shape", 20, since)
            call.info()
            await gateway.line(rf"call resumed.*session={call.session}|"
                               rf"session={call.session}.*call resumed", 20, since)
            await wait_for_file(tmp_path / "resumed", 20)
            for seq in range(27, 52):  # and once it resumed: sent
                await egress.publish(subject, agent_frame(call.session, seq, -8000))
            await egress.flush()
            await call.tap.wait_for(lambda: len(call.phone.heard) >= 25, 20, "the agent's audio")
            assert not call.tap.of(ev.SessionEnd, call.session)  # the session lived through it
            await call.hang_up()
            heard = [int(ulaw_decode(p).mean()) for p in call.phone.heard]
            frames = call.tap.of(ev.AudioFrame, call.session, topic=sj.SIP_AUDIO)
    finally:
        await egress.close()
    assert len(heard) == 25 and all(v < -7000 for v in heard), heard  # none from the hold
    assert [f.pts_ms for f in frames] == list(range(0, 20 * len(frames), 20))
    (end,) = call.tap.of(ev.SessionEnd, call.session, topic=sj.CTL_END)
    assert end.reason == "caller hung up"


CANCELLED = SCENARIO.split("  <recv response=\"100\"")[0] + """  <recv response="100" optional="true"/>
  <recv response="180"/>
  <send>
    <![CDATA[
      CANCEL sip:agent@[remote_ip]:[remote_port] SIP/2.0
      [last_Via:]
      From: "Caller" <sip:{caller}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:agent@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 CANCEL
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200"/>
  <recv response="487"/>
  <send>
    <![CDATA[
      ACK sip:agent@[remote_ip]:[remote_port] SIP/2.0
      [last_Via:]
      From: "Caller" <sip:{caller}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      [last_To:]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
</scenario>
"""


@pytest_asyncio.fixture(loop_scope="module")
async def ringing_gateway(phone_stack):
    """A second gateway that rings 30 s before it answers (VOICEBUS_SIP_RING_MS)."""
    gw = await start_gateway(phone_stack, VOICEBUS_SIP_RING_MS="30000")
    yield gw
    await stop_gateway(gw)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_cancel_while_ringing_ends_the_call_with_487_and_no_session(
        phone_stack, ringing_gateway, sipp, tmp_path) -> None:
    caller = "+15550187"
    nc = await phone_stack.connect()
    tap = Tap(nc)
    try:
        await tap.watch(sj.everything())
        xml = CANCELLED.format(caller=caller, rtp_port=9)
        call = await run_sipp(sipp, ringing_gateway, xml, tmp_path)
        out, _ = await asyncio.wait_for(call.communicate(), 30)
        assert call.returncode == 0, out.decode(errors="replace")[-4000:]  # 180, 200, 487
        await ringing_gateway.line(rf"caller cancelled while ringing.*caller={re.escape(caller)}|"
                                   rf"caller={re.escape(caller)}.*caller cancelled", 10)
        assert await ringing_gateway.metric("voicebus_sip_calls_total", direction="inbound",
                                            outcome="cancelled") == 1
    finally:
        await tap.close()
        await nc.close()
    assert not any("session started" in line for line in ringing_gateway.lines)
    assert not [s for s in tap.of(ev.PhoneSessionStart) if s.caller == caller]


CALLEE = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="voicebus callee">
  <recv request="INVITE" crlf="true"/>
{answer}</scenario>
"""

# The callee's parts: it rings; it answers (SDP: PCMU and keys, on {rtp_port}); it takes the
# ACK and, later, the BYE.
RINGING = """  <send>
    <![CDATA[
      SIP/2.0 180 Ringing
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:callee@[local_ip]:[local_port];transport=[transport]>
      Content-Length: 0

    ]]>
  </send>
"""
PICKS_UP = """  <send retrans="500">
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:callee@[local_ip]:[local_port];transport=[transport]>
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=callee 53655765 2353687637 IN IP4 127.0.0.1
      s=-
      c=IN IP4 127.0.0.1
      t=0 0
      m=audio {rtp_port} RTP/AVP 0 101
      a=rtpmap:0 PCMU/8000
      a=rtpmap:101 telephone-event/8000
      a=fmtp:101 0-15
      a=sendrecv

    ]]>
  </send>
"""
HANGS_UP = """  <recv request="ACK" crlf="true"/>
  <recv request="BYE" timeout="150000"/>
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0

    ]]>
  </send>
"""
ANSWERS = RINGING + PICKS_UP + HANGS_UP



def reply(status: str, *, cseq: str = "[last_CSeq:]", resent: bool = False) -> str:
    """The callee's bodiless ``status`` to the last request it got (``cseq`` names another),
    with its tag; ``resent`` every 500 ms until the next message comes."""
    return f"""  <send{' retrans="500"' if resent else ''}>
    <![CDATA[
      SIP/2.0 {status}
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      {cseq}
      Content-Length: 0

    ]]>
  </send>
"""


BUSY = reply("486 Busy Here", resent=True) + """  <recv request="ACK" crlf="true"/>
"""


# The callee rings, and answers just as the gateway's CANCEL (at the ring timeout) reaches it:
# it answers the CANCEL 200 (RFC 3261 9.2), and the INVITE 200 too, its answer already on the
# way, rather than 487. An answered phone must get its ACK and, since the dial was given up, a
# BYE. (SIPp goes on from a resent message only at a received one: the INVITE's 200 comes last.)
RINGS_TILL_CANCEL = RINGING + """  <recv request="CANCEL" timeout="30000"/>
"""
CROSSES = (RINGS_TILL_CANCEL + reply("200 OK")
           + PICKS_UP.replace("[last_CSeq:]", "CSeq: [last_cseq_number] INVITE")
           + HANGS_UP.replace('crlf="true"', 'timeout="10000" crlf="true"')
           .replace('timeout="150000"', 'timeout="10000"'))


# The same crossing, with a callee whose INVITE transaction ended at its 200: it answers the
# CANCEL 481 (RFC 3261 9.2, without RFC 6026), and sends its 200 again until an ACK comes. sipgo
# ends the dial on the 481 without reading the first 200; the resent ones, which no
# transaction takes any more, must still get their ACK, and the call a BYE.
CROSSES_481 = (RINGS_TILL_CANCEL
               + PICKS_UP.replace(' retrans="500"', "")
               .replace("[last_CSeq:]", "CSeq: [last_cseq_number] INVITE")
               + reply("481 Call/Transaction Does Not Exist")
               + """  <pause milliseconds="500"/>
"""
               + PICKS_UP.replace("[last_CSeq:]", "CSeq: [last_cseq_number] INVITE")
               + HANGS_UP.replace('crlf="true"', 'timeout="10000" crlf="true"')
               .replace('timeout="150000"', 'timeout="10000"'))


# A callee that answers with no SDP (an offer was made: the answer must carry one, RFC 3264):
# the gateway cannot take that call up, and the phone, off the hook, must still be ACKed and
# hung up.
NO_SDP = (RINGING + PICKS_UP[:PICKS_UP.index("      Content-Type:")] + """      Content-Length: 0

    ]]>
  </send>
""" + HANGS_UP.replace('crlf="true"', 'timeout="10000" crlf="true"')
          .replace('timeout="150000"', 'timeout="10000"'))


# A callee that rings, takes the CANCEL (200) and sends its 487 only 8 s later (RFC 3261 9.1
# warns that one may never come; sipgo waits up to 64*T1, 32 s, for it).
SLOW_487 = (RINGS_TILL_CANCEL + reply("200 OK") + """  <pause milliseconds="8000"/>
"""
            + reply("487 Request Terminated", cseq="CSeq: [last_cseq_number] INVITE",
                    resent=True)
            + """  <recv request="ACK" timeout="10000" crlf="true"/>
""")


def udp_bound(port: int) -> bool:
    """Something listens on UDP ``port`` (without binding it: that would race the owner)."""
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with open(table) as rows:
            next(rows)
            if any(int(row.split()[1].rsplit(":", 1)[1], 16) == port for row in rows):
                return True
    return False


async def callee(sipp: str, tmp_path: Path, answer: str, rtp_port: int = 9):
    """SIPp waiting for the gateway's call on a port of its own; returns it and its URI."""
    port = udp_port()
    xml = tmp_path / f"callee-{port}.xml"
    xml.write_text(CALLEE.format(answer=answer.format(rtp_port=rtp_port)))
    process = await asyncio.create_subprocess_exec(
        sipp, "-sf", str(xml), "-m", "1", "-i", "127.0.0.1", "-p", str(port), "-t", "u1",
        "-nostdin", "-timeout", "170s", "-trace_err",
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while not udp_bound(port):
        assert process.returncode is None and time.monotonic() < deadline, "SIPp did not start"
        await asyncio.sleep(0.05)
    return process, f"sip:callee@127.0.0.1:{port}"


@pytest.mark.asyncio(loop_scope="module")
async def test_voicebus_dial_calls_out_and_the_callee_hears_the_greeting(
        phone_stack, gateway, sipp, tmp_path) -> None:
    """`voicebus dial` as the operator; SIPp answers as the callee with an SDP whose media port
    is this test's. The session starts on the bus as an outbound call, the agent's greeting
    comes to the callee as PCMU RTP, and ctl.end hangs up."""
    rtp_port = udp_port()
    loop = asyncio.get_running_loop()
    transport, phone = await loop.create_datagram_endpoint(Phone,
                                                           local_addr=("127.0.0.1", rtp_port))
    nc = await phone_stack.connect()
    tap = Tap(nc)
    answered_before = await gateway.metric("voicebus_sip_calls_total", direction="outbound",
                                           outcome="answered")
    sipp_process, target = await callee(sipp, tmp_path, ANSWERS, rtp_port)
    greeting = "Hello, this is your voice agent calling."
    try:
        await tap.watch(sj.everything())
        env = {**os.environ, "VOICEBUS_NATS_NKEY_FILE": str(phone_stack.seed_file("operator"))}
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "voicebus", "dial", target, "--greeting", greeting,
            "--nats", phone_stack.nats_url, cwd=ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        printed, errors = await asyncio.wait_for(cli.communicate(), 120)
        assert cli.returncode == 0, errors.decode()
        reply = json.loads(printed)
        session = reply["session"]
        (start,) = tap.of(ev.PhoneSessionStart, session, topic=sj.CTL_START)
        assert (start.direction, start.caller, start.greeting) == ("outbound", target, greeting)
        (played,) = await tap.wait_for(
            lambda: tap.of(ev.Playback, session, turn=0, final=True), 60, "the greeting played")
        await tap.wait_for(lambda: len(phone.heard) * 20 >= played.played_ms - 20, 10,
                           "the greeting's last packets")
        end = ev.SessionEnd(session=session, seq=1, ts_ns=time.time_ns(), reason="done")
        from proto import codec
        await nc.publish(sj.CTL_END.subject(session), codec.encode(end))
        out, _ = await asyncio.wait_for(sipp_process.communicate(), 30)  # the gateway's BYE
        assert sipp_process.returncode == 0, out.decode(errors="replace")[-4000:]
        await gateway.line(rf'msg="call ended" session={session}', 10)
    finally:
        if sipp_process.returncode is None:
            sipp_process.kill()
            await sipp_process.communicate()
        await tap.close()
        await nc.close()
        transport.close()
    assert reply == {"session": session}
    assert await gateway.metric("voicebus_sip_calls_total", direction="outbound",
                                outcome="answered") == answered_before + 1
    assert len(phone.heard) > 25 and {len(p) for p in phone.heard} == {160}, phone.other_types
    said = await hear(b"".join(ulaw_decode(p).tobytes() for p in phone.heard))
    assert "hello" in said or "agent" in said, said


@pytest.mark.asyncio(loop_scope="module")
async def test_a_busy_callee_gives_a_clear_error_reply(phone_stack, gateway, sipp, tmp_path) -> None:
    """The dial request straight on the bus: a callee that answers 486 Busy Here makes the
    reply say so, with the status, and no session starts."""
    busy_before = await gateway.problems("dial_busy")
    reply, _, sessions = await dial_scripted_callee(phone_stack, sipp, tmp_path, BUSY, 20_000)
    assert reply == ev.DialReply(error="busy", status=486, reason="486 Busy Here")
    assert not sessions
    assert await gateway.problems("dial_busy") == busy_before + 1


@pytest.mark.asyncio(loop_scope="module")
async def test_a_callee_that_never_responds_is_given_up_on_at_the_ring_timeout(phone_stack,
                                                                             gateway) -> None:
    """A target that takes the INVITE and says nothing, not even 100 Trying (a dead phone, a
    wrong port): the reply says unreachable once the ring timeout is up. A CANCEL may only
    follow a response, so without one the INVITE would live out its Timer B (32 s) and the
    operator's ``--ring-timeout`` would mean nothing."""
    from proto import codec

    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    silent.setblocking(False)
    target = f"sip:nobody@127.0.0.1:{silent.getsockname()[1]}"
    before = await gateway.problems("dial_unreachable")
    nc = await phone_stack.connect()
    try:
        request = ev.DialRequest(target=target, greeting="Hi", answer_timeout_ms=2000)
        started = time.monotonic()
        msg = await nc.request(sj.SIP_DIAL, codec.encode(request), timeout=20)
        waited = time.monotonic() - started
        invite = silent.recv(65536)
    finally:
        await nc.close()
        silent.close()
    assert invite.startswith(b"INVITE " + target.encode()), invite[:200]
    reply = codec.decode_dial(msg.data)
    assert reply.error == "unreachable" and "no response" in reply.reason, reply
    assert waited >= 2.0  # it rang for the time asked
    assert await gateway.problems("dial_unreachable") == before + 1


async def dial_scripted_callee(phone_stack, sipp: str, tmp_path: Path, scenario: str,
                               answer_timeout_ms: int) -> tuple[ev.DialReply, float, list[Any]]:
    """A dial request on the bus to SIPp playing ``scenario`` as the callee, which must run to
    its end: the reply, the seconds it took, and the sessions started for that callee."""
    from proto import codec

    sipp_process, target = await callee(sipp, tmp_path, scenario)
    nc = await phone_stack.connect()
    tap = Tap(nc)
    try:
        await tap.watch(sj.everything())
        request = ev.DialRequest(target=target, greeting="Hi",
                                 answer_timeout_ms=answer_timeout_ms)
        started = time.monotonic()
        msg = await nc.request(sj.SIP_DIAL, codec.encode(request), timeout=60)
        waited = time.monotonic() - started
        out, _ = await asyncio.wait_for(sipp_process.communicate(), 40)
        assert sipp_process.returncode == 0, out.decode(errors="replace")[-4000:]
    finally:
        if sipp_process.returncode is None:
            sipp_process.kill()
            await sipp_process.communicate()
        await tap.close()
        await nc.close()
    started_for = [s for s in tap.of(ev.PhoneSessionStart) if s.caller == target]
    return codec.decode_dial(msg.data), waited, started_for


@pytest.mark.asyncio(loop_scope="module")
async def test_a_callee_that_answers_as_the_dial_is_cancelled_is_acked_and_hung_up(
        phone_stack, gateway, sipp, tmp_path) -> None:
    """The ring timeout's CANCEL crosses the callee's 200 OK: the dial is still given up (no
    answer, no session), and the phone, off the hook, gets its ACK and then a BYE rather than
    resending its 200 until its own timer ends the call."""
    before = await gateway.problems("dial_answered_as_cancelled")
    reply, _, sessions = await dial_scripted_callee(phone_stack, sipp, tmp_path, CROSSES, 1500)
    assert reply.error == "no_answer"
    assert not sessions
    await gateway.line(r"hung up a callee: it answered as its dial was given up", 10)
    assert await gateway.problems("dial_answered_as_cancelled") == before + 1


@pytest.mark.asyncio(loop_scope="module")
async def test_an_answer_resent_after_the_callee_refused_the_cancel_is_acked_and_hung_up(
        phone_stack, gateway, sipp, tmp_path) -> None:
    """The callee answers 200, then answers the CANCEL 481, then resends its 200: sipgo's dial
    ended on the 481, so no transaction takes the resent 200s. They are still ACKed and the
    call hung up (before, the phone resent its 200 until its own timer ended the call)."""
    before = await gateway.problems("dial_answered_as_cancelled")
    reply, _, sessions = await dial_scripted_callee(phone_stack, sipp, tmp_path, CROSSES_481,
                                                    1500)
    assert reply.error == "no_answer"
    assert not sessions
    await gateway.line(r"hung up a callee: it answered as its dial was given up.*"
                       r"its INVITE had ended", 10)
    assert await gateway.problems("dial_answered_as_cancelled") == before + 1


@pytest.mark.asyncio(loop_scope="module")
async def test_an_answer_the_gateway_cannot_take_is_acked_and_hung_up(
        phone_stack, gateway, sipp, tmp_path) -> None:
    """A 200 OK with no SDP: the dial fails with the reason, no session starts, and the callee
    gets its ACK and a BYE rather than resending its 200 until its own timer ends the call."""
    before = await gateway.problems("dial_answer_refused")
    reply, _, sessions = await dial_scripted_callee(phone_stack, sipp, tmp_path, NO_SDP, 20_000)
    assert reply.error == "failed" and "SDP" in reply.reason, reply
    assert not sessions
    await gateway.line(r"hung up a callee: its answer could not be taken up", 10)
    assert await gateway.problems("dial_answer_refused") == before + 1


@pytest.mark.asyncio(loop_scope="module")
async def test_a_dial_that_rang_out_is_answered_without_waiting_for_the_487(
        phone_stack, gateway, sipp, tmp_path) -> None:
    """The operator hears "no_answer" as the CANCEL goes at the ring timeout, not when the
    callee's 487 comes, 8 s later here (it might never come: sipgo would wait 32 s)."""
    reply, waited, _ = await dial_scripted_callee(phone_stack, sipp, tmp_path, SLOW_487, 1500)
    assert reply.error == "no_answer"
    assert 1.5 <= waited < 6, waited  # it rang for the time asked; 9.5 s waits for the 487


@pytest.mark.asyncio(loop_scope="module")
async def test_a_gateway_told_to_stop_mid_dial_still_answers_the_operator(tmp_path) -> None:
    """A dial to a target that never responds, and the gateway is stopped: the operator is told
    at once that it is stopping. Without a response the INVITE may not be cancelled: it lived on
    until the closing transport broke its next retransmission (0.5, 1, 2, 4, 8… s apart), and
    the reply, if it came before the gateway's 5 s wait for its calls ran out, spoke of a closed
    connection. The bus alone (no stages): the dial never reaches one, and no other gateway
    takes the request."""
    from proto import codec

    stack = Stack(tmp_path, sink=LogTail(tmp_path / "stack.log"))
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    silent.setblocking(False)
    target = f"sip:nobody@127.0.0.1:{silent.getsockname()[1]}"
    nc = gw = asked = None
    try:
        await stack.start_nats()
        gw = await start_gateway(stack)
        nc = await stack.connect()
        request = ev.DialRequest(target=target, greeting="Hi", answer_timeout_ms=60_000)
        asked = asyncio.create_task(nc.request(sj.SIP_DIAL, codec.encode(request), timeout=30))
        invite = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(silent, 65536), 20)
        assert invite.startswith(b"INVITE " + target.encode()), invite[:200]
        await stop_gateway(gw)  # exits with 0 (within 10 s)
        reply = codec.decode_dial((await asked).data)
    finally:
        if asked is not None and not asked.done():
            asked.cancel()
        if gw is not None and gw.process.returncode is None:  # the test failed before its stop
            gw.process.kill()
            await gw.process.wait()
        if nc is not None:
            await nc.close()
        silent.close()
        await stack.stop()
    assert reply.error == "failed" and "stopping" in reply.reason, reply


@pytest.mark.asyncio(loop_scope="module")
async def test_a_phone_that_goes_silent_without_a_bye_is_hung_up(phone_stack, sipp,
                                                                   tmp_path) -> None:
    """A phone that vanishes (no BYE, no packet: its network went) must not hold a session and
    a call slot for ever: after VOICEBUS_SIP_MEDIA_TIMEOUT_MS without a packet the gateway ends
    the session and sends BYE. This caller never sends RTP at all."""
    quiet = await start_gateway(phone_stack, VOICEBUS_SIP_MEDIA_TIMEOUT_MS="1500")
    offer = "m=audio 9 RTP/AVP 0\n      a=rtpmap:0 PCMU/8000\n      a=sendrecv"
    xml = invite_only(SCENARIO, offer, AGENT_HANGS_UP).format(
        caller=CALLER, rtp_port=9, ack=ACK.format(caller=CALLER))
    nc = await phone_stack.connect()
    tap = Tap(nc)
    call = None
    try:
        await tap.watch(sj.everything())
        call = await run_sipp(sipp, quiet, xml, tmp_path)
        answered = await quiet.line(r'msg="call answered" session=(\S+)', 30)
        session = answered.group(1)
        (end,) = await tap.wait_for(lambda: tap.of(ev.SessionEnd, session, topic=sj.CTL_END),
                                    30, "the gateway's end of the session")
        out, _ = await asyncio.wait_for(call.communicate(), 20)  # SIPp had its BYE
        assert end.reason == "no media from the phone for 1.5s"
        assert call.returncode == 0, out.decode(errors="replace")[-3000:]
        assert await quiet.problems("rtp_timeout") == 1
    finally:
        if call is not None and call.returncode is None:
            call.kill()
            await call.communicate()
        await tap.close()
        await nc.close()
        await stop_gateway(quiet)
