"""livekit-server's webhooks: the session ends when livekit-server closes its room.

Who is in a room, and when an empty one ends, is decided by the agent in the room
(``services/egress/presence.py``): it sees users come and go, and its lease carries that duty
over a crash. So the token service holds no timers, and this handler no state.

Webhooks are signed with our API key/secret (a JWT in ``Authorization`` carrying the body's
SHA-256); anything that fails verification is refused before a byte of it is interpreted.
A signed event is still refused when it is older than ``MAX_AGE_S`` (a recording replayed
later), and acted on once per event id (a replay within that window gets 200 and nothing else,
as a delivery retried by livekit-server must). A ``room_finished`` is believed only once
livekit-server, asked, no longer lists the room — which also covers a replay that reaches
another replica of the token service.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from fastapi import HTTPException
from google.protobuf.json_format import ParseError
from livekit import api
from livekit.protocol.models import ParticipantInfo
from livekit.protocol.webhook import WebhookEvent

from proto.subjects import BadSubject, check_session
from services.runtime.logs import Throttle
from services.token import metrics
from services.token.config import TokenConfig

log = logging.getLogger("voicebus.token.webhook")

MAX_AGE_S = 300  # livekit-server sends at once and retries for well under this


class Webhooks:
    def __init__(self, config: TokenConfig) -> None:
        self.config = config
        self.receiver = api.WebhookReceiver(
            api.TokenVerifier(config.livekit_api_key, config.livekit_api_secret))
        self._lkapi: api.LiveKitAPI | None = None
        self._seen: OrderedDict[str, float] = OrderedDict()  # event id -> when first seen
        self._throttle = Throttle()  # anyone can post junk here: keep it to a line per interval

    def verify(self, body: bytes, authorization: str) -> WebhookEvent:
        """The verified event; 401 for anything not signed by our key, 400 if unparsable."""
        # livekit-server sends the bare JWT; tolerate a "Bearer " prefix from other senders.
        token = authorization.removeprefix("Bearer ").strip()
        if not token:
            raise self._reject(401, "signature", "missing Authorization header")
        try:
            text = body.decode()
        except UnicodeDecodeError:
            raise self._reject(400, "body", "webhook body is not UTF-8") from None
        try:
            event = self.receiver.receive(text, token)
        except ParseError:  # raised only after the signature and body hash were checked
            raise self._reject(400, "body", "webhook body is not a WebhookEvent") from None
        except Exception:  # jwt errors, "hash mismatch", "sha256 was not found"…
            raise self._reject(401, "signature", "webhook signature verification failed") from None
        if not event.id or abs(time.time() - event.created_at) > MAX_AGE_S:
            raise self._reject(400, "stale", "webhook without an id or older than "
                               f"{MAX_AGE_S} s")
        return event

    def first_time(self, event: WebhookEvent) -> bool:
        """Whether this event id is new (then it is remembered for ``MAX_AGE_S``)."""
        now = time.monotonic()
        while self._seen and next(iter(self._seen.values())) < now - MAX_AGE_S:
            self._seen.popitem(last=False)
        if event.id in self._seen:
            metrics.WEBHOOKS_REJECTED.labels("replay").inc()
            log.info("webhook %s seen before: not acted on again", event.id[:40])
            return False
        self._seen[event.id] = now
        return True

    async def finished_room(self, event: WebhookEvent) -> str | None:
        """The session whose room this event says livekit-server closed, if any."""
        metrics.WEBHOOKS.labels(event.event or "unknown").inc()
        if event.event != "room_finished":
            return None
        room = event.room.name
        try:
            check_session(room)
        except BadSubject:
            log.info("ignoring %s of room %r: not a voicebus session id", event.event, room[:80])
            return None
        if await self._room_exists(room):
            log.info("room_finished for a room livekit-server still lists: ignored",
                     extra={"session": room})
            return None
        return room

    def phone_call(self, event: WebhookEvent) -> tuple[str, str] | None:
        """(room, caller) when this event is a caller joining through LiveKit SIP, the
        service that answers phone trunks into rooms (``voicebus sip setup``, docs/telephony.md).
        """
        if event.event != "participant_joined" or \
                event.participant.kind != ParticipantInfo.Kind.SIP:
            return None
        room = event.room.name
        try:
            check_session(room)
        except BadSubject:
            log.info("ignoring a phone call into room %r: not a voicebus session id", room[:80])
            return None
        caller = event.participant.attributes.get("sip.phoneNumber", "")
        return room, caller[:64]

    async def _room_exists(self, room: str) -> bool:
        """Raises HTTPException(502) if livekit-server cannot tell (it retries the webhook)."""
        try:
            listed = await self._api().room.list_rooms(api.ListRoomsRequest(names=[room]))
        except Exception as exc:
            log.warning("cannot ask livekit-server about room %s: %s", room, type(exc).__name__,
                        extra={"session": room})
            raise HTTPException(502, "could not ask livekit-server about the room") from None
        return any(r.name == room for r in listed.rooms)

    def _api(self) -> api.LiveKitAPI:
        # Made on first use: its aiohttp session must be created inside the running loop.
        if self._lkapi is None:
            self._lkapi = api.LiveKitAPI(self.config.livekit_http_url,
                                         self.config.livekit_api_key,
                                         self.config.livekit_api_secret)
        return self._lkapi

    async def aclose(self) -> None:
        if self._lkapi is not None:
            await self._lkapi.aclose()

    def _reject(self, status: int, reason: str, detail: str) -> HTTPException:
        metrics.WEBHOOKS_REJECTED.labels(reason).inc()
        held = self._throttle.allow(reason)
        if held is not None:
            log.warning("refused a webhook: %s (+%d more since last report)", detail, held)
        return HTTPException(status, detail)
