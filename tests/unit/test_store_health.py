"""StoreHealth: backoff with jitter between attempts, one log line per change of state."""

from __future__ import annotations

import logging
import random

import pytest

from streamer.engine import StoreHealth


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_backoff_grows_to_the_cap_with_jitter_and_resets_on_success(caplog):
    clock = Clock()
    health = StoreHealth(base_s=0.2, cap_s=5.0, clock=clock, rng=random.Random(1))
    assert health.up and health.may_try()
    waits = []
    with caplog.at_level(logging.WARNING, logger="streamer.engine"):
        for _ in range(10):
            health.failed(TimeoutError("Timeout reading from socket"))
            assert not health.up and not health.may_try()
            start = clock.now
            while not health.may_try():
                clock.now += 0.01
            waits.append(clock.now - start)
        health.succeeded()
    assert health.up and health.failures == 0 and health.may_try()
    # Each wait lies in [delay / 2, delay] with delay = min(cap, base * 2^k).
    for k, wait in enumerate(waits):
        delay = min(5.0, 0.2 * 2**k)
        assert 0.5 * delay - 0.02 <= wait <= delay + 0.02, (k, wait)
    assert max(waits) <= 5.02
    lines = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m for m in lines) == 1  # not one line per attempt
    assert sum("answers again" in m for m in lines) == 1
    assert "Timeout reading from socket" in health.error or health.error == ""


@pytest.mark.parametrize("failures", [1, 3])
def test_error_is_kept_while_down(failures):
    health = StoreHealth(clock=Clock())
    for i in range(failures):
        health.failed(ConnectionError(f"refused {i}"))
    assert health.error == f"refused {failures - 1}" and health.failures == failures
