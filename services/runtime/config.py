"""Configuration from the environment: one frozen Struct per service, failing fast.

A field ``foo_bar`` reads ``VOICEBUS_FOO_BAR`` unless the class maps it to a vendor's own name
in ``ENV`` (``{"openai_api_key": "OPENAI_API_KEY"}``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import msgspec

from services.runtime.errors import ConfigError

T = TypeVar("T", bound="BaseConfig")


class BaseConfig(msgspec.Struct, frozen=True, kw_only=True):
    ENV: ClassVar[dict[str, str]] = {}
    SECRETS: ClassVar[frozenset[str]] = frozenset()

    nats_url: str = "nats://127.0.0.1:4222"
    replica: str = ""
    log_format: str = "text"
    log_level: str = "INFO"
    metrics_port: int = 0
    metrics_addr: str = "127.0.0.1"
    # Seconds (whole: NATS's per-message TTLs are) a replica's session lease lives without a
    # renewal; renewed four times a lifetime. When a replica dies, another takes its sessions
    # over this long after its last renewal (docs/operations.md: why 1).
    lease_ttl: int = 1
    # If set, the development file edges (FileSessionStart.wav_in / wav_out) may only name WAV
    # files below it.
    audio_dir: str = ""
    # Seconds session state (turn counter, history) is kept in JetStream KV after its last write.
    state_ttl: float = 86400.0
    # Seconds a replica waits, on SIGTERM, for in-flight turns before handing sessions over.
    shutdown_grace: float = 10.0
    @classmethod
    def env_name(cls, field: str) -> str:
        return cls.ENV.get(field) or f"VOICEBUS_{field.upper()}"

    @classmethod
    def from_env(cls: type[T], environ: Mapping[str, str] | None = None) -> T:
        environ = os.environ if environ is None else environ
        raw: dict[str, Any] = {}
        for field in msgspec.structs.fields(cls):
            value = environ.get(cls.env_name(field.name))
            if value is not None and value != "":
                raw[field.name] = value
        try:
            return msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{cls.__name__}: {exc} (environment {_env_hint(cls, exc)})") from None

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict fit for a log line: secrets shown only as set/unset."""
        out = msgspec.structs.asdict(self)
        for name in self.SECRETS:
            out[name] = "<set>" if out.get(name) else "<unset>"
        return out


def _env_hint(cls: type[BaseConfig], exc: Exception) -> str:
    # msgspec reports the path as "at `$.field`"; name the variable the user has to fix.
    text = str(exc)
    for field in msgspec.structs.fields(cls):
        if f"$.{field.name}`" in text:
            return cls.env_name(field.name)
    return "?"


# What each stage runs without a key or a network, named in the hint of a missing key.
OFFLINE_PROVIDER = {"stt": "pocketsphinx", "llm": "echo", "tts": "piper"}


def require_key(key: str, *, provider: str, stage: str, variable: str) -> None:
    """A cloud provider cannot start without its key: say which variable to set, and how to
    run offline instead."""
    if not key:
        raise ConfigError(f"the {provider} {stage.upper()} provider needs an API key: set "
                          f"{variable} (or VOICEBUS_{stage.upper()}_PROVIDER="
                          f"{OFFLINE_PROVIDER[stage]} to run offline)")


def parse_list(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def audio_file(path: str, audio_dir: str) -> str:
    """Check a WAV path a bus client asked us to read or write: absolute, ``.wav``, and inside
    ``audio_dir`` when one is configured. Raises ``ValueError`` with the reason."""
    resolved = os.path.realpath(path)
    if not os.path.isabs(path) or not resolved.endswith(".wav"):
        raise ValueError(f"not an absolute path to a .wav file: {path[:200]!r}")
    if audio_dir and os.path.commonpath([resolved, os.path.realpath(audio_dir)]) != \
            os.path.realpath(audio_dir):
        raise ValueError(f"{path[:200]!r} is outside VOICEBUS_AUDIO_DIR")
    return resolved
