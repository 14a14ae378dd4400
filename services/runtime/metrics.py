"""Prometheus metrics shared by every stage (served on ``VOICEBUS_METRICS_PORT`` when set)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

REJECTED = Counter(
    "voicebus_messages_rejected", "Bus messages dropped as invalid", ["stage", "reason"]
)
PUBLISH_DROPPED = Counter(
    "voicebus_publish_dropped", "Events dropped because NATS was unreachable", ["stage"]
)
HANDLER_ERRORS = Counter(
    "voicebus_handler_errors", "Exceptions raised while handling a valid event", ["stage"]
)
SESSIONS_ACTIVE = Gauge("voicebus_sessions_active", "Sessions this replica owns", ["stage"])
SESSIONS_CLAIMED = Counter("voicebus_sessions_claimed", "Sessions claimed", ["stage"])
SESSIONS_HANDED_OVER = Counter(
    "voicebus_sessions_handed_over", "Sessions released to another replica", ["stage"]
)
FRAMES_DROPPED = Counter(
    "voicebus_frames_dropped", "Audio frames lost before this stage", ["stage"]
)
TURNS = Counter("voicebus_turns", "Turns handled", ["stage", "outcome"])
PROVIDER_SECONDS = Histogram(
    "voicebus_provider_seconds",
    "Provider compute on a turn's critical path",
    ["stage", "provider"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PROVIDER_ERRORS = Counter(
    "voicebus_provider_errors", "Provider failures", ["stage", "provider", "retryable"]
)


def serve(port: int, addr: str = "127.0.0.1") -> None:
    if port:
        start_http_server(port, addr=addr)
