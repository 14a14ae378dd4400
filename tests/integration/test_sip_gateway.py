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
import os
import random
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import soxr

from proto import events as ev
from proto import subjects as sj
from services.ingress.audio import Resampler, read_wav
from tests.conftest import running_stack
from tests.e2e.test_phone import hear
from voicebus.client import Tap
from voicebus.launcher import offline_ear
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

def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


def tool(script: str) -> str:
    done = subprocess.run([str(ROOT / script)], capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.fail(f"{script} failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


class Gateway:
    """The gateway process, its log lines collected as they come."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process, self.port, self.lines = process, port, []
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


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def phone_stack(tmp_path_factory: pytest.TempPathFactory):
    async for running in running_stack(tmp_path_factory, livekit=False, env=offline_ear()):
        yield running


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gateway(phone_stack):
    binary = tool("scripts/install-sip-gateway.sh")
    port = free_port()
    env = {**os.environ, **phone_stack.role_env("sip"),
           "VOICEBUS_SIP_LISTEN": f"127.0.0.1:{port}", "VOICEBUS_LOG_LEVEL": "info"}
    process = await asyncio.create_subprocess_exec(binary, env=env, stderr=asyncio.subprocess.PIPE)
    gw = Gateway(process, port)
    await gw.line(r"voicebus-sip ready", 20)
    yield gw
    process.terminate()
    try:
        code = await asyncio.wait_for(process.wait(), 10)
    except asyncio.TimeoutError:
        process.kill()
        code = await process.wait()
    await gw._reader
    assert code == 0, "\n".join(gw.lines)


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

    rtp_port, sipp_port, sipp_media = free_port(), free_port(), free_port()
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
        "-i", "127.0.0.1", "-p", str(free_port()), "-mp", str(free_port()), "-t", transport,
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
