"""The bus's memory: sessions captured by JetStream, exported as one self-describing file.

**Capture** is a JetStream stream, ``VOICEBUS_RECORD``, over the session subjects: nats-server
keeps it (its own persistence and retention), nothing of ours sits in the path. What it keeps
is chosen by ``VOICEBUS_RECORD``: ``off``, ``events`` (everything but audio frames) or ``all``.
Retention is by age and size (``VOICEBUS_RECORD_MAX_AGE``, ``VOICEBUS_RECORD_MAX_BYTES``);
``VOICEBUS_RECORD_REPLICAS`` for a cluster. The launcher sets it up; a deployment runs
``voicebus record setup`` once (``docs/recording.md``, with what this means for privacy).

**A recording file** (``.vbus``) is one MessagePack object: a header (format, file version, the
bus contract version, the session, when and how many) and the session's messages in order,
each with its subject, the time nats-server stored it, and the event's bytes exactly as they
crossed the bus. A SHA-256 of the messages in the header catches a truncated or edited file.

**Import** keeps a file in the JetStream object store ``voicebus_recordings``: it is listed and
exported like a captured session, and never published on the live subjects (which would drive
the stages).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from nats.js import api
from nats.js.errors import NotFoundError, ObjectNotFoundError

import proto
from proto import codec
from proto import events as ev
from proto import subjects as sj

STREAM = "VOICEBUS_RECORD"
OBJECTS = "voicebus_recordings"
FORMAT = "voicebus-recording"
FILE_VERSION = 1
MODES = ("off", "events", "all")
AUDIO_TOPICS = (sj.INGRESS_AUDIO, sj.TTS_AUDIO)
# Requests on the session subjects, answered by whoever serves them (the SIP gateway, the agent's
# phone actions). Never captured: a stream acknowledges a stored message that has a reply subject,
# to that subject, and its acknowledgement would come first, as the requester's answer (and no
# request would ever meet "no responders"). ToolUse on llm.tool keeps what they asked and got.
REQUEST_TOPICS = (sj.LLM_PHONE,)


class RecordingError(ValueError):
    """A recording that cannot be used: say why, in one line."""


class Header(msgspec.Struct, kw_only=True):
    format: str
    version: int
    contract: int
    session: str
    exported_at_ns: int
    count: int
    sha256: str


class Entry(msgspec.Struct, array_like=True):
    subject: str
    stored_ns: int  # when nats-server stored it (the capture's clock)
    data: bytes  # the event as it crossed the bus


class Recording(msgspec.Struct, kw_only=True):
    header: Header
    entries: list[Entry]

    def events(self) -> list[tuple[str, int, ev.AnyEvent]]:
        """(subject, stored_ns, event), in order; raises ``RecordingError`` on a bad one."""
        out = []
        for index, entry in enumerate(self.entries):
            try:
                out.append((entry.subject, entry.stored_ns,
                            codec.decode_on(entry.subject, entry.data)))
            except codec.Rejected as exc:
                raise RecordingError(f"message {index} ({entry.subject}): {exc}") from None
        return out


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Recording)


def _digest(entries: list[Entry]) -> str:
    return hashlib.sha256(_encoder.encode(entries)).hexdigest()


def make(session: str, entries: list[Entry]) -> Recording:
    header = Header(format=FORMAT, version=FILE_VERSION, contract=proto.CONTRACT_VERSION,
                    session=session, exported_at_ns=time.time_ns(), count=len(entries),
                    sha256=_digest(entries))
    return Recording(header=header, entries=entries)


def dumps(recording: Recording) -> bytes:
    return _encoder.encode(recording)


def loads(data: bytes) -> Recording:
    """A recording checked whole; ``RecordingError`` says what is wrong with it."""
    try:
        recording = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise RecordingError(f"not a voicebus recording, or truncated: {exc}") from None
    header = recording.header
    if header.format != FORMAT or header.version != FILE_VERSION:
        raise RecordingError(f"not a voicebus recording file (format {header.format!r} "
                             f"version {header.version})")
    if header.contract != proto.CONTRACT_VERSION:
        raise RecordingError(f"recorded with bus contract {header.contract}; this build speaks "
                             f"{proto.CONTRACT_VERSION}")
    if len(recording.entries) != header.count or _digest(recording.entries) != header.sha256:
        raise RecordingError("the messages do not match the header's count and SHA-256: the "
                             "file was truncated or edited")
    recording.events()  # every message decodes and belongs on its subject
    return recording


def read_file(path: Path) -> Recording:
    try:
        return loads(path.read_bytes())
    except OSError as exc:
        raise RecordingError(f"cannot read {path}: {exc.strerror}") from None


# ---- capture ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptureSettings:
    mode: str = "all"
    max_age_s: float = 3600.0
    max_bytes: int = 1 << 30
    replicas: int = 1

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **defaults: Any) -> CaptureSettings:
        env = os.environ if environ is None else environ
        base = cls(**defaults)
        mode = env.get("VOICEBUS_RECORD", base.mode)
        if mode not in MODES:
            raise RecordingError(f"VOICEBUS_RECORD={mode!r}: one of {', '.join(MODES)}")
        return cls(mode=mode,
                   max_age_s=float(env.get("VOICEBUS_RECORD_MAX_AGE", base.max_age_s)),
                   max_bytes=int(env.get("VOICEBUS_RECORD_MAX_BYTES", base.max_bytes)),
                   replicas=int(env.get("VOICEBUS_RECORD_REPLICAS", base.replicas)))

    def subjects(self) -> list[str]:
        """Every session topic (``voice.*.<producer>.<kind>``, not ``voice.>``: the requests
        are left out), audio frames too with ``all``."""
        skipped = REQUEST_TOPICS + (() if self.mode == "all" else AUDIO_TOPICS)
        return [topic.every_session() for topic in sj.TOPICS.values() if topic not in skipped]


async def setup(js: Any, settings: CaptureSettings) -> str:
    """Create or update the capture stream; with ``off``, remove it. Returns what was done."""
    if settings.mode == "off":
        try:
            await js.delete_stream(STREAM)
            return "capture off: stream removed"
        except NotFoundError:
            return "capture off"
    config = api.StreamConfig(
        name=STREAM, subjects=settings.subjects(), retention=api.RetentionPolicy.LIMITS,
        max_age=settings.max_age_s, max_bytes=settings.max_bytes,
        storage=api.StorageType.FILE, num_replicas=settings.replicas,
        discard=api.DiscardPolicy.OLD, allow_direct=True)
    try:
        await js.stream_info(STREAM)
        await js.update_stream(config)
        return f"capture {settings.mode}: stream updated"
    except NotFoundError:
        await js.add_stream(config)
        return f"capture {settings.mode}: stream created"


async def captured(js: Any, session: str, idle_s: float = 0.5) -> list[Entry]:
    """Every message of ``session`` in the capture stream, in order."""
    sj.check_session(session)
    try:
        info = await js.stream_info(STREAM, subjects_filter=sj.session_all(session))
    except NotFoundError:
        raise RecordingError("no capture stream on this bus (VOICEBUS_RECORD=off?)") from None
    expected = sum((info.state.subjects or {}).values())
    if not expected:
        return []
    entries: list[Entry] = []
    done = asyncio.Event()

    async def on_msg(msg: Any) -> None:
        entries.append(Entry(msg.subject, int(msg.metadata.timestamp.timestamp() * 1e9)
                             if msg.metadata.timestamp else 0, msg.data))
        if msg.metadata.num_pending == 0:
            done.set()

    sub = await js.subscribe(sj.session_all(session), stream=STREAM, cb=on_msg,
                             ordered_consumer=True, deliver_policy=api.DeliverPolicy.ALL)
    try:
        await asyncio.wait_for(done.wait(), max(10.0, expected / 500))
    finally:
        await sub.unsubscribe()
    return entries


async def sessions(js: Any) -> dict[str, int]:
    """Captured sessions and how many messages each has."""
    try:
        info = await js.stream_info(STREAM, subjects_filter=sj.everything())
    except NotFoundError:
        return {}
    counts: dict[str, int] = {}
    for subject, count in (info.state.subjects or {}).items():
        session = subject.split(".")[1]
        counts[session] = counts.get(session, 0) + count
    return counts


async def purge(js: Any, session: str) -> int:
    """Remove every captured message of ``session`` (and an imported recording of it)."""
    sj.check_session(session)
    before = (await sessions(js)).get(session, 0)
    if before:
        await js.purge_stream(STREAM, subject=sj.session_all(session))
    store = await _objects(js, create=False)
    if store is not None:
        try:
            await store.delete(session)
        except ObjectNotFoundError:
            pass
    return before


async def _objects(js: Any, create: bool) -> Any:
    try:
        return await js.object_store(OBJECTS)
    except NotFoundError:
        if not create:
            return None
        return await js.create_object_store(OBJECTS)


async def import_file(js: Any, recording: Recording) -> str:
    store = await _objects(js, create=True)
    await store.put(recording.header.session, dumps(recording))
    return recording.header.session


async def imported(js: Any) -> list[str]:
    store = await _objects(js, create=False)
    if store is None:
        return []
    try:
        return [info.name for info in await store.list() if not info.deleted]
    except NotFoundError:  # an empty store
        return []


async def export(js: Any, session: str) -> Recording:
    """The session as a recording: captured here, or imported."""
    entries = await captured(js, session) if (await sessions(js)).get(session) else []
    if entries:
        return make(session, entries)
    store = await _objects(js, create=False)
    if store is not None:
        try:
            return loads((await store.get(session)).data or b"")
        except ObjectNotFoundError:
            pass
    raise RecordingError(f"no recording of session {session!r} on this bus")


# ---- listening to it ---------------------------------------------------------------------------

AUDIO_RATE = 16000


def conversation_audio(recording: Recording) -> tuple[np.ndarray, np.ndarray]:
    """The call as the user heard it, two 16 kHz int16 channels on one timeline: the user's
    microphone (ingress frames where they were sent) and the agent's voice as it was played
    (each reply from its first ``Playback``, cut at its final ``played_ms``: a barge-in ends
    it where the user cut in). Needs a capture with audio (``VOICEBUS_RECORD=all``)."""
    from services.ingress.audio import Resampler

    decoded = recording.events()
    events = [e for _, _, e in decoded]
    mic = [e for s, _, e in decoded if sj.parse(s)[1] is sj.INGRESS_AUDIO]
    voice: dict[int, list[ev.AudioFrame]] = {}
    for s, _, e in decoded:
        if sj.parse(s)[1] is sj.TTS_AUDIO:
            voice.setdefault(e.turn, []).append(e)
    if not mic and not voice:
        raise RecordingError("the recording has no audio (captured with VOICEBUS_RECORD=events?)")
    origin = min([f.ts_ns for f in mic] + [e.ts_ns for e in events])
    plays: dict[int, tuple[int, int]] = {}  # turn -> (start ns, played ms)
    for e in events:
        if isinstance(e, ev.Playback):
            start, _ = plays.get(e.turn, (e.ts_ns - e.played_ms * 1_000_000, 0))
            plays[e.turn] = (start, e.played_ms)
    tracks: list[tuple[int, np.ndarray, int]] = []  # (channel, samples, start ns)
    if mic:
        tracks.append((0, np.frombuffer(b"".join(f.pcm for f in mic), np.int16), mic[0].ts_ns))
    for turn, frames in voice.items():
        if turn not in plays:
            continue  # synthesized, never played (cut before it began)
        start, played_ms = plays[turn]
        resampler = Resampler(frames[0].sample_rate, 1)
        pcm = resampler.process(b"".join(f.pcm for f in frames)) + resampler.flush()
        samples = np.frombuffer(pcm, np.int16)[: played_ms * AUDIO_RATE // 1000]
        tracks.append((1, samples, start))
    length = max(int((st - origin) / 1e9 * AUDIO_RATE) + len(s) for _, s, st in tracks)
    channels = (np.zeros(length, np.int16), np.zeros(length, np.int16))
    for channel, samples, start in tracks:
        at = max(0, int((start - origin) / 1e9 * AUDIO_RATE))
        channels[channel][at: at + len(samples)] = samples
    return channels


def write_wav(path: Path, channels: tuple[np.ndarray, np.ndarray], mix: bool = False) -> None:
    import wave

    left, right = channels
    if mix:
        data = np.clip(left.astype(np.int32) + right, -32768, 32767).astype(np.int16)
    else:
        data = np.stack([left, right], axis=1).reshape(-1)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1 if mix else 2)
        out.setsampwidth(2)
        out.setframerate(AUDIO_RATE)
        out.writeframes(data.tobytes())
