"""Usage and cost per turn (services/runtime/usage.py): the price table, token shapes, what a
fallback chain charges to each provider, the events and counters a turn ends with, and how the
session's record shows them (voicebus/timeline.py)."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import REGISTRY

from proto import codec
from proto import events as ev
from proto import permissions
from proto import subjects as sj
from services.llm.provider import ChatMessage
from services.llm.service import LlmFallback
from services.runtime import usage
from services.runtime.errors import APIStatusError, ConfigError
from services.runtime.service import SessionWorker
from services.stt.provider import SttResult
from services.stt.service import SttFallback
from services.tts.provider import SpokenAudio
from services.tts.service import TtsFallback
from voicebus import replay, timeline
from voicebus.record import Entry

_ids = itertools.count()
FRAME = bytes(640)  # 20 ms at 16 kHz


def unique(name: str) -> str:
    """Provider names unique per test: the prometheus registry is process-wide."""
    return f"{name}{next(_ids)}"


def sample(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


# ---- the price table -----------------------------------------------------------------------


def test_inline_prices_are_usd_per_unit_with_amounts() -> None:
    prices = usage.load_prices(
        "llm.openai.input_tokens=0.15/1M, llm.openai.output_tokens=0.6/1M;"
        "stt.deepgram.audio_in_s=0.0043/min,tts.cartesia.characters=0.03/1k,"
        "tts.cartesia.audio_out_s=0.36/h,llm.openai.requests=0.001")
    assert prices.table[("llm", "openai")] == pytest.approx(
        {"input_tokens": 0.15e-6, "output_tokens": 0.6e-6, "requests": 0.001})
    assert prices.table[("stt", "deepgram")] == pytest.approx({"audio_in_s": 0.0043 / 60})
    assert prices.table[("tts", "cartesia")] == pytest.approx(
        {"characters": 0.03e-3, "audio_out_s": 0.0001})
    assert not usage.load_prices("") and not usage.load_prices("  ")


def test_a_toml_price_file_says_the_same(tmp_path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text('[llm.openai]\ninput_tokens = "0.15/1M"\ncached_tokens = "0.075/1M"\n'
                    'output_tokens = 6e-7\n\n[stt.deepgram]\naudio_in_s = "0.0043/60"\n')
    prices = usage.load_prices(str(path))
    assert set(prices.table) == {("llm", "openai"), ("stt", "deepgram")}
    assert prices.table[("llm", "openai")] == pytest.approx(
        {"input_tokens": 0.15e-6, "cached_tokens": 0.075e-6, "output_tokens": 6e-7})
    assert prices.table[("stt", "deepgram")] == pytest.approx({"audio_in_s": 0.0043 / 60})


@pytest.mark.parametrize(("value", "says"), [
    ("llm.openai=1", "stage.provider.unit"),
    ("egress.x.requests=1", "the stage is one of"),
    ("stt.deepgram.characters=1", "stt stage's units are requests, audio_in_s"),
    ("llm.openai.bananas=1", "llm stage's units"),
    ("llm.openai.input_tokens=-1", "a price is a number"),
    ("llm.openai.input_tokens=cheap", "a price is a number"),
    ("llm.openai.input_tokens=1/0", "a price is a number"),
    ("llm.openai.input_tokens=nan", "a price is a number"),
    ("/nowhere/prices.toml", "VOICEBUS_PRICES=/nowhere/prices.toml"),
])
def test_a_bad_price_table_fails_naming_the_entry(value: str, says: str) -> None:
    with pytest.raises(ConfigError, match="VOICEBUS_PRICES") as caught:
        usage.load_prices(value)
    assert says in str(caught.value)


def test_a_broken_toml_file_fails_fast(tmp_path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text("[llm.openai\n")
    with pytest.raises(ConfigError, match="VOICEBUS_PRICES"):
        usage.load_prices(str(path))


def test_cost_only_from_prices_and_measured_units() -> None:
    prices = usage.load_prices("llm.openai.input_tokens=1/1M,llm.openai.cached_tokens=0.5/1M,"
                               "llm.openai.output_tokens=4/1M,llm.echo.requests=0,"
                               "tts.cartesia.characters=30/1M")
    tokens = usage.Counts(requests=1, input_tokens=1000, cached_tokens=400, output_tokens=100,
                          measured={"requests", *usage.TOKENS}, token_reports=1)
    # 600 uncached + 400 cached at half price + 100 output
    assert prices.cost("llm", "openai", tokens) == pytest.approx((600 + 200 + 400) / 1e6)
    # Not priced: no cost at all, not a zero.
    assert prices.cost("llm", "anthropic", tokens) is None
    assert usage.Prices().cost("llm", "openai", tokens) is None
    # Priced, but the API reported nothing (a cut reply): unknown, not zero.
    unreported = usage.Counts(requests=1, measured={"requests"})
    assert prices.cost("llm", "openai", unreported) is None
    # A free provider costs 0; units without a price are free.
    assert prices.cost("llm", "echo", unreported) == 0.0
    speech = usage.Counts(requests=1, characters=1000, audio_out_s=3.0,
                          measured=set(usage.MEASURED["tts"]))
    assert prices.cost("tts", "cartesia", speech) == pytest.approx(0.03)


def test_cached_tokens_without_a_price_of_their_own_cost_the_input_price() -> None:
    prices = usage.load_prices("llm.openai.input_tokens=1/1M")
    counts = usage.Counts(requests=1, input_tokens=1000, cached_tokens=400, output_tokens=9,
                          measured={"requests", *usage.TOKENS}, token_reports=1)
    assert prices.cost("llm", "openai", counts) == pytest.approx(1000 / 1e6)


@pytest.mark.parametrize(("reports", "priced"), [(1, False), (2, True)])
async def test_tokens_are_priced_only_when_every_request_reported_them(reports: int,
                                                                       priced: bool) -> None:
    # A turn of two rounds (a tool call, then the answer); a cut round reports nothing, and
    # the first round's tokens alone are not the turn's.
    name = unique("llm")
    prices = usage.load_prices(f"llm.{name}.input_tokens=1/1M,llm.{name}.output_tokens=4/1M")
    meter = usage.metering()
    for round_ in range(2):
        usage.attempt("llm", name)
        if round_ < reports:
            usage.report_tokens(name, {"prompt_tokens": 100, "completion_tokens": 10})
    counts = meter.providers[name]
    assert (counts.requests, counts.token_reports) == (2, reports)
    cost = prices.cost("llm", name, counts)
    assert cost == (pytest.approx(2 * (100 + 40) / 1e6) if priced else None)


@pytest.mark.parametrize(("reported", "tokens"), [
    ({"prompt_tokens": 120, "completion_tokens": 12, "total_tokens": 132,
      "prompt_tokens_details": {"cached_tokens": 100}}, (120, 12, 100)),  # OpenAI
    ({"prompt_tokens": 7, "completion_tokens": 3, "queue_time": 0.01}, (7, 3, 0)),  # Groq
    ({"input_tokens": 20, "output_tokens": 5, "cache_read_input_tokens": 100,
      "cache_creation_input_tokens": 30}, (150, 5, 100)),  # Anthropic: cache apart
    ({"input_tokens": 20}, (20, 0, 0)),  # message_start only
    ({}, None), ({"total_tokens": 3}, None),
    ({"prompt_tokens": "12", "completion_tokens": None}, (0, 0, 0)),  # junk is not a count
])
def test_token_shapes_of_the_apis(reported: dict[str, Any],
                                  tokens: tuple[int, int, int] | None) -> None:
    assert usage.tokens_of(reported) == tokens


# ---- what a chain charges to each provider -------------------------------------------------


class FakeStt:
    """Hears ``frames`` frames (all: None), then fails or gives a final."""

    def __init__(self, frames: int | None = None) -> None:
        self.name = unique("stt")
        self.frames = frames

    async def stream(self, frames: AsyncIterator[bytes], *,
                     partials: object = None) -> AsyncIterator[SttResult]:
        heard = 0
        async for _ in frames:
            heard += 1
            if heard == self.frames:
                raise APIStatusError("gone", status=500, provider=self.name)
        yield SttResult("hello", final=True)

    async def aclose(self) -> None:
        pass


async def utterance(count: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield FRAME


async def transcribe(chain: SttFallback, frames: int) -> str:
    stream = chain.stream(utterance(frames))
    async with aclosing(stream):
        return [r.text async for r in stream if r.final][0]


async def test_each_stt_provider_is_charged_the_audio_it_heard() -> None:
    failing, answering = FakeStt(frames=10), FakeStt()
    chain = SttFallback([failing, answering], first_result_timeout=5, probe_interval=60)
    meter = usage.metering()
    assert await transcribe(chain, 40) == "hello"
    charged = meter.providers
    assert list(charged) == [failing.name, answering.name]
    # The failed one read 10 frames before it broke; the next heard the utterance whole.
    assert (charged[failing.name].requests, charged[failing.name].failed) == (1, True)
    assert charged[failing.name].audio_in_s == pytest.approx(0.2)
    assert (charged[answering.name].requests, charged[answering.name].failed) == (1, False)
    assert charged[answering.name].audio_in_s == pytest.approx(0.8)
    await chain.aclose()


async def test_nothing_is_charged_outside_a_metered_turn(monkeypatch) -> None:
    provider = FakeStt()
    chain = SttFallback([provider], first_result_timeout=5)
    charged: list[usage.Counts | None] = []
    attempt = usage.attempt

    def spied(stage: str, name: str) -> usage.Counts | None:
        charged.append(counts := attempt(stage, name))
        return counts

    monkeypatch.setattr(usage, "attempt", spied)
    meter = usage.metering()
    # Work in a context of its own (as the chain's probes are): no meter there, not this one.
    outside = asyncio.create_task(transcribe(chain, 5), context=contextvars.Context())
    assert await outside == "hello"
    assert charged == [None] and meter.providers == {}
    meter.closed = True  # a turn already published
    assert await transcribe(chain, 5) == "hello"
    assert charged == [None, None] and meter.providers == {}
    await chain.aclose()


class FakeTts:
    sample_rate = 16000

    def __init__(self, fail_after_chunks: int | None = None) -> None:
        self.name = unique("tts")
        self.fail_after_chunks = fail_after_chunks

    async def synthesize(self, chunks: AsyncIterator[str]) -> AsyncIterator[SpokenAudio]:
        index = -1
        async for _ in chunks:
            index += 1
            if index + 1 == self.fail_after_chunks:
                raise APIStatusError("gone", status=500, provider=self.name)
            yield SpokenAudio(bytes(3200), chunk=index)  # 100 ms a chunk

    async def aclose(self) -> None:
        pass


async def text(*chunks: str) -> AsyncIterator[str]:
    for chunk in chunks:
        yield chunk


async def test_each_tts_provider_is_charged_the_text_it_read_and_the_audio_it_made() -> None:
    failing, speaking = FakeTts(fail_after_chunks=1), FakeTts()
    chain = TtsFallback([failing, speaking], first_result_timeout=5, probe_interval=60)
    meter = usage.metering()
    audio = chain.synthesize(text("Hello there. ", "How are you?"))
    async with aclosing(audio):
        pieces = [piece async for piece in audio]
    assert len(pieces) == 2
    charged = meter.providers
    assert (charged[failing.name].characters, charged[failing.name].audio_out_s,
            charged[failing.name].failed) == (len("Hello there. "), 0.0, True)
    assert (charged[speaking.name].characters, charged[speaking.name].failed) == (25, False)
    assert charged[speaking.name].audio_out_s == pytest.approx(0.2)
    await chain.aclose()


class TokenLlm:
    """Reports its API's usage as the real providers do, once the stream is read to its end."""

    def __init__(self, fail_turns: int = 0) -> None:
        self.name = unique("llm")
        self.fail_turns = fail_turns
        self.calls = 0
        self.probed = asyncio.Event()

    async def complete(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str]:
        self.calls += 1
        if self.calls <= self.fail_turns:
            raise APIStatusError("gone", status=500, provider=self.name)
        yield "OK"
        usage.report_tokens(self.name, {"prompt_tokens": 9, "completion_tokens": 1})
        if self.calls > 1:
            self.probed.set()

    async def aclose(self) -> None:
        pass


async def test_probes_of_a_failed_llm_are_not_charged_to_the_turn() -> None:
    broken, answering = TokenLlm(fail_turns=1), TokenLlm()
    chain = LlmFallback([broken, answering], first_result_timeout=5, probe_interval=0.01,
                        probe_timeout=5)
    meter = usage.metering()
    stream = chain.complete([ChatMessage("user", "hi")])
    async with aclosing(stream):
        assert [d async for d in stream] == ["OK"]
    # The turn is still being metered while the probe spends tokens on the broken provider.
    await asyncio.wait_for(broken.probed.wait(), 5)
    charged = meter.providers
    assert (charged[broken.name].requests, charged[broken.name].failed) == (1, True)
    assert "input_tokens" not in charged[broken.name].measured
    assert (charged[answering.name].input_tokens, charged[answering.name].output_tokens) == (9, 1)
    await chain.aclose()


# ---- the end of a turn: events and counters ------------------------------------------------


class FakeBus:
    def __init__(self) -> None:
        self.published: list[tuple[str, ev.Event]] = []

    async def publish(self, topic: sj.Topic, event: ev.Event, subject: str = "",
                      headers: Any = None) -> None:
        self.published.append((subject or topic.subject(event.session), event))


def worker(stage: str, prices: usage.Prices | None = None) -> SessionWorker[Any]:
    service = SimpleNamespace(stage=stage, bus=FakeBus(), prices=prices,
                              config_for=lambda agent: None)
    return SessionWorker(service, ev.SessionStart(session="s1"))  # type: ignore[arg-type]


async def test_a_turn_ends_with_one_usage_event_per_provider_and_counters() -> None:
    failed, served = unique("llm"), unique("llm")
    prices = usage.load_prices(f"llm.{served}.input_tokens=2/1M,llm.{served}.output_tokens=8/1M")
    llm = worker("llm", prices)
    llm.next_seq()  # the stage's own events count on their own
    meter = usage.metering()
    usage.attempt("llm", failed).failed = True
    usage.attempt("llm", served)
    usage.report_tokens(served, {"prompt_tokens": 1000, "completion_tokens": 50})
    await usage.publish(llm, meter, 3)
    subjects = [subject for subject, _ in llm.bus.published]
    events = [event for _, event in llm.bus.published]
    assert subjects == ["voice.s1.llm.usage"] * 2
    assert [(e.provider, e.turn, e.requests, e.failed, e.seq) for e in events] == [
        (failed, 3, 1, True, 1), (served, 3, 1, False, 2)]
    assert events[0].cost_usd is None and events[0].input_tokens == 0
    assert (events[1].input_tokens, events[1].output_tokens) == (1000, 50)
    assert events[1].cost_usd == pytest.approx(0.0024)
    assert llm.next_seq() == 2  # no hole in the stage's own stream
    for event in events:  # valid on their subject, as any consumer decodes them
        assert codec.decode_on("voice.s1.llm.usage", codec.encode(event)) == event
    assert sample("voicebus_usage_total", stage="llm", provider=served,
                  unit="input_tokens") == 1000
    assert sample("voicebus_usage_total", stage="llm", provider=served,
                  unit="output_tokens") == 50
    assert sample("voicebus_usage_total", stage="llm", provider=failed, unit="requests") == 1
    assert sample("voicebus_cost_usd_total", stage="llm", provider=served) == pytest.approx(
        0.0024)
    assert sample("voicebus_cost_usd_total", stage="llm", provider=failed) == 0
    # Closed: a provider finishing late charges nothing more to this turn.
    usage.report_tokens(served, {"prompt_tokens": 5, "completion_tokens": 5})
    assert usage.attempt("llm", served) is None
    assert meter.providers[served].input_tokens == 1000


async def test_a_cut_turn_says_so_and_a_turn_without_providers_says_nothing() -> None:
    tts = worker("tts")
    meter = usage.metering()
    counts = usage.attempt("tts", name := unique("tts"))
    counts.characters, counts.audio_out_s = 12, 0.3000000004
    await usage.publish(tts, meter, 2, interrupted=True)
    ((subject, event),) = tts.bus.published
    assert subject == "voice.s1.tts.usage"
    assert (event.stage, event.provider, event.interrupted, event.characters,
            event.audio_out_s, event.cost_usd) == ("tts", name, True, 12, 0.3, None)
    empty = worker("stt")
    await usage.publish(empty, usage.metering(), 4)  # a typed turn: no provider worked
    assert empty.bus.published == []


def test_each_stage_may_publish_its_usage_and_no_other_stage_may() -> None:
    def allowed(subject: str, patterns: Sequence[str]) -> bool:
        def match(pattern: list[str], tokens: list[str]) -> bool:
            if not pattern:
                return not tokens
            if pattern[0] == ">":
                return bool(tokens)
            return bool(tokens) and pattern[0] in ("*", tokens[0]) and match(pattern[1:],
                                                                            tokens[1:])
        return any(match(p.split("."), subject.split(".")) for p in patterns)

    for stage, topic in sj.USAGE.items():
        subject = topic.subject("s1")
        assert sj.parse(subject) == ("s1", topic)
        for role in permissions.ROLES:
            rights = permissions.rights(role)
            if rights is None:  # the operator: record, tap
                continue
            assert allowed(subject, rights.publish) == (role == stage), (role, subject)
    # Nobody replays a usage reading into a stage: a replay's usage is its own stages'.
    assert not any(kind == "usage" for s in replay.TARGETS
                   for _, kind in replay.inputs_of(replay.stages_of(s)))


# ---- the record ------------------------------------------------------------------------------


def test_the_timeline_shows_usage_per_turn_and_per_provider() -> None:
    stamp = itertools.count(1_000_000_000, 1_000_000)

    def entry(topic: sj.Topic, event: ev.Event) -> Entry:
        return Entry(topic.subject("s1"), 0, codec.encode(event))

    def use(stage: str, turn: int, **fields: Any) -> Entry:
        return entry(sj.USAGE[stage], ev.Usage(session="s1", seq=1, ts_ns=next(stamp),
                                               stage=stage, turn=turn, requests=1, **fields))

    entries = [
        entry(sj.STT_FINAL, ev.Transcript(session="s1", seq=1, ts_ns=next(stamp), turn=1,
                                          text="hi", final=True)),
        use("stt", 1, provider="instant", audio_in_s=0.8),
        use("llm", 1, provider="openai", failed=True),
        use("llm", 1, provider="echo", input_tokens=0, cost_usd=0.0),
        use("llm", 2, provider="openai", input_tokens=120, cached_tokens=100, output_tokens=12,
            cost_usd=0.000031),
        use("tts", 2, provider="piper", characters=40, audio_out_s=2.5, interrupted=True),
        use("llm", 3, provider="openai", input_tokens=80, output_tokens=4, cost_usd=0.00002),
    ]
    built = timeline.build("s1", entries)
    turns = {t.turn: t for t in built.turns}
    assert [(u.stage, u.provider, u.failed) for u in turns[1].usage] == [
        ("stt", "instant", False), ("llm", "openai", True), ("llm", "echo", False)]
    assert [u.characters for u in turns[2].usage] == [0, 40]
    assert [(u.stage, u.provider, u.turns, u.requests, u.input_tokens, u.cost_usd)
            for u in built.usage] == [
        ("stt", "instant", 1, 1, 0, None), ("llm", "echo", 1, 1, 0, 0.0),
        ("llm", "openai", 3, 3, 200, pytest.approx(0.000051)),
        ("tts", "piper", 1, 1, 0, None)]
    lines = [m.detail for m in built.marks if m.kind == "Usage"]
    assert lines[0] == "stt instant: 1 request, 0.80 s of audio in"
    assert lines[1] == "llm openai: 1 request (failed)"
    assert lines[3] == ("llm openai: 1 request, 120 input tokens (100 cached), "
                        "12 output tokens, $0.000031")
    report = timeline.usage_report("s1", entries)
    assert report[0] == "turn 1\tstt instant: 1 request, 0.80 s of audio in"
    assert report[-2] == ("total\tllm openai: 3 turns, 3 requests, 200 input tokens "
                          "(100 cached), 16 output tokens, $0.000051")
    assert timeline.usage_report("s1", entries[:1]) == ["no usage recorded in s1"]
