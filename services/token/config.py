"""Settings of the token service (``VOICEBUS_TOKEN_*``, ``LIVEKIT_*``), checked at start-up."""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from proto.permissions import PAGES
from services.runtime.errors import ConfigError
from services.runtime.livekit import LiveKitConfig

WEB_DIR = Path(__file__).resolve().parents[2] / "web"
MAX_TTL = 86400.0


class TokenConfig(LiveKitConfig, frozen=True, kw_only=True):
    token_host: str = "127.0.0.1"
    token_port: int = 8080
    # Seconds a user token lives (it only has to outlive joining: a connected participant stays).
    token_ttl: float = 900.0
    # Per client address: ``token_burst`` requests at once, refilled at this rate.
    token_rate_per_minute: float = 30.0
    token_burst: int = 10
    # Comma-separated addresses of reverse proxies whose X-Forwarded-For is believed (the
    # client's address for rate limits); none by default: a client could name any address.
    token_trusted_proxies: str = ""
    # "package.module:function" deciding who gets a token; empty lets everyone in.
    token_authorize: str = ""
    # Comma-separated origins (https://app.example.com) whose pages may call /api/token
    # (CORS); none by default: only the service's own page.
    token_cors_origins: str = ""
    # The LiveKit URL handed to browsers (empty: livekit_url), e.g. wss://lk.example.com.
    livekit_public_url: str = ""
    # The web page's directory (empty: web/ of this checkout).
    web_dir: str = ""
    # The session pages (/sessions/<id>, /api/sessions/<id>): recorded conversations, what
    # users said included. Off unless turned on (VOICEBUS_SESSION_PAGES=true); then the
    # VOICEBUS_TOKEN_AUTHORIZE hook decides who reads which (services/token/authorize.py).
    session_pages: bool = False
    # The pages' own bus identity (the read-only role "pages"): an nkey seed or .creds file.
    # The token service's own role cannot read the capture.
    session_pages_nkey_file: str = ""
    session_pages_creds_file: str = ""
    # What the agent says when it first hears the user (dispatched with the session; "" for
    # none). Turn 0 of the session: it can be interrupted like any reply.
    greeting: str = "Hello! How can I help you today?"

    def pages_nats_options(self) -> dict[str, Any]:
        """``nats.connect`` arguments for the session pages' own connection (role "pages")."""
        pages = msgspec.structs.replace(self, nats_nkey_file=self.session_pages_nkey_file,
                                        nats_creds_file=self.session_pages_creds_file)
        return pages.nats_options(PAGES)

    @property
    def cors_origins(self) -> list[str]:
        return [o.strip().rstrip("/") for o in self.token_cors_origins.split(",") if o.strip()]

    @property
    def public_url(self) -> str:
        return self.livekit_public_url or self.livekit_url

    @property
    def web_path(self) -> Path:
        return Path(self.web_dir) if self.web_dir else WEB_DIR

    @property
    def livekit_http_url(self) -> str:
        """The server API's URL: the same host as the signalling WebSocket, over HTTP(S)."""
        parts = urllib.parse.urlsplit(self.livekit_url)
        scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
        return urllib.parse.urlunsplit(parts._replace(scheme=scheme))


def load_config(environ: Mapping[str, str] | None = None) -> TokenConfig:
    """Read and check the settings; raises ``ConfigError`` naming the variable to fix."""
    config = TokenConfig.from_env(environ)
    checks = [
        ("token_ttl", 0 < config.token_ttl <= MAX_TTL, f"must be in (0, {MAX_TTL:.0f}] seconds"),
        ("token_rate_per_minute", 0 < config.token_rate_per_minute < math.inf,
         "must be a positive number"),
        ("token_burst", config.token_burst >= 1, "must be >= 1"),
        ("token_port", 0 < config.token_port < 65536, "must be a TCP port"),
    ]
    for field, ok, rule in checks:
        if not ok:
            raise ConfigError(f"{TokenConfig.env_name(field)}={getattr(config, field)}: {rule}")
    if urllib.parse.urlsplit(config.livekit_url).scheme not in ("ws", "wss", "http", "https"):
        raise ConfigError(f"LIVEKIT_URL={config.livekit_url!r}: must be ws://, wss://, http(s)://")
    for origin in config.cors_origins:
        parts = urllib.parse.urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or \
                origin == "*":
            raise ConfigError(f"{TokenConfig.env_name('token_cors_origins')}: {origin!r} is not "
                              "an origin (scheme://host[:port], no path, no wildcard)")
    config.nats_options("token")  # fails here if a credentials file named is missing
    if config.session_pages:
        own = config.nats_nkey_file or config.nats_creds_file
        if own and not (config.session_pages_nkey_file or config.session_pages_creds_file):
            raise ConfigError(f"{TokenConfig.env_name('session_pages')} is on: set "
                              f"{TokenConfig.env_name('session_pages_nkey_file')} (the seed of "
                              "the read-only role 'pages', made by voicebus credentials)")
        config.pages_nats_options()
    return config
