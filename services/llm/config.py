from __future__ import annotations

from typing import ClassVar

from services.runtime.fallback import ChainConfig


class LlmConfig(ChainConfig, frozen=True, kw_only=True):
    ENV: ClassVar[dict[str, str]] = {
        "openai_api_key": "OPENAI_API_KEY",
        "openai_base_url": "OPENAI_BASE_URL",
        "anthropic_api_key": "ANTHROPIC_API_KEY",
        "anthropic_base_url": "ANTHROPIC_BASE_URL",
        "groq_api_key": "GROQ_API_KEY",
        "gemini_api_key": "GEMINI_API_KEY",
    }
    SECRETS: ClassVar[frozenset[str]] = frozenset({"openai_api_key", "anthropic_api_key",
                                                   "groq_api_key", "gemini_api_key"})

    # The one provider, used when VOICEBUS_LLM_PROVIDERS is not set.
    llm_provider: str = "echo"
    # A fallback chain, in order (e.g. "a,b"); when set it wins over the single provider.
    llm_providers: str = ""
    # Seconds from the request to a provider's first text delta before the turn moves to the
    # next provider in VOICEBUS_LLM_PROVIDERS (not applied to the last one left).
    llm_first_result_timeout: float = 5.0
    # The echo modifier's fixed acknowledgement, appended to what was heard.
    echo_ack: str = "got it."
    system_prompt: str = (
        "You are a helpful voice assistant. Answer in one or two short spoken sentences, "
        "with no lists, markup or emoji."
    )
    # What the agent says to a user who stays silent (user-idle turns, VOICEBUS_STT_USER_IDLE_S;
    # how many re-prompts before the goodbye is the judge's VOICEBUS_IDLE_PROMPTS, in egress).
    idle_prompt: str = "Are you still there?"
    idle_goodbye: str = "It seems you have stepped away. Goodbye!"
    llm_model: str = "gpt-4o-mini"
    # How many past user/assistant turns are sent to the model.
    llm_history_turns: int = 20
    # The openai provider (any OpenAI-compatible server: OPENAI_BASE_URL).
    # Seconds it waits for the next bytes of a response (the first included) before failing.
    llm_timeout: float = 30.0
    # Seconds to open a connection: a dead host should fail fast, not after llm_timeout.
    llm_connect_timeout: float = 5.0
    # Extra attempts after a connection error, timeout or 5xx, made only before the first
    # token (after it the user has heard the start). 429 goes to the fallback chain instead.
    llm_retries: int = 2
    # Seconds before the first retry; doubled for each one after.
    llm_retry_backoff: float = 0.25
    # Ask for token usage in the stream (stream_options.include_usage); turn off for a
    # compatible server that rejects the option.
    llm_stream_usage: bool = True
    openai_api_key: str = ""
    openai_base_url: str = ""
    # The anthropic provider (Claude, Messages API); shares the timeouts and retries above.
    anthropic_api_key: str = ""
    anthropic_base_url: str = ""
    # Its own model setting, so a chain "openai,anthropic" names a model for each.
    anthropic_model: str = "claude-haiku-5-5"
    # The API requires a cap on the reply; a spoken reply is far below it.
    anthropic_max_tokens: int = 1024
    # Groq and Gemini through their OpenAI-compatible endpoints (the openai provider's code
    # under names of their own, so one chain can hold "openai,anthropic,groq"); they share the
    # timeouts, retries and llm_stream_usage above.
    groq_api_key: str = ""
    groq_base_url: str = "https://api.groq.com/openai/v1"
    groq_model: str = "llama-3.3-70b-versatile"
    gemini_api_key: str = ""
    gemini_base_url: str = "https://generativelanguage.googleapis.com/v1beta/openai/"
    gemini_model: str = "gemini-2.5-flash"
