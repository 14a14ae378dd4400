"""One encoder and one decoder for the whole bus (msgspec's own advice: build them once)."""

from __future__ import annotations

import msgspec

from proto import events as ev
from proto.subjects import BadSubject, parse

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ev.AnyEvent)
# Dial requests and their replies travel outside ``voice.>`` (subjects.SIP_DIAL).
_dial_decoder = msgspec.msgpack.Decoder(ev.DialRequest | ev.DialReply)


class Rejected(ValueError):
    """A message that must be dropped. ``reason`` is a short label for counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def encode(event: ev.Event | ev.DialRequest | ev.DialReply) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes) -> ev.AnyEvent:
    """Decode any bus event; raises ``Rejected('decode', …)`` on malformed or invalid data."""
    try:
        return _decoder.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError is a subclass
        raise Rejected("decode", str(exc)) from None


def decode_on(subject: str, data: bytes) -> ev.AnyEvent:
    """Decode ``data`` received on ``subject`` and check it belongs there.

    Rejects: bad subjects, undecodable payloads, an event type the subject does not carry, and
    an event whose session differs from the subject's.
    """
    try:
        session, topic = parse(subject)
    except BadSubject as exc:
        raise Rejected("subject", str(exc)) from None
    event = decode(data)
    if not isinstance(event, topic.events):
        raise Rejected("wrong_kind", f"{type(event).__name__} on {topic.producer}.{topic.kind}")
    if event.session != session:
        raise Rejected("session_mismatch", f"event for {event.session!r} on {subject!r}")
    return event


def decode_dial(data: bytes) -> ev.DialRequest | ev.DialReply:
    """Decode a dial request or reply; raises ``Rejected('decode', …)`` on anything else."""
    try:
        return _dial_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise Rejected("decode", str(exc)) from None
