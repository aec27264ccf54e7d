"""`streamer bench combine`: is the published forecast ever worse than the naive one?

The combiner (streamer/combiner.py) alone, on two kinds of world, many seeds each:

- unlearnable: a random walk whose returns are heavy-tailed (Student t, 4 degrees of
  freedom) and volatility-clustered (GARCH(1,1)); the "model" forecasts pure noise with the
  returns' overall variance (its MSE is about twice zero-change's). Acceptance: the published
  MSE is at most 1.005x zero-change's and never significantly worse (Diebold-Mariano
  statistic of the pooled per-step loss differential below 1.96) in any seed.
- learnable: the same noise around a smooth per-entity signal the model knows up to a small
  error. Acceptance: the published forecast keeps at least 95% of the model's skill against
  zero change.

Coverage of the 80% and 95% intervals is reported for both (target: within 2 points).
The engine's own LSTM on such worlds is measured by `streamer bench learn`.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from ..combiner import Combiner
from ..config import ForecastConfig

WARMUP = 50


def garch_t(rng: np.random.Generator, steps: int, n: int) -> np.ndarray:
    """Returns [steps, n]: GARCH(1,1) with Student-t(4) innovations, about 1% daily vol."""
    df, omega, a, b = 4, 0.05, 0.1, 0.85
    z = rng.standard_t(df, (steps, n)) / math.sqrt(df / (df - 2))
    h = np.full(n, omega / (1 - a - b))
    r = np.zeros((steps, n))
    for t in range(steps):
        r[t] = np.sqrt(h) * z[t]
        h = omega + a * r[t] ** 2 + b * h
    return 0.01 * r


def _dm(e_a: np.ndarray, e_b: np.ndarray) -> float:
    d = (e_a - e_b).mean(axis=1)
    sd = d.std(ddof=1)
    return 0.0 if sd == 0 else float(d.mean() / (sd / math.sqrt(len(d))))


def run_case(seed: int, learnable: bool, entities: int, steps: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    noise = garch_t(rng, steps, entities)
    if learnable:
        signal = 0.005 * np.sin(np.arange(steps)[:, None] / 7.0 + rng.uniform(0, 6, entities))
        y = signal + noise
        model = np.vstack([signal[1:], signal[-1:]]) + 0.002 * rng.normal(size=y.shape)
    else:
        y = noise
        model = rng.normal(size=y.shape) * y.std()
    comb = Combiner(ForecastConfig(), entities, 1, "log_return")
    published = np.zeros_like(y)
    valid = np.ones(entities, bool)
    for t in range(steps):
        published[t] = comb.step(model[t][:, None], y[t], valid).published[:, 0]
    tail = slice(WARMUP, steps - 1)
    target = y[WARMUP + 1 :]
    e_pub = (published[tail] - target) ** 2
    e_model = (model[tail] - target) ** 2
    e_zero = target**2
    summary = comb.summary()[0]
    return {
        "seed": seed,
        "published_over_zero": round(float(e_pub.mean() / e_zero.mean()), 6),
        "model_over_zero": round(float(e_model.mean() / e_zero.mean()), 6),
        "dm_published_vs_zero": round(_dm(e_pub, e_zero), 3),
        "skill_model": round(float(1 - e_model.mean() / e_zero.mean()), 5),
        "skill_published": round(float(1 - e_pub.mean() / e_zero.mean()), 5),
        "mean_model_weight": summary["mean_model_weight"],
        "coverage": {str(lv["level"]): lv["coverage"] for lv in summary["intervals"]},
    }


def run(*, seeds: int = 20, entities: int = 20, steps: int = 2000) -> dict[str, Any]:
    t0 = time.perf_counter()
    walk = [run_case(1000 + s, False, entities, steps) for s in range(seeds)]
    learn = [run_case(2000 + s, True, entities, steps) for s in range(seeds)]
    cover = [c for case in walk + learn for c in case["coverage"].items()]
    worst_cover = {
        level: max(abs(v - float(level)) for lv, v in cover if lv == level and v is not None)
        for level in {lv for lv, _ in cover}
    }
    kept = [c["skill_published"] / c["skill_model"] for c in learn if c["skill_model"] > 0]
    return {
        "benchmark": "combine",
        "seeds": seeds,
        "entities": entities,
        "steps": steps,
        "unlearnable": {
            "worst_published_over_zero": max(c["published_over_zero"] for c in walk),
            "worst_dm_published_vs_zero": max(c["dm_published_vs_zero"] for c in walk),
            "significantly_worse_seeds": sum(c["dm_published_vs_zero"] > 1.96 for c in walk),
            "cases": walk,
        },
        "learnable": {
            "worst_share_of_model_skill_kept": round(min(kept), 4) if kept else None,
            "cases": learn,
        },
        "worst_coverage_gap": {k: round(v, 4) for k, v in sorted(worst_cover.items())},
        "seconds": round(time.perf_counter() - t0, 1),
    }
