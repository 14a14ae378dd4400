"""What the LiveKit edges share: settings, names LiveKit's front-ends know, tokens, joining.

The ingress, egress and token services read ``LIVEKIT_URL``, ``LIVEKIT_API_KEY`` and
``LIVEKIT_API_SECRET`` (LiveKit's own names). The defaults match the development server that
``make up`` starts; anything reachable from outside this machine must set its own.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, ClassVar

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


def is_user(participant: rtc.RemoteParticipant) -> bool:
    """A person: in a browser (or a `voicebus call`), or on the phone through LiveKit SIP; not
    one of our own or LiveKit's other service participants (egress, ingress, agents)."""
    from livekit import rtc

    return (participant.kind in (rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD,
                                 rtc.ParticipantKind.PARTICIPANT_KIND_SIP)
            and not participant.identity.startswith(RESERVED_PREFIX))
