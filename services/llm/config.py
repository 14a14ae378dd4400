from __future__ import annotations

from typing import ClassVar

from services.runtime.config import BaseConfig


class LlmConfig(BaseConfig, frozen=True, kw_only=True):
    ENV: ClassVar[dict[str, str]] = {
        "openai_api_key": "OPENAI_API_KEY",
        "openai_base_url": "OPENAI_BASE_URL",
    }
    SECRETS: ClassVar[frozenset[str]] = frozenset({"openai_api_key"})

    llm_provider: str = "echo"
    # The echo modifier's fixed acknowledgement, appended to what was heard.
    echo_ack: str = "got it."
    system_prompt: str = (
        "You are a helpful voice assistant. Answer in one or two short spoken sentences, "
        "with no lists, markup or emoji."
    )
    llm_model: str = "gpt-4o-mini"
    # How many past user/assistant turns are sent to the model.
    llm_history_turns: int = 20
    llm_timeout: float = 30.0
    openai_api_key: str = ""
    openai_base_url: str = ""
