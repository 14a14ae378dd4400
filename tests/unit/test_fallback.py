"""Fallback chain rules with in-process fake providers: order, budget, commitment after the
first result, unavailability, background probes, the all-failed error, counters."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

import pytest
from prometheus_client import REGISTRY

from services.llm.config import LlmConfig
from services.llm.provider import ChatMessage
from services.llm.service import LlmFallback
from services.runtime.errors import APIConnectionError, APIStatusError, ConfigError, ProviderError
from services.runtime.fallback import chain_names
from services.stt.provider import SttResult
from services.stt.service import SttFallback
from services.tts.provider import SpokenAudio
from services.tts.service import TtsFallback

_ids = itertools.count()
MESSAGES = [ChatMessage("system", "Be brief."), ChatMessage("user", "hello")]


def unique(name: str) -> str:
    """Provider names unique per test: the prometheus registry is process-wide."""
    return f"{name}{next(_ids)}"


def sample(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


def requests(stage: str, provider: str, outcome: str) -> float:
    return sample("voicebus_provider_requests_total", stage=stage, provider=provider,
                  outcome=outcome)


class FakeLlm:
    """``mode``: ok, fail (500), unauthorized (401), stall, break (fails after one delta)."""

    def __init__(self, mode: str = "ok") -> None:
        self.name = unique("llm")
        self.mode = mode
        self.calls = 0
        self.closed = 0
        self.closed_provider = False
        self.called = asyncio.Event()

    async def complete(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str]:
        self.calls += 1
        self.called.set()
        try:
            if self.mode == "fail":
                raise APIStatusError("server error", status=500, provider=self.name)
            if self.mode == "unauthorized":
                raise APIStatusError("bad key", status=401, provider=self.name)
            if self.mode == "stall":
                await asyncio.Event().wait()
            yield f"{self.name} says "
            if self.mode == "break":
                raise APIConnectionError("connection dropped", provider=self.name)
            yield messages[-1].content
        finally:
            self.closed += 1

    async def aclose(self) -> None:
        self.closed_provider = True


def llm_chain(*providers: FakeLlm, budget: float = 5.0, probe: float = 60.0) -> LlmFallback:
    return LlmFallback(providers, first_result_timeout=budget, probe_interval=probe,
                       probe_timeout=5.0)


async def reply(chain: LlmFallback) -> tuple[str, str]:
    """The reply's text and the provider that gave it."""
    stream = chain.complete(MESSAGES)
    async with aclosing(stream):
        text = "".join([delta async for delta in stream])
    return text, stream.provider


async def test_the_first_available_provider_answers_and_is_counted() -> None:
    first, second = FakeLlm(), FakeLlm()
    chain = llm_chain(first, second)
    assert await reply(chain) == (f"{first.name} says hello", first.name)
    assert (first.calls, second.calls) == (1, 0)
    assert requests("llm", first.name, "success") == 1
    assert sample("voicebus_provider_first_result_seconds_count", stage="llm",
                  provider=first.name) == 1
    assert sample("voicebus_provider_available", stage="llm", provider=first.name) == 1


async def test_an_error_moves_the_turn_on_and_marks_the_provider_unavailable() -> None:
    first, second = FakeLlm("fail"), FakeLlm()
    chain = llm_chain(first, second)
    assert await reply(chain) == (f"{second.name} says hello", second.name)
    assert not chain.available(first.name) and chain.available(second.name)
    assert requests("llm", first.name, "failure") == 1
    assert requests("llm", second.name, "success") == 1
    assert sample("voicebus_provider_fallbacks_total", stage="llm", from_provider=first.name,
                  to_provider=second.name) == 1
    assert sample("voicebus_provider_available", stage="llm", provider=first.name) == 0
    # Unavailable: the next turn goes straight to the second provider.
    await reply(chain)
    assert (first.calls, second.calls) == (1, 2)
    await chain.aclose()


async def test_a_budget_overrun_moves_on_and_counts_a_timeout() -> None:
    first, second = FakeLlm("stall"), FakeLlm()
    chain = llm_chain(first, second, budget=0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await reply(chain))[1] == second.name
    assert loop.time() - started < 1.0
    assert requests("llm", first.name, "timeout") == 1
    assert first.closed == 1  # the stalled stream was closed, not left hanging
    await chain.aclose()


async def test_no_fallback_after_the_first_result_went_out() -> None:
    first, second = FakeLlm("break"), FakeLlm()
    chain = llm_chain(first, second)
    got: list[str] = []
    stream = chain.complete(MESSAGES)
    with pytest.raises(APIConnectionError):
        async with aclosing(stream):
            async for delta in stream:
                got.append(delta)
    assert got == [f"{first.name} says "] and second.calls == 0
    assert stream.provider == first.name
    assert requests("llm", first.name, "failure") == 1
    assert not chain.available(first.name)  # it broke: the next turns go elsewhere
    await chain.aclose()


async def test_the_last_provider_left_gets_no_budget() -> None:
    slow = FakeLlm("stall")
    chain = llm_chain(FakeLlm("fail"), slow, budget=0.05)
    task = asyncio.create_task(reply(chain))
    await asyncio.wait_for(slow.called.wait(), 2)
    slow.mode = "ok"  # too late for the stalled call, which must still be waiting
    done, _ = await asyncio.wait({task}, timeout=0.3)
    assert not done
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert slow.closed == 1 and requests("llm", slow.name, "timeout") == 0
    await chain.aclose()


async def test_when_every_provider_fails_the_error_names_each_failure() -> None:
    first, second = FakeLlm("unauthorized"), FakeLlm("fail")
    chain = llm_chain(first, second)
    with pytest.raises(ProviderError) as caught:
        await reply(chain)
    message = str(caught.value)
    assert f"{first.name}: 401: bad key" in message and f"{second.name}: 500: server error" in message
    assert caught.value.retryable  # the 500 may pass
    assert caught.value.provider == chain.name
    # The 401 (not retryable) marks its provider down as any other failure does.
    assert not chain.available(first.name) and not chain.available(second.name)
    # All down: the next turn still tries them all, and one that answers is back in use.
    second.mode = "ok"
    assert (await reply(chain))[1] == second.name
    assert first.calls == 2 and chain.available(second.name)
    await chain.aclose()


async def test_a_chain_of_one_fails_like_its_provider_and_is_never_marked_down() -> None:
    only = FakeLlm("fail")
    chain = llm_chain(only)
    with pytest.raises(APIStatusError) as caught:
        await reply(chain)
    assert caught.value.status == 500
    assert chain.available(only.name) and chain.name == only.name
    only.mode = "ok"
    assert (await reply(chain))[1] == only.name


async def test_a_probe_brings_a_recovered_provider_back() -> None:
    first, second = FakeLlm("fail"), FakeLlm()
    chain = llm_chain(first, second, probe=0.01)
    assert (await reply(chain))[1] == second.name
    first.called.clear()
    await asyncio.wait_for(first.called.wait(), 2)  # probed while still broken
    first.mode = "ok"
    await asyncio.wait_for(chain.wait_available(first.name), 2)
    assert sample("voicebus_provider_probes_total", stage="llm", provider=first.name,
                  outcome="success") == 1
    assert sample("voicebus_provider_available", stage="llm", provider=first.name) == 1
    assert (await reply(chain))[1] == first.name
    await chain.aclose()


async def test_an_early_close_counts_a_success_and_closes_the_provider_stream() -> None:
    first = FakeLlm()
    chain = llm_chain(first, FakeLlm())
    stream = chain.complete(MESSAGES)
    assert await anext(stream) == f"{first.name} says "
    await stream.aclose()  # barge-in
    assert first.closed == 1 and requests("llm", first.name, "success") == 1


async def test_aclose_stops_probes_and_closes_every_provider() -> None:
    first, second = FakeLlm("fail"), FakeLlm()
    chain = llm_chain(first, second, probe=0.01)
    await reply(chain)
    probe = chain.slots[0].probe
    assert probe is not None
    await chain.aclose()
    assert probe.done() and first.closed_provider and second.closed_provider


# ---- STT: replay of the utterance, budget from the end of speech -------------------------


class FakeStt:
    """Hears frames and answers with how many it heard. ``fail_at``: fail on that frame;
    ``partial_then_fail``/``_stall``: yield a partial, then fail / never answer again."""

    def __init__(self, fail_at: int | None = None, partial_then_fail: bool = False,
                 partial_then_stall: bool = False) -> None:
        self.name = unique("stt")
        self.fail_at = fail_at
        self.partial_then_fail = partial_then_fail
        self.partial_then_stall = partial_then_stall
        self.heard: list[list[bytes]] = []
        self.listening = asyncio.Event()  # it has heard a frame

    async def stream(self, frames: AsyncIterator[bytes], *,
                     partials: object = None) -> AsyncIterator[SttResult]:
        heard: list[bytes] = []
        self.heard.append(heard)
        async for frame in frames:
            heard.append(frame)
            self.listening.set()
            if len(heard) == self.fail_at:
                raise APIConnectionError("socket closed", provider=self.name)
            if self.partial_then_fail and len(heard) == 2:
                yield SttResult("hel")
                raise APIConnectionError("socket closed", provider=self.name)
            if self.partial_then_stall and len(heard) == 2:
                yield SttResult("hel")
                await asyncio.Event().wait()  # never a final
        yield SttResult(f"{len(heard)} frames", final=True)

    async def aclose(self) -> None:
        pass


class Speech:
    """Frames as they arrive from a speaker, ended by the test."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def say(self, *frames: bytes | None) -> None:  # None ends the utterance
        for frame in frames:
            self.queue.put_nowait(frame)

    async def frames(self) -> AsyncIterator[bytes]:
        while (frame := await self.queue.get()) is not None:
            yield frame


def stt_chain(*providers: FakeStt, budget: float = 5.0) -> SttFallback:
    return SttFallback(providers, first_result_timeout=budget, probe_interval=60.0)


async def transcripts(stream: AsyncIterator[SttResult]) -> list[SttResult]:
    return [result async for result in stream]


async def test_stt_replays_the_utterance_from_the_start_to_the_next_provider() -> None:
    first, second = FakeStt(fail_at=3), FakeStt()
    chain = stt_chain(first, second)
    speech = Speech()
    frames = [bytes([n]) * 640 for n in range(6)]
    speech.say(*frames[:4])
    task = asyncio.create_task(transcripts(chain.stream(speech.frames())))
    await asyncio.wait_for(second.listening.wait(), 5)
    speech.say(*frames[4:], None)  # live frames, after the replayed ones
    results = await asyncio.wait_for(task, 5)
    assert results == [SttResult("6 frames", final=True)]
    assert second.heard == [frames]  # all of it, in order, though the first had heard three
    await chain.aclose()


async def test_stt_budget_runs_from_the_end_of_speech() -> None:
    slow, spare = FakeStt(), FakeStt()
    chain = stt_chain(slow, spare, budget=0.05)
    speech = Speech()
    task = asyncio.create_task(transcripts(chain.stream(speech.frames())))
    speech.say(bytes(640))
    # The user keeps talking for several budgets: no result is due before the end of speech,
    # so the spare is not asked. (After the end, a stall of the loop longer than the budget
    # may rightly hand the utterance on: that is not checked here.)
    await asyncio.sleep(0.2)
    assert spare.heard == [] and not task.done()
    speech.say(None)
    assert await asyncio.wait_for(task, 5) == [SttResult("1 frames", final=True)]


@pytest.mark.parametrize("fault", ["partial_then_fail", "partial_then_stall"])
async def test_stt_partials_bind_nothing_the_utterance_moves_on(fault: str) -> None:
    first, second = FakeStt(**{fault: True}), FakeStt()
    chain = stt_chain(first, second, budget=0.2)
    speech = Speech()
    speech.say(bytes(640), bytes(640), bytes(640), None)
    got = await transcripts(chain.stream(speech.frames()))
    # The partial went out; the next provider heard the whole utterance and gave the final.
    assert got == [SttResult("hel"), SttResult("3 frames", final=True)]
    assert len(second.heard) == 1 and len(second.heard[0]) == 3
    assert not chain.available(first.name) and chain.available(second.name)
    await chain.aclose()


async def test_stt_final_commits_a_later_failure_is_an_error() -> None:
    class FinalThenFail(FakeStt):
        async def stream(self, frames: AsyncIterator[bytes], *,
                         partials: object = None) -> AsyncIterator[SttResult]:
            async for _ in frames:
                pass
            yield SttResult("done", final=True)
            raise APIConnectionError("socket closed", provider=self.name)

    first, second = FinalThenFail(), FakeStt()
    chain = stt_chain(first, second)
    speech = Speech()
    speech.say(bytes(640), None)
    got: list[SttResult] = []
    with pytest.raises(APIConnectionError):
        async for result in chain.stream(speech.frames()):
            got.append(result)
    assert got == [SttResult("done", final=True)] and second.heard == []
    await chain.aclose()


async def test_stt_probe_sends_a_short_silence() -> None:
    stt = FakeStt()
    await stt_chain(stt).probe(stt)
    assert len(stt.heard[0]) == 25 and not any(any(f) for f in stt.heard[0])


# ---- TTS: replay of the text, budget from the first chunk, one output rate ----------------


class FakeTts:
    def __init__(self, sample_rate: int = 16000, fail: bool = False, mute: bool = False) -> None:
        self.name = unique("tts")
        self.sample_rate = sample_rate
        self.fail, self.mute = fail, mute
        self.spoken: list[str] = []

    async def synthesize(self, chunks: AsyncIterator[str]) -> AsyncIterator[SpokenAudio]:
        index = 0
        async for text in chunks:
            self.spoken.append(text)
            if self.fail:
                raise APIStatusError("overloaded", status=503, provider=self.name)
            if not self.mute:
                yield SpokenAudio(b"\x01\x00" * (self.sample_rate // 10), index)  # 100 ms
            index += 1

    async def aclose(self) -> None:
        pass


async def texts(*chunks: str, first_after: asyncio.Event | None = None) -> AsyncIterator[str]:
    if first_after is not None:
        await first_after.wait()
    for chunk in chunks:
        yield chunk


def tts_chain(*providers: FakeTts, budget: float = 5.0) -> TtsFallback:
    return TtsFallback(providers, first_result_timeout=budget, probe_interval=60.0,
                       probe_timeout=5.0)


async def test_tts_falls_back_with_all_chunks_and_resamples_to_the_chain_rate() -> None:
    first, second = FakeTts(16000, fail=True), FakeTts(24000)
    chain = tts_chain(first, second)
    assert chain.sample_rate == 16000
    stream = chain.synthesize(texts("Hello there.", "How are you?"))
    pieces = [piece async for piece in stream]
    assert stream.provider == second.name and second.spoken == ["Hello there.", "How are you?"]
    assert {piece.chunk for piece in pieces} == {0, 1}
    # Two 100 ms pieces at 24 kHz come out as ~200 ms at 16 kHz.
    samples = sum(len(piece.pcm) for piece in pieces) // 2
    assert abs(samples - 3200) < 50
    await chain.aclose()


async def test_tts_budget_starts_at_the_first_text_chunk() -> None:
    first, spare = FakeTts(), FakeTts()
    chain = tts_chain(first, spare, budget=0.05)
    text_ready = asyncio.Event()
    stream = chain.synthesize(texts("Late text.", first_after=text_ready))
    task = asyncio.create_task(transcripts(stream))  # type: ignore[arg-type]
    await asyncio.sleep(0.2)  # the LLM thinks for several budgets: nothing is due yet
    assert stream.provider == first.name and spare.spoken == [] and not task.done()
    text_ready.set()
    assert len(await asyncio.wait_for(task, 5)) == 1


async def test_tts_probe_needs_audio() -> None:
    mute = FakeTts(mute=True)
    with pytest.raises(ProviderError, match="no audio"):
        await tts_chain(mute).probe(mute)


def test_the_providers_list_wins_over_the_single_provider() -> None:
    env = {"VOICEBUS_LLM_PROVIDER": "echo", "VOICEBUS_LLM_PROVIDERS": "openai, echo",
                           "VOICEBUS_LLM_FIRST_RESULT_TIMEOUT": "1.5",
                           "VOICEBUS_PROVIDER_PROBE_INTERVAL": "0.5"}
    config = LlmConfig.from_env(env)
    assert chain_names(config, "llm") == ("openai", "echo")
    assert (config.llm_first_result_timeout, config.provider_probe_interval) == (1.5, 0.5)
    assert chain_names(LlmConfig.from_env({"VOICEBUS_LLM_PROVIDER": "openai"}), "llm") == ("openai",)
    with pytest.raises(ConfigError, match="twice"):
        chain_names(LlmConfig.from_env({"VOICEBUS_LLM_PROVIDERS": "echo,echo"}), "llm")
