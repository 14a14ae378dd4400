"""LLM stage: a final transcript in, the reply streamed out as deltas, history in JetStream KV.

Every final transcript gets exactly one ``ReplyDone`` (empty, ignored, interrupted or failed
included), so each turn closes end to end. A final heard over our reply that does not
interrupt it (``services.runtime.turns``, the rule egress applies too) is ignored: no answer,
and the reply goes on. The history keeps of each reply what the user heard (``Playback``).
The greeting (turn 0) and the re-prompts of an idle user are fixed texts, not the model's.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

import msgspec
from nats.js.errors import KeyNotFoundError

from proto import events as ev
from proto import subjects as sj
from services.llm.config import LlmConfig
from services.llm.provider import PROVIDERS, ChatMessage, LlmProvider
from services.runtime import metrics
from services.runtime.fallback import FallbackAdapter, answered_by
from services.runtime.service import ProviderStage, SessionWorker
from services.runtime.turns import words

HISTORY_BUCKET = "voicebus_history"
_history_codec = (msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(list[ChatMessage]))
_PROBE = (ChatMessage("system", "Answer with one word."), ChatMessage("user", "Say OK."))


class LlmFallback(FallbackAdapter[LlmProvider]):
    """The LLM chain, itself an ``LlmProvider``: the conversation is the whole input, so a turn
    can move on at any point before the first delta."""

    stage = "llm"

    def complete(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str]:
        return self.run(lambda provider, _: provider.complete(messages))

    async def probe(self, provider: LlmProvider) -> None:
        async with aclosing(provider.complete(_PROBE)) as deltas:
            async for _ in deltas:
                pass


class LlmWorker(SessionWorker[LlmConfig]):
    service: LlmService

    async def start(self) -> None:
        self.kv = await self.bus.key_value(HISTORY_BUCKET, ttl=self.config.state_ttl)
        self.history = await self._load_history()
        self.rules = self.config.turn_rules()
        self.reply: asyncio.Task[None] | None = None
        self.reply_turn = -1
        self.final_upto = 0  # the newest final handled (repeats and stale ones are dropped)
        self.cancelled_upto = -1
        self.floor: int | None = None  # our reply the user has not finished hearing
        self.heard: dict[int, int] = {}  # Playback cuts that came before their reply was stored
        self.goodbyes: set[int] = set()  # replies after which the session ends
        self.greeting_closed = False
        await self.subscribe(sj.STT_FINAL.subject(self.session), self.on_final)
        await self.subscribe(sj.EGRESS_PLAYBACK.subject(self.session), self.on_playback)
        if self.start_event.greeting:
            await self.subscribe(sj.INGRESS_TRACK.subject(self.session), self.on_input_track)

    async def _load_history(self) -> list[ChatMessage]:
        try:
            entry = await self.kv.get(self.session)
        except KeyNotFoundError:  # a new session (any other KV error fails the claim)
            return []
        try:
            return _history_codec[1].decode(entry.value or b"")
        except msgspec.DecodeError:
            self.log.warning("stored history is unreadable; starting a fresh one")
            return []

    async def on_final(self, final: ev.Transcript) -> None:
        if final.turn <= max(self.cancelled_upto, self.final_upto):
            return  # a stale or repeated final
        self.final_upto = final.turn
        received = time.perf_counter()
        said = words(final.text)
        if final.idle:
            await self._say_idle(final)
            return
        if not said or (self.floor is not None and
                        not self.rules.interrupts(final.text, final.speech_ms, final=True)):
            # No words, or a backchannel over our reply: not a turn. The reply goes on.
            # A backchannel is not stored either: it belongs to no turn of the conversation.
            await self.emit(sj.LLM_DONE, ev.ReplyDone, turn=final.turn, ignored=bool(said),
                            provider=self.service.provider.name)
            metrics.TURNS.labels("llm", "ignored" if said else "empty").inc()
            return
        superseded = self.reply
        self._take_floor(final.turn)
        self.reply = self.spawn_turn(self.respond(final, received, superseded), final.turn,
                                     self._unstarted)

    def _take_floor(self, turn: int) -> None:
        if self.reply is not None:
            self.reply.cancel()  # a newer user turn supersedes the old reply
        self.reply_turn = self.floor = turn
        self.idle.clear()

    async def on_cancel(self, cancel: ev.Cancel) -> None:
        self.cancelled_upto = max(self.cancelled_upto, cancel.turn)
        if self.floor is not None and self.floor <= cancel.turn:
            self._release_floor()
        if self.reply is not None and self.reply_turn <= cancel.turn:
            self.reply.cancel()

    def _release_floor(self) -> None:
        # Until then a handover waits: the next replica could not tell a backchannel from a
        # turn, nor cut the history, nor end the session after a goodbye.
        self.floor = None
        if self.reply is None or self.reply.done():
            self.idle.set()

    async def on_playback(self, playback: ev.Playback) -> None:
        if not playback.final:
            return
        if playback.turn == self.floor:
            self._release_floor()
        if playback.interrupted:
            await self._cut(playback.turn, playback.text_offset)
        elif playback.turn in self.goodbyes:
            self.log.info("user idle: the goodbye was heard; ending the session")
            await self.emit(sj.CTL_END, ev.SessionEnd, reason="user idle")

    # ---- what the agent says on its own: the greeting, idle re-prompts ---------------------------

    async def on_input_track(self, track: ev.InputTrack) -> None:
        if not track.active or self.greeting_closed:
            return
        self.greeting_closed = True
        if any(message.turn == 0 and message.role == "assistant" for message in self.history) \
                or self.final_upto:
            # Greeted already (a reconnect, a handed-over session) or the user spoke first:
            # turn 0 still closes, so egress stops waiting for it.
            await self.emit(sj.LLM_DONE, ev.ReplyDone, turn=0, provider="voicebus")
            return
        self._take_floor(0)
        await self._say(0, self.start_event.greeting)

    async def _say_idle(self, final: ev.Transcript) -> None:
        goodbye = final.idle > self.config.idle_prompts
        text = self.config.idle_goodbye if goodbye else self.config.idle_prompt
        self._take_floor(final.turn)
        if goodbye:
            self.goodbyes.add(final.turn)
        await self._say(final.turn, text, end_session=goodbye)

    async def _say(self, turn: int, text: str, end_session: bool = False) -> None:
        """A reply of fixed text (not the model's), spoken and remembered like any other."""
        if text:
            await self.emit(sj.LLM_DELTA, ev.ReplyDelta, turn=turn, text=text)
        await self.emit(sj.LLM_DONE, ev.ReplyDone, turn=turn, text=text, provider="voicebus",
                        end_session=end_session)
        await self._remember("", text, interrupted=False, turn=turn)

    # ---- answering -------------------------------------------------------------------------------

    def messages_for(self, text: str) -> list[ChatMessage]:
        keep = self.history[-2 * self.config.llm_history_turns:] if self.config.llm_history_turns else []
        return [ChatMessage("system", self.config.system_prompt), *keep, ChatMessage("user", text)]

    async def respond(self, final: ev.Transcript, received: float,
                      superseded: asyncio.Task[None] | None = None) -> None:
        if superseded is not None:
            # It stores its user message (and what it said) as it closes: the model must see
            # that turn before this one.
            await asyncio.wait([superseded])
        parts: list[str] = []
        outcome, error = "ok", ""
        provider = self.service.provider
        # Not started until iterated; it names the provider that answered (or failed last).
        stream = provider.complete(self.messages_for(final.text))
        try:
            await self._stream_reply(stream, final, received, parts)
        except asyncio.CancelledError:
            outcome = "interrupted"
        except Exception as exc:  # a provider failure or a bug: the turn still closes
            outcome, error = "error", await self.provider_failed(final.turn, exc, "reply")
        finally:
            if self.reply is asyncio.current_task() and self.floor is None:
                self.idle.set()  # else when the reply has been heard (or cut)
        text = "".join(parts)
        await self.emit(sj.LLM_DONE, ev.ReplyDone, turn=final.turn, text=text,
                        compute_ms=(time.perf_counter() - received) * 1000,
                        interrupted=outcome == "interrupted", error=error,
                        provider=answered_by(stream, provider))
        metrics.TURNS.labels("llm", outcome).inc()
        await self._remember(final.text, text, interrupted=outcome == "interrupted",
                             turn=final.turn)

    async def _unstarted(self, turn: int) -> None:
        await self.emit(sj.LLM_DONE, ev.ReplyDone, turn=turn, interrupted=True,
                        provider=self.service.provider.name)

    async def _stream_reply(self, stream: AsyncIterator[str], final: ev.Transcript,
                            received: float, parts: list[str]) -> None:
        # aclosing: a cancelled turn must close the provider's stream at once.
        async with aclosing(stream):
            async for delta in stream:
                elapsed = (time.perf_counter() - received) * 1000
                if not parts:
                    name = answered_by(stream, self.service.provider)
                    metrics.PROVIDER_SECONDS.labels("llm", name).observe(elapsed / 1000)
                await self.emit(sj.LLM_DELTA, ev.ReplyDelta, turn=final.turn, text=delta,
                                index=len(parts), compute_ms=elapsed)
                parts.append(delta)

    # ---- history ---------------------------------------------------------------------------------

    async def _remember(self, user: str, assistant: str, interrupted: bool, turn: int) -> None:
        if user:
            self.history.append(ChatMessage("user", user, turn=turn))
        if assistant:
            message = ChatMessage("assistant", assistant, interrupted=interrupted, turn=turn)
            if (heard := self.heard.pop(turn, None)) is not None:
                message = _heard_part(message, heard)
            if message.content:
                self.history.append(message)
        await self.kv.put(self.session, _history_codec[0].encode(self.history))

    async def _cut(self, turn: int, heard: int) -> None:
        """The user heard reply ``turn`` only up to character ``heard``: keep just that, marked
        interrupted (nothing heard: no assistant message at all)."""
        for index in range(len(self.history) - 1, -1, -1):
            message = self.history[index]
            if message.role == "assistant" and message.turn == turn:
                cut = _heard_part(message, heard)
                if cut.content:
                    self.history[index] = cut
                else:
                    del self.history[index]
                await self.kv.put(self.session, _history_codec[0].encode(self.history))
                return
        # Not stored yet (still being written, or closing after a newer turn took over).
        self.heard[turn] = heard
        while len(self.heard) > 64:  # cuts of replies that never had text
            del self.heard[min(self.heard)]


def _heard_part(message: ChatMessage, heard: int) -> ChatMessage:
    text = message.content[:max(0, heard)].rstrip()
    return msgspec.structs.replace(message, content=text, interrupted=True)


class LlmService(ProviderStage[LlmConfig]):
    stage = "llm"
    Config = LlmConfig
    Worker = LlmWorker
    PROVIDERS = PROVIDERS
    Fallback = LlmFallback
    provider: LlmFallback
