"""What the LiveKit edges share: settings, names LiveKit's front-ends know, tokens, joining.

The ingress, egress and token services read ``LIVEKIT_URL``, ``LIVEKIT_API_KEY`` and
``LIVEKIT_API_SECRET`` (LiveKit's own names). The defaults match the development server that
``make up`` starts; anything reachable from outside this machine must set its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar

from services.runtime import metrics
from services.runtime.config import BaseConfig

if TYPE_CHECKING:  # the SDKs are optional extras; import them where they are used
    from livekit import api, rtc

log = logging.getLogger("voicebus.livekit")

DEV_API_KEY = "devkey"
DEV_API_SECRET = "voicebus-development-secret-change-me"

# Names LiveKit's front-end components look for (livekit/components-js, agents).
TOPIC_TRANSCRIPTION = "lk.transcription"
# What a user types to the agent (LiveKit Agents reads the same topic).
TOPIC_CHAT = "lk.chat"
# A typed message's own id (the web page sets it): a copy sent again after a reconnect, while
# the first may have arrived, is read once.
ATTR_MESSAGE_ID = "voicebus.message_id"
ATTR_SEGMENT_ID = "lk.segment_id"
ATTR_TRACK_ID = "lk.transcribed_track_id"
ATTR_FINAL = "lk.transcription_final"
ATTR_AGENT_STATE = "lk.agent.state"

# Participant identities starting with this belong to voicebus itself; users cannot take them.
RESERVED_PREFIX = "voicebus-"
AGENT_IDENTITY = "voicebus-agent"
INGRESS_IDENTITY = "voicebus-ingress"


def exit_process(code: int) -> None:
    """End a process that may have used ``livekit.rtc`` without tearing its native runtime down.

    The SDK's Rust threads call into Python for every log line and event. Python 3.11 ends a
    thread that asks for the GIL while the interpreter finalizes with ``pthread_exit``, whose
    unwinding through the SDK's ``extern "C"`` frames aborts the process ("panic in a function
    that cannot unwind", exit -6) after an otherwise clean shutdown. Call this once the rooms
    are disconnected: logs are flushed and the process ends before finalization starts.
    """
    if "livekit.rtc" not in sys.modules:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class LiveKitConfig(BaseConfig, frozen=True, kw_only=True):
    ENV: ClassVar[dict[str, str]] = {
        "livekit_url": "LIVEKIT_URL",
        "livekit_api_key": "LIVEKIT_API_KEY",
        "livekit_api_secret": "LIVEKIT_API_SECRET",
    }
    SECRETS: ClassVar[frozenset[str]] = frozenset({"livekit_api_secret"})

    livekit_url: str = "ws://127.0.0.1:7880"
    livekit_api_key: str = DEV_API_KEY
    livekit_api_secret: str = DEV_API_SECRET
    # Seconds to keep trying to join a room (livekit-server may still be starting).
    livekit_connect_timeout: float = 20.0


def token_for(config: LiveKitConfig, room: str, identity: str, *,
              grants: api.VideoGrants, kind: str = "standard", name: str = "",
              ttl: float = 3600.0) -> str:
    from livekit import api

    token = (api.AccessToken(config.livekit_api_key, config.livekit_api_secret)
             .with_identity(identity).with_name(name or identity).with_kind(kind)  # type: ignore[arg-type]
             .with_ttl(datetime.timedelta(seconds=ttl)).with_grants(grants))
    return token.to_jwt()


class _UnclaimedStreams(logging.Filter):
    """Drops the SDK's line for each data stream on a topic nobody handles. Users may publish
    data (they type to the agent), so any user could send a stream per packet on topics of
    their choosing: one INFO line each would let them flood our logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and isinstance(record.msg, str)
                    and record.msg.startswith(("ignoring text stream", "ignoring byte stream")))


_QUIET = _UnclaimedStreams()


async def join(config: LiveKitConfig, room_name: str, identity: str, *,
               grants: api.VideoGrants, kind: str = "standard", auto_subscribe: bool = False,
               room: rtc.Room | None = None) -> rtc.Room:
    """Connect ``room`` (a new one if not given) to ``room_name``, retrying while the server is
    unreachable for up to ``livekit_connect_timeout`` seconds. Raises ``ConnectionError``."""
    from livekit import rtc

    logging.getLogger().addFilter(_QUIET)  # the SDK logs on the root logger (a no-op if added)
    room = room or rtc.Room()
    deadline = time.monotonic() + config.livekit_connect_timeout
    delay = 0.2
    while True:
        jwt = token_for(config, room_name, identity, grants=grants, kind=kind)
        try:
            await room.connect(config.livekit_url, jwt,
                               rtc.RoomOptions(auto_subscribe=auto_subscribe))
            return room
        except rtc.ConnectError as exc:
            if time.monotonic() + delay > deadline:
                raise ConnectionError(f"cannot join room {room_name!r} at {config.livekit_url}: "
                                      f"{exc}") from None
            log.warning("joining %s failed (%s); retrying in %.1fs", room_name, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def listener_grants(room_name: str) -> api.VideoGrants:
    """Ingress's grants: hidden, it only listens (subscribes), publishes nothing."""
    from livekit import api

    return api.VideoGrants(room_join=True, room=room_name, hidden=True, can_publish=False,
                           can_publish_data=False, can_subscribe=True)


# Leaving the room for these was somebody's decision: our own leave, a newer participant with
# our identity (a replica that took the session over, another tab of the same user), an
# operator removing us or deleting the room. Staying out is then the point. Every other
# reason (the server went away or restarted, the network did, the SDK's own reconnection gave
# up) is an outage, and the participant joins again.
FINAL_DISCONNECTS = frozenset({"CLIENT_INITIATED", "DUPLICATE_IDENTITY", "PARTICIPANT_REMOVED",
                               "ROOM_DELETED", "ROOM_CLOSED"})
REJOIN_FIRST_DELAY = 0.5  # seconds before the first attempt (jittered), doubled after each…
REJOIN_MAX_DELAY = 5.0  # …up to this

# (url, token) for the next join: services mint their own, users ask the token service.
Credentials = Callable[[], Awaitable[tuple[str, str]]]


class RoomKeeper:
    """Keeps a participant in its room. The SDK reconnects on its own for a while (a resume,
    then full reconnects with the token livekit-server refreshes over the signal connection,
    so a short token TTL does not matter); once it gives up (an outage longer than ~20 s) or
    the server sends everyone away (a forced stop), the room reports ``disconnected``, and the
    keeper joins the SAME ``rtc.Room`` again with fresh credentials, with capped, jittered
    backoff, until it is back or ``aclose`` is called (or, with ``give_up_after``, that many
    seconds passed: ``on_gone`` is told). Handlers registered on the room stay with it.

    ``on_back`` (a plain callable) runs each time the participant is back: after a rejoin of
    ours and after the SDK reconnected on its own. Either way a restarted server knows nothing
    of us any more: tracks (the SDK republishes its own, under new sids), attributes set since
    the last token refresh, and subscriptions asked for while the SDK was reconnecting (they
    are dropped: found by test) must be checked again. It must be idempotent: a plain resume
    after a network blip calls it too.

    Each outage is logged once when it starts and once when it ends, and counted in
    ``voicebus_livekit_rejoins_total{stage,outcome}``.
    """

    def __init__(self, room: rtc.Room, room_name: str, credentials: Credentials, *, stage: str,
                 options: rtc.RoomOptions | None = None,
                 on_back: Callable[[], object] | None = None, give_up_after: float = 0.0,
                 on_gone: Callable[[str], None] | None = None) -> None:
        self.room = room
        self.room_name = room_name
        self.credentials = credentials
        self.stage = stage
        self.options = options
        self.on_back = on_back
        self.give_up_after = give_up_after
        self.on_gone = on_gone
        self.outages = 0  # disconnects we rejoined from (or are rejoining from)
        self._closed = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        room.on("disconnected", self._on_disconnected)
        room.on("reconnected", self._on_reconnected)

    @classmethod
    def minting(cls, config: LiveKitConfig, room: rtc.Room, room_name: str, identity: str, *,
                grants: api.VideoGrants, stage: str, kind: str = "standard",
                auto_subscribe: bool = False, **options: Any) -> RoomKeeper:
        """A keeper for one of our own participants, which mints a token for each attempt."""
        from livekit import rtc

        async def credentials() -> tuple[str, str]:
            return config.livekit_url, token_for(config, room_name, identity, grants=grants,
                                                 kind=kind)

        room_options = rtc.RoomOptions(auto_subscribe=auto_subscribe,
                                       connect_timeout=config.livekit_connect_timeout)
        return cls(room, room_name, credentials, stage=stage, options=room_options, **options)

    @property
    def rejoining(self) -> bool:
        return self._task is not None and not self._task.done()

    def _on_disconnected(self, reason: int) -> None:
        from livekit import rtc

        name = rtc.DisconnectReason.Name(reason) if reason in rtc.DisconnectReason.values() \
            else str(reason)
        if self._closed or self.rejoining:
            return
        if name in FINAL_DISCONNECTS:
            if name != "CLIENT_INITIATED":
                log.warning("left room %s (%s): not rejoining", self.room_name, name.lower(),
                            extra={"stage": self.stage, "session": self.room_name})
            return
        self.outages += 1
        self._task = asyncio.create_task(self._rejoin(name.lower()), name="livekit-rejoin")

    def _on_reconnected(self) -> None:
        if self._closed:
            return
        metrics.LIVEKIT_REJOINS.labels(self.stage, "sdk").inc()
        log.info("back in room %s (the SDK reconnected)", self.room_name,
                 extra={"stage": self.stage, "session": self.room_name})
        self._back()

    async def _rejoin(self, reason: str) -> None:
        from livekit import rtc

        log.warning("dropped from room %s (%s): rejoining", self.room_name, reason,
                    extra={"stage": self.stage, "session": self.room_name})
        started = time.monotonic()
        delay, attempts, error = REJOIN_FIRST_DELAY, 0, ""
        while not self._closed:
            # Full jitter on half the delay: the sessions of a restarted server spread out.
            await self._pause(random.uniform(delay / 2, delay))
            if self._closed:
                break
            if self.give_up_after and time.monotonic() - started > self.give_up_after:
                log.error("could not rejoin room %s for %.0f s (%s): giving up", self.room_name,
                          time.monotonic() - started, error,
                          extra={"stage": self.stage, "session": self.room_name})
                if self.on_gone is not None:
                    self.on_gone(f"room unreachable: {error}")
                return
            attempts += 1
            try:
                await self._connect()
            except Exception as exc:  # unreachable, refused, the token service down…
                error = str(exc) or type(exc).__name__
                metrics.LIVEKIT_REJOINS.labels(self.stage, "failed").inc()
                log.debug("rejoining %s failed: %s", self.room_name, error)
                delay = min(delay * 2, REJOIN_MAX_DELAY)
                continue
            if self._closed:  # closed while we were joining: leave again, for good
                await self.room.disconnect()
                return
            if self.room.connection_state != rtc.ConnectionState.CONN_CONNECTED:
                error = "dropped again as it joined"  # its drop came while we were rejoining
                continue
            metrics.LIVEKIT_REJOINS.labels(self.stage, "rejoined").inc()
            log.info("back in room %s after %.1f s (%d attempts)", self.room_name,
                     time.monotonic() - started, attempts,
                     extra={"stage": self.stage, "session": self.room_name})
            self._back()
            return

    async def _connect(self) -> None:
        room = self.room
        # The dropped connection's own event loop in the SDK must end before a new one starts
        # on the same Room (both would read its next events).
        listener = getattr(room, "_task", None)
        if listener is not None and not listener.done():
            await asyncio.wait({listener}, timeout=5.0)
        # A room dropped at once (the server's leave) still lists who was there: they are gone
        # (a restarted server knows nobody). Listeners hear it as the SDK tells it after its
        # own full reconnect; and connect() would refuse to list them again.
        for identity, participant in list(room.remote_participants.items()):
            room.remote_participants.pop(identity, None)
            room.emit("participant_disconnected", participant)
        url, token = await asyncio.wait_for(self.credentials(), 30.0)
        if self.options is not None:
            await room.connect(url, token, self.options)
        else:
            await room.connect(url, token)

    def _back(self) -> None:
        if self.on_back is None:
            return
        try:
            self.on_back()
        except Exception:
            log.exception("after rejoining room %s", self.room_name)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def aclose(self) -> None:
        """No more rejoining. A join in flight is let finish (its connection is then left at
        once); the room itself is disconnected by its owner."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


def is_user(participant: rtc.RemoteParticipant) -> bool:
    """A person: in a browser (or a `voicebus call`), or on the phone through LiveKit SIP; not
    one of our own or LiveKit's other service participants (egress, ingress, agents)."""
    from livekit import rtc

    return (participant.kind in (rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD,
                                 rtc.ParticipantKind.PARTICIPANT_KIND_SIP)
            and not participant.identity.startswith(RESERVED_PREFIX))
