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
