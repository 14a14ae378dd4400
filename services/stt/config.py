from __future__ import annotations

from services.runtime.fallback import ChainConfig


class SttConfig(ChainConfig, frozen=True, kw_only=True):
    # The one provider, used when VOICEBUS_STT_PROVIDERS is not set.
    stt_provider: str = "pocketsphinx"
    # A fallback chain, in order (e.g. "a,b"); when set it wins over the single provider.
    stt_providers: str = ""
    # Seconds from the end of speech to a provider's first transcript before the turn moves to
    # the next provider in VOICEBUS_STT_PROVIDERS (not applied to the last one left).
    stt_first_result_timeout: float = 3.0
    # Audio kept from before the VAD's speech edge, so the first phoneme is not clipped.
    stt_preroll_ms: int = 300
    # How often (in audio ms) a partial transcript may be published while the user speaks.
    stt_partial_interval_ms: int = 200
    stt_language: str = "en-us"
    # Decoders loaded at start-up. Loading one later (more people talking at once than this)
    # blocks the process for ~0.5 s, so set it to the utterances you expect at the same time.
    stt_warm_decoders: int = 2
