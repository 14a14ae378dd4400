"""LLM stage: the judge's verdicts in, the reply streamed out as deltas, history in JetStream KV.

The LLM answers verdicts and never judges: ``answer`` asks the model with the user's words;
``greet``, ``prompt`` and ``goodbye`` say fixed texts; ``ignore`` needs nothing. Every verdict it
speaks gets exactly one ``ReplyDone`` (empty, interrupted or failed included), so each turn
closes end to end. The history keeps of each reply what the user heard (``Playback``).

A ``draft`` verdict is answered at once like any other, but its turn enters the history only
when the plain verdict of the same turn confirms it; a cancel before that forgets it whole (the
user's words come again in the turn that carries them on).

Tools (docs/tools.md): the model may answer with tool calls. The decision enters the history
first, then each call runs exactly once, outside the reply's task: a barge-in cancels the reply
but not a call that has started (unless its tool is cancellable), and its result is kept for
the next reply, which waits for it. A draft acts only once its turn is confirmed; a reply cut
before the model finished deciding calls nothing. The model sees each decision followed by the
answers to its calls, whatever order they arrived in.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import NamedTuple

import msgspec
from nats.js.errors import KeyNotFoundError

from proto import events as ev
from proto import subjects as sj
from proto.events import NOT_ADDRESSED, Timing
from services.llm.config import LlmConfig
from proto.tools import ToolSpec
from services.llm.provider import PROVIDERS, ChatMessage, LlmProvider, ToolCall
from services.llm.tools import END_CALL, PHONE_BUILT_IN, ToolBox
from services.runtime import metrics, tracing, usage
from services.runtime.fallback import FallbackAdapter, answered_by
from services.runtime.ledger import MAX_AHEAD, FloorRecord, TurnLedger
from services.runtime.service import ProviderStage, SessionWorker, to_the_end


HISTORY_BUCKET = "voicebus_history"
_history_codec = (msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(list[ChatMessage]))
_PROBE = (ChatMessage("system", "Answer with one word."), ChatMessage("user", "Say OK."))
# Rounds of tool calls in one reply; calls the model asks for after the last are not run.
MAX_TOOL_ROUNDS = 4
# Messages of a session's history kept in KV (the model sees the last llm_history_turns).
HISTORY_KEPT = 500
# Told to the model in a meeting (several people heard, each message after its speaker's name).
MEETING_PROMPT = (
    "Several people take part in this conversation. Each of their messages begins with the "
    "speaker's name and a colon. Answer the person who spoke last, by name when it helps; do "
    "not begin your reply with a name and a colon.")
# What of a tool's answer the history keeps (the whole history is one KV value).
MAX_RESULT_CHARS = 16_384


class Origin(NamedTuple):
    """Where a reply's work began: the verdict's trace headers and when it arrived."""

    trace: tracing.Headers | None
    ns: int


class Draft:
    """A reply to a draft verdict, kept out of the history until its turn is confirmed."""

    __slots__ = ("certain", "confirmed", "dropped", "memory")

    def __init__(self) -> None:
        self.confirmed = False
        self.dropped = False
        self.memory: tuple[str, str, bool] | None = None  # (user, reply, interrupted) once done
        self.certain = asyncio.Event()  # set on confirmation: its tool calls may run


class Acting:
    """A reply whose model called tools: what of it the history already holds."""

    __slots__ = ("stored_chars", "user_stored")

    def __init__(self) -> None:
        self.user_stored = False  # the user's message went in before the first decision
        self.stored_chars = 0  # the reply's text up to here is in the decisions


class LlmFallback(FallbackAdapter[LlmProvider]):
    """The LLM chain, itself an ``LlmProvider``: the conversation is the whole input, so a turn
    can move on at any point before the first delta."""

    stage = "llm"

    def complete(self, messages: Sequence[ChatMessage],
                 tools: Sequence[ToolSpec] = ()) -> AsyncIterator[str | ToolCall]:
        # Without tools, the one-argument call: a provider that knows no tools still works.
        if not tools:
            return self.run(lambda provider, _: provider.complete(messages))
        return self.run(lambda provider, _: provider.complete(messages, tools))

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
        self.agent = self.service.agents.get_or_default(self.start_event.agent)
        self.acting: dict[int, Acting] = {}
        self.calls: set[asyncio.Task[ChatMessage]] = set()  # tool calls still running
        self.end_call_turn = -1  # the reply that called end_call
        # What people in a meeting said to each other while a reply was being written: into
        # the history once that reply is stored, so the history stays in the order of speech.
        self.overheard: list[ChatMessage] = []
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
        if turn < 0 or _settled(self.history, turn):
            return
        self.ledger.pass_over(turn)
        await self.stage_error("the replica answering this turn died", retryable=True, turn=turn)
        await self.emit(sj.LLM_DONE, ev.ReplyDone, turn=turn, interrupted=True,
                        error="replica lost", provider=self.provider.name)

    async def stop(self) -> None:
        """Tool calls still running (a cut reply's, which run to their end) may finish within
        the grace, their answers kept, before another replica takes the session over."""
        if self.calls:
            await asyncio.wait(set(self.calls), timeout=self.config.shutdown_grace)
            for task in self.calls:
                task.cancel()  # past the grace: its answer says it was cut
            await asyncio.gather(*self.calls, return_exceptions=True)
        await super().stop()

    @property
    def provider(self) -> LlmFallback:
        """This session's LLM chain (its agent's, if that agent has LLM settings of its own)."""
        return self.service.provider_for(self.start_event.agent)

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
                if event.reason == NOT_ADDRESSED and event.text:
                    await self._overhear(event)
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

        async def close() -> None:
            await self.emit(sj.LLM_DONE, ev.ReplyDone, turn=turn, text=text, provider="voicebus")
            await self._remember("", text, interrupted=False, turn=turn)

        await to_the_end(close(), self.config.shutdown_grace)

    # ---- answering -------------------------------------------------------------------------------

    def messages_for(self, text: str, meeting: bool = False) -> list[ChatMessage]:
        keep = self.history[-2 * self.config.llm_history_turns:] if self.config.llm_history_turns else []
        system = self.agent.instructions or self.config.system_prompt
        if extra := self.start_event.instructions:
            system = f"{system}\n\n{extra}"
        if meeting:
            system = f"{system}\n\n{MEETING_PROMPT}"
        return [ChatMessage("system", system), *model_view(keep), ChatMessage("user", text)]

    async def respond(self, verdict: ev.Verdict, received: float,
                      superseded: asyncio.Task[None] | None, origin: Origin) -> None:
        if superseded is not None:
            # It stores its user message (and what it said) as it closes: the model must see
            # that turn before this one.
            await asyncio.wait([superseded])
        if self.calls:
            # Tool calls of an earlier reply still running (it was cut): the model must see
            # their results. Each is bounded by its tool's timeout.
            await asyncio.wait(set(self.calls))
        turn = verdict.turn
        parts: list[str] = []
        outcome = "ok"
        failure: Exception | None = None  # what broke the reply: told as the reply closes
        provider = self.provider
        messages = self.messages_for(said_by(verdict), meeting=bool(verdict.speaker))
        stream: AsyncIterator[str | ToolCall] | None = None
        meter = usage.metering()  # the tokens of every round, by provider
        try:
            phone = isinstance(self.start_event, ev.PhoneSessionStart)
            offered = (await self.service.tools.offered(self.agent.tools, phone=phone)
                       if self.agent.tools else [])
            for round_ in range(MAX_TOOL_ROUNDS + 1):
                # Not started until iterated; it names the provider that answered (or failed).
                # Tools stay offered in every round: some APIs refuse a conversation holding
                # tool calls without them.
                stream = provider.complete(messages, offered)
                calls = await self._stream_reply(stream, turn, received, parts, origin)
                if not calls or round_ == MAX_TOOL_ROUNDS:
                    break  # (calls past the last round are not run: the reply ends)
                calls = self._unique_ids(calls, turn, round_)
                messages += await self._act(verdict, calls, parts, offered, received, origin)
        except asyncio.CancelledError:
            outcome = "interrupted"
        except Exception as exc:  # a provider failure or a bug: the turn still closes
            outcome, failure = "error", exc
        text, interrupted = "".join(parts), outcome == "interrupted"
        timing = Timing(compute_ms=(time.perf_counter() - received) * 1000)

        async def close() -> None:
            """Announced, metered, into the history: a cut that comes now finds nothing left
            to stop."""
            error = await self.provider_failed(turn, failure, "reply") if failure else ""
            await self.emit(sj.LLM_DONE, ev.ReplyDone, turn=turn, text=text,
                            interrupted=interrupted, error=error,
                            provider=answered_by(stream, provider) if stream else provider.name,
                            end_call=outcome == "ok" and self.end_call_turn == turn,
                            timing=timing)
            await usage.publish(self, meter, turn, interrupted=interrupted)
            metrics.TURNS.labels("llm", outcome).inc()
            await self._settle(turn, said_by(verdict), text, interrupted)

        await to_the_end(close(), self.config.shutdown_grace)

    async def _unstarted(self, turn: int) -> None:
        await self.emit(sj.LLM_DONE, ev.ReplyDone, turn=turn, interrupted=True,
                        provider=self.provider.name)

    async def _stream_reply(self, stream: AsyncIterator[str | ToolCall], turn: int,
                            received: float, parts: list[str], origin: Origin
                            ) -> list[ToolCall]:
        """Speak the model's text as it comes; return the calls it decided on (at its end)."""
        calls: list[ToolCall] = []
        # A round after words already said: keep a space between them.
        gap = bool(parts) and not parts[-1][-1:].isspace()
        # aclosing: a cancelled turn must close the provider's stream at once.
        async with aclosing(stream):
            async for item in stream:
                if isinstance(item, ToolCall):
                    calls.append(item)
                    continue
                if not item:
                    continue
                if gap:
                    item, gap = " " + item, False
                await self._delta(turn, item, parts, received, origin,
                                  answered_by(stream, self.provider))
        return calls

    async def _delta(self, turn: int, text: str, parts: list[str], received: float,
                     origin: Origin, provider: str) -> None:
        elapsed = (time.perf_counter() - received) * 1000
        trace = None
        if not parts:
            metrics.PROVIDER_SECONDS.labels("llm", provider).observe(elapsed / 1000)
            trace = self._first_token(turn, origin, provider)
        await self.emit(sj.LLM_DELTA, ev.ReplyDelta, turn=turn, text=text, trace=trace,
                        index=len(parts), timing=Timing(compute_ms=elapsed))
        parts.append(text)

    # ---- tools -----------------------------------------------------------------------------------

    async def _act(self, verdict: ev.Verdict, calls: list[ToolCall], parts: list[str],
                   offered: list[ToolSpec], received: float, origin: Origin
                   ) -> list[ChatMessage]:
        """The model decided to call tools: the decision goes into the history, each call runs
        once, and what the model must see next (the decision and the answers) comes back."""
        turn = verdict.turn
        draft = self.drafts.get(turn)
        if draft is not None and not draft.confirmed:
            await draft.certain.wait()  # a cancel of the draft cancels this reply meanwhile
        acting = self.acting.setdefault(turn, Acting())
        said = "".join(parts)
        if not acting.user_stored:
            acting.user_stored = True
            self.history.append(ChatMessage("user", said_by(verdict), turn=turn))
        decision = ChatMessage("assistant", said[acting.stored_chars:], turn=turn,
                               tool_calls=tuple(calls))
        acting.stored_chars = len(said)
        self.history.append(decision)
        await self._save()
        specs = {spec.name: spec for spec in offered}
        running = [self._start_call(turn, call, specs.get(call.name)) for call in calls]
        answers = await self._await_calls(turn, running, [specs.get(c.name) for c in calls],
                                          parts, received, origin)
        return [decision, *answers]

    def _unique_ids(self, calls: list[ToolCall], turn: int, round_: int) -> list[ToolCall]:
        """The model's ids, unless one is missing or was seen before in this session (a
        compatible server without ids, a provider counting from 1 again after a restart): an
        answer must find its own decision, and a tool may rely on an id meaning one call."""
        seen = {c.id for m in self.history for c in m.tool_calls}
        unique = []
        for index, call in enumerate(calls):
            if not call.id or call.id in seen:
                call = msgspec.structs.replace(call, id=f"vb{turn}-{round_}-{index}")
            seen.add(call.id)
            unique.append(call)
        return unique

    def _start_call(self, turn: int, call: ToolCall, spec: ToolSpec | None
                    ) -> asyncio.Task[ChatMessage]:
        # Its own task, not the reply's: cutting the reply must not cut a call that started.
        task = asyncio.create_task(self._run_call(turn, call, spec), name=f"tool-{call.name}")
        self.calls.add(task)
        task.add_done_callback(self.calls.discard)
        return task

    async def _await_calls(self, turn: int, running: list[asyncio.Task[ChatMessage]],
                           specs: list[ToolSpec | None], parts: list[str], received: float,
                           origin: Origin) -> list[ChatMessage]:
        together = asyncio.gather(*running)
        try:
            wait = self.agent.filler_ms / 1000
            if self.agent.filler and wait and not "".join(parts).strip():
                done, _ = await asyncio.wait([together], timeout=wait)
                if not done:  # a slow tool and a silent agent: say something meanwhile
                    await self._delta(turn, self.agent.filler.strip() + " ", parts, received,
                                      origin, "voicebus")
            return list(await asyncio.shield(together))
        except asyncio.CancelledError:
            for task, spec in zip(running, specs):
                if spec is not None and spec.cancellable:
                    task.cancel()
            raise

    async def _run_call(self, turn: int, call: ToolCall, spec: ToolSpec | None) -> ChatMessage:
        began = time.perf_counter()
        await self.emit(sj.LLM_TOOL, ev.ToolUse, turn=turn, call_id=call.id[:128],
                        name=call.name[:64], arguments=call.arguments[:16384])
        result, error = "", "cancelled: the user interrupted"
        try:
            if spec is None:
                result, error = "", f"there is no tool named {call.name!r}"
            elif spec.name == END_CALL.name:
                self.end_call_turn = turn
                result, error = json.dumps("The call ends once the user has heard this reply."), ""
            elif spec.name in PHONE_BUILT_IN:
                result, error = await self.service.tools.phone(spec, call, self.session, turn,
                                                               self.next_seq("llm"))
            else:
                result, error = await self.service.tools.call(spec, call, self.session, turn)
        except asyncio.CancelledError:
            raise  # (its answer, below, says the user interrupted)
        except Exception as exc:  # a bug of ours: the model hears that the call failed
            self.log.exception("tool call %s failed in the stage", call.name)
            result, error = "", f"the call failed ({type(exc).__name__})"
        finally:
            ms = (time.perf_counter() - began) * 1000
            if len(result) > MAX_RESULT_CHARS:
                result, error = "", f"the answer was too long ({len(result)} characters)"
            content = json.dumps({"error": error}) if error else result
            answer = ChatMessage("tool", content, turn=turn, tool_call_id=call.id, name=call.name)
            self.history.append(answer)
            metrics.TOOL_CALLS.labels(call.name if spec else "unknown",
                                      "error" if error else "ok").inc()
            if error:
                self.log.info("tool %s failed: %s", call.name, error)
            await self._save()
            await self.emit(sj.LLM_TOOL, ev.ToolUse, turn=turn, call_id=call.id[:128],
                            name=call.name[:64], done=True, result=result[:16384],
                            error=error[:16384], ms=ms)
        return answer

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
        end = False
        if (acting := self.acting.pop(turn, None)) is not None:
            # Its decisions hold the user's words and what was said before each call.
            user, reply = "" if acting.user_stored else user, reply[acting.stored_chars:]
            end = not reply.strip()
        draft = self.drafts.get(turn)
        if draft is None or draft.confirmed:
            self.drafts.pop(turn, None)
            await self._remember(user, reply, interrupted=interrupted, turn=turn, end=end)
        elif draft.dropped:
            del self.drafts[turn]
        else:
            draft.memory = (user, reply, interrupted)

    async def _confirm(self, turn: int) -> None:
        """The final agreed with draft ``turn``: it is the answer, and joins the history."""
        draft = self.drafts[turn]
        draft.certain.set()
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

    async def _save(self) -> None:
        # A long call (a meeting's every line goes in) must stay within a KV value: the oldest
        # messages go, far beyond what the model is shown (llm_history_turns).
        del self.history[:-HISTORY_KEPT]
        await self.bus.put(self.kv, self.session, _history_codec[0].encode(self.history))

    async def _remember(self, user: str, assistant: str, interrupted: bool, turn: int,
                        end: bool = False) -> None:
        if user:
            self.history.append(ChatMessage("user", user, turn=turn))
        if assistant.strip() or end:
            self.history.append(ChatMessage("assistant", assistant if not end else "",
                                            interrupted=interrupted, turn=turn, end=end))
        self.history += self.overheard
        self.overheard.clear()
        if (heard := self.heard.pop(turn, None)) is not None:
            _cut_history(self.history, turn, heard)
        await self._save()

    async def _overhear(self, verdict: ev.Verdict) -> None:
        """A meeting's turn the agent was not asked to answer: the model sees it next time."""
        said = ChatMessage("user", said_by(verdict), turn=verdict.turn)
        if self.reply is not None and not self.reply.done():
            self.overheard.append(said)  # after the reply being written, once it is stored
            return
        self.history.append(said)
        await self._save()

    async def _cut(self, turn: int, heard: int) -> None:
        """The user heard reply ``turn`` only up to character ``heard``: keep just that, marked
        interrupted (nothing heard: no assistant message at all)."""
        settled = turn not in self.acting and any(
            m.role == "assistant" and m.turn == turn for m in self.history)
        if settled:
            _cut_history(self.history, turn, heard)
            await self._save()
            return
        # Not stored (in full) yet: still being written, or closing after a newer turn took over.
        self.heard[turn] = heard
        while len(self.heard) > 64:  # cuts of replies that never had text
            del self.heard[min(self.heard)]


def said_by(verdict: ev.Verdict) -> str:
    """The user's words as the model reads them: in a meeting, after the speaker's name."""
    return f"{verdict.speaker}: {verdict.text}" if verdict.speaker else verdict.text


def _cut_history(history: list[ChatMessage], turn: int, heard: int) -> None:
    """Cut the assistant messages of ``turn`` (its text before each tool call, then the rest:
    consecutive pieces of the reply) to the first ``heard`` characters of the reply. A piece
    left empty goes, unless it holds tool calls (their answers refer to it)."""
    start = 0
    for index in range(len(history)):
        message = history[index]
        if message.role != "assistant" or message.turn != turn:
            continue
        length = len(message.content)
        if heard < start + length:
            text = message.content[:max(0, heard - start)].rstrip()
            history[index] = msgspec.structs.replace(message, content=text, interrupted=True)
        start += length
    history[:] = [m for m in history if not (m.role == "assistant" and m.turn == turn
                                             and not m.content and not m.tool_calls
                                             and not m.end)]


def _settled(history: Sequence[ChatMessage], turn: int) -> bool:
    """Reply ``turn`` reached the history as a whole: a reply without tools, or the end of one
    that called some (the decisions alone are stored before the calls run)."""
    return any(m.turn == turn and m.role == "assistant" and (not m.tool_calls or m.end)
               for m in history)


def model_view(history: Sequence[ChatMessage]) -> list[ChatMessage]:
    """The history as a model must read it: each decision to call tools followed at once by
    the answers to its calls (whatever came between them in time), an answer that was lost
    (its replica died) said to be lost, and answers whose decision is out of view left out."""
    answers = {m.tool_call_id: m for m in history if m.role == "tool"}
    view: list[ChatMessage] = []
    for message in history:
        if message.role == "tool" or message.end:
            continue
        view.append(message)
        for call in message.tool_calls:
            view.append(answers.get(call.id) or ChatMessage(
                "tool", json.dumps({"error": "the result was lost"}), turn=message.turn,
                tool_call_id=call.id, name=call.name))
    return view


class LlmService(ProviderStage[LlmConfig]):
    stage = "llm"
    Config = LlmConfig
    Worker = LlmWorker
    PROVIDERS = PROVIDERS
    Fallback = LlmFallback
    provider: LlmFallback

    async def serve(self, stop: asyncio.Event) -> None:
        self.tools = ToolBox(self.bus.nc)
        await super().serve(stop)
