"""The egress part of a turn's trace, with the SDK's in-memory exporter: the judge's span and
the playback span go on from the headers that came in, and an interruption hangs off the
playback it cut. Off, nothing is recorded and no headers are made."""

from __future__ import annotations

import time

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proto import events as ev
from services.egress.traces import TurnTraces
from services.runtime import tracing


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    tracing.setup("egress", "test", exporter=exporter)
    yield exporter
    tracing.shutdown()


def _arriving(headers: tracing.Headers | None, call, *args):
    token = tracing.CARRIED.set(headers)
    try:
        return call(*args)
    finally:
        tracing.CARRIED.reset(token)


def test_off_records_nothing_and_carries_nothing():
    assert not tracing.enabled()
    assert tracing.stage_span("stt_final", session="s", start_ns=1) is None
    traces = TurnTraces()
    traces.final(1)
    assert traces.judged("s", 1, "answer") is None


def test_egress_spans_chain_on_what_came_in_and_the_cut_hangs_off_the_playback(spans):
    upstream = tracing.stage_span("stt_final", session="s", turn=1, start_ns=time.time_ns())
    traces = TurnTraces()
    traces.vad(ev.SpeechEnded(session="s", pts_ms=900, timing=ev.Timing(
        last_speech_ts_ns=time.time_ns() - 300_000_000)))
    _arriving(upstream, traces.final, 1)
    judged = traces.judged("s", 1, "answer")
    tts = tracing.stage_span("tts_first_audio", session="s", turn=1, parent=judged,
                             start_ns=time.time_ns())
    _arriving(tts, traces.first_audio, 1)
    _arriving(None, traces.first_audio, 1)  # later frames carry no headers: the first counts
    traces.playing("s", 1)
    traces.vad(ev.SpeechStarted(session="s", pts_ms=2000))
    assert traces.interrupted("s", 1, "barge-in") is not None

    by_name = {s.name: s for s in spans.get_finished_spans()}
    assert set(by_name) == {"stt_final", "end_of_turn", "tts_first_audio", "playback_start",
                            "interruption"}
    assert len({s.context.trace_id for s in by_name.values()}) == 1
    for child, parent in (("end_of_turn", "stt_final"), ("tts_first_audio", "end_of_turn"),
                          ("playback_start", "tts_first_audio"),
                          ("interruption", "playback_start")):
        assert by_name[child].parent.span_id == by_name[parent].context.span_id, child
    cut = by_name["interruption"]
    assert cut.attributes["voicebus.reason"] == "barge-in"
    assert cut.attributes["voicebus.turn"] == 1 and cut.attributes["voicebus.session"] == "s"
    assert by_name["end_of_turn"].attributes["voicebus.action"] == "answer"


def test_a_turn_is_forgotten_with_the_turns_before_it(spans):
    traces = TurnTraces()
    upstream = {turn: tracing.stage_span("stt_final", session="s", turn=turn,
                                         start_ns=time.time_ns()) for turn in (1, 2, 3)}
    for turn in (1, 2, 3):
        _arriving(upstream[turn], traces.final, turn)
    traces.forget(2)
    for turn in (1, 3):
        traces.judged("s", turn, "answer")
    judged = {s.attributes["voicebus.turn"]: s for s in spans.get_finished_spans()
              if s.name == "end_of_turn"}
    assert judged[1].parent is None  # forgotten: the verdict starts a trace of its own
    finals = {s.attributes["voicebus.turn"]: s for s in spans.get_finished_spans()
              if s.name == "stt_final"}
    assert judged[3].parent.span_id == finals[3].context.span_id
