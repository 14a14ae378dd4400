"""Configuration from the environment: names, conversion, fail fast, secrets kept out of logs."""

from __future__ import annotations

import pytest

from services.llm.config import LlmConfig
from services.runtime.errors import ConfigError
from services.stt.config import SttConfig


def test_fields_read_voicebus_names_and_convert() -> None:
    cfg = SttConfig.from_env({"VOICEBUS_STT_PREROLL_MS": "200", "VOICEBUS_NATS_URL": "nats://x:1"})
    assert cfg.stt_preroll_ms == 200 and cfg.nats_url == "nats://x:1"
    assert cfg.stt_provider == "pocketsphinx"


def test_vendor_keys_use_the_vendors_names() -> None:
    cfg = LlmConfig.from_env({"OPENAI_API_KEY": "sk-secret", "VOICEBUS_OPENAI_API_KEY": "no"})
    assert cfg.openai_api_key == "sk-secret"


def test_bad_values_fail_fast_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="VOICEBUS_STT_PREROLL_MS"):
        SttConfig.from_env({"VOICEBUS_STT_PREROLL_MS": "lots"})


def test_secrets_never_appear_in_the_redacted_view() -> None:
    cfg = LlmConfig.from_env({"OPENAI_API_KEY": "sk-secret"})
    shown = cfg.redacted()
    assert shown["openai_api_key"] == "<set>" and "sk-secret" not in repr(shown)


def test_session_pages_need_their_own_read_only_bus_identity(tmp_path) -> None:
    from services.token.config import load_config

    seed = tmp_path / "token.nk"
    seed.write_text("SU...")
    pages = tmp_path / "pages.nk"
    pages.write_text("SU...")
    base = {"VOICEBUS_NATS_NKEY_FILE": str(seed), "LIVEKIT_API_SECRET": "x" * 32}
    assert not load_config(base).session_pages  # off by default
    with pytest.raises(ConfigError, match="VOICEBUS_SESSION_PAGES_NKEY_FILE"):
        load_config({**base, "VOICEBUS_SESSION_PAGES": "true"})
    config = load_config({**base, "VOICEBUS_SESSION_PAGES": "true",
                          "VOICEBUS_SESSION_PAGES_NKEY_FILE": str(pages)})
    options = config.pages_nats_options()
    assert options["nkeys_seed"] == str(pages) and options["inbox_prefix"] == "_INBOX.pages"
    assert config.nats_options("token")["nkeys_seed"] == str(seed)  # the token's own, unchanged
