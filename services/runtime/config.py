"""Configuration from the environment: one frozen Struct per service, failing fast.

A field ``foo_bar`` reads ``VOICEBUS_FOO_BAR`` unless the class maps it to a vendor's own name
in ``ENV`` (``{"openai_api_key": "OPENAI_API_KEY"}``).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

import msgspec

from proto.permissions import inbox_prefix
from services.runtime.errors import ConfigError

T = TypeVar("T", bound="BaseConfig")


class BaseConfig(msgspec.Struct, frozen=True, kw_only=True):
    ENV: ClassVar[dict[str, str]] = {}
    SECRETS: ClassVar[frozenset[str]] = frozenset()

    # One NATS URL, or several (comma-separated) nodes of a cluster: the client connects to
    # one, learns the rest from it, and reconnects to another when its node goes.
    nats_url: str = "nats://127.0.0.1:4222"
    # Copies of each JetStream KV bucket (turn counter, history, leases): 3 on a 3-node
    # cluster, so the state outlives a node; at most the number of nodes.
    js_replicas: int = 1
    # The bus identity (docs/security.md): an nkey seed file, or a .creds file (JWT accounts).
    nats_nkey_file: str = ""
    nats_creds_file: str = ""
    # TLS to nats-server: the CA to trust (then tls:// URLs work), and a client certificate
    # if the server asks for one.
    nats_tls_ca: str = ""
    nats_tls_cert: str = ""
    nats_tls_key: str = ""
    replica: str = ""
    log_format: str = "text"
    log_level: str = "INFO"
    metrics_port: int = 0
    metrics_addr: str = "127.0.0.1"
    # Seconds (whole: NATS's per-message TTLs are) a replica's session lease lives without a
    # renewal; renewed four times a lifetime. When a replica dies, another takes its sessions
    # over this long after its last renewal (docs/operations.md: why 1).
    lease_ttl: int = 1
    # The development file edges (FileSessionStart.wav_in / wav_out) are off unless this names
    # a folder; then they may only name WAV files below it (docs/security.md).
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

    def nats_options(self, role: str) -> dict[str, Any]:
        """``nats.connect`` keyword arguments for ``role``: its identity, its own inboxes, TLS.
        Raises ``ConfigError`` for a named file that is not there."""
        for field in ("nats_nkey_file", "nats_creds_file", "nats_tls_ca", "nats_tls_cert",
                      "nats_tls_key"):
            path = getattr(self, field)
            if path and not os.path.isfile(path):
                raise ConfigError(f"{self.env_name(field)}={path}: no such file")
        options: dict[str, Any] = {"inbox_prefix": inbox_prefix(role)}
        if self.nats_nkey_file:
            options["nkeys_seed"] = self.nats_nkey_file
        if self.nats_creds_file:
            options["user_credentials"] = self.nats_creds_file
        if self.nats_tls_ca or self.nats_tls_cert:
            context = ssl.create_default_context(cafile=self.nats_tls_ca or None)
            if self.nats_tls_cert:
                context.load_cert_chain(self.nats_tls_cert, self.nats_tls_key or None)
            options["tls"] = context
        return options

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
    """Check a WAV path a bus client asked us to read or write: file edges on (``audio_dir``
    set), absolute, ``.wav``, and inside ``audio_dir`` once symlinks are resolved. Raises
    ``ValueError`` with the reason."""
    if not audio_dir:
        raise ValueError("the development file edges are off (set VOICEBUS_AUDIO_DIR to a "
                         "folder to allow WAV files below it)")
    resolved = os.path.realpath(path)
    if not os.path.isabs(path) or not resolved.endswith(".wav"):
        raise ValueError(f"not an absolute path to a .wav file: {path[:200]!r}")
    if os.path.commonpath([resolved, os.path.realpath(audio_dir)]) != \
            os.path.realpath(audio_dir):
        raise ValueError(f"{path[:200]!r} is outside VOICEBUS_AUDIO_DIR")
    return resolved


def nats_servers(url: str) -> list[str]:
    """The node URLs of ``VOICEBUS_NATS_URL`` (one, or a cluster's, comma-separated)."""
    return [part.strip() for part in url.split(",") if part.strip()]
