"""The judge's and the agent's spans of each turn's trace, and the latencies only egress sees
whole: the end-of-utterance delay (the user's last word to the judge's verdict) and the
end-to-end latency (the user's last word to the first frame of the reply played).

Kept per turn from the events as they arrive; a turn is forgotten once its reply has played.
Times are taken whether tracing is on or off: the Prometheus histograms need them either way.
"""

from __future__ import annotations

import time

from proto import events as ev
from services.runtime import metrics, tracing


class _Turn:
    __slots__ = ("final", "final_ns", "last_speech_ns", "judged", "audio", "audio_ns", "played")

    def __init__(self) -> None:
        self.final: tracing.Headers | None = None  # the STT's span, from the final's headers
        self.final_ns = 0
        self.last_speech_ns = 0  # the user's last word before the final
        self.judged: tracing.Headers | None = None
        self.audio: tracing.Headers | None = None  # the TTS's span, from the first frame
        self.audio_ns = 0
        self.played: tracing.Headers | None = None


class TurnTraces:
    def __init__(self) -> None:
        self._turns: dict[int, _Turn] = {}
        self._last_speech_ns = 0
        self._speech_started_ns = 0

    def _turn(self, turn: int) -> _Turn:
        state = self._turns.get(turn)
        if state is None:
            state = self._turns[turn] = _Turn()
        return state

    def vad(self, event: ev.SpeechStarted | ev.SpeechEnded) -> None:
        if isinstance(event, ev.SpeechStarted):
            self._speech_started_ns = time.time_ns()
        elif event.timing is not None and event.timing.last_speech_ts_ns:
            self._last_speech_ns = event.timing.last_speech_ts_ns

    def final(self, turn: int) -> None:
        state = self._turn(turn)
        state.final, state.final_ns = tracing.received(), time.time_ns()
        state.last_speech_ns = self._last_speech_ns

    def judged(self, session: str, turn: int, action: ev.VerdictAction) -> tracing.Headers | None:
        """The verdict on ``turn`` is out: its span, from the final (the agent's own turns —
        greeting, prompts — start a trace here)."""
        state = self._turn(turn)
        now = time.time_ns()
        if action == "answer" and state.last_speech_ns:
            metrics.END_OF_UTTERANCE_DELAY.observe(max(0.0, (now - state.last_speech_ns) / 1e9))
        state.judged = tracing.stage_span("end_of_turn", session=session, turn=turn,
                                          parent=state.final, start_ns=state.final_ns or now,
                                          end_ns=now, action=action)
        return state.judged

    def first_audio(self, turn: int) -> None:
        state = self._turn(turn)
        if not state.audio_ns:
            state.audio, state.audio_ns = tracing.received(), time.time_ns()

    def playing(self, session: str, turn: int) -> None:
        """The first frame of ``turn``'s reply went out to the user."""
        state = self._turn(turn)
        now = time.time_ns()
        if state.last_speech_ns:
            metrics.E2E_LATENCY.observe(max(0.0, (now - state.last_speech_ns) / 1e9))
        state.played = tracing.stage_span("playback_start", session=session, turn=turn,
                                          parent=state.audio, start_ns=state.audio_ns or now,
                                          end_ns=now)

    def interrupted(self, session: str, turn: int, reason: str) -> tracing.Headers | None:
        """``turn``'s reply was cut: a span from the user's speech that cut it to the cut."""
        state = self._turns.get(turn) or _Turn()
        now = time.time_ns()
        started = self._speech_started_ns if 0 < self._speech_started_ns <= now else now
        return tracing.stage_span("interruption", session=session, turn=turn,
                                  parent=state.played or state.judged, start_ns=started,
                                  end_ns=now, reason=reason)

    def forget(self, turn: int) -> None:
        """``turn`` is over: it and every turn before it."""
        for old in [t for t in self._turns if t <= turn]:
            del self._turns[old]
