"""Google Gemini through its OpenAI-compatible endpoint, the openai provider's code under a name
of its own, with its own key, base URL and model (https://ai.google.dev/gemini-api/docs/openai).

What differs from OpenAI:

- streamed tool calls come without ``index``, each call whole in one delta (the openai provider
  tells them apart by id);
- a call carries a thought signature (``extra_content.google.thought_signature``) that Gemini 3
  requires back with the call in the next request, or it answers 400
  (https://ai.google.dev/gemini-api/docs/thought-signatures). The openai provider sends back
  what it kept; a call it never saw (made by another provider of the chain, or by this session
  on another replica) gets the stand-in signature Google documents for such histories;
- errors come as a one-element list of ``{"error": {...}}``, and a bad key is a 400, not a 401.
"""

from __future__ import annotations

from typing import Any

from services.llm.config import LlmConfig
from services.llm.provider import ChatMessage
from services.llm.providers.openai import OpenAILlm
from services.runtime.errors import ProviderError

# Passes Gemini's check for a call whose signature is unknown; the model goes on without the
# reasoning behind that call.
STAND_IN_SIGNATURE = "skip_thought_signature_validator"


class GeminiLlm(OpenAILlm):
    name = "gemini"

    @classmethod
    def from_config(cls, cfg: LlmConfig) -> GeminiLlm:
        # GEMINI_API_KEY (a secret, never logged), VOICEBUS_GEMINI_BASE_URL, VOICEBUS_GEMINI_MODEL.
        return cls.for_account(cfg, model=cfg.gemini_model)

    def _wire(self, message: ChatMessage) -> dict[str, Any]:
        wired = super()._wire(message)
        calls = wired.get("tool_calls") or ()
        # The signature rides on the first call of a decision (parallel calls share it).
        if calls and "extra_content" not in calls[0]:
            calls[0]["extra_content"] = {"google": {"thought_signature": STAND_IN_SIGNATURE}}
        return wired

    def _map_error(self, exc: Exception) -> ProviderError:
        body = getattr(exc, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], dict) \
                and isinstance(body[0].get("error"), dict):
            exc.body = body[0]["error"]  # what the SDK gives for OpenAI's own error shape
        return super()._map_error(exc)
