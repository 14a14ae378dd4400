"""Prometheus metrics shared by every stage (served on ``VOICEBUS_METRICS_PORT`` when set)."""

from __future__ import annotations

import bisect
import gc
import itertools
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer

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
LEASE_REFRESH_FAILED = Counter(
    "voicebus_lease_refresh_failures", "Session lease refreshes that failed (JetStream "
    "unreachable or electing a leader; the lease lapses after its TTL)", ["stage"]
)
SESSIONS_TAKEN_OVER = Counter(
    "voicebus_sessions_taken_over", "Sessions taken over from a replica that died", ["stage"]
)
FRAMES_DROPPED = Counter(
    "voicebus_frames_dropped", "Audio frames lost before this stage", ["stage"]
)
TURNS = Counter("voicebus_turns", "Turns handled", ["stage", "outcome"])
DRAFTS = Counter("voicebus_drafts", "Replies prepared before their turn was certain "
                 "(prepared), and those the final dropped (dropped)", ["outcome"])
PROVIDER_SECONDS = Histogram(
    "voicebus_provider_seconds",
    "Provider compute on a turn's critical path",
    ["stage", "provider"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
PROVIDER_ERRORS = Counter(
    "voicebus_provider_errors", "Provider failures", ["stage", "provider", "retryable"]
)

# Fallback chains (services/runtime/fallback.py). Counters get prometheus' ``_total`` suffix.
PROVIDER_REQUESTS = Counter(
    "voicebus_provider_requests", "Turns a provider was asked to serve, by outcome",
    ["stage", "provider", "outcome"],  # success | failure | timeout
)
PROVIDER_FIRST_RESULT = Histogram(
    "voicebus_provider_first_result_seconds",
    "Time from a provider having its input (LLM: the request, STT: the end of speech, "
    "TTS: the first text) to its first result",
    ["stage", "provider"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2.5, 5, 10),
)
PROVIDER_AVAILABLE = Gauge(
    "voicebus_provider_available", "1 while a provider is in use, 0 while it is being probed",
    ["stage", "provider"],
)
PROVIDER_FALLBACKS = Counter(
    "voicebus_provider_fallbacks", "Turns moved from one provider to the next",
    ["stage", "from_provider", "to_provider"],
)
PROVIDER_PROBES = Counter(
    "voicebus_provider_probes", "Background probes of unavailable providers, by outcome",
    ["stage", "provider", "outcome"],
)
LLM_TOKENS = Counter(
    "voicebus_llm_tokens", "Tokens as reported by the LLM API", ["provider", "kind"]
)
# What the providers did for turns (services/runtime/usage.py): the units of the Usage events
# (input_tokens, output_tokens, cached_tokens, characters, audio_in_s, audio_out_s, requests),
# and their cost when VOICEBUS_PRICES prices the provider. Probes are not turns: not counted.
USAGE = Counter(
    "voicebus_usage", "Provider usage of turns, by unit", ["stage", "provider", "unit"]
)
COST = Counter(
    "voicebus_cost_usd", "Cost of turns in USD, from the price table", ["stage", "provider"]
)
# Staying in a LiveKit room (services/runtime/livekit.py RoomKeeper): "rejoined" once per
# outage we rejoined from, "failed" per rejoin attempt that failed, "sdk" each time the SDK's
# own reconnection brought the participant back (a resume, or a full reconnect after a restart).
LIVEKIT_REJOINS = Counter(
    "voicebus_livekit_rejoins", "Returns to a LiveKit room after a drop, by outcome",
    ["stage", "outcome"],
)
TOOL_CALLS = Counter(
    "voicebus_tool_calls", "Tool calls the LLM stage ran, by tool (unknown: a name the model "
    "made up) and outcome (ok, error)", ["tool", "outcome"]
)

# A turn's latency, in the names LiveKit Agents users know (its EOUMetrics, LLMMetrics and
# TTSMetrics fields), each measured by the stage that sees both of its ends.
TURN_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10)
TRANSCRIPTION_DELAY = Histogram(
    "voicebus_transcription_delay_seconds",
    "STT: from the end of the user's speech to the turn's final transcript", ["provider"],
    buckets=TURN_BUCKETS,
)
END_OF_UTTERANCE_DELAY = Histogram(
    "voicebus_end_of_utterance_delay_seconds",
    "The judge: from the end of the user's speech to its decision that the turn is over",
    buckets=TURN_BUCKETS,
)
LLM_TTFT = Histogram(
    "voicebus_llm_ttft_seconds", "LLM: from the go-ahead to reply to the first text published",
    ["provider"], buckets=TURN_BUCKETS,
)
TTS_TTFB = Histogram(
    "voicebus_tts_ttfb_seconds", "TTS: from the first text of a reply to its first audio frame",
    ["provider"], buckets=TURN_BUCKETS,
)
E2E_LATENCY = Histogram(
    "voicebus_e2e_latency_seconds",
    "Egress: from the end of the user's speech to the first frame of the reply played",
    buckets=TURN_BUCKETS,
)


# Python's cyclic garbage collector stops the whole process while it runs: a stage's event loop,
# and every session on it, waits. Full collections of a model stage's startup heap took 16-84 ms
# (docs/benchmarks.md, "The garbage collector's pauses"), hence ``StageService.settle_heap``.
GC_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25)
GC_FROZEN = Gauge("voicebus_gc_frozen_objects", "Objects of the startup heap that the garbage "
                  "collector no longer scans", ["stage"])


class GcPauses:
    """``voicebus_gc_pause_seconds{stage,generation}``: how long each garbage collection held
    the process. The timing hook only counts into plain lists, read when /metrics is scraped: a
    collection can begin in any thread at any allocation, one holding a metric's lock too, and
    a hook that took that lock again would hang the process."""

    def __init__(self) -> None:
        self.stage = ""
        self.started = 0.0
        self.counts = [[0] * (len(GC_BUCKETS) + 1) for _ in range(3)]  # per bucket, +Inf last
        self.seconds = [0.0] * 3

    def hook(self, phase: str, info: dict[str, int]) -> None:
        # One collection at a time runs in a process, its two calls in the same thread.
        if phase == "start":
            self.started = time.perf_counter()
            return
        took = time.perf_counter() - self.started
        generation = info["generation"]
        self.counts[generation][bisect.bisect_left(GC_BUCKETS, took)] += 1
        self.seconds[generation] += took

    def collect(self) -> Iterable[HistogramMetricFamily]:
        if not self.stage:
            return
        family = HistogramMetricFamily("voicebus_gc_pause_seconds", "How long each garbage "
                                       "collection held the process", labels=["stage", "generation"])
        for generation in range(3):
            counts, total = list(self.counts[generation]), self.seconds[generation]
            bounds = [*map(str, GC_BUCKETS), "+Inf"]
            family.add_metric([self.stage, str(generation)],
                              list(zip(bounds, itertools.accumulate(counts))), total)
        yield family


GC_PAUSES = GcPauses()
REGISTRY.register(GC_PAUSES)


def watch_gc(stage: str) -> None:
    """Times every garbage collection of this process, as ``stage``, from now on."""
    GC_PAUSES.stage = stage
    if GC_PAUSES.hook not in gc.callbacks:
        gc.callbacks.append(GC_PAUSES.hook)


READY = Gauge("voicebus_ready", "1 from joining $SRV discovery until draining: the replica "
              "takes new sessions", ["stage"])

# What /readyz asks: set by the process once it can take work (a stage: after it joined $SRV
# discovery; cleared when it starts to drain). Called on the HTTP thread: it must only read.
_readiness: Callable[[], bool] = lambda: False  # noqa: E731


def set_readiness(check: Callable[[], bool]) -> None:
    global _readiness
    _readiness = check


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass  # probes every few seconds would flood the log


def _app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """/metrics for Prometheus; /healthz (alive: this thread answers) and /readyz (ready for
    new sessions) for an orchestrator's probes."""
    path = environ.get("PATH_INFO", "")
    if path in ("/healthz", "/readyz"):
        ok = path == "/healthz" or _readiness()
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "text/plain")])
        return [b"ok\n" if ok else b"not ready\n"]
    return _metrics(environ, start_response)


_metrics = make_wsgi_app()


def serve(port: int, addr: str = "127.0.0.1") -> None:
    """Serve /metrics, /healthz and /readyz on ``port`` (nothing when 0) from a daemon thread."""
    if port:
        server = make_server(addr, port, _app, ThreadingWSGIServer, handler_class=_Quiet)
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
