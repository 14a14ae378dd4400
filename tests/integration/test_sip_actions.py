"""The agent acts on its phone call through voicebus's own SIP gateway (docs/telephony.md, "The
agent's keys and transfers"): a ``PhoneAction`` request on ``voice.<session>.llm.phone``, as the
LLM stage's built-in tools ``send_dtmf`` and ``transfer`` send it, answered by the gateway
holding the call with a ``PhoneActionDone``.

Every process is real, as in test_sip_gateway.py (whose helpers this reuses): nats-server, the
five stages (the offline ear; the LLM stage also has an agent on the local OpenAI fake), the
gateway built from services/sip, and SIPp as the other party. The test plays the phone's media
(its RTP socket is the one the SDP names) and, where no LLM is involved, the LLM stage itself
(the role ``llm``, a NATS request):
- keys: 1, 2, # reach the phone as RFC 4733 events, in order, with the payload type its SDP
  offered, each ended;
- a transfer the phone accepts (REFER 202, NOTIFY 200): the answer says done, the gateway hangs
  up with BYE and the session ends "transferred" on the bus; a number is referred through the
  dial trunk;
- a transfer the phone refuses (REFER 403), or whose target fails (NOTIFY 486): the answer names
  the status, the call goes on;
- malformed actions are counted and answered, and the gateway carries on;
- end to end: the gateway calls out for an agent whose tools include ``send_dtmf``; the callee
  presses keys, the model (the fake) answers with ``send_dtmf("5")``, and the callee's socket
  receives the key 5."""

from __future__ import annotations

import asyncio
import random
import re
import struct
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import pytest_asyncio

from proto import codec
from proto import events as ev
from proto import subjects as sj
from tests.conftest import running_stack
from tests.fakes.openai_server import start_fake_openai
from tests.integration.test_sip_gateway import (ACK, ANSWERS, CALLER, SCENARIO, Gateway, callee,
                                                info_request, send_rtp, start_gateway,
                                                stop_gateway, tool)
from voicebus.client import Tap
from voicebus.launcher import offline_ear, udp_port

pytestmark = pytest.mark.e2e

KEYS = "0123456789*#ABCD"
AGENTS = """
[agents.presser]
instructions = "You work phone menus for the user."
tools = ["send_dtmf"]

[agents.presser.llm]
llm_provider = "openai"
"""
# Where the gateway sends numbers (VOICEBUS_SIP_DIAL_TRUNK): a transfer to a number is referred
# there. Nothing listens: the phone that is referred does the calling, and SIPp only checks it.
TRUNK_PORT = udp_port()
TRANSFER_NUMBER = "+15550199"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def fake_llm():
    fake = await start_fake_openai(api_key="test-key")
    yield fake
    await fake.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, fake_llm):
    agents = tmp_path_factory.mktemp("agents") / "agents.toml"
    agents.write_text(AGENTS)
    env = {**offline_ear(), "VOICEBUS_AGENTS": str(agents), "OPENAI_API_KEY": "test-key",
           "OPENAI_BASE_URL": fake_llm.base_url}
    async for running in running_stack(tmp_path_factory, livekit=False, env=env):
        yield running


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def gateway(stack):
    gw = await start_gateway(stack, VOICEBUS_SIP_DIAL_TRUNK=f"sip:127.0.0.1:{TRUNK_PORT}",
                             VOICEBUS_SIP_TRANSFER_TO=f"{TRANSFER_NUMBER},sip:desk@192.0.2.80:5060")
    yield gw
    await stop_gateway(gw)


@pytest.fixture(scope="module")
def sipp() -> str:
    return tool("scripts/install-sipp.sh")


# ---- the phone's media ------------------------------------------------------------------------

class Rtp(NamedTuple):
    pt: int
    marker: bool
    seq: int
    ts: int
    payload: bytes


class Media(asyncio.DatagramProtocol):
    """The phone's RTP socket: every packet the gateway sends it."""

    def __init__(self) -> None:
        self.packets: list[Rtp] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[override]
        if len(data) < 12 or data[0] >> 6 != 2:
            return
        offset = 12 + 4 * (data[0] & 0x0F)
        if data[0] & 0x10:
            offset += 4 + 4 * struct.unpack("!H", data[offset + 2:offset + 4])[0]
        seq, ts = struct.unpack("!HI", data[2:8])
        self.packets.append(Rtp(data[1] & 0x7F, bool(data[1] & 0x80), seq, ts, data[offset:]))

    def keys(self, pt: int) -> list[tuple[str, list[Rtp]]]:
        """The RFC 4733 events of payload type ``pt``: each key with its packets (an event is
        the packets of one timestamp), in the order they came."""
        events: dict[int, list[Rtp]] = {}
        for packet in self.packets:
            if packet.pt == pt and len(packet.payload) >= 4:
                events.setdefault(packet.ts, []).append(packet)
        return [(KEYS[packets[0].payload[0]], packets) for packets in events.values()]

    def ended_keys(self, pt: int) -> str:
        """The keys whose end (the E bit) has come."""
        return "".join(key for key, packets in self.keys(pt)
                       if any(p.payload[1] & 0x80 for p in packets))


def assert_rfc4733(media: Media, pt: int, keys: str) -> None:
    """``keys`` came as RFC 4733 events of payload type ``pt`` and nothing else did: one event
    per key, in order, the first packet marked, the durations growing, the end bit set."""
    pressed = media.keys(pt)
    assert "".join(key for key, _ in pressed) == keys, pressed
    for key, packets in pressed:
        assert packets[0].marker and not any(p.marker for p in packets[1:]), (key, packets)
        assert {p.payload[0] for p in packets} == {KEYS.index(key)}
        assert packets[-1].payload[1] & 0x80, (key, packets)  # E: the key's end
        durations = [struct.unpack("!H", p.payload[2:4])[0] for p in packets]
        assert durations == sorted(durations) and durations[0] > 0, durations
    stamps = [packets[0].ts for _, packets in pressed]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps), stamps
    assert {p.pt for p in media.packets} <= {0, pt}, {p.pt for p in media.packets}


# ---- SIPp as the caller -----------------------------------------------------------------------

# The caller offers telephone-event as payload type 96 (not the usual 101): the keys must come
# with the type the phone chose.
KEYS_PT = 96
OFFER_96 = SCENARIO.replace("RTP/AVP 0 101", f"RTP/AVP 0 {KEYS_PT}").replace(
    "rtpmap:101 ", f"rtpmap:{KEYS_PT} ").replace("fmtp:101 ", f"fmtp:{KEYS_PT} ")
assert OFFER_96.count(str(KEYS_PT)) == 3 and "101" not in OFFER_96
# Up to and including the caller's ACK: the call is up.
ANSWERED = OFFER_96.split("{ack}")[0] + "{ack}"

REFER_ANSWER = """  <recv request="REFER" timeout="60000">
    <action>
      <ereg regexp="{refer_to}" search_in="hdr" header="Refer-To:" check_it="true" assign_to="to"/>
    </action>
  </recv>
  <Reference variables="to"/>
  <send>
    <![CDATA[
      SIP/2.0 {status}
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:{{caller}}@[local_ip]:[local_port]>
      Content-Length: 0

    ]]>
  </send>
"""

# The outcome of the transfer, as the referred phone reports it (RFC 3515: a sipfrag).
NOTIFY = """  <send retrans="500">
    <![CDATA[
      NOTIFY [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "Caller" <sip:{{caller}}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:agent@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 2 NOTIFY
      Contact: <sip:{{caller}}@[local_ip]:[local_port]>
      Max-Forwards: 70
      Event: refer
      Subscription-State: terminated;reason=noresource
      Content-Type: message/sipfrag;version=2.0
      Content-Length: [len]

      SIP/2.0 {frag}
    ]]>
  </send>
  <recv response="200"/>
"""

GATEWAY_HANGS_UP = """  <recv request="BYE" timeout="60000"/>
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
</scenario>
"""

# The test says when the caller hangs up (an INFO): a BYE from the gateway before that fails
# the scenario.
CALLER_HANGS_UP = """  <recv request="INFO" timeout="150000"/>
  <send retrans="500">
    <![CDATA[
      BYE [next_url] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "Caller" <sip:{{caller}}@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:agent@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: {cseq} BYE
      Contact: <sip:{{caller}}@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200" crlf="true"/>
</scenario>
"""


def refer_to(target: str) -> str:
    """A regular expression for the Refer-To SIPp must see (XML-escaped)."""
    return re.escape(target).replace("<", "&lt;").replace(">", "&gt;")


class Call:
    """A call SIPp places to the gateway with ``scenario``; the test is the phone's media."""

    def __init__(self, stack, gateway: Gateway, sipp: str, tmp_path: Path, scenario: str,
                 caller: str = CALLER) -> None:
        self.stack, self.gateway, self.sipp, self.tmp_path = stack, gateway, sipp, tmp_path
        self.scenario, self.caller = scenario, caller
        self.rtp_port, self.sipp_port, self.sipp_media = udp_port(), udp_port(), udp_port()

    async def __aenter__(self) -> Call:
        loop = asyncio.get_running_loop()
        self.transport, self.media = await loop.create_datagram_endpoint(
            Media, local_addr=("127.0.0.1", self.rtp_port))
        xml = self.tmp_path / f"call-{self.sipp_port}.xml"
        xml.write_text(self.scenario.format(caller=self.caller, rtp_port=self.rtp_port,
                                            ack=ACK.format(caller=self.caller)))
        self.nc = await self.stack.connect()
        self.llm = await self.stack.connect(role="llm")
        self.tap = Tap(self.nc)
        await self.tap.watch(sj.everything())
        since = len(self.gateway.lines)
        self.sipp_process = await asyncio.create_subprocess_exec(
            self.sipp, f"127.0.0.1:{self.gateway.port}", "-sf", str(xml), "-m", "1", "-l", "1",
            "-i", "127.0.0.1", "-p", str(self.sipp_port), "-mp", str(self.sipp_media),
            "-t", "u1", "-nostdin", "-timeout", "170s", "-trace_err",
            cwd=self.tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        answered = await self.gateway.line(
            rf"call answered.*session=(\S+).*caller={re.escape(self.caller)}.*call_id=(\S+)", 30,
            since)
        self.session, self.call_id = answered.groups()
        await self.tap.wait_for(lambda: len(self.tap.of(ev.StageReady, self.session)) == 5, 60,
                                "every stage")
        return self

    async def act(self, timeout: float = 40, **fields) -> ev.PhoneActionDone:
        """A PhoneAction as the LLM stage sends it (services/llm/tools.py ToolBox.phone)."""
        action = ev.PhoneAction(session=self.session, seq=random.randrange(1, 1 << 30),
                                ts_ns=time.time_ns(), turn=1, **fields)
        msg = await self.llm.request(sj.LLM_PHONE.subject(self.session), codec.encode(action),
                                     timeout=timeout)
        done = codec.decode(msg.data)
        assert isinstance(done, ev.PhoneActionDone), done
        assert done.session == self.session and done.call_id == action.call_id, done
        return done

    async def ends(self, timeout: float = 30) -> str:
        """SIPp's scenario ran to its end; its output."""
        out, _ = await asyncio.wait_for(self.sipp_process.communicate(), timeout)
        text = out.decode(errors="replace")
        assert self.sipp_process.returncode == 0, text[-4000:]
        return text

    async def hang_up(self) -> None:
        """The caller hangs up (its scenario waits for the test's INFO): the session ends."""
        self.transport.sendto(info_request(self.sipp_port, self.call_id),
                              ("127.0.0.1", self.sipp_port))
        await self.ends()
        await self.tap.wait_for(lambda: self.tap.of(ev.SessionEnd, self.session,
                                                    topic=sj.CTL_END), 10, "the hang-up")

    async def __aexit__(self, *exc_info) -> None:
        if self.sipp_process.returncode is None:
            self.sipp_process.kill()
            await self.sipp_process.communicate()
        await self.tap.close()
        await self.nc.close()
        await self.llm.close()
        self.transport.close()


async def actions(gateway: Gateway, action: str, outcome: str) -> float:
    return await gateway.metric("voicebus_sip_phone_actions_total", action=action,
                                outcome=outcome)


# ---- the tests ----------------------------------------------------------------------------------

@pytest.mark.asyncio(loop_scope="module")
async def test_the_agents_keys_reach_the_phone_as_rfc4733_events(
        stack, gateway, sipp, tmp_path) -> None:
    sent_before = await actions(gateway, "dtmf", "sent")
    async with Call(stack, gateway, sipp, tmp_path, OFFER_96, caller="+15550110") as call:
        done = await call.act(call_id="call_keys", action="dtmf", digits="12#")
        assert done.error == ""
        # The answer comes once the last packet is sent: all are in flight to the socket.
        await call.tap.wait_for(lambda: call.media.ended_keys(KEYS_PT) == "12#", 10, "the keys")
        assert_rfc4733(call.media, KEYS_PT, "12#")
        assert not call.tap.of(ev.SessionEnd, call.session)
        await call.hang_up()
        (end,) = call.tap.of(ev.SessionEnd, call.session, topic=sj.CTL_END)
    assert end.reason == "caller hung up"
    assert await actions(gateway, "dtmf", "sent") == sent_before + 1


@pytest.mark.asyncio(loop_scope="module")
async def test_a_transfer_the_phone_takes_hangs_up_and_ends_the_session_as_transferred(
        stack, gateway, sipp, tmp_path) -> None:
    """SIPp answers the REFER 202 (checking its Refer-To: the number through the dial trunk),
    reports the target's 200 in a NOTIFY, and then must get the gateway's BYE."""
    target = f"<sip:{TRANSFER_NUMBER}@127.0.0.1:{TRUNK_PORT}>"
    scenario = (ANSWERED + REFER_ANSWER.format(refer_to=refer_to(target), status="202 Accepted")
                + NOTIFY.format(frag="200 OK") + GATEWAY_HANGS_UP)
    before = await actions(gateway, "transfer", "transferred")
    async with Call(stack, gateway, sipp, tmp_path, scenario, caller="+15550111") as call:
        done = await call.act(call_id="call_transfer", action="transfer", target=TRANSFER_NUMBER)
        assert done.error == ""
        await call.ends()  # REFER, 202, NOTIFY, 200, and the gateway's BYE answered
        (end,) = await call.tap.wait_for(lambda: call.tap.of(ev.SessionEnd, call.session,
                                                             topic=sj.CTL_END), 10, "the end")
        await gateway.line(rf'msg="call ended" session={call.session}', 10)
    assert end.reason == "transferred"
    assert await actions(gateway, "transfer", "transferred") == before + 1


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("refusal, status", [
    (REFER_ANSWER.format(refer_to=refer_to("<sip:desk@192.0.2.80:5060>"), status="403 Forbidden"),
     "403 Forbidden"),
    (REFER_ANSWER.format(refer_to=refer_to("<sip:desk@192.0.2.80:5060>"), status="202 Accepted")
     + NOTIFY.format(frag="486 Busy Here"), "answered 486"),
], ids=["refer-403", "notify-486"])
async def test_a_refused_transfer_is_an_error_naming_the_status_and_the_call_goes_on(
        stack, gateway, sipp, tmp_path, refusal: str, status: str) -> None:
    cseq = 3 if "NOTIFY" in refusal else 2
    scenario = ANSWERED + refusal + CALLER_HANGS_UP.format(cseq=cseq)
    async with Call(stack, gateway, sipp, tmp_path, scenario, caller="+15550112") as call:
        done = await call.act(call_id="call_refused", action="transfer",
                              target="sip:desk@192.0.2.80:5060")
        assert status in done.error and "transfer" in done.error, done.error
        # The call goes on: the keys still work, nothing ended it, and the caller hangs up.
        assert (await call.act(call_id="call_after", action="dtmf", digits="7")).error == ""
        await call.tap.wait_for(lambda: call.media.ended_keys(KEYS_PT) == "7", 10, "the key")
        assert not call.tap.of(ev.SessionEnd, call.session)
        await call.hang_up()  # SIPp fails the scenario had the gateway sent BYE before
        (end,) = call.tap.of(ev.SessionEnd, call.session, topic=sj.CTL_END)
    assert end.reason == "caller hung up"


@pytest.mark.asyncio(loop_scope="module")
async def test_malformed_phone_actions_are_counted_and_answered_and_the_gateway_goes_on(
        stack, gateway, sipp, tmp_path) -> None:
    bad_before = await gateway.problems("bad_phone_action")
    async with Call(stack, gateway, sipp, tmp_path, OFFER_96, caller="+15550113") as call:
        subject = sj.LLM_PHONE.subject(call.session)
        junk = await call.llm.request(subject, b"\xc1\x00 not msgpack", timeout=20)
        answer = codec.decode(junk.data)
        assert isinstance(answer, ev.PhoneActionDone) and answer.call_id == ""
        assert answer.error.startswith("not a phone action"), answer.error
        await call.llm.publish(subject, b"\x93\x01\x02")  # no reply subject: only counted
        stranger = ev.PhoneAction(session="call-someone-else", seq=1, ts_ns=time.time_ns(),
                                  turn=1, call_id="x", action="dtmf", digits="1")
        other = codec.decode((await call.llm.request(subject, codec.encode(stranger),
                                                     timeout=20)).data)
        assert other.error == "a phone action for another session", other
        # Still there, and still this call's: a good action after them works.
        assert (await call.act(call_id="call_good", action="dtmf", digits="9")).error == ""
        await call.tap.wait_for(lambda: call.media.ended_keys(KEYS_PT) == "9", 10, "the key")
        await call.hang_up()
    assert await gateway.problems("bad_phone_action") == bad_before + 3
    assert gateway.process.returncode is None


@pytest.mark.asyncio(loop_scope="module")
async def test_the_model_presses_a_key_on_a_call_it_placed(
        stack, gateway, fake_llm, sipp, tmp_path) -> None:
    """End to end through the LLM stage: the gateway calls out (a DialRequest with the agent
    "presser", whose tools include send_dtmf), SIPp answers as the callee, and the callee
    presses 4, # (a keypad turn). The model (the fake) answers with send_dtmf("5"): the stage
    sends the PhoneAction, the gateway the key, and the callee's socket receives a 5."""
    loop = asyncio.get_running_loop()
    transport, media = await loop.create_datagram_endpoint(Media, local_addr=("127.0.0.1", 0))
    sipp_process, target = await callee(sipp, tmp_path, ANSWERS,
                                        transport.get_extra_info("sockname")[1])
    nc = await stack.connect()
    tap = Tap(nc)
    stop = asyncio.Event()
    sender: asyncio.Task | None = None
    fake_llm.tool_calls = [{"name": "send_dtmf", "arguments": '{"digits": "5"}'}]
    try:
        await tap.watch(sj.everything())
        since = len(gateway.lines)
        request = ev.DialRequest(target=target, agent="presser", answer_timeout_ms=20_000)
        reply = codec.decode_dial((await nc.request(sj.SIP_DIAL, codec.encode(request),
                                                    timeout=60)).data)
        assert isinstance(reply, ev.DialReply) and reply.session, reply
        session = reply.session
        host, port = (await gateway.line(rf"call answered.*local=(\S+):(\d+).*direction=outbound",
                                         10, since)).groups()
        await tap.wait_for(lambda: len(tap.of(ev.StageReady, session)) == 5, 60, "every stage")
        keys: asyncio.Queue[str] = asyncio.Queue()
        sender = asyncio.create_task(send_rtp(media, (host, int(port)), bytes(3200), stop, keys))
        for key in "4#":
            keys.put_nowait(key)
        (use,) = await tap.wait_for(lambda: tap.of(ev.ToolUse, session, done=True), 60,
                                    "the model's send_dtmf")
        await tap.wait_for(lambda: media.ended_keys(101) == "5", 10, "the key 5")
        keypad = [t.text for t in tap.of(ev.Transcript, session, final=True)
                  if t.text.startswith("(keypad")]
        end = ev.SessionEnd(session=session, seq=1, ts_ns=time.time_ns(), reason="done")
        await nc.publish(sj.CTL_END.subject(session), codec.encode(end))
        out, _ = await asyncio.wait_for(sipp_process.communicate(), 30)  # the gateway's BYE
        assert sipp_process.returncode == 0, out.decode(errors="replace")[-4000:]
    finally:
        fake_llm.tool_calls = []
        stop.set()
        if sender is not None:
            await asyncio.gather(sender, return_exceptions=True)
        if sipp_process.returncode is None:
            sipp_process.kill()
            await sipp_process.communicate()
        await tap.close()
        await nc.close()
        transport.close()
    (start,) = tap.of(ev.PhoneSessionStart, session, topic=sj.CTL_START)
    assert (start.direction, start.agent) == ("outbound", "presser")
    assert keypad == ["(keypad: 4#)"], keypad
    assert (use.name, use.result, use.error) == ("send_dtmf", '"done"', ""), use
    (asked,) = [u for u in tap.of(ev.ToolUse, session, done=False) if u.call_id == use.call_id]
    assert asked.arguments == '{"digits": "5"}', asked
    (action,) = [a for a in tap.of(ev.PhoneAction, session) if a.call_id == use.call_id]
    assert action.digits == "5" and action.action == "dtmf"
    offered = {t["function"]["name"] for r in fake_llm.requests for t in r.get("tools") or ()}
    assert offered == {"send_dtmf"}, offered
    assert_rfc4733(media, 101, "5")
