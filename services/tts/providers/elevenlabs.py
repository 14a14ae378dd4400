"""Streaming TTS over ElevenLabs' stream-input WebSocket, through the official ``elevenlabs`` SDK.

A turn is one WebSocket on ``/v1/text-to-speech/{voice_id}/stream-input``, opened as the turn
starts so that the handshake overlaps the LLM's first sentence. With the first text chunk goes
the opening message (a single space, and the voice settings if any are configured); each chunk
is sent the moment it arrives, with ``flush``: the stage's chunker already cut it at a sentence
or clause, so waiting for ElevenLabs' chunk-length schedule (120 characters at first) would
only add latency, and a flush makes each chunk a generation of its own, which is how its audio
is matched to it (below). ``try_trigger_generation`` is not used: a flush does the same, always.
The turn ends with empty text; the server answers ``isFinal`` and closes. Closing the iterator
early closes the socket, which is how the server is told to stop generating.

No socket pool, unlike Cartesia: this endpoint's socket ends with its stream, and on the
multi-context endpoint a flushed context that is closed goes on generating, so a barge-in would
cost a socket there too; the handshake is hidden behind the LLM's thinking anyway.

What the SDK gives, and what we drive ourselves: the SDK's one helper for this endpoint
(``text_to_speech.convert_realtime``) is synchronous (``websockets.sync``), polls for audio
with a 10 ms timeout between sends, raises its own ``ApiError`` and drops the alignments. We
run the socket on ``websockets``' asyncio client instead, and take the rest from the SDK: its
client wrapper for the auth header (``xi-api-key``) and its other headers, its environment for
the production URL, ``build_ws_url`` for the endpoint, its models for what we send
(``InitializeConnection``, ``SendText``, ``CloseConnection``, ``RealtimeVoiceSettings``) and to
check what we receive (``AudioOutput`` with its ``Alignment``), and its output-format enum for
the PCM rates there are.

Word timings (``synthesize(chunks, words=[])``, as for Cartesia): with ``sync_alignment=true``
every audio message carries the characters it speaks, with start times and durations in ms from
the start of that message's audio (``alignment``: the text as we sent it; ``normalizedAlignment``:
as the model read it, used only when the other is missing). Each message is placed on the turn's
clock by the audio received before it, counted in samples, so the clock is the turn's ``pts_ms``
one; characters are joined into words at whitespace (a word may span messages) and a word ends
with its chunk. The same characters say which chunk a message speaks: letters and digits are
counted against those of the chunks sent, in order.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import json
import logging
import typing
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pydantic
from elevenlabs.core.client_wrapper import BaseClientWrapper
from elevenlabs.core.pydantic_utilities import parse_obj_as
from elevenlabs.environment import ElevenLabsEnvironment
from elevenlabs.types import (
    Alignment,
    AudioOutput,
    CloseConnection,
    InitializeConnection,
    NormalizedAlignment,
    RealtimeVoiceSettings,
    SendText,
    TextToSpeechOutputFormatEnum,
)
from elevenlabs.url_utils import build_ws_url
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from services.runtime.config import BaseConfig, require_key
from services.runtime.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    ConfigError,
    ProviderError,
)
from services.runtime.logs import redact
from services.tts.config import TtsConfig
from services.tts.provider import SpokenAudio, WordTiming
from services.tts.providers._common import WholeSamples, speakable

log = logging.getLogger(__name__)

NAME = "elevenlabs"
_CLOSE_SECONDS = 1.0  # a socket that cannot close this fast is dropped
_MAX_MESSAGE = 16 * 2**20  # a long chunk's audio comes in big messages; 1 MiB is not enough
_WAKE = object()  # tells the receiving side that the sending side changed the turn's state
# The ``error`` names the server reports (the ``detail.status`` names of its REST API), as the
# HTTP status each stands for: that decides ``retryable``.
_ERROR_STATUS = {
    "invalid_api_key": 401, "missing_permissions": 403, "quota_exceeded": 402,
    "voice_not_found": 404, "input_timeout_exceeded": 408,
    "too_many_concurrent_requests": 429, "rate_limit_exceeded": 429, "system_busy": 503,
}
# Close codes of a socket the server shut without an error message.
_CLOSE_STATUS = {1008: 400, 1011: 500, 1013: 503}  # policy violation, internal error, try later


def _pcm_rates() -> tuple[int, ...]:
    formats, *_ = typing.get_args(TextToSpeechOutputFormatEnum)
    return tuple(sorted(int(f.removeprefix("pcm_")) for f in typing.get_args(formats)
                        if f.startswith("pcm_")))


_RATES = _pcm_rates()  # 8000, 16000, 22050, 24000, 44100 in SDK 2.78


class ElevenLabsConfig(BaseConfig, frozen=True, kw_only=True):
    ENV: ClassVar[dict[str, str]] = {"elevenlabs_api_key": "ELEVENLABS_API_KEY"}
    SECRETS: ClassVar[frozenset[str]] = frozenset({"elevenlabs_api_key"})

    elevenlabs_api_key: str = ""
    # Base URL of the API (https://, http://, wss:// or ws://); empty means ElevenLabs' own.
    elevenlabs_url: str = ""
    # (The voice, model, language and voice settings are the stage's, TtsConfig: an agent
    # may choose them.)
    elevenlabs_tts_sample_rate: int = 24000
    # Seconds the server waits for more text before it ends the stream (it allows 1..180); must
    # outlast the LLM's longest pause in a reply (a tool call), 20 s being the server's default.
    elevenlabs_tts_inactivity_timeout: int = 60
    # Seconds to open the socket, and the longest silence while the server owes us audio.
    tts_timeout: float = 10.0


class ElevenLabsTts:
    name = NAME
    word_timestamps = True

    def __init__(self, cfg: ElevenLabsConfig, voice: TtsConfig) -> None:
        require_key(cfg.elevenlabs_api_key, provider=self.name, stage="tts",
                    variable="ELEVENLABS_API_KEY")
        if cfg.elevenlabs_tts_sample_rate not in _RATES:
            raise ConfigError(f"VOICEBUS_ELEVENLABS_TTS_SAMPLE_RATE must be one of {_RATES}")
        if not 1 <= cfg.elevenlabs_tts_inactivity_timeout <= 180:
            raise ConfigError("VOICEBUS_ELEVENLABS_TTS_INACTIVITY_TIMEOUT must be 1..180")
        self.sample_rate: int = cfg.elevenlabs_tts_sample_rate
        self._cfg, self._voice = cfg, voice
        base = _base_url(cfg.elevenlabs_url)
        self._sdk = BaseClientWrapper(api_key=cfg.elevenlabs_api_key, base_url=base)
        self._url = build_ws_url(
            base, ["v1", "text-to-speech", voice.elevenlabs_tts_voice, "stream-input"],
            self._query())
        # websockets logs the upgrade's headers at DEBUG, the key among them.
        self._ws_log = logging.getLogger(f"{__name__}.websocket")
        redact(self._ws_log, cfg.elevenlabs_api_key)
        log.info("elevenlabs tts: model %s, voice %s, %d Hz", voice.elevenlabs_tts_model,
                 voice.elevenlabs_tts_voice, self.sample_rate, extra={"provider": self.name})

    @classmethod
    def from_config(cls, stage: TtsConfig) -> ElevenLabsTts:
        return cls(ElevenLabsConfig.from_env(), stage)

    async def synthesize(self, chunks: AsyncIterator[str], *,
                         words: list[WordTiming] | None = None) -> AsyncIterator[SpokenAudio]:
        """Audio as it arrives, tagged with its chunk's index in ``chunks``; word timings go to
        ``words`` if given. An error raised by ``chunks`` passes through."""
        turn = _Turn(self.sample_rate, words)
        ws = await self._connect()  # before the first chunk: the handshake overlaps the LLM
        reader = asyncio.create_task(self._read(ws, turn))
        sender = asyncio.create_task(self._send_all(ws, turn, chunks))
        try:
            while not turn.finished():
                piece = self._take(turn, await self._next(turn))
                if piece is not None:
                    yield piece
        finally:
            sender.cancel()
            reader.cancel()
            await asyncio.gather(sender, reader, return_exceptions=True)
            await _close_quietly(ws)  # early, this is what stops the generation

    async def aclose(self) -> None:
        pass  # nothing outlives a turn

    # -- one turn -------------------------------------------------------------------------------

    async def _next(self, turn: _Turn) -> object:
        # Silence is a stall only while the server owes us something; between the LLM's
        # sentences it is normal, however long the LLM takes.
        timeout = self._cfg.tts_timeout if turn.owed() else None
        try:
            async with asyncio.timeout(timeout):  # not wait_for: it can drop a cancel (3.11)
                return await turn.inbox.get()
        except TimeoutError:
            raise APITimeoutError(f"no audio for {timeout:.1f}s", provider=self.name) from None

    def _take(self, turn: _Turn, item: object) -> SpokenAudio | None:
        try:
            return turn.take(item)
        except ProviderError as exc:  # a server may echo the key it rejected: never log it
            key = self._cfg.elevenlabs_api_key
            if key in str(exc):
                exc.args = (str(exc).replace(key, "<redacted>"),)
            raise

    async def _send_all(self, ws: ClientConnection, turn: _Turn,
                        chunks: AsyncIterator[str]) -> None:
        try:
            index = -1
            async for text in chunks:
                index += 1  # counts skipped chunks too: indices match the caller's chunk list
                if not speakable(text):
                    continue
                if not turn.sent:
                    await self._send(ws, self._opening())
                turn.add_chunk(index, text)  # before sending: its audio may arrive at once
                # The API wants text to end in one space: it is how it knows a word is whole.
                await self._send(ws, SendText(text=text.strip() + " ", flush=True))
                turn.inbox.put_nowait(_WAKE)
            if turn.sent:
                await self._send(ws, CloseConnection())
            turn.input_done = True
            turn.inbox.put_nowait(_WAKE)
        except Exception as exc:  # ours are mapped in _send; the input's own pass through
            turn.inbox.put_nowait(exc)

    async def _read(self, ws: ClientConnection, turn: _Turn) -> None:
        while True:
            try:
                message = await ws.recv()
            except Exception as exc:  # after isFinal the close is expected, and not looked at
                turn.inbox.put_nowait(self._map_error(exc))
                return
            turn.inbox.put_nowait(message)

    def _opening(self) -> InitializeConnection:
        voice = self._voice
        settings = {name: value for name, value in (
            ("stability", voice.elevenlabs_tts_stability),
            ("similarity_boost", voice.elevenlabs_tts_similarity_boost),
            ("speed", voice.elevenlabs_tts_speed)) if value is not None}
        if settings:
            return InitializeConnection(voice_settings=RealtimeVoiceSettings(**settings))
        return InitializeConnection()  # the key goes in a header, not in this message

    def _query(self) -> dict[str, str]:
        cfg, voice = self._cfg, self._voice
        query = {"model_id": voice.elevenlabs_tts_model, "output_format": f"pcm_{self.sample_rate}",
                 "sync_alignment": "true",  # timings with every audio message
                 "inactivity_timeout": str(cfg.elevenlabs_tts_inactivity_timeout)}
        if voice.elevenlabs_tts_language:
            query["language_code"] = voice.elevenlabs_tts_language
        return query

    async def _send(self, ws: ClientConnection, message: pydantic.BaseModel) -> None:
        try:
            await ws.send(json.dumps(message.dict()))
        except Exception as exc:
            raise self._map_error(exc) from exc

    async def _connect(self) -> ClientConnection:
        try:
            return await connect(
                self._url, additional_headers=self._sdk.get_headers(),
                user_agent_header=None,  # the SDK's headers name it
                open_timeout=self._cfg.tts_timeout, close_timeout=_CLOSE_SECONDS,
                max_size=_MAX_MESSAGE, logger=self._ws_log)
        except Exception as exc:
            raise self._map_error(exc) from exc

    def _map_error(self, exc: BaseException) -> ProviderError:
        error = _classify(exc)
        key = self._cfg.elevenlabs_api_key
        if key in str(error):  # a close reason may echo the key that was rejected
            error.args = (str(error).replace(key, "<redacted>"),)
        return error


class _Words:
    """Timed characters joined into words at whitespace; a word may span audio messages."""

    def __init__(self, out: list[WordTiming] | None) -> None:
        self.out = out
        self.chars: list[str] = []
        self.start = self.end = 0.0

    def add(self, timed: Alignment | NormalizedAlignment, offset: float) -> None:
        for char, start_ms, duration_ms in zip(timed.chars or [], timed.char_start_times_ms or [],
                                               timed.char_durations_ms or [], strict=False):
            if char.isspace():
                self.close()
                continue
            if not self.chars:
                self.start = offset + start_ms / 1000
            self.chars.append(char)
            self.end = offset + (start_ms + duration_ms) / 1000

    def close(self) -> None:
        if self.chars and self.out is not None:
            self.out.append(WordTiming("".join(self.chars), self.start, self.end))
        self.chars = []


class _Turn:
    """One synthesize() call: what was sent, what came back."""

    def __init__(self, rate: int, words: list[WordTiming] | None) -> None:
        self.rate = rate
        # Items from the reader (server messages, errors) and the sender (_WAKE, errors).
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self.sent: list[int] = []  # the input index of each chunk sent, in order
        self.ends: list[int] = []  # letters and digits sent up to the end of each chunk
        self.aligned = 0  # letters and digits the audio has spoken so far
        self.current = 0  # the position in ``sent`` of the chunk being spoken
        self.audio_bytes = 0  # the turn's clock
        self.unanswered = False  # a chunk went out whose audio has not all come back
        self.input_done = False
        self.final = False
        self.words = _Words(words)
        self.carry = WholeSamples()  # a byte left over waits for the next message

    def add_chunk(self, index: int, text: str) -> None:
        self.sent.append(index)
        self.ends.append((self.ends[-1] if self.ends else 0) + _letters(text))
        self.unanswered = True

    def finished(self) -> bool:
        return self.final or (self.input_done and not self.sent)

    def owed(self) -> bool:
        return bool(self.sent) and not self.final and (self.unanswered or self.input_done)

    def take(self, item: object) -> SpokenAudio | None:
        if isinstance(item, BaseException):
            raise item
        if item is _WAKE:
            return None
        data = _parse(item)
        if data.get("isFinal"):
            self.words.close()
            self.final = True
            return None
        if "audio" not in data and ("error" in data or "message" in data):
            raise _server_error(data)
        if data.get("audio") is None:
            return None  # a message with nothing to play (null audio) has nothing to time either
        return self._audio(_audio_output(data))

    def _audio(self, message: AudioOutput) -> SpokenAudio | None:
        try:
            data = base64.b64decode(message.audio, validate=True)
        except (binascii.Error, ValueError):
            raise ProviderError("audio is not base64", provider=NAME) from None
        if not self.sent:
            raise ProviderError("audio before any text was sent", provider=NAME)
        offset = self.audio_bytes / 2 / self.rate
        self.audio_bytes += len(data)
        self._follow(message.alignment, message.normalized_alignment, offset)
        pcm = self.carry.whole(data)
        return SpokenAudio(pcm, chunk=self.sent[self.current]) if pcm else None

    def _follow(self, alignment: Alignment | None, normalized: NormalizedAlignment | None,
                offset: float) -> None:
        """Which chunk this message speaks, and its words."""
        if alignment is not None and alignment.chars:
            # The chunk of the next letter to be spoken; a flush is a generation of its own,
            # so a message never speaks two chunks.
            position = min(bisect.bisect_right(self.ends, self.aligned), len(self.sent) - 1)
            if position > self.current:
                self.words.close()  # the last word of a chunk has no space after it
                self.current = position
            self.aligned += sum(_letters(char) for char in alignment.chars)
            self.unanswered = self.aligned < self.ends[-1]
            self.words.add(alignment, offset)
            return
        # Without the characters sent, a message cannot be placed in the text: it speaks the
        # chunk being spoken, and at least something came back.
        self.unanswered = False
        if normalized is not None and normalized.chars:
            self.words.add(normalized, offset)


def _letters(text: str) -> int:
    return sum(char.isalnum() for char in text)


def _parse(item: object) -> dict[str, Any]:
    if not isinstance(item, str):
        raise ProviderError("a binary message from the server", provider=NAME)
    try:
        data = json.loads(item)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ProviderError(f"malformed message from the server: {item[:200]}", provider=NAME)
    return data


def _audio_output(data: dict[str, Any]) -> AudioOutput:
    try:
        return parse_obj_as(AudioOutput, data)
    except pydantic.ValidationError as exc:
        raise ProviderError(f"malformed audio message: {exc.errors()[0]['msg']}",
                            provider=NAME) from None


def _status(kind: str, code: int | None, text: str) -> int | None:
    if kind in _ERROR_STATUS:
        return _ERROR_STATUS[kind]
    if "api key" in text.lower() or "unauthorized" in text.lower():
        return 401
    return _CLOSE_STATUS.get(code) if code is not None else None


def _server_error(data: dict[str, Any]) -> ProviderError:
    kind = str(data.get("error") or "")
    message = str(data.get("message") or kind or "error")
    code = data.get("code")
    status = _status(kind, code if isinstance(code, int) else None, message)
    if status is not None:
        return APIStatusError(message, status=status, provider=NAME)
    return ProviderError(message, provider=NAME)


def _classify(exc: BaseException) -> ProviderError:
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, InvalidStatus):
        return APIStatusError(_rest_message(exc.response.body), status=exc.response.status_code,
                              provider=NAME)
    if isinstance(exc, TimeoutError):
        return APITimeoutError("timed out opening the socket", provider=NAME)
    if isinstance(exc, ConnectionClosed):
        close = exc.rcvd
        if close is not None and (status := _status("", close.code, close.reason)) is not None:
            return APIStatusError(close.reason or f"closed with {close.code}", status=status,
                                  provider=NAME)
        return APIConnectionError(f"the socket closed before the speech ended: {exc}",
                                  provider=NAME)
    if isinstance(exc, OSError | WebSocketException):
        return APIConnectionError(f"{type(exc).__name__}: {exc}", provider=NAME)
    return ProviderError(f"{type(exc).__name__}: {exc}", provider=NAME)


def _rest_message(body: bytes | None) -> str:
    """The message of a refused upgrade: the REST API's ``{"detail": {"message"}}``, or text."""
    text = (body or b"").decode(errors="replace")
    try:
        detail = json.loads(text).get("detail")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, dict) and detail.get("message"):
        return str(detail["message"])[:200]
    return text[:200] or "handshake refused"


def _base_url(url: str) -> str:
    if not url:
        return ElevenLabsEnvironment.PRODUCTION.value
    if not url.startswith(("https://", "http://", "wss://", "ws://")):
        raise ConfigError(f"VOICEBUS_ELEVENLABS_URL={url!r}: expected an http(s):// or ws(s):// "
                          "URL")
    return url.rstrip("/")


async def _close_quietly(ws: ClientConnection) -> None:
    try:
        await asyncio.wait_for(ws.close(), 2 * _CLOSE_SECONDS)
    except Exception:  # closing a broken socket has nothing left to tell us
        pass
