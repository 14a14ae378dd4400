"""Per-client token buckets: ``burst`` requests at once, refilled at ``rate`` per second.

Pure logic with an injectable clock, so it is tested without waiting. Memory is bounded: a
client whose bucket has refilled completely is indistinguishable from a new one and is
forgotten, and past ``max_clients`` the least recently seen client is forgotten first.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic,
                 max_clients: int = 10_000) -> None:
        if rate <= 0 or burst < 1 or max_clients < 1:
            raise ValueError("rate must be > 0, burst and max_clients >= 1")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.max_clients = max_clients
        # Least recently seen first: both eviction rules look only at the front.
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @property
    def refill_seconds(self) -> float:
        """Time for an empty bucket to become full again."""
        return self.burst / self.rate

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str) -> float:
        """Spend one request of ``client``. Returns 0.0 if allowed, else the seconds until the
        next request would be."""
        now = self.clock()
        self._evict(now)
        bucket = self._buckets.pop(client, None) or _Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        self._buckets[client] = bucket  # re-inserted at the back: most recently seen
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def _evict(self, now: float) -> None:
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            if now - oldest.updated < self.refill_seconds and len(self._buckets) < self.max_clients:
                return
            self._buckets.popitem(last=False)


def retry_after(seconds: float) -> int:
    """An HTTP ``Retry-After`` value: whole seconds, never 0 (that would invite a busy loop)."""
    return max(1, math.ceil(seconds))
