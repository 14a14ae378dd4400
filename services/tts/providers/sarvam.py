"""Sarvam's text-to-speech WebSocket (Bulbul voices, Indian languages), through ``sarvamai``.

A turn is one WebSocket (``/text-to-speech/ws``), opened before the first chunk so that its
handshake overlaps the LLM's first sentence. With the first speakable chunk goes a ``config``
message (language, speaker, model, raw ``linear16`` at our rate); each chunk is then sent as
``text`` and ``flush``, and its audio is read until the ``final`` event that
``send_completion_event=true`` asks for. One chunk is spoken at a time: Sarvam's audio messages
say nothing of the text they speak, and that event is the only boundary, so the next chunk goes
out once the one before is spoken (synthesis runs ahead of playout, so nothing is heard of the
wait). Closing the iterator early closes the socket, which stops the generation.

The WebSocket gives no word timings: egress estimates ``text_offset`` from the audio.

The key travels as the ``api-subscription-key`` header. The SDK's ``ApiError`` carries every
header of a refused handshake (the key among them) in its ``str``, so it is never formatted, and
the websockets logger, which shows the upgrade's headers at DEBUG, is filtered.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any, ClassVar

from sarvamai import (
    AsyncSarvamAI,
    AudioOutput,
    ErrorResponse,
    EventResponse,
)
from sarvamai.text_to_speech_streaming.socket_client import (
    AsyncTextToSpeechStreamingSocketClient as Socket,
)

from services.runtime.config import BaseConfig, require_key
from services.runtime.errors import (
    APIStatusError,
    APITimeoutError,
    ConfigError,
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
from services.tts.config import TtsConfig
from services.tts.provider import SpokenAudio
from services.tts.providers._common import WholeSamples, speakable

log = logging.getLogger(__name__)

_RATES = (8000, 16000, 22050, 24000)  # what the WebSocket offers


class SarvamTtsConfig(BaseConfig, frozen=True, kw_only=True):
    ENV: ClassVar[dict[str, str]] = {"sarvam_api_key": "SARVAM_API_KEY"}
    SECRETS: ClassVar[frozenset[str]] = frozenset({"sarvam_api_key"})

    sarvam_api_key: str = ""
    # The API's origin (ws(s):// or http(s)://, no path); tests point it at a local fake.
    sarvam_url: str = PRODUCTION
    # Seconds to open a socket, and the longest silence while audio is owed.
    tts_timeout: float = 10.0


class SarvamTts:
    name = "sarvam"

    def __init__(self, own: SarvamTtsConfig, stage: TtsConfig) -> None:
        require_key(own.sarvam_api_key, provider=self.name, stage="tts", variable="SARVAM_API_KEY")
        if stage.sarvam_tts_sample_rate not in _RATES:
            raise ConfigError(f"VOICEBUS_SARVAM_TTS_SAMPLE_RATE must be one of {_RATES}")
        self.sample_rate: int = stage.sarvam_tts_sample_rate
        self.timeout = own.tts_timeout
        self._key = own.sarvam_api_key
        self._model = stage.sarvam_tts_model
        client = AsyncSarvamAI(api_subscription_key=own.sarvam_api_key,
                               environment=environment(own.sarvam_url))
        # The SDK imports a socket client on first use: import it now, not inside the first
        # turn's handshake timeout.
        self._streaming = client.text_to_speech_streaming
        # The config message (the model itself goes in the connection's query).
        self.voice: dict[str, Any] = {
            "target_language_code": language_code(stage.sarvam_tts_language),
            "speaker": stage.sarvam_tts_speaker, "speech_sample_rate": self.sample_rate,
            "output_audio_codec": "linear16"}
        redact_websocket_log(own.sarvam_api_key)
        log.info("sarvam tts at %s: model %s, speaker %s, language %s, %d Hz", own.sarvam_url,
                 self._model, stage.sarvam_tts_speaker, self.voice["target_language_code"],
                 self.sample_rate, extra={"stage": "tts", "provider": self.name})

    @classmethod
    def from_config(cls, stage: TtsConfig) -> SarvamTts:
        return cls(SarvamTtsConfig.from_env(), stage)

    async def synthesize(self, chunks: AsyncIterator[str]) -> AsyncIterator[SpokenAudio]:
        """Audio as it arrives, tagged with its chunk's index in ``chunks``. An error raised by
        ``chunks`` passes through."""
        async with AsyncExitStack() as stack:
            turn = _Turn(self, await self._connect(stack))
            index = -1
            async for text in chunks:
                index += 1  # counts skipped chunks too: indices match the caller's chunk list
                if not speakable(text):
                    continue
                await turn.send(text)
                while (pcm := await turn.next_audio()) is not None:
                    if pcm:
                        yield SpokenAudio(pcm, chunk=index)

    async def aclose(self) -> None:
        # Sockets live only as long as their turn; the SDK's HTTP client was never used.
        pass

    async def _connect(self, stack: AsyncExitStack) -> Socket:
        return await open_socket(
            self._streaming.connect(model=self._model, send_completion_event="true"), stack,
            timeout=self.timeout, provider=self.name, redact=self.redact)

    def map_error(self, exc: BaseException) -> ProviderError:
        return sdk_error(exc, self.name, self.redact)

    def redact(self, text: str) -> str:
        return text.replace(self._key, "<redacted>") if self._key else text


class _Turn:
    """One synthesize() call on its socket."""

    def __init__(self, provider: SarvamTts, socket: Socket) -> None:
        self.provider = provider
        self.socket = socket
        self.configured = False
        self.carry = WholeSamples()  # a byte left over waits for the next message

    async def send(self, text: str) -> None:
        try:
            if not self.configured:
                await self.socket.configure(**self.provider.voice)
                self.configured = True
            await self.socket.convert(text)
            await self.socket.flush()
        except Exception as exc:
            raise self.provider.map_error(exc) from exc

    async def next_audio(self) -> bytes | None:
        """The next PCM of the chunk in flight (b"" if a message held none), None once the
        server said it was all spoken."""
        provider = self.provider
        try:
            async with asyncio.timeout(provider.timeout):
                message = await self.socket.recv()
        except TimeoutError:
            raise APITimeoutError(f"no audio for {provider.timeout:g} s",
                                  provider=provider.name) from None
        except Exception as exc:
            raise provider.map_error(exc) from exc
        match message:
            case AudioOutput(data=data):
                return self.carry.whole(self._decode(data.content_type, data.audio))
            case EventResponse(data=data) if data.event_type == "final":
                if self.carry.pending:
                    log.warning("speech ended in half a sample; dropped",
                                extra={"stage": "tts", "provider": provider.name})
                    self.carry = WholeSamples()
                return None
            case ErrorResponse(data=data):
                raise _server_error(data.code, provider.redact(data.message))
        return b""  # an event of another kind: nothing to play

    def _decode(self, content_type: str, audio: str) -> bytes:
        # A JSON or text body where audio belongs must not be played as noise.
        if content_type.startswith(("application/json", "text/")):
            raise ProviderError(f"expected audio, got {content_type}", provider=SarvamTts.name)
        try:
            return base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise ProviderError("audio is not base64", provider=SarvamTts.name) from None


def _server_error(code: Any, message: str) -> ProviderError:
    if isinstance(code, int) and code >= 400:
        return APIStatusError(message, status=code, provider=SarvamTts.name)
    return ProviderError(message, provider=SarvamTts.name)
