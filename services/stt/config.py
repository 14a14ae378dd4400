from __future__ import annotations

from services.runtime.config import BaseConfig


class SttConfig(BaseConfig, frozen=True, kw_only=True):
    stt_provider: str = "pocketsphinx"
    # Audio kept from before the VAD's speech edge, so the first phoneme is not clipped.
    stt_preroll_ms: int = 300
    # How often (in audio ms) a partial transcript may be published while the user speaks.
    stt_partial_interval_ms: int = 200
    stt_language: str = "en-us"
    # Decoders loaded at start-up. Loading one later (more people talking at once than this)
    # blocks the process for ~0.5 s, so set it to the utterances you expect at the same time.
    stt_warm_decoders: int = 2
