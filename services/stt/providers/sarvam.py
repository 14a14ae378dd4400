"""Sarvam's realtime speech-to-text WebSocket (Indian languages), through the official ``sarvamai``.

Sarvam has two STT WebSockets. The older ``/speech-to-text/ws`` answers only with a transcript
per segment its own VAD cut, and says nothing when a flush finds nothing left to transcribe, so
a client cannot tell when an utterance's last words have come. We use the realtime one,
``/speech-to-text-realtime/ws`` (``speech_to_text_realtime_streaming`` in the SDK), with
``endpointing=manual``: our VAD delimits the utterance (``speech_start``, base64 ``audio_input``,
``speech_end``), Sarvam answers with growing ``transcript.partial`` texts and exactly one
``transcript.final``, and a fatal failure arrives as an ``error`` event with an HTTP-like
``status_code`` before the socket closes. Sarvam marks that endpoint beta: a key without beta
access is refused there (a 4000 close, or a 403), which a fallback chain then moves past.

One WebSocket per utterance, opened when the utterance starts so the handshake overlaps the
user's first words. The key travels as the ``api-subscription-key`` header; the SDK's
``ApiError`` carries every header of the handshake (the key among them) in its ``str``, so it is
never formatted, and the websockets logger, which shows the upgrade's headers at DEBUG, is
filtered.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any, ClassVar

import websockets
from sarvamai import (
    AsyncSarvamAI,
    RealtimeAudioInput,
    RealtimeEnd,
    RealtimeError,
    RealtimeSpeechEnd,
    RealtimeSpeechStart,
    RealtimeTranscriptFinal,
    RealtimeTranscriptPartial,
)
from sarvamai.speech_to_text_realtime_streaming.socket_client import (
    AsyncSpeechToTextRealtimeStreamingSocketClient as Socket,
)

from services.runtime.config import BaseConfig, require_key
from services.runtime.errors import (
    APIStatusError,
    APITimeoutError,
    ProviderError,
)
from services.runtime.sarvam import (
    PRODUCTION,
    environment,
    language_code,
    open_socket,
    redact_websocket_log,
    sdk_error,
)
from services.stt.config import SttConfig
from services.stt.provider import SAMPLE_RATE, SttResult, WantPartials

log = logging.getLogger(__name__)

_END_SECONDS = 1.0  # the polite "end" after a final is not worth waiting longer for
# Events whose fields we read: one of these that does not parse is a malformed message. Other
# events (session.begin, pong, ones newer than this SDK) carry nothing we need.
_READ = frozenset({"transcript.partial", "transcript.final", "error"})


class SarvamSttConfig(BaseConfig, frozen=True, kw_only=True):
    ENV: ClassVar[dict[str, str]] = {"sarvam_api_key": "SARVAM_API_KEY"}
    SECRETS: ClassVar[frozenset[str]] = frozenset({"sarvam_api_key"})

    sarvam_api_key: str = ""
    # The API's origin (ws(s):// or http(s)://, no path); tests point it at a local fake.
    sarvam_url: str = PRODUCTION
    # Seconds for the handshake, and for the final once the utterance has ended.
    sarvam_stt_timeout: float = 5.0


class SarvamStt:
    name = "sarvam"

    def __init__(self, client: AsyncSarvamAI, *, key: str, language: str, model: str,
                 mode: str, timeout: float = 5.0) -> None:
        # The SDK imports a socket client on first use: import it now, not inside the first
        # utterance's handshake timeout.
        self._realtime = client.speech_to_text_realtime_streaming
        self._key = key
        self.timeout = timeout
        # Query parameters of every connection, as the SDK's connect() takes them.
        self.params: dict[str, Any] = {
            "language_code": language, "model": model, "mode": mode, "endpointing": "manual",
            "encoding": "linear16", "sample_rate": str(SAMPLE_RATE),
        }
        self._closed = False
        redact_websocket_log(key)

    @classmethod
    def from_config(cls, cfg: SttConfig) -> SarvamStt:
        own = SarvamSttConfig.from_env()
        require_key(own.sarvam_api_key, provider=cls.name, stage="stt", variable="SARVAM_API_KEY")
        client = AsyncSarvamAI(api_subscription_key=own.sarvam_api_key,
                               environment=environment(own.sarvam_url))
        provider = cls(client, key=own.sarvam_api_key, language=language_code(
            cfg.sarvam_stt_language), model=cfg.sarvam_stt_model, mode=cfg.sarvam_stt_mode,
            timeout=own.sarvam_stt_timeout)
        log.info("sarvam STT at %s, model %s, language %s, mode %s", own.sarvam_url,
                 cfg.sarvam_stt_model, provider.params["language_code"], cfg.sarvam_stt_mode,
                 extra={"stage": "stt", "provider": cls.name})
        return provider

    async def stream(self, frames: AsyncIterator[bytes], *,
                     partials: WantPartials = None) -> AsyncIterator[SttResult]:
        """Partials as Sarvam revises its hypothesis, then one final after ``frames`` ends.

        An error raised by ``frames`` itself is the caller's and passes through unchanged.
        """
        if self._closed:
            raise ProviderError("provider is closed", provider=self.name, retryable=False)
        async with AsyncExitStack() as stack:
            socket = await self._connect(stack)
            utt = _Utterance(self, socket, frames)
            # Registered after the socket, so it runs first: stop pulling audio, then close.
            stack.push_async_callback(utt.stop)
            async for text in utt.partials():
                yield SttResult(text)
            # Yielded before the socket closes: the close handshake is not on the user's clock.
            yield SttResult(utt.final_text, final=True)

    async def aclose(self) -> None:
        # Live audio never uses the SDK's HTTP client: it holds no connections.
        self._closed = True

    async def _connect(self, stack: AsyncExitStack) -> Socket:
        return await open_socket(self._realtime.connect(**self.params), stack,
                                 timeout=self.timeout, provider=self.name, redact=self.redact)

    def map_error(self, exc: BaseException) -> ProviderError:
        return sdk_error(exc, self.name, self.redact)

    def redact(self, text: str) -> str:
        return text.replace(self._key, "<redacted>") if self._key else text


class _Utterance:
    """One utterance on one socket: a task sends the audio while ``partials`` reads."""

    def __init__(self, provider: SarvamStt, socket: Socket, frames: AsyncIterator[bytes]) -> None:
        self.provider = provider
        self.socket = socket
        self.heard_audio = False
        self.final_text = ""
        self.finished = False  # the final came: the socket may be ended politely
        self.deadline: float | None = None  # set at speech_end: when the final is due
        self.sender = asyncio.create_task(self._send(frames), name="sarvam-send")

    async def partials(self) -> AsyncIterator[str]:
        """Partial texts until the final (kept in ``final_text``) arrives."""
        shown = ""
        while (message := await self._next()) is not None:
            match message:
                case RealtimeTranscriptPartial(text=text) if text.strip() and text != shown:
                    shown = text
                    yield text.strip()
                case RealtimeTranscriptFinal(text=text):
                    self.final_text, self.finished = text.strip(), True
                    return
                case RealtimeError() if message.is_fatal:
                    raise _server_error(message, self.provider)
                case RealtimeError():
                    log.warning("Sarvam: %s (%s)", self.provider.redact(message.message),
                                message.code, extra={"stage": "stt", "provider": "sarvam"})
                case dict() if message.get("event") in _READ:  # the SDK could not parse it
                    raise _malformed(f"a {message['event']} event without its fields")
                case bytes():
                    raise _malformed("a binary frame")
        self.finished = True  # no audio came: nothing was asked, the final is empty

    async def stop(self) -> None:
        self.sender.cancel()
        await asyncio.gather(self.sender, return_exceptions=True)
        if self.finished and self.heard_audio:
            try:  # the documented graceful end of a session; the close follows regardless
                async with asyncio.timeout(_END_SECONDS):
                    await self.socket.send_realtime_end(RealtimeEnd())
            except Exception:  # the transcript is already out: nothing left to report
                pass

    async def _send(self, frames: AsyncIterator[bytes]) -> None:
        try:
            async for pcm in frames:  # errors of ``frames`` itself stay the caller's
                if not self.heard_audio:
                    self.heard_audio = True
                    if not await self._call(self.socket.send_realtime_speech_start(
                            RealtimeSpeechStart())):
                        return
                audio = base64.b64encode(pcm).decode("ascii")
                if not await self._call(self.socket.send_realtime_audio_input(
                        RealtimeAudioInput(audio=audio))):
                    return
        finally:
            # Stopped mid-utterance (early close, an error): let the frames' producer know now
            # rather than whenever the garbage collector finalizes it.
            if (close := getattr(frames, "aclose", None)) is not None:
                await close()
        if self.heard_audio:
            self.deadline = asyncio.get_running_loop().time() + self.provider.timeout
            await self._call(self.socket.send_realtime_speech_end(RealtimeSpeechEnd()))

    async def _call(self, sending: Any) -> bool:
        """Send; False if the socket is gone. Why it went is the receiving side's to report:
        the server's error event, still queued, is a better account than our failed send."""
        try:
            await sending
        except websockets.ConnectionClosed:
            return False
        return True

    async def _next(self) -> Any:
        """The next server message, or None when no audio came and there is nothing to await."""
        receiving = asyncio.ensure_future(self.socket.recv())
        try:
            if not self.sender.done():
                await asyncio.wait((receiving, self.sender), return_when=asyncio.FIRST_COMPLETED)
            if self.sender.done():
                if (failure := self.sender.exception()) is not None:
                    raise failure
                if not self.heard_audio:
                    return None
            return await self._receive(receiving)
        finally:
            receiving.cancel()  # cancel-safe in websockets; a no-op once it is done
            if receiving.done() and not receiving.cancelled():
                receiving.exception()  # retrieved: a failure already reported elsewhere

    async def _receive(self, receiving: asyncio.Future[Any]) -> Any:
        try:
            # No deadline while audio still flows: a quiet server is normal mid-utterance.
            async with asyncio.timeout_at(self.deadline):
                return await receiving
        except TimeoutError:
            raise APITimeoutError(f"no final transcript within {self.provider.timeout:g} s "
                                  "of the end of speech", provider=self.provider.name) from None
        except Exception as exc:
            raise self.provider.map_error(exc) from exc


def _server_error(error: RealtimeError, provider: SarvamStt) -> ProviderError:
    message = provider.redact(f"{error.message} ({error.code})")
    if error.status_code and error.status_code >= 400:
        return APIStatusError(message, status=error.status_code, provider=provider.name)
    return ProviderError(message, provider=provider.name)


def _malformed(what: str) -> ProviderError:
    # As the other providers: neither a status nor a lost connection, and retryable.
    return ProviderError(f"malformed message from Sarvam: {what}", provider=SarvamStt.name)
