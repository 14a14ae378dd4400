"""Prometheus metrics of the token service (served on its own ``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import Counter

TOKENS_MINTED = Counter(
    "voicebus_tokens_minted", "User tokens handed out (each dispatched the agent)"
)
REQUESTS_REJECTED = Counter(
    "voicebus_token_requests_rejected", "Token requests refused", ["reason"]
)
WEBHOOKS = Counter("voicebus_livekit_webhooks", "Verified livekit-server webhooks", ["event"])
WEBHOOKS_REJECTED = Counter(
    "voicebus_livekit_webhooks_rejected",
    "Webhooks refused (bad signature, body, stale) or not acted on (replay)", ["reason"]
)
SIP_CALLS = Counter("voicebus_token_sip_calls", "Phone calls (LiveKit SIP) the agent was sent to")
SESSIONS_ENDED = Counter("voicebus_token_sessions_ended", "SessionEnd published", ["reason"])
CLIENT_DISCONNECTS = Counter(
    "voicebus_token_client_disconnects", "Requests whose client hung up before the body was read")
