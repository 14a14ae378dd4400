"""``python -m services.token``: the token service under uvicorn; SIGTERM → graceful exit 0."""

from __future__ import annotations

import logging
import signal
from types import FrameType

import uvicorn

from services.runtime import agents, metrics
from services.runtime.errors import ConfigError
from services.runtime.logs import setup_logging
from services.token.app import create_app
from services.token.authorize import ENV_NAME, load_authorizer
from services.token.config import load_config

log = logging.getLogger("voicebus.token")


def _after_shutdown(signum: int, _frame: FrameType | None) -> None:
    """uvicorn handles SIGTERM/SIGINT itself, then re-raises the signal to the handler that
    was installed before it: this one, so a graceful stop ends with exit code 0 instead of
    being killed by the default handler."""


def main() -> None:
    try:
        config = load_config()
        authorize = load_authorizer(config.token_authorize)
        agents.load()  # a broken agents file stops us here, not at the first token
    except ConfigError as exc:
        raise SystemExit(f"voicebus token: configuration error: {exc}") from None
    setup_logging(config.log_format, config.log_level)
    metrics.serve(config.metrics_port, config.metrics_addr)
    log.info("starting with %s", config.redacted(), extra={"stage": "token"})
    if authorize is None:
        log.warning("no %s hook: anyone who can reach %s:%d gets a token; set a hook or put an "
                    "authenticating reverse proxy in front before exposing it", ENV_NAME,
                    config.token_host, config.token_port, extra={"stage": "token"})
        if config.session_pages:
            log.warning("session pages on without a %s hook: anyone who can reach %s:%d reads "
                        "every recorded conversation at /sessions", ENV_NAME, config.token_host,
                        config.token_port, extra={"stage": "token"})
    server = uvicorn.Server(uvicorn.Config(
        create_app(config, authorize), host=config.token_host, port=config.token_port,
        log_config=None,  # our logging setup (text or JSON) for uvicorn's lines too
        server_header=False, timeout_graceful_shutdown=5,
        # X-Forwarded-For only from proxies we were told to trust (uvicorn's own default
        # trusts loopback, which lets any local client pick its address).
        proxy_headers=bool(config.token_trusted_proxies),
        forwarded_allow_ips=config.token_trusted_proxies or "",
    ))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _after_shutdown)
    server.run()
    if not server.started:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
