"""Shared test vectors: events as the contract encodes them, for implementations of a stage in
another language (the SIP gateway: docs/telephony.md). Each vector is a subject, the event's
fields as JSON, and its msgpack bytes (hex). Another implementation must decode the bytes to
those fields and encode the fields back to the same bytes; ``proto/`` stays the one source.

    python -m proto.vectors          # write proto/vectors/gateway.json
    python -m proto.vectors --check  # exit 1 if the file is not what proto/ makes now
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import msgspec

from proto import codec
from proto import events as ev
from proto import subjects as sj

FILE = Path(__file__).with_name("vectors") / "gateway.json"

# What the SIP gateway publishes and consumes, with edge values: an empty and a full caller,
# silence and a loud frame, the largest pts of a long call, an outbound call, the agent's phone
# actions (keys; a transfer) and the gateway's answers (done; refused); and the dial request it
# answers.
_PCM = bytes(range(256)) + bytes(64)  # 320 bytes: 20 ms at 8 kHz, every byte value once


def vectors() -> list[dict[str, object]]:
    cases: list[tuple[sj.Topic, ev.Event]] = [
        (sj.CTL_START, ev.PhoneSessionStart(session="call-0001", seq=1, ts_ns=1_796_000_000_000,
                                            caller="+15550100", greeting="Hello!")),
        (sj.CTL_START, ev.PhoneSessionStart(session="call-0002", seq=1, ts_ns=1, caller="",
                                            sample_rate=16000)),
        (sj.SIP_AUDIO, ev.AudioFrame(session="call-0001", seq=2, ts_ns=1_796_000_000_020,
                                     pcm=_PCM, sample_rate=8000, pts_ms=0)),
        (sj.EGRESS_AUDIO, ev.AudioFrame(session="call-0001", seq=77, ts_ns=1_796_000_003_000,
                                        pcm=bytes(320), sample_rate=8000,
                                        pts_ms=10_799_980)),
        (sj.SIP_DTMF, ev.Dtmf(session="call-0001", seq=3, ts_ns=1_796_000_001_000, digit="#")),
        (sj.CTL_END, ev.SessionEnd(session="call-0001", seq=500, ts_ns=1_796_000_060_000,
                                   reason="caller hung up")),
        (sj.FLOOR_END, ev.SessionEnd(session="call-0001", seq=9, ts_ns=1_796_000_059_000,
                                     reason="user idle")),
        (sj.CTL_START, ev.PhoneSessionStart(session="call-0003", seq=1, ts_ns=1_796_000_100_000,
                                            caller="sip:bob@192.0.2.7:5070", greeting="Hi, Bob.",
                                            agent="reminders",
                                            instructions="Remind Bob of his 3 pm appointment.",
                                            direction="outbound")),
        (sj.LLM_PHONE, ev.PhoneAction(session="call-0001", seq=12, ts_ns=1_796_000_030_000,
                                      turn=3, call_id="call_kd81HsQ2", action="dtmf",
                                      digits="12#*AD0")),
        (sj.LLM_PHONE, ev.PhoneAction(session="call-0001", seq=13, ts_ns=1_796_000_031_000,
                                      turn=0, call_id="c" * 128, action="transfer",
                                      target="sip:desk@pbx.example.com;transport=tcp")),
    ]
    out = []
    for topic, event in cases:
        data = codec.encode(event)
        assert codec.decode_on(topic.subject(event.session), data) == event
        out.append({"subject": topic.subject(event.session),
                    "event": json.loads(msgspec.json.encode(event)),
                    "msgpack_hex": data.hex()})
    return out + phone_answers() + dial_vectors()


def phone_answers() -> list[dict[str, object]]:
    """The gateway's answers to phone actions: the NATS reply to a request on ``LLM_PHONE``
    (named as the vector's subject: the reply itself goes to the requester's inbox)."""
    cases = [
        ev.PhoneActionDone(session="call-0001", seq=40, ts_ns=1_796_000_030_700,
                           call_id="call_kd81HsQ2"),
        ev.PhoneActionDone(session="call-0001", seq=41, ts_ns=1_796_000_033_000,
                           call_id="c" * 128, error="the transfer was refused: 403 Forbidden"),
    ]
    out = []
    for done in cases:
        data = codec.encode(done)
        assert codec.decode(data) == done
        out.append({"subject": sj.LLM_PHONE.subject(done.session),
                    "event": json.loads(msgspec.json.encode(done)),
                    "msgpack_hex": data.hex()})
    return out


def dial_vectors() -> list[dict[str, object]]:
    """The dial request and its replies (on ``SIP_DIAL``, outside ``voice.>``): everything set,
    only the target, a session, and a refusal."""
    cases: list[ev.DialRequest | ev.DialReply] = [
        ev.DialRequest(target="+15550123", caller_id="+15550100", greeting="Hello, it's the agent.",
                       agent="reminders", instructions="Remind Bob of his 3 pm appointment.",
                       answer_timeout_ms=45_000),
        ev.DialRequest(target="sip:bob@192.0.2.7:5070;transport=tcp"),
        ev.DialReply(session="call-0003"),
        ev.DialReply(error="busy", status=486, reason="486 Busy Here"),
    ]
    out = []
    for message in cases:
        data = codec.encode(message)
        assert codec.decode_dial(data) == message
        out.append({"subject": sj.SIP_DIAL, "event": json.loads(msgspec.json.encode(message)),
                    "msgpack_hex": data.hex()})
    return out


def render() -> str:
    return json.dumps({"contract": __import__("proto").CONTRACT_VERSION,
                       "note": "made by python -m proto.vectors; pcm is base64 in 'event'",
                       "vectors": vectors()}, indent=1) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not FILE.exists() or FILE.read_text() != text:
            print(f"{FILE} is not what proto/ makes now: run python -m proto.vectors",
                  file=sys.stderr)
            return 1
        return 0
    FILE.write_text(text)
    print(FILE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
