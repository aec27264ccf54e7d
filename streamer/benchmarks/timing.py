"""Small timing helpers shared by the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def time_calls(
    fn: Callable[[], object], *, warmup: int, max_calls: int, budget_s: float
) -> np.ndarray:
    """Call `fn` `warmup` times untimed, then up to `max_calls` times or `budget_s` seconds.

    Returns the per-call wall times in milliseconds (at least 5 calls).
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_calls and (len(times) < 5 or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return np.asarray(times)


def pct(values: np.ndarray, q: float) -> float:
    return round(float(np.percentile(values, q)), 4)
