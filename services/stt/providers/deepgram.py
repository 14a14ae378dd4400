"""Deepgram live transcription over its listen WebSocket, through the official ``deepgram-sdk``.

One WebSocket per utterance: it opens when the utterance starts (so the handshake overlaps the
user's first words), audio goes out as it arrives, and at the end of speech we send
``Finalize`` (flush whatever audio is pending) and ``CloseStream``.

Deepgram's interim results (``is_final`` false) revise only the current segment, and its
endpointing finalizes segments (``is_final`` true) while the user still speaks. A partial is
therefore every finalized segment so far plus the current interim; the one final joins the
finalized segments. Deepgram's ``speech_final`` does not end our turn: our VAD does.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any, ClassVar

import websockets
from deepgram import AsyncDeepgramClient
from deepgram.core.api_error import ApiError
from deepgram.environment import DeepgramClientEnvironment
from deepgram.listen.v1.socket_client import AsyncV1SocketClient
from deepgram.listen.v1.types import ListenV1Error, ListenV1Results

from services.runtime.config import BaseConfig, require_key
from services.runtime.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ConfigError,
    ProviderError,
)
from services.stt.config import SttConfig
from services.stt.provider import SAMPLE_RATE, SttResult, WantPartials

log = logging.getLogger(__name__)


class DeepgramSttConfig(BaseConfig, frozen=True, kw_only=True):
    ENV: ClassVar[dict[str, str]] = {"deepgram_api_key": "DEEPGRAM_API_KEY"}
    SECRETS: ClassVar[frozenset[str]] = frozenset({"deepgram_api_key"})

    deepgram_api_key: str = ""
    # The WebSocket origin; tests and self-hosted Deepgram point it elsewhere.
    deepgram_url: str = DeepgramClientEnvironment.PRODUCTION.production
    deepgram_stt_model: str = "nova-3"
    # Silence (ms) after which Deepgram finalizes a segment. Our VAD ends the turn; this only
    # decides when a segment stops being revised, so it is long enough not to split phrases.
    deepgram_stt_endpointing_ms: int = 300
    deepgram_stt_interim_results: bool = True
    deepgram_stt_smart_format: bool = True
    # Seconds for the handshake, and for the last results once the utterance has ended.
    deepgram_stt_timeout: float = 5.0


class DeepgramStt:
    name = "deepgram"

    def __init__(self, client: AsyncDeepgramClient, *, model: str, language: str,
                 endpointing_ms: int = 300, interim_results: bool = True,
                 smart_format: bool = True, timeout: float = 5.0) -> None:
        self._client = client
        self.timeout = timeout
        # Query parameters of every connection; Deepgram wants the strings "true"/"false".
        self.params: dict[str, Any] = {
            "model": model, "language": language, "encoding": "linear16",
            "sample_rate": SAMPLE_RATE, "channels": 1,
            "endpointing": endpointing_ms if endpointing_ms > 0 else "false",
            "interim_results": _flag(interim_results), "smart_format": _flag(smart_format),
        }
        self._closed = False

    @classmethod
    def from_config(cls, cfg: SttConfig) -> DeepgramStt:
        own = DeepgramSttConfig.from_env()
        require_key(own.deepgram_api_key, provider=cls.name, stage="stt",
                    variable="DEEPGRAM_API_KEY")
        origin = own.deepgram_url.rstrip("/")
        if not re.match(r"wss?://[^/]+$", origin):
            raise ConfigError(f"VOICEBUS_DEEPGRAM_URL must be a ws:// or wss:// origin without a "
                              f"path (like {DeepgramClientEnvironment.PRODUCTION.production}), "
                              f"not {origin!r}")
        environment = DeepgramClientEnvironment(
            base=re.sub(r"^ws", "http", origin), production=origin,
            agent=DeepgramClientEnvironment.PRODUCTION.agent,
            agent_rest=DeepgramClientEnvironment.PRODUCTION.agent_rest,
        )
        client = AsyncDeepgramClient(api_key=own.deepgram_api_key, environment=environment)
        provider = cls(client, model=own.deepgram_stt_model, language=_bcp47(cfg.stt_language),
                       endpointing_ms=own.deepgram_stt_endpointing_ms,
                       interim_results=own.deepgram_stt_interim_results,
                       smart_format=own.deepgram_stt_smart_format,
                       timeout=own.deepgram_stt_timeout)
        log.info("deepgram STT at %s, model %s, language %s", origin, own.deepgram_stt_model,
                 provider.params["language"], extra={"stage": "stt", "provider": cls.name})
        return provider

    async def stream(self, frames: AsyncIterator[bytes], *,
                     partials: WantPartials = None) -> AsyncIterator[SttResult]:
        """Partials as Deepgram revises its hypothesis, then one final after ``frames`` ends.

        An error raised by ``frames`` itself is the caller's and passes through unchanged.
        """
        if self._closed:
            raise ProviderError("provider is closed", provider=self.name, retryable=False)
        async with AsyncExitStack() as stack:
            socket = await self._connect(stack)
            utt = _Utterance(self, socket, frames)
            # Registered after the socket, so it runs first: stop pulling audio, then close.
            stack.push_async_callback(utt.stop_sending)
            async for result in utt.results():
                yield result
            # Yielded before the socket closes: the close handshake is not on the user's clock.
            yield utt.final()

    async def aclose(self) -> None:
        # The SDK's HTTP client is never used for live audio and holds no connections.
        self._closed = True

    async def _connect(self, stack: AsyncExitStack) -> AsyncV1SocketClient:
        try:
            async with asyncio.timeout(self.timeout):
                return await stack.enter_async_context(self._client.listen.v1.connect(**self.params))
        except TimeoutError as exc:
            raise APITimeoutError(f"no WebSocket handshake within {self.timeout:g} s",
                                  provider=self.name) from exc
        except Exception as exc:
            raise self.map_error(exc) from exc

    def map_error(self, exc: BaseException) -> ProviderError:
        """Translate an SDK or WebSocket failure. Never uses ``str(exc)`` of an SDK error: only
        status codes and close reasons reach the message, so the key cannot leak into logs."""
        if isinstance(exc, ProviderError):
            return exc
        if isinstance(exc, ApiError):
            return APIStatusError(_describe_status(exc.status_code), status=exc.status_code or 0,
                                  provider=self.name)
        if isinstance(exc, websockets.ConnectionClosed):
            close = exc.rcvd
            why = f"code {close.code}, {close.reason or 'no reason'}" if close else "no close frame"
            return APIConnectionError(f"connection lost ({why})", provider=self.name)
        if isinstance(exc, ValueError):  # json.JSONDecodeError
            return _malformed(exc)
        if isinstance(exc, OSError | websockets.InvalidHandshake | EOFError):
            return APIConnectionError(f"cannot reach Deepgram: {type(exc).__name__}: {exc}",
                                      provider=self.name)
        return ProviderError(f"{type(exc).__name__}", provider=self.name)


class _Utterance:
    """One utterance on one socket: a task sends the audio while ``results`` reads."""

    def __init__(self, provider: DeepgramStt, socket: AsyncV1SocketClient,
                 frames: AsyncIterator[bytes]) -> None:
        self.provider = provider
        self.socket = socket
        self.closing = False  # CloseStream was sent: a clean close now means "done"
        self.deadline: float | None = None  # set when the audio ended: the results' due time
        self.segments: list[tuple[str, float]] = []  # finalized (text, confidence)
        self.sender = asyncio.create_task(self._send(frames), name="deepgram-send")

    async def results(self) -> AsyncIterator[SttResult]:
        """Partials until the server has answered our Finalize (or closed after CloseStream)."""
        shown = ""
        while (message := await self._next()) is not None:
            if isinstance(message, ListenV1Error):
                raise APIConnectionError(f"Deepgram error: {message.description}",
                                         provider=self.provider.name)
            if not isinstance(message, ListenV1Results):
                continue  # Metadata, SpeechStarted, UtteranceEnd: nothing to transcribe
            text = self._take(message)
            if message.from_finalize:
                return
            if text and text != shown:
                shown = text
                yield SttResult(text)

    def final(self) -> SttResult:
        words = [(len(text.split()), confidence) for text, confidence in self.segments]
        total = sum(count for count, _ in words)
        # Weighted by words, so a one-word segment does not count as much as a sentence.
        confidence = sum(count * c for count, c in words) / total if total else 0.0
        return SttResult(self._joined(), final=True, confidence=confidence)

    async def stop_sending(self) -> None:
        self.sender.cancel()
        await asyncio.gather(self.sender, return_exceptions=True)

    def _take(self, message: ListenV1Results) -> str:
        """Fold one Results message in; return the text a listener should now see."""
        try:
            best = message.channel.alternatives[0]
            text, confidence = best.transcript.strip(), float(best.confidence)
        except (AttributeError, IndexError, TypeError) as exc:  # the SDK does not validate
            raise _malformed(exc) from exc
        if not message.is_final:
            return self._joined(text)
        if text:
            self.segments.append((text, confidence))
        return self._joined()

    def _joined(self, interim: str = "") -> str:
        return " ".join([text for text, _ in self.segments] + ([interim] if interim else []))

    async def _send(self, frames: AsyncIterator[bytes]) -> None:
        try:
            async for pcm in frames:  # errors of ``frames`` itself stay the caller's
                await self._call(self.socket.send_media(pcm))
        finally:
            # Stopped mid-utterance (early close, an error): let the frames' producer know now
            # rather than whenever the garbage collector finalizes it.
            if (close := getattr(frames, "aclose", None)) is not None:
                await close()
        self.deadline = asyncio.get_running_loop().time() + self.provider.timeout
        await self._call(self.socket.send_finalize())
        self.closing = True  # before the send: the server may close before the send returns
        await self._call(self.socket.send_close_stream())

    async def _call(self, sending: Any) -> None:
        try:
            await sending
        except Exception as exc:
            raise self.provider.map_error(exc) from exc

    async def _next(self) -> Any:
        """The next server message, or None once the server closed after our CloseStream."""
        receiving = asyncio.ensure_future(self.socket.recv())
        try:
            if not self.sender.done():
                await asyncio.wait((receiving, self.sender), return_when=asyncio.FIRST_COMPLETED)
            if self.sender.done() and (failure := self.sender.exception()) is not None:
                raise failure
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
        except websockets.ConnectionClosedOK as exc:
            if self.closing:
                return None
            raise APIConnectionError("Deepgram closed the stream before the utterance ended",
                                     provider=self.provider.name) from exc
        except TimeoutError as exc:
            raise APITimeoutError(f"no final transcript within {self.provider.timeout:g} s "
                                  "of the end of speech", provider=self.provider.name) from exc
        except Exception as exc:
            raise self.provider.map_error(exc) from exc


def _malformed(exc: Exception) -> ProviderError:
    # Neither a status nor a lost connection; as for the OpenAI providers, the plain error,
    # retryable (another attempt, or provider, may well be fine).
    return ProviderError(f"malformed message from Deepgram: {type(exc).__name__}",
                         provider=DeepgramStt.name)


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _bcp47(language: str) -> str:
    # Our setting is case-insensitive ("en-us"); Deepgram documents codes as "en-US".
    primary, _, region = language.partition("-")
    if len(region) == 2:
        return f"{primary.lower()}-{region.upper()}"
    return language


def _describe_status(status: int | None) -> str:
    if status == 401:
        return "Deepgram rejected the API key (DEEPGRAM_API_KEY)"
    if status == 400:
        return "Deepgram rejected the stream parameters (model, language, encoding)"
    return "Deepgram refused the WebSocket handshake"
