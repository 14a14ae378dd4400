"""Offline STT with CMU PocketSphinx 5 and its bundled en-us model.

One provider instance serves every session of the process. A ``Decoder`` takes ~0.4 s and
~90 MB to load and decodes one utterance at a time, so the provider keeps a pool: an utterance
borrows an idle decoder (or loads a new one when all are busy) and gives it back at its end.

Decoder calls hold the GIL (measured), so a worker thread would buy nothing: they run inline on
the event loop, and the loop is handed back every few milliseconds of decoding.

A decoder adapts its noise estimate and cepstral mean (CMN) to the audio it hears and keeps them
across utterances. In a pool shared by every session that would let one caller's microphone
colour the next caller's words, so each utterance starts from the model's initial state and its
words depend only on its own audio.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from pocketsphinx import Decoder

from services.runtime.errors import ConfigError, ProviderError
from services.stt.config import SttConfig
from services.stt.provider import SAMPLE_RATE, SttResult, WantPartials

log = logging.getLogger(__name__)

T = TypeVar("T")

# Measured here: the same words as the default beams at RTF ~0.16 instead of ~0.26. Without
# the flat-lexicon second pass (fwdflat) the final comes ~40 ms sooner and 28/28 test phrases
# were still exact (27/28 with it).
FAST_BEAMS: dict[str, Any] = {"beam": 1e-40, "wbeam": 1e-20, "pbeam": 1e-40, "fwdflat": False}
# How much decoding (seconds) may run before other sessions get the loop back.
LOOP_SLICE_S = 0.010
BYTES_PER_MS = SAMPLE_RATE * 2 // 1000


class PocketSphinxStt:
    name = "pocketsphinx"

    def __init__(self, *, partial_interval_ms: int = 200, warm_decoders: int = 1,
                 **decoder_options: Any) -> None:
        """``decoder_options`` go to ``pocketsphinx.Decoder`` on top of our defaults."""
        self.partial_interval_ms = partial_interval_ms
        self._options: dict[str, Any] = {
            "samprate": SAMPLE_RATE, "loglevel": "FATAL", **FAST_BEAMS, **decoder_options,
        }
        self._idle: list[Decoder] = []
        self._loaded = 0
        self._initial_cmn = ""
        self._closed = False
        for _ in range(warm_decoders):
            self._idle.append(self._load_decoder())

    @classmethod
    def from_config(cls, cfg: SttConfig) -> PocketSphinxStt:
        if cfg.stt_language.lower() != "en-us":
            raise ConfigError(f"pocketsphinx bundles only an en-us model, not {cfg.stt_language!r}")
        return cls(partial_interval_ms=cfg.stt_partial_interval_ms,
                   warm_decoders=cfg.stt_warm_decoders)

    @property
    def decoders(self) -> int:
        """How many decoders exist: the most utterances that ever ran at once."""
        return self._loaded

    async def stream(self, frames: AsyncIterator[bytes], *,
                     partials: WantPartials = None) -> AsyncIterator[SttResult]:
        """Partials at most every ``partial_interval_ms`` of audio, then one final.

        Decoder failures become ``ProviderError``; an error raised by ``frames`` itself is the
        caller's and passes through unchanged.
        """
        utt = _Utterance(self._acquire(), self.partial_interval_ms * BYTES_PER_MS)
        try:
            utt.start(self._initial_cmn)
            async for pcm in frames:
                partial = utt.feed(pcm)
                if partial is not None:
                    yield SttResult(partial)
                if utt.busy_s >= LOOP_SLICE_S:
                    utt.busy_s = 0.0
                    await asyncio.sleep(0)
            final = utt.finish()
        finally:
            # Also runs when the consumer closes us early or the task is cancelled.
            self._release(utt.decoder, reusable=utt.abandon())
        # Yielded after the decoder is back in the pool: the next utterance need not wait.
        yield final

    async def aclose(self) -> None:
        self._closed = True
        self._idle.clear()

    def _load_decoder(self) -> Decoder:
        started = time.perf_counter()
        try:
            decoder = Decoder(**self._options)
        except Exception as exc:
            raise ProviderError(f"loading the decoder failed: {exc}", provider=self.name,
                                retryable=False) from exc
        self._loaded += 1
        self._initial_cmn = self._initial_cmn or decoder.get_cmn()
        log.info("pocketsphinx decoder %d loaded in %.2f s", self._loaded,
                 time.perf_counter() - started, extra={"provider": self.name})
        return decoder

    def _acquire(self) -> Decoder:
        if self._closed:
            raise ProviderError("provider is closed", provider=self.name, retryable=False)
        if self._idle:
            return self._idle.pop()
        log.warning("all %d decoders busy: loading one more blocks this process ~0.5 s; "
                    "set VOICEBUS_STT_WARM_DECODERS to the utterances you expect at once",
                    self._loaded, extra={"provider": self.name})
        return self._load_decoder()

    def _release(self, decoder: Decoder, *, reusable: bool) -> None:
        if reusable and not self._closed:
            self._idle.append(decoder)
        elif not reusable:
            # Its state is unknown after an error (process_raw outside an utterance segfaults).
            self._loaded -= 1
            log.warning("pocketsphinx decoder dropped after an error", extra={"provider": self.name})


class _Utterance:
    """One utterance on one borrowed decoder; every decoder call goes through ``_call``."""

    def __init__(self, decoder: Decoder, partial_bytes: int) -> None:
        self.decoder = decoder
        self.partial_bytes = partial_bytes
        self.since_partial = 0
        self.text = ""
        self.busy_s = 0.0
        self.active = False
        self.broken = False

    def start(self, cmn: str) -> None:
        # Both are needed (measured): reinit_feat forgets the noise estimate, set_cmn the mean.
        self._call(self.decoder.reinit_feat)
        self._call(self.decoder.set_cmn, cmn)
        self._call(self.decoder.start_utt)
        self.active = True

    def feed(self, pcm: bytes) -> str | None:
        """Decode one frame; return the new partial text when one is due and it changed."""
        self._call(self.decoder.process_raw, pcm, False, False)
        self.since_partial += len(pcm)
        if self.since_partial < self.partial_bytes:
            return None
        self.since_partial = 0
        text = _text(self._call(self.decoder.hyp))
        # An empty hypothesis tells a listener nothing; keep the last words instead.
        if not text or text == self.text:
            return None
        self.text = text
        return text

    def finish(self) -> SttResult:
        self._call(self.decoder.end_utt)
        self.active = False
        hyp = self._call(self.decoder.hyp)
        text = _text(hyp)
        # Silence gets a high posterior for "nothing"; no words means no confidence to report.
        return SttResult(text, final=True, confidence=_confidence(hyp) if text else 0.0)

    def abandon(self) -> bool:
        """End the utterance if it is still open; say whether the decoder can be reused."""
        if self.active and not self.broken:
            try:
                self.decoder.end_utt()
            except Exception:
                self.broken = True
            self.active = False
        return not self.broken

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        started = time.perf_counter()
        try:
            return fn(*args)
        except Exception as exc:
            self.broken = True
            raise ProviderError(f"pocketsphinx {getattr(fn, '__name__', 'call')} failed: {exc}",
                                provider=PocketSphinxStt.name, retryable=False) from exc
        finally:
            self.busy_s += time.perf_counter() - started


def _text(hyp: Any) -> str:
    return hyp.hypstr.strip() if hyp is not None and hyp.hypstr else ""


def _confidence(hyp: Any) -> float:
    if hyp is None:
        return 0.0
    prob = float(hyp.prob)
    # PocketSphinx 5 already reports a posterior in [0, 1]; older builds gave its logarithm.
    if prob < 0:
        prob = math.exp(prob)
    return min(1.0, max(0.0, prob))
