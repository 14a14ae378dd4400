"""The silence a reply's audio starts with is cut (``LeadTrim``): the user hears the first word
as soon as it exists, not after the quiet a TTS put before it."""

from __future__ import annotations

import numpy as np

from services.tts.provider import WordTiming
from services.tts.service import LeadTrim

RATE = 16000


def quiet(ms: int, level: int = 30) -> bytes:
    """Near-silence: a TTS's quiet, under the trim's level."""
    return (np.resize(np.array([level, -level], "<i2"), RATE * ms // 1000)).tobytes()


def tone(ms: int) -> bytes:
    t = np.arange(RATE * ms // 1000) / RATE
    return (8000 * np.cos(2 * np.pi * 440 * t)).astype("<i2").tobytes()  # loud from sample 0


def through(trim: LeadTrim, *pieces: bytes) -> bytes:
    return b"".join(trim.cut(p) for p in pieces) + trim.flush()


def test_the_quiet_before_the_first_sound_is_cut_to_the_kept_lead() -> None:
    trim = LeadTrim(RATE, 1000)
    sound = tone(100)
    # The quiet spans pieces; the sound starts in the third.
    out = through(trim, quiet(200), quiet(150), quiet(50) + sound, tone(60))
    keep = RATE * LeadTrim.KEEP_MS // 1000
    assert out == quiet(400)[-keep * 2:] + sound + tone(60)
    assert trim.trimmed == RATE * 400 // 1000 - keep


def test_pieces_after_the_first_sound_pass_untouched() -> None:
    trim = LeadTrim(RATE, 1000)
    assert trim.cut(tone(40)) == tone(40)
    assert trim.trimmed == 0
    assert trim.cut(quiet(300)) == quiet(300)  # a pause inside the reply stays


def test_quiet_longer_than_the_limit_is_played_as_it_is() -> None:
    trim = LeadTrim(RATE, 300)
    assert trim.cut(quiet(200)) == b""  # held: the sound may still come within the limit
    out = trim.cut(quiet(200)) + trim.cut(tone(50))
    assert out == quiet(200) + quiet(200) + tone(50)
    assert trim.trimmed == 0


def test_a_reply_silent_throughout_is_played_whole_at_its_end() -> None:
    trim = LeadTrim(RATE, 1000)
    assert trim.cut(quiet(120)) == b""
    assert trim.flush() == quiet(120)


def test_switched_off_nothing_is_held() -> None:
    trim = LeadTrim(RATE, 0)
    assert trim.cut(quiet(100)) == quiet(100)


def test_word_timings_move_with_the_cut_and_never_before_zero() -> None:
    trim = LeadTrim(RATE, 1000)
    through(trim, quiet(210) + tone(100))
    cut = trim.trimmed / RATE
    words = [WordTiming("hello", 0.1, 0.5), WordTiming("there", 0.5, 0.9)]
    assert trim.shift(words) == [WordTiming("hello", 0.0, 0.5 - cut),
                                 WordTiming("there", 0.5 - cut, 0.9 - cut)]
