"""The token service's per-client token bucket, on a hand-driven clock."""

from __future__ import annotations

import pytest

from services.token.ratelimit import RateLimiter, retry_after


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(rate: float = 1.0, burst: int = 3, **kw: object) -> tuple[RateLimiter, Clock]:
    clock = Clock()
    return RateLimiter(rate, burst, clock=clock, **kw), clock  # type: ignore[arg-type]


def test_a_burst_is_allowed_at_once_then_refused_with_the_wait() -> None:
    rl, _ = limiter(rate=0.5, burst=3)
    assert [rl.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rl.take("a") == pytest.approx(2.0)  # one token every 2 s


def test_tokens_refill_at_the_rate_and_never_beyond_the_burst() -> None:
    rl, clock = limiter(rate=1.0, burst=3)
    for _ in range(3):
        rl.take("a")
    clock.now += 1.0
    assert rl.take("a") == 0.0
    assert rl.take("a") > 0
    clock.now += 3600  # a long pause refills to the burst, not to 3600
    assert [rl.take("a") for _ in range(4)][-1] > 0


def test_a_refused_request_costs_nothing() -> None:
    rl, clock = limiter(rate=1.0, burst=1)
    rl.take("a")
    for _ in range(10):  # hammering while empty does not push the next token further away
        assert rl.take("a") == pytest.approx(1.0)
    clock.now += 1.0
    assert rl.take("a") == 0.0


def test_clients_have_separate_buckets() -> None:
    rl, _ = limiter(rate=1.0, burst=2)
    assert rl.take("a") == rl.take("a") == 0.0
    assert rl.take("a") > 0
    assert rl.take("b") == 0.0 and rl.take("b") == 0.0


def test_idle_clients_are_forgotten_once_their_bucket_is_full_again() -> None:
    rl, clock = limiter(rate=1.0, burst=2)
    for client in ("a", "b", "c"):
        rl.take(client)
    assert len(rl) == 3
    clock.now += rl.refill_seconds
    rl.take("d")
    assert len(rl) == 1


def test_memory_is_bounded_by_evicting_the_least_recently_seen() -> None:
    rl, _ = limiter(rate=0.001, burst=1, max_clients=100)
    for i in range(1000):
        rl.take(f"client-{i}")
        assert len(rl) <= 100
    assert rl.take("client-999") > 0  # the most recent clients are still limited


def test_retry_after_is_whole_seconds_and_at_least_one() -> None:
    assert retry_after(0.01) == 1
    assert retry_after(1.0) == 1
    assert retry_after(1.2) == 2


@pytest.mark.parametrize("rate, burst", [(0, 1), (-1, 1), (1, 0)])
def test_nonsense_limits_are_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate, burst)
