"""What the session's user types: LiveKit text streams on ``lk.chat`` (the topic LiveKit Agents
reads), bounded, handed on to become ``UserText`` on the bus.

A user may publish data so that they can type, so anyone in the room can send a stream on this
topic. Only the session's user is read — the rule of the microphone: a person (not one of ours,
not another agent), the first one heard — at most ``burst`` messages at once and
``per_minute`` after that, each at most ``max_chars`` long and complete within
``read_timeout`` seconds. Whatever else arrives is dropped unread and reported as a refusal,
which the stage counts as a rejected message and logs once per burst.

A client that cannot tell whether a message arrived (livekit-server restarted as it was sent)
sends it again under the same ``voicebus.message_id`` attribute: a message already taken under
that id is dropped unread, and is no refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proto.events import MAX_CHAT_CHARS
from services.runtime.livekit import ATTR_MESSAGE_ID, TOPIC_CHAT

if TYPE_CHECKING:
    from livekit import rtc

log = logging.getLogger("voicebus.ingress.chat")

# (reason, detail): a message dropped, for the rejection metric and a log line.
Refusal = Callable[[str, str], None]
# (the user's identity, the text): a message to pass on.
Message = Callable[[str, str], None]
# UTF-8 takes at most 4 bytes a character: a stream announced longer than this cannot fit.
_BYTES_PER_CHAR = 4
# Message ids remembered, per session: far more than a client resends (the page resends only
# the messages it has not seen answered).
_IDS_KEPT = 256
_MAX_ID_CHARS = 64


@dataclass(frozen=True, slots=True)
class ChatLimits:
    max_chars: int = MAX_CHAT_CHARS
    burst: int = 5
    per_minute: float = 20.0
    read_timeout: float = 10.0


class ChatGate:
    """The session's rate limit: a token bucket of ``burst`` messages refilled at
    ``per_minute``. Pure: the clock is injected."""

    def __init__(self, burst: int, per_minute: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if burst < 1 or per_minute <= 0:
            raise ValueError("a chat burst must be >= 1 and its rate > 0")
        self.burst = burst
        self.rate = per_minute / 60.0
        self.clock = clock
        self.tokens = float(burst)
        self.updated = clock()

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class TooLong(ValueError):
    pass


async def read_bounded(chunks: AsyncIterator[str], max_chars: int) -> str:
    """The whole text of a stream, or ``TooLong`` as soon as it passes ``max_chars`` (the rest
    is never held in memory)."""
    parts: list[str] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > max_chars:
            raise TooLong(f"more than {max_chars} characters")
        parts.append(chunk)
    return "".join(parts)


class ChatInbox:
    """Reads ``lk.chat`` streams of one room. ``admits(identity)`` says whether the sender is
    the session's user; ``on_text`` gets each accepted message, stripped, in the order the
    messages were sent (streams are read side by side and may end in any order);
    ``on_refused`` each dropped one."""

    def __init__(self, room: rtc.Room, admits: Callable[[str], bool], on_text: Message,
                 on_refused: Refusal, limits: ChatLimits = ChatLimits()) -> None:
        self.admits = admits
        self.on_text = on_text
        self.on_refused = on_refused
        self.limits = limits
        self.gate = ChatGate(limits.burst, limits.per_minute)
        self._reading: set[asyncio.Task[None]] = set()
        self._last: asyncio.Task[None] | None = None  # the newest message being read
        self._taken: OrderedDict[str, None] = OrderedDict()  # ids of messages taken, oldest first
        room.register_text_stream_handler(TOPIC_CHAT, self._on_stream)

    def _on_stream(self, reader: rtc.TextStreamReader, sender: str) -> None:
        """A plain callback of the SDK: decide at once, read in a task."""
        message_id = (reader.info.attributes or {}).get(ATTR_MESSAGE_ID, "")[:_MAX_ID_CHARS]
        copy = message_id in self._taken  # never "": an id-less message is taken as new
        refusal = self._refusal(reader, sender, copy)
        if refusal is not None or copy:
            reader.close()  # never read: the SDK drops what it buffered
            if refusal is not None:
                self.on_refused(*refusal)
            else:
                log.debug("message %s from %s again: read once already", message_id, sender)
            return
        if message_id:
            self._taken[message_id] = None
            while len(self._taken) > _IDS_KEPT:
                self._taken.popitem(last=False)
        task = asyncio.create_task(self._read(reader, sender, self._last, message_id),
                                   name="chat")
        self._last = task
        self._reading.add(task)
        task.add_done_callback(self._reading.discard)

    def _refusal(self, reader: rtc.TextStreamReader, sender: str,
                 copy: bool) -> tuple[str, str] | None:
        # The sender's identity is livekit-server's word: it overwrites what a user claims
        # (only an agent may send on another's behalf, and agents are not users).
        if not self.admits(sender):
            return "chat_not_user", f"a message from {sender[:64]!r}, not the session's user"
        if (reader.info.size or 0) > self.limits.max_chars * _BYTES_PER_CHAR:
            return "chat_too_long", f"a message of {reader.info.size} bytes announced"
        if copy:
            return None  # dropped unread, and it costs the sender nothing
        if not self.gate.allow():
            return "chat_rate", (f"more than {self.limits.burst} messages at once or "
                                 f"{self.limits.per_minute:g} a minute")
        return None

    async def _read(self, reader: rtc.TextStreamReader, sender: str,
                    previous: asyncio.Task[None] | None, message_id: str) -> None:
        from livekit import rtc

        try:
            async with asyncio.timeout(self.limits.read_timeout):
                text = (await read_bounded(reader, self.limits.max_chars)).strip()
        except TooLong as exc:
            self.on_refused("chat_too_long", str(exc))
            return
        except TimeoutError:
            self._taken.pop(message_id, None)  # a copy sent again may arrive whole
            self.on_refused("chat_slow", f"not complete within {self.limits.read_timeout:g} s")
            return
        except rtc.StreamError as exc:  # the sender left mid-message: nothing to answer
            self._taken.pop(message_id, None)
            log.debug("a chat message broke off: %s", exc)
            return
        finally:
            reader.close()  # a no-op once read to its end
        if previous is not None:
            await asyncio.wait({previous})  # the message sent before this one goes first
        if not text:
            self.on_refused("chat_empty", "a message with no text")
            return
        self.on_text(sender, text)

    async def aclose(self) -> None:
        for task in list(self._reading):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
