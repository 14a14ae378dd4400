"""Groq through its OpenAI-compatible endpoint (https://console.groq.com/docs/openai): the openai
provider's code under a name of its own, with its own key, base URL and model, so one chain can
hold ``openai,anthropic,groq`` (``OPENAI_BASE_URL`` can point at only one server).

Nothing else differs on our side: token usage may come as ``x_groq.usage``, which the openai
provider reads, and ``messages[].name``, which Groq refuses with a 400, is never sent.
"""

from __future__ import annotations

from services.llm.config import LlmConfig
from services.llm.providers.openai import OpenAILlm


class GroqLlm(OpenAILlm):
    name = "groq"

    @classmethod
    def from_config(cls, cfg: LlmConfig) -> GroqLlm:
        # GROQ_API_KEY (a secret, never logged), VOICEBUS_GROQ_BASE_URL, VOICEBUS_GROQ_MODEL.
        return cls.for_account(cfg, model=cfg.groq_model)
