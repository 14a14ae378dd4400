"""livekit-server's webhooks: the session ends when no user is left in its room — or when
nobody used the token that dispatched it.

A token dispatches the agent at once (it is in the room before the user), so a token that is
never used would leave a session, its agent and its ingress running for good. Each token starts
a timer: if, ``VOICEBUS_TOKEN_JOIN_GRACE`` seconds later, no user is in the room and no newer
token was handed out for it, the session ends ("nobody joined").

A user leaving does not end the session at once either: a user who reloads the page or loses the network for a moment comes back within
seconds, and ending the session under them would leave them in a room without an agent. So the
end waits ``VOICEBUS_TOKEN_EMPTY_GRACE`` seconds, and is called off if by then a user is in the
room again or a token for the room was handed out since the last user left.

Webhooks are signed with our API key/secret (a JWT in ``Authorization`` carrying the body's
SHA-256); anything that fails verification is refused before a byte of it is interpreted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from fastapi import HTTPException
from google.protobuf.json_format import ParseError
from livekit import api
from livekit.protocol.models import ParticipantInfo
from livekit.protocol.webhook import WebhookEvent

from proto.subjects import BadSubject, check_session
from services.runtime.livekit import RESERVED_PREFIX
from services.runtime.logs import Throttle
from services.token import metrics
from services.token.config import TokenConfig

log = logging.getLogger("voicebus.token.webhook")

EndSession = Callable[[str, str], Awaitable[None]]


def _is_user(participant: ParticipantInfo) -> bool:
    """A person: standard kind, and not one of our own participants (agent, ingress)."""
    return (participant.kind == ParticipantInfo.Kind.STANDARD
            and not participant.identity.startswith(RESERVED_PREFIX))


class Webhooks:
    def __init__(self, config: TokenConfig, end_session: EndSession) -> None:
        self.config = config
        self.end_session = end_session
        self.minted: dict[str, float] = {}  # room -> monotonic time of its last token
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._joining: dict[str, asyncio.Task[None]] = {}  # room -> its newest token's timer
        self.receiver = api.WebhookReceiver(
            api.TokenVerifier(config.livekit_api_key, config.livekit_api_secret))
        self._lkapi: api.LiveKitAPI | None = None
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
            return self.receiver.receive(text, token)
        except ParseError:  # raised only after the signature and body hash were checked
            raise self._reject(400, "body", "webhook body is not a WebhookEvent") from None
        except Exception:  # jwt errors, "hash mismatch", "sha256 was not found"…
            raise self._reject(401, "signature", "webhook signature verification failed") from None

    async def handle(self, event: WebhookEvent) -> None:
        metrics.WEBHOOKS.labels(event.event or "unknown").inc()
        if event.event not in ("participant_left", "room_finished"):
            return
        room = event.room.name
        try:
            check_session(room)
        except BadSubject:
            log.info("ignoring %s of room %r: not a voicebus session id", event.event, room[:80])
            return
        if event.event == "room_finished":
            await self.end_session(room, "room finished")
        elif _is_user(event.participant) and not await self._users_left(room, event.participant):
            if room not in self._pending:
                self._pending[room] = asyncio.create_task(self._end_if_still_empty(room))

    def token_minted(self, room: str) -> None:
        self.minted[room] = time.monotonic()
        if (older := self._joining.pop(room, None)) is not None:
            older.cancel()  # the newest token decides
        self._joining[room] = asyncio.create_task(self._end_unless_joined(room))

    async def _end_unless_joined(self, room: str) -> None:
        try:
            await asyncio.sleep(self.config.token_join_grace)
            if await self._users_left(room, None):
                return  # joined (a user leaving later is the webhooks' business)
            log.info("nobody joined within %.0fs: ending the session",
                     self.config.token_join_grace, extra={"session": room})
            self.minted.pop(room, None)
            await self.end_session(room, "nobody joined")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # livekit-server unreachable: the room's own timeouts remain
            log.warning("could not check who joined: %s", type(exc).__name__,
                        extra={"session": room})
        finally:
            if self._joining.get(room) is asyncio.current_task():
                del self._joining[room]

    async def _end_if_still_empty(self, room: str) -> None:
        left_at = time.monotonic()
        try:
            await asyncio.sleep(self.config.token_empty_grace)  # the grace period itself
            if self.minted.get(room, 0.0) > left_at or await self._users_left(room, None):
                log.info("a user came back: the session goes on", extra={"session": room})
                return
            self.minted.pop(room, None)
            await self.end_session(room, "room empty")
        except Exception as exc:  # the next webhook (or room_finished) gets another chance
            log.warning("could not end session: %s", type(exc).__name__, extra={"session": room})
        finally:
            self._pending.pop(room, None)

    async def _users_left(self, room: str, leaving: ParticipantInfo | None) -> bool:
        """Whether a user other than ``leaving`` (by sid: the same identity may have rejoined)
        is still in ``room``. Raises HTTPException(502) if livekit-server cannot tell us."""
        try:
            listed = await self._api().room.list_participants(
                api.ListParticipantsRequest(room=room))
        except Exception as exc:
            log.warning("cannot list the participants of %s: %s", room, type(exc).__name__,
                        extra={"session": room})
            raise HTTPException(502, "could not ask livekit-server who is in the room") from None
        gone = leaving.sid if leaving is not None else ""
        return any(_is_user(p) and p.sid != gone
                   and p.state != ParticipantInfo.State.DISCONNECTED
                   for p in listed.participants)

    def _api(self) -> api.LiveKitAPI:
        # Made on first use: its aiohttp session must be created inside the running loop.
        if self._lkapi is None:
            self._lkapi = api.LiveKitAPI(self.config.livekit_http_url,
                                         self.config.livekit_api_key,
                                         self.config.livekit_api_secret)
        return self._lkapi

    async def aclose(self) -> None:
        for task in [*self._pending.values(), *self._joining.values()]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._lkapi is not None:
            await self._lkapi.aclose()

    def _reject(self, status: int, reason: str, detail: str) -> HTTPException:
        metrics.WEBHOOKS_REJECTED.labels(reason).inc()
        held = self._throttle.allow(reason)
        if held is not None:
            log.warning("refused a webhook: %s (+%d more since last report)", detail, held)
        return HTTPException(status, detail)
