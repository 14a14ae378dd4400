"""The only errors providers raise (after LiveKit Agents' taxonomy).

``retryable`` tells a fallback chain whether trying again (or the next provider) can help.
"""

from __future__ import annotations


class ProviderError(Exception):
    def __init__(self, message: str, *, provider: str = "", retryable: bool = True) -> None:
        super().__init__(message)
        self.provider = provider
        self.retryable = retryable


class APIConnectionError(ProviderError):
    """Could not reach the provider, or the connection broke."""


class APITimeoutError(APIConnectionError):
    """The provider did not answer in time."""


class APIStatusError(ProviderError):
    """The provider answered with an error status."""

    def __init__(self, message: str, *, status: int, provider: str = "") -> None:
        retryable = status == 429 or status >= 500
        super().__init__(f"{status}: {message}", provider=provider, retryable=retryable)
        self.status = status


class ConfigError(Exception):
    """Configuration is missing or invalid; the service refuses to start."""
