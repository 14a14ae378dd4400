"""How the offline test listener cuts a recording into phrases before hearing it."""

import numpy as np

from voicebus.speech import phrases

RATE = 16000


def _tone(ms: int) -> bytes:
    t = np.arange(RATE * ms // 1000) / RATE
    return (np.sin(2 * np.pi * 220 * t) * 8000).astype(np.int16).tobytes()


def _quiet(ms: int) -> bytes:
    return bytes(RATE * ms // 1000 * 2)


def test_a_long_pause_parts_two_phrases_and_a_short_one_does_not():
    audio = _quiet(200) + _tone(400) + _quiet(500) + _tone(300) + _quiet(100) + _tone(200)
    parts = phrases(audio, gap_ms=300)
    assert len(parts) == 2
    # each phrase holds its voice whole, with a little quiet either side
    assert 400 <= len(parts[0]) / 2 / RATE * 1000 <= 400 + 300 + 20
    assert 600 <= len(parts[1]) / 2 / RATE * 1000 <= 600 + 300 + 20


def test_silence_has_no_phrase_and_a_trailing_phrase_is_kept():
    assert phrases(_quiet(1000)) == []
    assert len(phrases(_quiet(500) + _tone(300))) == 1
