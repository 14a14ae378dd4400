"""LLM stage: the judge's verdicts in, the reply streamed out as deltas, history in JetStream KV.

The LLM answers verdicts and never judges: ``answer`` asks the model with the user's words;
``greet``, ``prompt`` and ``goodbye`` say fixed texts; ``ignore`` needs nothing. Every verdict it
speaks gets exactly one ``ReplyDone`` (empty, interrupted or failed included), so each turn
closes end to end. The history keeps of each reply what the user heard (``Playback``).

A ``draft`` verdict is answered at once like any other, but its turn enters the history only
when the plain verdict of the same turn confirms it; a cancel before that forgets it whole (the
user's words come again in the turn that carries them on).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import NamedTuple

import msgspec
from nats.js.errors import KeyNotFoundError

from proto import events as ev
from proto import subjects as sj
from proto.events import Timing
from services.llm.config import LlmConfig
from services.llm.provider import PROVIDERS, ChatMessage, LlmProvider
from services.runtime import metrics, tracing
from services.runtime.fallback import FallbackAdapter, answered_by
from services.runtime.ledger import MAX_AHEAD, FloorRecord, TurnLedger
from services.runtime.service import ProviderStage, SessionWorker


HISTORY_BUCKET = "voicebus_history"
_history_codec = (msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(list[ChatMessage]))
_PROBE = (ChatMessage("system", "Answer with one word."), ChatMessage("user", "Say OK."))


class Origin(NamedTuple):
    """Where a reply's work began: the verdict's trace headers and when it arrived."""

    trace: tracing.Headers | None
    ns: int


class Draft:
    """A reply to a draft verdict, kept out of the history until its turn is confirmed."""

    __slots__ = ("confirmed", "dropped", "memory")

    def __init__(self) -> None:
        self.confirmed = False
        self.dropped = False
        self.memory: tuple[str, str, bool] | None = None  # (user, reply, interrupted) once done


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

    async def subscribe_inputs(self) -> None:
        self.kv = await self.bus.key_value(HISTORY_BUCKET, ttl=self.config.state_ttl)
        self.history = await self._load_history()
        self.ledger = TurnLedger.following(await self.load_floor())
        self.reply: asyncio.Task[None] | None = None
        self.reply_turn = -1
        self.heard: dict[int, int] = {}  # Playback cuts that came before their reply was stored
        self.drafts: dict[int, Draft] = {}
        # The judge's decisions in one subscription: a cancel and the verdict after it stay in
        # order.
        await self.subscribe(sj.producer_all(self.session, "floor"), self.handle)
        await self.subscribe(sj.EGRESS_PLAYBACK.subject(self.session), self.handle)

    async def on_taken_over(self, record: FloorRecord) -> None:
        """The replica that died may have been answering the reply that holds the floor. If it
        had not finished (nothing of that turn is in the history), the turn is closed with an
        error: its text may have been half sent, so asking the model again could say it twice.
        The agent listens again and the user's next words are answered."""
        turn = record.reply
        if turn < 0 or any(message.turn == turn for message in self.history):
            return
        self.ledger.pass_over(turn)
        await self.stage_error("the replica answering this turn died", retryable=True, turn=turn)
        await self.emit(sj.LLM_DONE, ev.ReplyDone, turn=turn, interrupted=True,
                        error="replica lost", provider=self.service.provider.name)

    async def _load_history(self) -> list[ChatMessage]:
        try:
            entry = await self.bus.get(self.kv, self.session)
        except KeyNotFoundError:  # a new session (any other KV error fails the claim)
            return []
        try:
            return _history_codec[1].decode(entry.value or b"")
        except msgspec.DecodeError:
            self.log.warning("stored history is unreadable; starting a fresh one")
            return []

    async def handle(self, event: ev.Event) -> None:
        match event:
            case ev.Verdict(action="ignore"):
                self.ledger.pass_over(event.turn)
            case ev.Verdict(draft=False) if event.turn in self.drafts:
                await self._confirm(event.turn)
            case ev.Verdict() if self.ledger.open(event.turn):
                if event.draft:
                    self.drafts[event.turn] = Draft()
                self._take(event)
            case ev.Cancel() if self.ledger.cancel(event.turn):
                self._drop_drafts(event.turn)
                if self.reply is not None and self.ledger.is_cut(self.reply_turn):
                    self.reply.cancel()
            case ev.Playback(final=True, interrupted=True):
                await self._cut(event.turn, event.text_offset)

    def _take(self, verdict: ev.Verdict) -> None:
        superseded = self.reply
        if superseded is not None:
            superseded.cancel()  # a newer turn supersedes the old reply (the judge cut it)
        self.reply_turn = verdict.turn
        origin = Origin(tracing.received(), time.time_ns())
        if verdict.action == "answer":
            work = self.respond(verdict, time.perf_counter(), superseded, origin)
        else:
            work = self._say(verdict.turn, self._fixed_text(verdict.action), origin)
        self.reply = self.spawn_turn(work, verdict.turn, self._unstarted)

    def _fixed_text(self, action: str) -> str:
        """What the agent says on its own: the greeting, or the words to a silent user."""
        if action == "greet":
            return self.start_event.greeting
        return self.config.idle_goodbye if action == "goodbye" else self.config.idle_prompt

    async def _say(self, turn: int, text: str, origin: Origin) -> None:
        """A reply of fixed text (not the model's), spoken and remembered like any other."""
        if text:
            trace = self._first_token(turn, origin, "voicebus")
            await self.emit(sj.LLM_DELTA, ev.ReplyDelta, turn=turn, text=text, trace=trace)
        await self.emit(sj.LLM_DONE, ev.ReplyDone, turn=turn, text=text, provider="voicebus")
        await self._remember("", text, interrupted=False, turn=turn)

    # ---- answering -------------------------------------------------------------------------------

    def messages_for(self, text: str) -> list[ChatMessage]:
        keep = self.history[-2 * self.config.llm_history_turns:] if self.config.llm_history_turns else []
        return [ChatMessage("system", self.config.system_prompt), *keep, ChatMessage("user", text)]

    async def respond(self, verdict: ev.Verdict, received: float,
                      superseded: asyncio.Task[None] | None, origin: Origin) -> None:
        if superseded is not None:
            # It stores its user message (and what it said) as it closes: the model must see
            # that turn before this one.
            await asyncio.wait([superseded])
        parts: list[str] = []
        outcome, error = "ok", ""
        provider = self.service.provider
        # Not started until iterated; it names the provider that answered (or failed last).
        stream = provider.complete(self.messages_for(verdict.text))
        try:
            await self._stream_reply(stream, verdict.turn, received, parts, origin)
        except asyncio.CancelledError:
            outcome = "interrupted"
        except Exception as exc:  # a provider failure or a bug: the turn still closes
            outcome, error = "error", await self.provider_failed(verdict.turn, exc, "reply")
        text = "".join(parts)
        await self.emit(sj.LLM_DONE, ev.ReplyDone, turn=verdict.turn, text=text,
                        interrupted=outcome == "interrupted", error=error,
                        provider=answered_by(stream, provider),
                        timing=Timing(compute_ms=(time.perf_counter() - received) * 1000))
        metrics.TURNS.labels("llm", outcome).inc()
        await self._settle(verdict.turn, verdict.text, text, outcome == "interrupted")

    async def _unstarted(self, turn: int) -> None:
        await self.emit(sj.LLM_DONE, ev.ReplyDone, turn=turn, interrupted=True,
                        provider=self.service.provider.name)

    async def _stream_reply(self, stream: AsyncIterator[str], turn: int, received: float,
                            parts: list[str], origin: Origin) -> None:
        # aclosing: a cancelled turn must close the provider's stream at once.
        async with aclosing(stream):
            async for delta in stream:
                elapsed = (time.perf_counter() - received) * 1000
                trace = None
                if not parts:
                    name = answered_by(stream, self.service.provider)
                    metrics.PROVIDER_SECONDS.labels("llm", name).observe(elapsed / 1000)
                    trace = self._first_token(turn, origin, name)
                await self.emit(sj.LLM_DELTA, ev.ReplyDelta, turn=turn, text=delta, trace=trace,
                                index=len(parts), timing=Timing(compute_ms=elapsed))
                parts.append(delta)

    def _first_token(self, turn: int, origin: Origin, provider: str) -> tracing.Headers | None:
        """The reply's first text is out: LLM TTFT, and the turn's trace goes on to the TTS."""
        now = time.time_ns()
        metrics.LLM_TTFT.labels(provider).observe(max(0.0, (now - origin.ns) / 1e9))
        return tracing.stage_span("llm_first_token", session=self.session, turn=turn,
                                  parent=origin.trace, start_ns=origin.ns, end_ns=now,
                                  provider=provider)

    # ---- drafts ----------------------------------------------------------------------------------

    async def _settle(self, turn: int, user: str, reply: str, interrupted: bool) -> None:
        """Reply ``turn`` is over: into the history, unless it is a draft not yet confirmed."""
        draft = self.drafts.get(turn)
        if draft is None or draft.confirmed:
            self.drafts.pop(turn, None)
            await self._remember(user, reply, interrupted=interrupted, turn=turn)
        elif draft.dropped:
            del self.drafts[turn]
        else:
            draft.memory = (user, reply, interrupted)

    async def _confirm(self, turn: int) -> None:
        """The final agreed with draft ``turn``: it is the answer, and joins the history."""
        draft = self.drafts[turn]
        if draft.memory is None:
            draft.confirmed = True  # still being written: it joins the history when done
            return
        del self.drafts[turn]
        user, reply, interrupted = draft.memory
        await self._remember(user, reply, interrupted=interrupted, turn=turn)

    def _drop_drafts(self, up_to: int) -> None:
        """Drafts cut before their confirmation are forgotten, not remembered as cut replies."""
        for turn in [t for t in self.drafts if t < up_to - MAX_AHEAD]:
            del self.drafts[turn]  # long over (a draft cut before it began never settles)
        for turn in [t for t, d in self.drafts.items() if t <= up_to and not d.confirmed]:
            if self.drafts[turn].memory is not None:
                del self.drafts[turn]
            else:
                self.drafts[turn].dropped = True

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
        await self.bus.put(self.kv, self.session, _history_codec[0].encode(self.history))

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
                await self.bus.put(self.kv, self.session,
                                   _history_codec[0].encode(self.history))
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
