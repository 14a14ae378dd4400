"""Session leases in JetStream KV: which replica of a stage owns a session, and who takes the
session over when that replica dies without a word.

A lease is the key ``<stage>.<session>`` in the bucket ``voicebus_leases``; its value is the
owner's replica name. Every revision lives ``ttl`` whole seconds (NATS's per-message TTL, whole
seconds only) and the owner writes a new one, by revision, every ``ttl / 4``. A replica that
dies — SIGKILL, OOM, a frozen process, a lost machine — stops writing; its last revision
expires and nats-server writes a delete marker (header ``Nats-Marker-Reason: MaxAge``) into the
bucket. Every replica watches its stage's keys with an ordered consumer (the KV watcher hides
that header: an expiry would look like a purge) and, on a marker, tries to take the key over
the marker by revision: exactly one wins. A deliberate release (the session ended, or was
handed over) is a delete (``KV-Operation: DEL``), which nobody takes over.

The session's start event is kept beside the leases (``voicebus_sessions``, key
``<session>.start``) by whoever claims it, so the successor knows the room and the greeting.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.js import api
from nats.js.errors import APIError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from services.runtime.bus import Bus

log = logging.getLogger(__name__)

LEASE_BUCKET = "voicebus_leases"
STREAM = f"KV_{LEASE_BUCKET}"
PREFIX = f"$KV.{LEASE_BUCKET}."
# nats-server keeps a delete marker this long (its minimum): long enough for every watcher.
MARKER_TTL = 1
# JetStream's error codes for "wrong last sequence": a lost race for a key. A clustered
# stream answers 10164 while another write to the key that expects a sequence is in flight.
_WRONG_LAST_SEQUENCE = (10071, 10164)
# Reads and writes of a lease that changed in between (a marker written or expired meanwhile)
# before giving up; only another replica's lease, seen, refuses at once.
_ACQUIRE_TRIES = 4


def _is_free(headers: dict[str, str] | None) -> bool:
    """A key whose last revision is an expiry marker or a deletion: nobody holds it."""
    headers = headers or {}
    return "Nats-Marker-Reason" in headers or headers.get("KV-Operation") in ("DEL", "PURGE")


class LeaseContended(Exception):
    """The lease changed between each read and write of a claim: nobody was seen holding it,
    so the session is not given up; the claim is tried again later."""


class Leases:
    def __init__(self, bus: Bus, stage: str, replica: str, ttl: int) -> None:
        self.bus = bus
        self.stage = stage
        self.replica = replica.encode()
        self.ttl = max(1, int(ttl))
        self.kv: KeyValue | None = None

    async def open(self) -> None:
        try:
            self.kv = await self.bus.js.key_value(LEASE_BUCKET)
        except Exception:  # not there yet (BucketNotFoundError): the first replica makes it
            config = api.KeyValueConfig(bucket=LEASE_BUCKET, history=1,
                                        limit_marker_ttl=MARKER_TTL,
                                        replicas=self.bus.replicas)
            self.kv = await self.bus.js.create_key_value(config=config)

    def key(self, session: str, stage: str = "") -> str:
        return f"{stage or self.stage}.{session}"

    async def acquire(self, session: str) -> int:
        """Take the lease (new, released or expired); its revision. Raises
        ``KeyWrongLastSequenceError`` when another replica holds it or won the race (its name
        read in the key), ``LeaseContended`` when the key kept changing under us. Tried again
        while JetStream elects a leader (a cluster node died)."""
        return await self.bus.jetstream(lambda: self._acquire(session))

    async def _acquire(self, session: str) -> int:
        key = self.key(session)
        revision = 0  # first as a new key: one request for a new session
        for attempt in range(1, _ACQUIRE_TRIES + 1):
            try:
                return await self._write(key, revision)
            except KeyWrongLastSequenceError:
                if attempt == _ACQUIRE_TRIES:
                    break
            # There is a revision: free (a marker, a deletion) or someone's lease.
            try:
                last = await self.bus.js.get_msg(STREAM, subject=PREFIX + key)
            except NotFoundError:
                revision = 0  # gone since (an expiry marker lives MARKER_TTL): new again
                continue
            if _is_free(last.headers):
                revision = last.seq  # over the marker, unless it changes meanwhile
                continue
            if last.data == self.replica:
                return last.seq  # ours already: a try before timed out after it was written
            raise KeyWrongLastSequenceError(
                description=f"{key} is held by {(last.data or b'').decode()!r}")
        # Written and expired under us each time: nobody was seen holding it.
        raise LeaseContended(f"{key} changed between each read and write, {_ACQUIRE_TRIES} times")

    async def refresh(self, session: str, revision: int) -> int:
        """A new revision of our lease, only if ``revision`` is still the last one."""
        return await self._write(self.key(session), revision)

    async def _write(self, key: str, revision: int) -> int:
        try:
            ack = await self.bus.js.publish(
                PREFIX + key, self.replica, stream=STREAM, msg_ttl=self.ttl,
                headers={"Nats-Expected-Last-Subject-Sequence": str(revision)})
        except APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                raise KeyWrongLastSequenceError(description=str(exc)) from None
            raise
        return ack.seq

    async def release(self, session: str) -> None:
        """Delete our lease, and only ours, by revision: a release that lands late (held up
        past its caller's wait by a JetStream election) must not delete the lease another
        replica took meanwhile, which would let a third take the session too."""
        assert self.kv is not None
        key = self.key(session)
        for _ in range(_ACQUIRE_TRIES):
            try:
                last = await self.bus.js.get_msg(STREAM, subject=PREFIX + key)
            except NotFoundError:
                return  # expired, and its marker gone: nothing to release
            if _is_free(last.headers) or last.data != self.replica:
                return  # free already, or another replica's now
            try:
                await self.kv.delete(key, last=last.seq)
                return
            except APIError as exc:
                if exc.err_code not in _WRONG_LAST_SEQUENCE:
                    raise
                # Changed between the read and the delete (our own refresh landing): again.
        log.warning("lease %s kept changing while it was released: left to expire", key)

    async def holder(self, stage: str, session: str) -> str | None:
        """The replica of ``stage`` that holds the session, if any."""
        try:
            last = await self.bus.js.get_msg(STREAM, subject=PREFIX + self.key(session, stage))
        except (NotFoundError, NoRespondersError):
            return None
        return None if _is_free(last.headers) else (last.data or b"").decode()

    async def watch_expiries(self, on_expired: Callable[[str, str], Any]) -> Any:
        """Call ``on_expired(session, replica)`` whenever a lease of our stage expires (its
        owner stopped renewing it); ``replica`` is the last owner seen ("" if unknown)."""
        owners: dict[str, str] = {}
        stage_prefix = f"{PREFIX}{self.stage}."

        async def on_msg(msg: Msg) -> None:
            session = msg.subject[len(stage_prefix):]
            headers = msg.headers or {}
            if headers.get("Nats-Marker-Reason"):
                on_expired(session, owners.pop(session, ""))
            elif _is_free(headers):
                owners.pop(session, None)
            else:
                owners[session] = (msg.data or b"").decode()

        return await self.bus.js.subscribe(
            f"{stage_prefix}*", stream=STREAM, cb=on_msg, ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT)
