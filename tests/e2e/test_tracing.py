"""One trace per turn across every process: a spoken question through the five stages (each its
own OS process, real nats-server) reaches a local OTLP/HTTP collector as one trace, a span per
stage, each parented on the stage before it by the context carried in the NATS headers."""

from __future__ import annotations

import pytest
import pytest_asyncio

from proto import events as ev
from proto import subjects as sj
from tests.conftest import running_stack
from tests.fakes.otlp_collector import FakeOtlpCollector, Span
from voicebus.client import Tap, dispatch, end_session
from voicebus.speech import say_to_wav

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

SESSION = "traced"
# The turn's critical path, stage by stage, in the order each span's parent precedes it.
CHAIN = [("voicebus-ingress", "end_of_speech"), ("voicebus-stt", "stt_final"),
         ("voicebus-egress", "end_of_turn"), ("voicebus-llm", "llm_first_token"),
         ("voicebus-tts", "tts_first_audio"), ("voicebus-egress", "playback_start")]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def traced(tmp_path_factory: pytest.TempPathFactory):
    collector = await FakeOtlpCollector().start()
    folder = tmp_path_factory.mktemp("traced")
    question = await say_to_wav("What time is it?", folder / "q.wav", lead_ms=400)
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    async for stack in running_stack(tmp_path_factory, livekit=False, env=env):
        nc = await stack.connect()
        tap = Tap(nc)
        await tap.watch(sj.session_all(SESSION))
        await dispatch(nc, tap, SESSION, wav_in=[str(question)])
        await tap.wait_for(lambda: tap.of(ev.Playback, SESSION, final=True), 60, "the reply played")
        await end_session(nc, SESSION)
        yield collector, tap
        await tap.close()
        await nc.drain()
    await collector.close()


def _turn_chain(spans: list[Span]) -> list[Span] | None:
    """The spans of the chain, all of them, in one trace of the session (None until then)."""
    ours = [s for s in spans if s.attributes.get("voicebus.session") == SESSION]
    for root in (s for s in ours if (s.service, s.name) == CHAIN[0]):
        trace = [s for s in ours if s.trace_id == root.trace_id]
        chain = []
        for service, name in CHAIN:
            found = [s for s in trace if (s.service, s.name) == (service, name)]
            if len(found) != 1:
                break
            chain.append(found[0])
        else:
            return chain
    return None


async def test_a_turn_is_one_trace_with_a_span_per_stage_parented_in_order(traced) -> None:
    collector, tap = traced
    chain = await collector.wait_for(_turn_chain, 20, "trace of the whole turn")
    root, *rest = chain
    assert root.parent_id == ""  # the turn's trace begins at the user's end of speech
    for parent, child in zip(chain, rest):
        assert child.parent_id == parent.span_id, (parent.name, child.name)
        # Each stage's work starts once the stage before it has handed on (clocks: one machine).
        assert child.start_ns >= parent.end_ns - 1_000_000, (parent.name, child.name)
        assert child.end_ns >= child.start_ns
    # Every span names the session; from the STT on (which numbers turns), the turn too.
    final = tap.of(ev.Transcript, SESSION, final=True)[0]
    assert all(s.attributes["voicebus.session"] == SESSION for s in chain)
    assert {s.attributes.get("voicebus.turn") for s in rest} == {final.turn}
    assert chain[3].attributes["voicebus.provider"] == "echo"
    assert chain[2].attributes["voicebus.action"] == "answer"
    assert collector.bad_requests == 0
