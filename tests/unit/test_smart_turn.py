"""The audio end-of-turn model's input (Whisper's log-mel features) and how its weights are
taken out of the ``pipecat-ai`` wheel (``voicebus bench turns --smart-turn``)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from services.stt.endpoint import EndOfTurnHolds
from voicebus.bench import smart_turn as st
from voicebus.bench.turns import Utterance, answered, auc


def tone(hz: float, seconds: float, amplitude: int = 8000) -> bytes:
    t = np.arange(int(st.SAMPLE_RATE * seconds)) / st.SAMPLE_RATE
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype("<i2").tobytes()


def test_the_mel_bands_are_triangles_of_unit_area_rising_in_pitch() -> None:
    filters = st.mel_filters()
    assert filters.shape == (80, 201)
    peaks = filters.argmax(axis=1)
    assert np.all(np.diff(peaks) >= 0) and peaks[-1] > peaks[0]
    assert np.all(filters >= 0)
    bin_hz = st.SAMPLE_RATE / st.N_FFT
    # Bands wide enough (above ~1.1 kHz) are sampled finely enough for their area to show.
    areas = filters[41:].sum(axis=1) * bin_hz
    assert np.allclose(areas, 1.0, atol=0.03)
    # Linear below 1 kHz: the centres there are evenly spaced.
    centres = st._slaney_hz(np.linspace(0, st._slaney_mel(8000.0), 82))[1:-1]
    low = centres[centres < 1000]
    assert np.allclose(np.diff(low), np.diff(low)[0])


def test_a_tone_lights_the_band_of_its_pitch_at_the_end_of_the_window() -> None:
    feats = st.features(tone(1000.0, 2.0))
    assert feats.shape == (1, 80, 800) and feats.dtype == np.float32
    spoken = feats[0, :, -150:]  # the last 1.5 s: the tone
    centres = st._slaney_hz(np.linspace(0, st._slaney_mel(8000.0), 82))[1:-1]
    assert abs(centres[spoken.mean(axis=1).argmax()] - 1000.0) < 60
    # The 6 s in front are the zeros it was padded with: floored, 8 below the peak, scaled.
    assert np.allclose(feats[0, :, :500], feats[0].max() - 2.0)


def test_only_the_last_eight_seconds_are_heard() -> None:
    recent = tone(440.0, 8.0)
    assert np.array_equal(st.features(tone(2000.0, 3.0) + recent), st.features(recent))


def test_a_chirp_matches_whispers_features() -> None:
    """Reference values for Whisper's feature extractor (chunk_length=8, do_normalize) on a
    chirp from 100 Hz rising 1.3 kHz a second for 3 s: computed once with pipecat-ai 1.14.0's
    numpy copy of it, which the model was trained against."""
    t = np.arange(3 * st.SAMPLE_RATE) / st.SAMPLE_RATE
    chirp = (6000 * np.sin(2 * np.pi * (100 * t + 650 * t ** 2))).astype("<i2").tobytes()
    feats = st.features(chirp)[0]
    # frame: (loudest band, its value, the frame's mean)
    for frame, (band, value, mean) in {-290: (5, 1.74742, -0.00739),
                                       -200: (35, 1.71918, -0.07996),
                                       -100: (52, 1.6818, -0.10927),
                                       -10: (61, 1.66379, -0.13534)}.items():
        assert feats[:, frame].argmax() == band
        assert feats[band, frame] == pytest.approx(value, abs=1e-4)
        assert feats[:, frame].mean() == pytest.approx(mean, abs=1e-4)
    assert feats.mean() == pytest.approx(-0.162136, abs=1e-5)


def wheel_holding(data: bytes):
    def download(folder: Path) -> Path:
        wheel = folder / "pipecat_ai-1.14.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(st.MEMBER, data)
        return wheel
    return download


def test_weights_that_are_not_the_published_ones_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="SHA-256"):
        st.fetch(tmp_path, download=wheel_holding(b"not the model"))
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_cached_model_is_fetched_again(tmp_path: Path) -> None:
    st.model_path(tmp_path).write_bytes(b"half a file")
    asked = []

    def download(folder: Path) -> Path:
        asked.append(folder)
        return wheel_holding(b"still not it")(folder)

    with pytest.raises(RuntimeError, match="SHA-256"):
        st.fetch(tmp_path, download=download)
    assert len(asked) == 1


def test_a_wheel_without_the_model_is_a_clear_error(tmp_path: Path) -> None:
    def download(folder: Path) -> Path:
        wheel = folder / "w.whl"
        zipfile.ZipFile(wheel, "w").close()
        return wheel

    with pytest.raises(KeyError):
        st.fetch(tmp_path, download=download)


HOLDS = EndOfTurnHolds(question_ms=0, statement_ms=50, incomplete_ms=1500, brief_ms=300)


def test_a_statement_heard_unfinished_waits_like_a_lone_answer() -> None:
    first = Utterance(300, 1000, 1220, b"")
    rest = Utterance(1400, 2500, 2720, b"")
    texts = ["turn off the lights", "then lock the door"]
    # Heard finished: the statement's 50 ms hold is over at 1270, before the rest at 1400.
    assert len(answered([first, rest], texts, HOLDS, [False, False])) == 2
    # Heard unfinished: it waits 300 ms, until 1520, and the rest joins the turn.
    assert answered([first, rest], texts, HOLDS, [True, False]) == [
        (2720 + 50, "turn off the lights then lock the door", 2500)]
    # The model never shortens a hold: a hanging phrase still waits its own.
    assert answered([first], ["I want to"], HOLDS, [True]) == [(1220 + 1500, "I want to", 1000)]


def test_auc_counts_the_pairs_an_end_scores_above_a_pause() -> None:
    assert auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auc([0.1], [0.9]) == 0.0
    assert auc([0.5, 0.9], [0.5, 0.1]) == 0.875  # (0.5 + 1 + 1 + 1) / 4
