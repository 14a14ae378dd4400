"""STT stage: ingress audio + VAD edges in, partial and final transcripts out.

Only speech is decoded: frames are kept in a short pre-roll while the user is silent, and an
utterance runs from ``SpeechStarted`` (plus pre-roll) to ``SpeechEnded``. An utterance opens the
next turn, unless the previous turn's final is still held back (``endpoint.py``: a phrase left
hanging waits for more speech): then it continues that turn, and the turn ends in one final of
all its words. A message the user typed (``UserText``) is a turn of its own, with a final
marked ``typed``, after every turn already open. The turn counter lives in JetStream KV so
another replica can carry on.

In a meeting each speaker's audio (``AudioFrame.speaker``) is an utterance stream of its own:
two people talking at once are two turns, numbered as they started, transcribed side by side,
and closed in that order (a turn's final waits for the finals of those before it), so the judge
sees every turn, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import aclosing

from nats.js.errors import KeyNotFoundError

from proto import events as ev
from proto import subjects as sj
from proto.events import Timing
from services.runtime import metrics, tracing, usage
from services.runtime.audio import frame_problem
from services.runtime.bus import SeqGaps
from services.runtime.fallback import READY_END, FallbackAdapter, answered_by
from services.runtime.ledger import FloorRecord, TurnLedger
from services.runtime.service import ProviderStage, SessionWorker
from services.runtime.turns import words
from services.stt.config import SttConfig
from services.stt.endpoint import EndOfTurnHolds, IdleWatch, TurnSoFar
from services.stt.provider import (PROVIDERS, SAMPLE_RATE, SttProvider, SttResult,
                                   WantPartials)

STATE_BUCKET = "voicebus_sessions"
# An utterance longer than this is closed without waiting for the VAD (a lost SpeechEnded).
MAX_UTTERANCE_FRAMES = 30 * 50
# …and, should its frames stop coming, this long after it could have been that long.
UTTERANCE_GRACE_S = 5.0
# Keypad keys: this long after the last key (or at "#") they are a turn, which the judge weighs
# like an utterance of KEYS_SPEECH_MS (long enough to interrupt the agent).
KEYS_PAUSE_S = 1.0
KEYS_SPEECH_MS = 600
# A turn's usage goes out however the turn ended; a cancelled one (the session is closing)
# waits at most this long for it.
USAGE_PUBLISH_TIMEOUT_S = 1.0
# A probe: half a second of silence (20 ms frames).
_PROBE_FRAMES = 25
_SILENCE = bytes(SAMPLE_RATE * 2 // 50)


class SttFallback(FallbackAdapter[SttProvider]):
    """The STT chain, itself an ``SttProvider``. The utterance's frames are kept so the next
    provider hears it from the start; the budget for the final runs from the end of speech (a
    provider cannot be asked for a final before it has heard everything). Only the final
    commits: a provider that fails or stalls after partials hands the utterance on."""

    stage = "stt"

    def commits(self, item: SttResult) -> bool:
        # Partials are shown but bind nothing: until a final, the utterance can move on.
        return item.final

    def stream(self, frames: AsyncIterator[bytes], *,
               partials: WantPartials = None) -> AsyncIterator[SttResult]:
        return self.run(lambda provider, replay: provider.stream(replay, partials=partials),
                        frames, READY_END)

    async def probe(self, provider: SttProvider) -> None:
        async def silence() -> AsyncIterator[bytes]:
            for _ in range(_PROBE_FRAMES):
                yield _SILENCE

        async with aclosing(provider.stream(silence())) as results:
            async for _ in results:
                pass


class Utterance:
    """Frames of one utterance on their way to the provider."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.frames = 0
        self.speech_frames = 0  # after the speech edge (the pre-roll is not speech)
        self.vad_speech_ms = 0
        self.ended_at = 0.0
        self.dropped = 0
        # The turn's trace so far and the user's last word (from the VAD's SpeechEnded).
        self.trace: tracing.Headers | None = None
        self.ended_ns = 0
        self.last_speech_ns = 0
        self.deadline: asyncio.TimerHandle | None = None  # when it is ended without its edge
        # Begun while the agent only listened: its partials are not wanted while that lasts.
        self.began_listened_to = False

    def push(self, pcm: bytes, *, speech: bool = True) -> None:
        self.frames += 1
        self.speech_frames += int(speech)
        self.queue.put_nowait(pcm)

    def end(self, edge: ev.SpeechEnded | None = None) -> None:
        """End of speech: the VAD's edge, or None when the VAD did not close it."""
        if not self.ended_at:
            self.ended_at = time.perf_counter()
            self.ended_ns = time.time_ns()
            if edge is not None:
                self.vad_speech_ms = edge.speech_ms
                self.last_speech_ns = edge.timing.last_speech_ts_ns if edge.timing else 0
                self.trace = tracing.received()
            self.queue.put_nowait(None)

    @property
    def speech_ms(self) -> int:
        return self.vad_speech_ms or self.speech_frames * ev.FRAME_MS

    async def frames_iter(self) -> AsyncIterator[bytes]:
        while (pcm := await self.queue.get()) is not None:
            yield pcm


def _hold_left(hold: int, last: Utterance | None) -> int:
    """What is left of a ``hold`` (ms) counted from the end of the turn's ``last`` utterance."""
    if last is None or not last.ended_at:
        return hold
    return max(0, hold - round((time.perf_counter() - last.ended_at) * 1000))


class OpenTurn:
    """A turn whose final has not been published yet. Its utterances are transcribed in order
    (a continuation's partials show the words before it), by one task."""

    def __init__(self, turn: int, speaker: str = "") -> None:
        self.speaker = speaker
        self.so_far = TurnSoFar(turn)
        self.pending: deque[Utterance] = deque()
        self.more = asyncio.Event()
        self.compute_ms = 0.0  # of the last utterance: end of speech to its provider final
        self.provider = ""
        self.last: Utterance | None = None
        # The user typed meanwhile: they are done speaking this turn, so no hold for more.
        self.typed_after = False
        # The words of a settled transcript published before the end of speech (the provider
        # knew them early), which the final must repeat for the draft to stand.
        self.early: str | None = None

    def add(self, utterance: Utterance) -> None:
        self.pending.append(utterance)
        self.last = utterance
        self.more.set()


class SttWorker(SessionWorker[SttConfig]):
    service: SttService

    async def subscribe_inputs(self) -> None:
        self.kv = await self.bus.key_value(STATE_BUCKET, ttl=self.config.state_ttl)
        self.turn = await self._load_turn()
        # The STT opens the user's turns, one step at a time, from the counter it keeps in KV.
        self.ledger = TurnLedger(newest=self.turn)
        # By speaker ("": the session's one user): audio before speech, the utterance being
        # heard, and the turn still open.
        self.preroll: dict[str, deque[bytes]] = {}
        self.utterances: dict[str, Utterance] = {}
        self.open_turns: dict[str, OpenTurn] = {}
        self.turn_closed = asyncio.Event()  # a turn left the ledger: a later final may go
        self.holds = EndOfTurnHolds(self.config.stt_eot_question_ms,
                                    self.config.stt_eot_statement_ms,
                                    self.config.stt_eot_incomplete_ms,
                                    self.config.stt_eot_brief_ms)
        self.user_idle = IdleWatch()
        self.agent_state_heard = False  # an AgentState came since this replica subscribed
        self.idle_timer: asyncio.Task[None] | None = None
        self.gaps = SeqGaps()
        self.keys = ""  # keypad keys pressed, not yet a turn
        self.keys_timer: asyncio.TimerHandle | None = None
        # Messages the user typed, waiting for the turns still open to end.
        self.typed: deque[tuple[str, str]] = deque()  # (text, speaker)
        # One subscription for audio and VAD keeps them in publish order.
        await self.subscribe(sj.producer_all(self.session, "ingress"), self.handle)
        # The agent's state: whether the user-idle timer may run, and whether words known
        # early are an answer to prepare (the agent listens) or not.
        if self.config.stt_user_idle_s > 0 or self.config.stt_early_drafts:
            await self.subscribe(sj.FLOOR_STATE.subject(self.session), self.handle)

    async def on_taken_over(self, record: FloorRecord) -> None:
        """The agent's state is published when it changes, so a replica that takes a session
        over would not know it until the next change: no user-idle turn and no early drafts
        while the agent goes on listening (and a user who walked away would never be told
        goodbye). The judge's record tells: the greeting is over and no reply holds the floor,
        so the agent listens. An AgentState heard meanwhile is newer and stands."""
        if not self.agent_state_heard:
            self.user_idle.agent_state("initializing" if not record.greeted
                                       else "listening" if record.reply < 0 else "thinking")
            self._activity_changed()

    async def _load_turn(self) -> int:
        try:
            entry = await self.bus.get(self.kv, f"{self.session}.turn")
        except KeyNotFoundError:  # a new session (any other KV error fails the claim)
            return 0
        return int(entry.value or b"0")

    async def _save_turn(self) -> None:
        # The highest turn opened, not the one just closed: a turn id is never used twice.
        await self.bus.put(self.kv, f"{self.session}.turn", str(self.turn).encode())

    # ---- ingress ---------------------------------------------------------------------------

    def handle(self, event: ev.Event) -> None:
        if isinstance(event, ev.AgentState):
            self.agent_state_heard = True
            self.user_idle.agent_state(event.state)
            self._activity_changed()
            return
        if lost := self.gaps.lost(event):
            metrics.FRAMES_DROPPED.labels("stt").inc(lost)
            for utterance in self.utterances.values():
                utterance.dropped += lost
        match event:
            case ev.AudioFrame():
                self.on_audio(event)
            case ev.SpeechStarted():
                self.begin_utterance(event.speaker)
            case ev.SpeechEnded() if event.speaker in self.utterances:
                self.end_utterance(event.speaker, event)
            case ev.Dtmf():
                self.on_key(event.digit)
            case ev.UserText():
                self.on_text(event.text, event.speaker)
            case ev.InputTrack(active=False) if event.speaker in self.utterances:
                # A speaker's microphone went away mid-sentence (and a replica of ingress may
                # have gone with it): their utterance ends here, not never.
                self.end_utterance(event.speaker)

    def on_audio(self, frame: ev.AudioFrame) -> None:
        if problem := frame_problem(frame, SAMPLE_RATE):
            self.bus.reject("bad_audio", problem, sj.INGRESS_AUDIO.subject(self.session))
            return
        utterance = self.utterances.get(frame.speaker)
        if utterance is None:
            self._preroll(frame.speaker).append(frame.pcm)
            return
        utterance.push(frame.pcm)
        if utterance.frames >= MAX_UTTERANCE_FRAMES:
            self.end_utterance(frame.speaker)

    def _preroll(self, speaker: str) -> deque[bytes]:
        preroll = self.preroll.get(speaker)
        if preroll is None:
            preroll = self.preroll[speaker] = deque(
                maxlen=max(1, self.config.stt_preroll_ms // 20))
        return preroll

    def begin_utterance(self, speaker: str = "") -> None:
        if speaker in self.utterances:
            self.end_utterance(speaker)  # its SpeechEnded was lost
        self.user_idle.user_spoke()
        utterance = Utterance()
        utterance.began_listened_to = self.user_idle.listening
        preroll = self._preroll(speaker)
        for pcm in preroll:
            utterance.push(pcm, speech=False)
        preroll.clear()
        self.utterances[speaker] = utterance
        # Frames that stop coming (ingress lost, the speaker gone without a word) must not keep
        # the utterance, and every turn after it, open: ended after the longest one there is.
        utterance.deadline = asyncio.get_running_loop().call_later(
            MAX_UTTERANCE_FRAMES * ev.FRAME_MS / 1000 + UTTERANCE_GRACE_S,
            self._end_if_open, speaker, utterance)
        open_turn = self.open_turns.get(speaker)
        if open_turn is None:
            self.turn += 1
            self.ledger.open(self.turn)
            open_turn = self.open_turns[speaker] = OpenTurn(self.turn, speaker)
            self.spawn(self.run_turn(open_turn), f"turn-{self.turn}")
        open_turn.add(utterance)  # a held final's turn goes on with this utterance
        self._activity_changed()

    def _end_if_open(self, speaker: str, utterance: Utterance) -> None:
        if self.utterances.get(speaker) is utterance:
            self.log.warning("%s's utterance got no end from ingress: ended", speaker or "the user")
            self.end_utterance(speaker)

    def end_utterance(self, speaker: str, edge: ev.SpeechEnded | None = None) -> None:
        utterance = self.utterances.pop(speaker)
        utterance.end(edge)
        if utterance.deadline is not None:
            utterance.deadline.cancel()
        self._activity_changed()

    def _close(self, turn: int) -> None:
        self.ledger.close(turn)
        self.turn_closed.set()

    def _earlier_open(self, turn: int) -> bool:
        return any(other < turn for other in self.ledger.open_turns)

    async def _after_earlier_turns(self, turn: int) -> None:
        """Wait until every turn opened before ``turn`` (another speaker's) has closed: the
        judge takes turns in order, and drops one older than a turn it has judged."""
        while self._earlier_open(turn):
            self.turn_closed.clear()
            await self.turn_closed.wait()

    # ---- one turn: its utterances, the end-of-turn hold, its final ---------------------------

    async def run_turn(self, open_turn: OpenTurn) -> None:
        so_far = open_turn.so_far
        meter = usage.metering()  # the audio each provider heard in this turn
        heard = False  # the turn's speech is over: its final is next
        try:
            while True:
                failed = False
                while open_turn.pending:
                    failed = not await self.transcribe(open_turn, open_turn.pending.popleft())
                if open_turn.early is not None and (failed or open_turn.early != so_far.text):
                    # Settled early on words the speech then changed: that draft is dropped,
                    # and the next turn answers the words as they are now.
                    open_turn.early = None
                    await self._carry_on(so_far, open_turn.speaker)
                settled, open_turn.early = open_turn.early is not None, None
                hold = 0 if failed or open_turn.typed_after else self.holds.hold_ms(so_far.text)
                if hold and not open_turn.pending:
                    if not settled and self._may_draft(open_turn, so_far.text, hold):
                        # The words are all there: the agent may prepare its answer meanwhile.
                        await self._emit_settled(open_turn, so_far.text, hold,
                                                 open_turn.provider)
                        settled = True
                    # The wait runs from the end of speech: speech that resumed while the
                    # final was decoded is in ``pending`` already, so that time counts.
                    hold = _hold_left(hold, open_turn.last)
                    open_turn.more.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(hold / 1000):
                            await open_turn.more.wait()  # the user speaks again: same turn
                if not open_turn.pending:
                    break
                if settled:
                    await self._carry_on(so_far, open_turn.speaker)
                self.log.debug("turn %d goes on after %r", so_far.turn, so_far.text)
            heard = True
        finally:
            # No await since the last look at ``pending``: speech from now on opens the next
            # turn (and a turn that died of a bug does not swallow the speech after it).
            if self.open_turns.get(open_turn.speaker) is open_turn:
                del self.open_turns[open_turn.speaker]
            if not heard:  # cancelled (the session ends) or a bug: the audio heard is billed
                try:
                    await self._publish_usage(meter, so_far.turn, interrupted=True)
                finally:
                    # No final will come: another speaker's later turn must not wait for it.
                    self._close(so_far.turn)
                    self._activity_changed()
        cancelled = False
        try:
            await self._after_earlier_turns(so_far.turn)
            last = open_turn.last
            trace = tracing.stage_span(
                "stt_final", session=self.session, turn=so_far.turn, parent=last and last.trace,
                start_ns=last.ended_ns if last else 0, provider=open_turn.provider, hold_ms=hold)
            if last is not None and last.last_speech_ns:
                metrics.TRANSCRIPTION_DELAY.labels(open_turn.provider).observe(
                    max(0.0, (time.time_ns() - last.last_speech_ns) / 1e9))
            await self.emit(sj.STT_FINAL, ev.Transcript, turn=so_far.turn, text=so_far.text,
                            trace=trace,
                            final=True, confidence=so_far.confidence,
                            frames_dropped=so_far.frames_dropped, provider=open_turn.provider,
                            speech_ms=so_far.speech_ms, speaker=open_turn.speaker,
                            timing=Timing(compute_ms=open_turn.compute_ms, hold_ms=hold))
            metrics.TURNS.labels("stt", "ok" if so_far.text else "empty").inc()
            await self._save_turn()
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            try:  # before the ledger settles: a hand-over waits for that, not for this
                await self._publish_usage(meter, so_far.turn, interrupted=cancelled)
            finally:
                self._close(so_far.turn)
                self._activity_changed()

    async def _publish_usage(self, meter: usage.Meter, turn: int, *, interrupted: bool) -> None:
        """The turn's usage, however it ended. Never raises (it must not hide how the turn
        ended) and is bounded (a cancelled turn's session is closing)."""
        try:
            async with asyncio.timeout(USAGE_PUBLISH_TIMEOUT_S):
                await usage.publish(self, meter, turn, interrupted=interrupted)
        except Exception:
            self.log.warning("turn %d: its usage was not published", turn, exc_info=True)

    def _may_draft(self, open_turn: OpenTurn, text: str, hold: int) -> bool:
        """Whether the words ``text`` may go out settled, for the agent to prepare its answer
        while the final is held back ``hold`` ms."""
        return (0 < self.config.stt_preemptive_max_hold_ms and
                hold <= self.config.stt_preemptive_max_hold_ms and bool(words(text))
                and not open_turn.typed_after and not self._earlier_open(open_turn.so_far.turn))

    def _want_partials(self, utt: Utterance) -> bool:
        """Partials are read by the judge while a reply is in flight (whether the user's
        words cut it) and by a page showing the user's words live. An utterance that began
        while the agent only listened, and goes on while it still does, wants none unless
        ``stt_partials_while_listening``: with Whisper each one decodes the utterance again, and
        those decodes slowed the final's, and so the answer (docs/turn-taking.md, "Partials").
        A reply that starts brings them back. An utterance begun over a reply keeps them, also
        once the judge pauses the reply and shows "listening"."""
        return (self.config.stt_partials_while_listening or not utt.began_listened_to
                or not self.user_idle.listening)

    async def _settle_early(self, open_turn: OpenTurn, text: str, provider: str) -> None:
        """The provider knows the utterance's words before its end of speech (a stable
        partial): they go out settled now, so the answer is prepared during the VAD's silence
        window as well as the hold. Once per turn, and only while the agent listens (over its
        reply, words are not an answer to prepare but maybe an interruption, which the final
        decides); the final decides whether the draft stands."""
        text = open_turn.so_far.shown(text)
        if (open_turn.early is not None or open_turn.pending or not self.config.stt_early_drafts
                or not self.user_idle.listening):
            return
        hold = self.holds.hold_ms(text)
        if not self._may_draft(open_turn, text, hold):
            return
        open_turn.early = text
        await self._emit_settled(open_turn, text, hold, provider)

    async def _emit_settled(self, open_turn: OpenTurn, text: str, hold: int,
                            provider: str) -> None:
        """The turn's words ``text`` out as settled: the agent may prepare its answer while the
        final is held back ``hold`` ms."""
        await self.emit(sj.STT_PARTIAL, ev.Transcript, turn=open_turn.so_far.turn, text=text,
                        settled=True, provider=provider, speech_ms=open_turn.so_far.speech_ms,
                        timing=Timing(hold_ms=hold), speaker=open_turn.speaker)

    async def _carry_on(self, so_far: TurnSoFar, speaker: str) -> None:
        """The user spoke again after the turn's words went out settled (an answer to them may
        be on its way): the turn ends unanswered, and the next one carries its words on."""
        ended = so_far.turn
        self.turn += 1
        self.ledger.open(self.turn)
        so_far.turn = self.turn
        try:
            await self._after_earlier_turns(ended)
            await self.emit(sj.STT_FINAL, ev.Transcript, turn=ended, text=so_far.text,
                            final=True, continued=True, provider="",
                            speech_ms=so_far.speech_ms, speaker=speaker)
            metrics.TURNS.labels("stt", "continued").inc()
            await self._save_turn()
        finally:
            self._close(ended)

    async def transcribe(self, open_turn: OpenTurn, utt: Utterance) -> bool:
        """Transcribe one utterance into the turn; False when every provider failed (the turn
        then ends at once with what it has)."""
        so_far, provider = open_turn.so_far, self.service.provider_for(self.start_event.agent)
        text, confidence, ok = "", 0.0, True
        try:
            # Closed on every way out (a cancelled turn too): a provider's socket must not
            # outlive its turn.
            async with contextlib.aclosing(provider.stream(
                    utt.frames_iter(), partials=lambda: self._want_partials(utt))) as stream:
                async for result in stream:
                    name = answered_by(stream, provider)
                    if result.stable:
                        await self._settle_early(open_turn, result.text, name)
                        continue
                    if not result.final:
                        await self.emit(sj.STT_PARTIAL, ev.Transcript, turn=so_far.turn,
                                        text=so_far.shown(result.text), provider=name,
                                        speaker=open_turn.speaker)
                        continue
                    text, confidence = result.text, result.confidence
                    compute = time.perf_counter() - utt.ended_at
                    metrics.PROVIDER_SECONDS.labels("stt", name).observe(compute)
                    open_turn.compute_ms, open_turn.provider = compute * 1000, name
        except Exception as exc:  # a provider failure or a bug: the turn still closes
            await self.provider_failed(so_far.turn, exc, "transcription")
            ok = False
        so_far.add(text, utt.speech_ms, utt.dropped, confidence)
        return ok

    # ---- the keypad ------------------------------------------------------------------------

    async def stop(self) -> None:
        if self.keys_timer is not None:
            self.keys_timer.cancel()
        for utterance in self.utterances.values():
            if utterance.deadline is not None:
                utterance.deadline.cancel()

    def on_key(self, digit: str) -> None:
        """A key pressed on the phone. Keys make a turn of their own, like words: when "#" is
        pressed, or KEYS_PAUSE_S after the last key, the judge gets "(keypad: 12#)"."""
        self.keys += digit
        if self.keys_timer is not None:
            self.keys_timer.cancel()
        wait = 0.0 if digit == "#" else KEYS_PAUSE_S
        self.keys_timer = asyncio.get_running_loop().call_later(
            wait, lambda: self.spawn(self._keys_turn(), "keypad"))

    async def _keys_turn(self) -> None:
        self.keys_timer = None
        if self.open_turns or self.ledger.open_turns:
            # The user is speaking too (or a turn waits for its final): the spoken turn goes first, the keys right after.
            self.keys_timer = asyncio.get_running_loop().call_later(
                KEYS_PAUSE_S / 2, lambda: self.spawn(self._keys_turn(), "keypad"))
            return
        keys, self.keys = self.keys, ""
        if not keys:
            return
        self.user_idle.user_spoke()
        self.turn += 1
        turn = self.turn
        self.ledger.open(turn)
        self._activity_changed()
        try:
            # As long as a sentence for the judge: keys over the agent's reply interrupt it.
            await self.emit(sj.STT_FINAL, ev.Transcript, turn=turn, text=f"(keypad: {keys})",
                            final=True, confidence=1.0, provider="keypad",
                            speech_ms=KEYS_SPEECH_MS)
            metrics.TURNS.labels("stt", "keypad").inc()
            await self._save_turn()
        finally:
            self._close(turn)
            self._activity_changed()

    # ---- typed messages --------------------------------------------------------------------

    def on_text(self, text: str, speaker: str = "") -> None:
        """A message the user typed: a turn of its own once every turn open now has ended.
        Turns are judged in order and a turn older than one judged is dropped, so a spoken turn
        under way keeps its number and goes first; its end-of-turn hold is cut short, as the
        user has turned to the keyboard."""
        self.typed.append((text, speaker))
        if (open_turn := self.open_turns.get(speaker)) is not None:
            open_turn.typed_after = True
            open_turn.more.set()  # wakes a hold in progress; ``pending`` is unchanged
        self._activity_changed()

    def _take_typed(self) -> None:
        if not self.typed or self.ledger.open_turns:
            return
        text, speaker = self.typed.popleft()
        self.user_idle.user_spoke()
        self.turn += 1
        self.ledger.open(self.turn)
        self.spawn(self._typed_turn(self.turn, text, speaker), f"typed-{self.turn}")

    async def _typed_turn(self, turn: int, text: str, speaker: str) -> None:
        try:
            # No speech: the judge answers it whoever holds the floor (barge-in rules are for
            # speech), and it is one final with nothing before it.
            await self.emit(sj.STT_FINAL, ev.Transcript, turn=turn, text=text, final=True,
                            confidence=1.0, provider="typed", typed=True, speaker=speaker)
            metrics.TURNS.labels("stt", "typed").inc()
            await self._save_turn()
        finally:
            self._close(turn)
            self._activity_changed()

    # ---- user idle -----------------------------------------------------------------------

    def _activity_changed(self) -> None:
        """The user or a turn started or stopped: a typed message waiting for the turns open
        may go, and the user-idle timer keeps in step."""
        self._take_typed()
        busy = bool(self.utterances) or bool(self.ledger.open_turns) or bool(self.typed)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.config.stt_user_idle_s > 0 and self.user_idle.may_run(busy):
            self.idle_timer = self.spawn(self._user_idle_after(self.config.stt_user_idle_s),
                                         "user-idle")

    async def _user_idle_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        # From here on the idle turn is taken: nothing cancels this task but the session's end.
        self.idle_timer = None
        count = self.user_idle.fire()
        self.turn += 1
        turn = self.turn
        self.ledger.open(turn)
        self._activity_changed()
        try:
            # A turn with no speech: the judge has the agent re-prompt or say goodbye.
            await self.emit(sj.STT_IDLE, ev.UserIdle, turn=turn, count=count)
            metrics.TURNS.labels("stt", "idle").inc()
            await self._save_turn()
        finally:
            self._close(turn)
            self._activity_changed()


class SttService(ProviderStage[SttConfig]):
    stage = "stt"
    Config = SttConfig
    Worker = SttWorker
    PROVIDERS = PROVIDERS
    Fallback = SttFallback
    provider: SttFallback
