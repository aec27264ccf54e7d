"""A synthetic market: many entities with known, entity-specific nonlinear dynamics.

Each entity i ("SYN00042") has a price and an observed signal::

    s[t] = rho_i * s[t-1] + u[t],                 u ~ N(0, 1 - rho_i^2)   (unit variance)
    r[t] = a_i * r[t-1] + vol_i * (b_i * tanh(2 * s[t-1]) + NOISE * e[t]),   e ~ N(0, 1)
    price[t] = price[t-1] * exp(r[t])

so the log-return r[t] is predictable from what was observed at t-1 up to the noise
vol_i * NOISE * e[t]: the best possible one-step MSE (the oracle) is mean((vol_i * NOISE)^2).
The coefficients are entity-specific but scattered around a common regime (a, b), and the
scale vol_i differs by a factor of five across entities: per-entity normalisation is what
lets one model serve them all. An optional regime shift flips the regime at a given step,
which online learning must recover from.
Event times are spread inside each step (jitter) and arrive interleaved across entities.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

# Regimes (a, b) before and after the shift, and the noise, in units of each entity's vol.
REGIME = (0.3, 1.0)
SHIFTED = (-0.2, -1.0)
NOISE = 0.5

# 2026-01-01T00:00:00Z: synthetic streams start here so that event-time checks pass.
DEFAULT_START_TS = 1_767_225_600.0


@dataclass(frozen=True)
class SyntheticMarket:
    entities: int
    steps: int
    seed: int = 0
    interval: float = 1.0
    start_ts: float = DEFAULT_START_TS
    shift_at: int | None = None  # step at which (a_i, b_i) change

    def __post_init__(self) -> None:
        if self.entities < 1 or self.steps < 1:
            raise ValueError("entities and steps must be >= 1")

    def entity_id(self, i: int) -> str:
        return f"SYN{i:05d}"

    def params(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, 1])
        n = self.entities
        vol = rng.uniform(0.002, 0.01, n)
        return {
            "a": REGIME[0] + rng.uniform(-0.05, 0.05, n),
            "b": REGIME[1] * rng.uniform(0.8, 1.2, n) * vol,
            "a_shift": SHIFTED[0] + rng.uniform(-0.05, 0.05, n),
            "b_shift": SHIFTED[1] * rng.uniform(0.8, 1.2, n) * vol,
            "rho": rng.uniform(0.5, 0.9, n),
            "sigma": NOISE * vol,
            "price0": rng.uniform(10.0, 500.0, n),
        }

    def simulate(self) -> dict[str, np.ndarray]:
        """Arrays [steps, entities]: price, signal, ret, and the oracle's one-step forecast.

        `oracle[t]` is E[r[t] | everything up to t-1], so `mean((ret - oracle)^2)` over a
        stretch approaches `mean(sigma^2)`.
        """
        p = self.params()
        rng = np.random.default_rng([self.seed, 2])
        n, steps = self.entities, self.steps
        price = np.empty((steps, n))
        signal = np.empty((steps, n))
        ret = np.empty((steps, n))
        oracle = np.zeros((steps, n))
        s_prev = rng.normal(size=n)
        r_prev = np.zeros(n)
        px = p["price0"].copy()
        for t in range(steps):
            shifted = self.shift_at is not None and t >= self.shift_at
            a = p["a_shift"] if shifted else p["a"]
            b = p["b_shift"] if shifted else p["b"]
            oracle[t] = a * r_prev + b * np.tanh(2.0 * s_prev)
            r = oracle[t] + p["sigma"] * rng.normal(size=n)
            s = p["rho"] * s_prev + np.sqrt(1.0 - p["rho"] ** 2) * rng.normal(size=n)
            px = px * np.exp(r)
            price[t], signal[t], ret[t] = px, s, r
            s_prev, r_prev = s, r
        return {"price": price, "signal": signal, "ret": ret, "oracle": oracle}

    def events(self) -> Iterator[dict[str, Any]]:
        """Events as producers would send them, interleaved across entities within a step."""
        sim = self.simulate()
        rng = np.random.default_rng([self.seed, 3])
        ids = [self.entity_id(i) for i in range(self.entities)]
        for t in range(self.steps):
            jitter = rng.uniform(0.0, 0.9, self.entities) * self.interval
            order = rng.permutation(self.entities)
            base = self.start_ts + t * self.interval
            price, signal = sim["price"][t], sim["signal"][t]
            for i in order:
                yield {
                    "entity": ids[i],
                    "ts": round(base + float(jitter[i]), 6),
                    "values": {"price": float(price[i]), "signal": float(signal[i])},
                }
