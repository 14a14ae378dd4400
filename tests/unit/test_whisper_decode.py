"""What the whisper provider asks of whisper.cpp, checked against a stand-in model: flash
attention off (with it, the decoder read encoder frames left over from an earlier decode, so the
words depended on what was decoded before), and more trailing silence in the window for the final
than for a partial."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from services.stt.provider import SttResult
from services.stt.providers import whisper

pywhispercpp_model = pytest.importorskip("pywhispercpp.model")


class StandInModel:
    def __init__(self, path: str, **options: object) -> None:
        self.options = options
        self.decodes: list[dict[str, object]] = []

    def transcribe(self, audio: object, **options: object) -> list[object]:
        self.decodes.append(options)
        return []


@pytest.fixture
def stt(monkeypatch: pytest.MonkeyPatch) -> whisper.WhisperCppStt:
    monkeypatch.setattr(pywhispercpp_model, "Model", StandInModel)
    return whisper.WhisperCppStt(Path("ggml-tiny.en.bin"))


def test_flash_attention_is_off(stt: whisper.WhisperCppStt) -> None:
    assert stt._model.options["context_params"] == {"flash_attn": False}


async def test_the_final_gets_the_wider_window(stt: whisper.WhisperCppStt) -> None:
    second = bytes(2 * whisper.SAMPLE_RATE)
    utterance = whisper._Utterance(stt)
    utterance.audio += second
    utterance._start(speculative=False)  # a partial
    await utterance.running
    utterance._start(speculative=True)  # the final, decoded ahead
    await utterance.running
    stt.decode(second, threading.Event())  # the final at the end of speech
    windows = [decode["audio_ctx"] for decode in stt._model.decodes]
    assert windows == [50 + whisper.PARTIAL_CONTEXT_MARGIN, 50 + whisper.CONTEXT_MARGIN,
                       50 + whisper.CONTEXT_MARGIN]
    assert whisper.PARTIAL_CONTEXT_MARGIN < whisper.CONTEXT_MARGIN


@pytest.mark.parametrize("speculate_ms", [40, 80])
def test_the_final_is_decoded_ahead_after_the_quiet_set(monkeypatch: pytest.MonkeyPatch,
                                                         speculate_ms: int) -> None:
    monkeypatch.setattr(pywhispercpp_model, "Model", StandInModel)
    stt = whisper.WhisperCppStt(Path("ggml-tiny.en.bin"), speculate_ms=speculate_ms)
    frame = whisper.SAMPLE_RATE * whisper.FRAME_MS // 1000
    loud, quiet = (b"\x00\x10" * frame), bytes(2 * frame)  # 4096: speech; 0: quiet
    utterance = whisper._Utterance(stt)
    started = []
    monkeypatch.setattr(utterance, "_start", lambda *, speculative: started.append(speculative))
    utterance.feed(loud)
    for n in range(1, speculate_ms // whisper.FRAME_MS + 1):
        assert started == []  # not yet: the user may only be between two words
        utterance.feed(quiet)
    assert started == [True] and n * whisper.FRAME_MS == speculate_ms


class HearsLength(StandInModel):
    """Hears how many samples it was given: which audio each decode covered."""

    def transcribe(self, audio: object, **options: object) -> list[object]:
        self.decodes.append(options)
        return [type("Segment", (), {"text": f"heard {len(audio)}"})()]


FRAME = whisper.SAMPLE_RATE * whisper.FRAME_MS // 1000  # samples
LOUD, QUIET = b"\x00\x10" * FRAME, bytes(2 * FRAME)
TAIL_STARTS = 4  # the VAD's quiet (80 ms) that starts the draft


@pytest.fixture
def hears(monkeypatch: pytest.MonkeyPatch) -> whisper.WhisperCppStt:
    monkeypatch.setattr(pywhispercpp_model, "Model", HearsLength)
    return whisper.WhisperCppStt(Path("ggml-tiny.en.bin"), speculate_ms=80)


async def _settle(utterance: whisper._Utterance) -> None:
    """Let the decode in flight finish (the next frame collects it)."""
    if utterance.running is not None:
        await asyncio.wait([utterance.running])


async def test_a_tail_the_vad_calls_no_speech_drafts_early_but_the_final_hears_it(
        hears: whisper.WhisperCppStt) -> None:
    """A word's unvoiced end (the "ch" of "much") is loud but not speech to the VAD. The words
    are decoded once the VAD has heard 80 ms without speech (a draft), and again over
    everything for the final."""
    utterance = whisper._Utterance(hears)
    for _ in range(10):
        assert utterance.feed(LOUD, True) is None
    for _ in range(TAIL_STARTS):
        utterance.feed(LOUD, False)
    assert utterance.speculative  # decoded ahead on the VAD's quiet, the microphone still loud
    await _settle(utterance)
    stable = utterance.feed(LOUD, False)  # more of the tail
    assert stable == SttResult(f"heard {14 * FRAME}", stable=True)
    assert utterance.ready is None  # the tail is not in it: not the final
    await _settle(utterance)
    for _ in range(3):  # the tail ends; the edge comes before 80 ms of quiet
        assert utterance.feed(QUIET, False) is None
    assert utterance.running is None  # one draft a pause, not one a frame
    assert await utterance.finish() == f"heard {18 * FRAME}"


async def test_after_the_tail_the_final_is_decoded_ahead_over_everything(
        hears: whisper.WhisperCppStt) -> None:
    utterance = whisper._Utterance(hears)
    for _ in range(10):
        utterance.feed(LOUD, True)
    for _ in range(TAIL_STARTS + 2):
        utterance.feed(LOUD, False)
    await _settle(utterance)
    results = [utterance.feed(QUIET, False) for _ in range(4)]  # the microphone's 80 ms
    assert results[0] == SttResult(f"heard {14 * FRAME}", stable=True)
    assert utterance.speculative and utterance.whole  # the final, with the tail
    await _settle(utterance)
    assert utterance.feed(QUIET, False) == SttResult(f"heard {20 * FRAME}", stable=True)
    assert utterance.ready == f"heard {20 * FRAME}"
    assert await utterance.finish() == f"heard {20 * FRAME}"
    assert len(hears._model.decodes) == 2


async def test_voiced_speech_after_the_draft_throws_it_away(
        hears: whisper.WhisperCppStt) -> None:
    utterance = whisper._Utterance(hears)
    for _ in range(10):
        utterance.feed(LOUD, True)
    for _ in range(TAIL_STARTS):
        utterance.feed(QUIET, False)
    running = utterance.running
    assert running is not None and utterance.speculative
    utterance.feed(LOUD, True)  # the user goes on
    assert utterance.running is None and not utterance.speculative
    await asyncio.wait([running])
    assert utterance.feed(LOUD, True) is None  # its words are not announced
    assert utterance.ready is None


async def test_without_the_vads_word_a_loud_frame_is_speech(
        hears: whisper.WhisperCppStt) -> None:
    """Frames that never passed the VAD (``voiced`` None): only the microphone's quiet starts a
    decode ahead, and anything loud after it is the user going on."""
    utterance = whisper._Utterance(hears)
    for _ in range(10):
        utterance.feed(LOUD)
    for _ in range(TAIL_STARTS + 2):
        utterance.feed(LOUD, None)
    assert utterance.running is None
    for _ in range(TAIL_STARTS):
        utterance.feed(QUIET)
    assert utterance.speculative
    utterance.feed(LOUD)
    assert not utterance.speculative and utterance.ready is None


async def test_a_draft_running_at_the_end_of_speech_still_goes_out_before_the_final(
        hears: whisper.WhisperCppStt) -> None:
    """The edge can come before the tail's quiet: the draft's words are handed out (the agent
    prepares its answer from them) and the final is decoded over everything."""
    utterance = whisper._Utterance(hears)
    for _ in range(10):
        utterance.feed(LOUD, True)
    for _ in range(TAIL_STARTS + 1):
        utterance.feed(LOUD, False)
    assert utterance.running is not None and not utterance.whole
    assert await utterance.draft_at_end() == SttResult(f"heard {14 * FRAME}", stable=True)
    assert await utterance.finish() == f"heard {15 * FRAME}"


async def test_no_draft_at_the_end_when_the_decode_ahead_covers_everything(
        hears: whisper.WhisperCppStt) -> None:
    utterance = whisper._Utterance(hears)
    for _ in range(10):
        utterance.feed(LOUD, True)
    for _ in range(TAIL_STARTS):
        utterance.feed(QUIET, False)
    assert utterance.speculative and utterance.whole
    assert await utterance.draft_at_end() is None  # that decode is the final itself
    assert await utterance.finish() == f"heard {14 * FRAME}"
    assert len(hears._model.decodes) == 1
