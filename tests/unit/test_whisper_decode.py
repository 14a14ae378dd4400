"""What the whisper provider asks of whisper.cpp, checked against a stand-in model: flash
attention off (with it, the decoder read encoder frames left over from an earlier decode, so the
words depended on what was decoded before), and more trailing silence in the window for the final
than for a partial."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

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
