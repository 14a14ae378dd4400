"""LLM stage: a final transcript in, the reply streamed out as deltas, history in JetStream KV.

Every final transcript gets exactly one ``ReplyDone`` (empty, interrupted or failed included),
so each turn closes end to end.
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
        self.reply: asyncio.Task[None] | None = None
        self.reply_turn = 0
        self.cancelled_upto = 0
        await self.subscribe(sj.STT_FINAL.subject(self.session), self.on_final)

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
        if final.turn <= self.cancelled_upto or final.turn <= self.reply_turn:
            return  # a stale or repeated final
        received = time.perf_counter()
        if self.reply is not None:
            self.reply.cancel()  # a newer user turn supersedes the old reply
        self.reply_turn = final.turn
        self.idle.clear()
        self.reply = self.spawn_turn(self.respond(final, received), final.turn, self._unstarted)

    async def on_cancel(self, cancel: ev.Cancel) -> None:
        self.cancelled_upto = max(self.cancelled_upto, cancel.turn)
        if self.reply is not None and self.reply_turn <= cancel.turn:
            self.reply.cancel()

    def messages_for(self, text: str) -> list[ChatMessage]:
        keep = self.history[-2 * self.config.llm_history_turns:] if self.config.llm_history_turns else []
        return [ChatMessage("system", self.config.system_prompt), *keep, ChatMessage("user", text)]

    async def respond(self, final: ev.Transcript, received: float) -> None:
        parts: list[str] = []
        outcome, error = ("ok", "") if final.text.strip() else ("empty", "")
        provider = self.service.provider
        # Not started until iterated; it names the provider that answered (or failed last).
        stream = provider.complete(self.messages_for(final.text))
        try:
            if outcome == "ok":
                await self._stream_reply(stream, final, received, parts)
        except asyncio.CancelledError:
            outcome = "interrupted"
        except Exception as exc:  # a provider failure or a bug: the turn still closes
            outcome, error = "error", await self.provider_failed(final.turn, exc, "reply")
        finally:
            if self.reply is asyncio.current_task():  # not when a newer turn took over
                self.idle.set()
        text = "".join(parts)
        await self.emit(sj.LLM_DONE, ev.ReplyDone, turn=final.turn, text=text,
                        compute_ms=(time.perf_counter() - received) * 1000,
                        interrupted=outcome == "interrupted", error=error,
                        provider=answered_by(stream, provider))
        metrics.TURNS.labels("llm", outcome).inc()
        if final.text.strip():
            await self._remember(final.text, text, interrupted=outcome == "interrupted")

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


    async def _remember(self, user: str, assistant: str, interrupted: bool) -> None:
        self.history.append(ChatMessage("user", user))
        if assistant:
            self.history.append(ChatMessage("assistant", assistant, interrupted=interrupted))
        await self.kv.put(self.session, _history_codec[0].encode(self.history))


class LlmService(ProviderStage[LlmConfig]):
    stage = "llm"
    Config = LlmConfig
    Worker = LlmWorker
    PROVIDERS = PROVIDERS
    Fallback = LlmFallback
    provider: LlmFallback
