"""Whisper over a window fitted to the audio may loop; what the provider keeps of its text."""

from services.stt.providers.whisper import dedupe


def test_a_repeated_sentence_is_cut() -> None:
    assert dedupe("What time is it? What time is it? What time") == "What time is it?"
    assert dedupe("Hello there. How are you?") == "Hello there. How are you?"
    assert dedupe("Yes. No. Yes.") == "Yes. No."
    assert dedupe("") == ""
