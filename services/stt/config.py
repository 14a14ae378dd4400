from __future__ import annotations

from typing import Annotated

import msgspec

from services.runtime.fallback import ChainConfig

Ms = Annotated[int, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(ge=0)]


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
    # Partials of an utterance begun while the agent only listens (a provider that pays for
    # each, Whisper, skips them otherwise): for a page that shows the user's words as they come.
    stt_partials_while_listening: bool = False
    stt_language: str = "en-us"
    # Decoders loaded at start-up. Loading one later (more people talking at once than this)
    # blocks the process for ~0.5 s, so set it to the utterances you expect at the same time.
    stt_warm_decoders: int = 2
    # End of turn (docs/turn-taking.md). The VAD's silence window (VOICEBUS_VAD_SILENCE_MS)
    # ends an utterance; its final is then held back this many ms, by how its words end, and
    # speech that starts meanwhile continues the same turn. A question is over at once…
    stt_eot_question_ms: Ms = 0
    # …a statement after a short pause, a lone answer ("Yes.", "Okay") a little longer, as
    # it often leads into more ("Yes, please call my mother")…
    stt_eot_statement_ms: Ms = 50
    stt_eot_brief_ms: Ms = 300
    # …and a phrase left hanging ("I want to", "and um") waits long for the rest of it.
    stt_eot_incomplete_ms: Ms = 1500
    # Preemptive replies (docs/turn-taking.md): when a final is held back at most this long,
    # the utterance's words go out at once as a settled transcript, so the agent prepares its
    # answer during the hold (heard only once the final agrees). Speech in the hold then opens
    # the next turn, which carries these words on. 0: off.
    stt_preemptive_max_hold_ms: Ms = 1000
    # …and sooner still when the provider knows the words before the end of speech (whisper's
    # final decoded ahead, after 80 ms of quiet): the answer is then prepared during the VAD's
    # silence window too, questions' included. Speech that resumes after that costs a
    # prepared answer thrown away (an LLM request, with a cloud LLM).
    stt_early_drafts: bool = True
    # Seconds the user may stay silent while the agent listens before the STT opens a turn
    # with no speech (a final with idle=1, 2, … in a row) for the agent to prompt them; 0: off.
    stt_user_idle_s: Seconds = 0.0
    # instant (services/stt/providers/instant.py, capacity planning only): the words it hears.
    stt_instant_text: str = "What time is it?"
    # whisper (services/stt/providers/whisper.py): where the converted model is kept, and the
    # threads each decode may use.
    whisper_cache: str = "~/.cache/voicebus"
    whisper_threads: int = 2
    # Beam search of this width instead of greedy decoding (0): more CPU per decode.
    whisper_beam_size: int = 0
    # Quiet (ms) after which whisper decodes the final ahead of the end of speech. Less starts
    # the answer sooner; a pause inside a sentence longer than this plus a decode (~100 ms)
    # then costs a prepared answer thrown away, and a shorter one a decode aborted.
    whisper_speculate_ms: Ms = 80
    # sarvam (services/stt/providers/sarvam.py; the key and URL are its own): the language
    # spoken, as Sarvam names it ("hi-IN", "ta-IN", "en-IN"…; "auto" detects it), the model,
    # and what it writes ("transcribe"; "translate" to English, "translit", "codemix"…).
    sarvam_stt_language: str = "en-IN"
    sarvam_stt_model: str = "saaras:v3-realtime"
    sarvam_stt_mode: str = "transcribe"
