"""Generator families with a known one-step oracle, for `streamer bench learn`.

The repo's own synthetic market (streamer.synthetic) is one world; figures measured on it
alone say little about another. Each family here is a variation with a known oracle: the
generator's conditional expectation of the next log-return, E[r[t] | everything up to t-1],
so that the error of any forecaster has an absolute floor to be compared with.

Every entity i has an observed signal and a price, as in the synthetic market::

    s[t] = rho_i * s[t-1] + sqrt(1 - rho_i^2) * u[t]                (unit variance)
    r[t] = a_i(t) * r[t-1] + b_i(t) * tanh(2 * s[t-1]) + eps[t]      (the oracle + noise)
    price[t] = price[t-1] * exp(r[t])

Families (`FAMILIES`), which combine freely through `Family`:

- coefficients "shared": (a_i, b_i) scattered around one common regime (the synthetic
  market's own parameters, `SyntheticMarket.params`); "independent": every entity draws its
  own, of either sign (no regime for one set of weights to share);
- noise "gaussian": eps ~ N(0, sigma_i^2) (the synthetic market's); "garch_t": GARCH(1,1)
  volatility (alpha 0.08, beta 0.90, long-run variance sigma_i^2) with Student-t (df 4)
  innovations scaled to unit variance: heavy tails and volatility clusters;
- shift "abrupt": the coefficients switch to a second set at `shift_at`; "gradual": they
  interpolate linearly from `shift_at` to `shift_end` (`ramp` steps);
- gaps: 10% of entity-steps missing at random, 10% of the entities join late (first event
  between 10% and 50% of the steps) and 10% leave early (last event between 50% and 90%);
- learnable False: the random walk. r[t] = eps[t] (GARCH, t df 4) and the signal is
  independent noise: nothing is predictable, the oracle is zero change.

With shared coefficients and gaussian noise the arrays are exactly `SyntheticMarket.simulate()`
(same seed, same random streams), with or without an abrupt shift. Every family is
deterministic per seed, and families that differ only in noise or gaps share the signal path.

`simulate` returns arrays [steps, entities] ("price", "signal", "ret", "oracle", "valid": the
entity reported at that step) and "shift_at" / "shift_end" (None without a shift; equal for
an abrupt one). The latent process runs on through missing steps: what an absent entity
misses is the observation, so its next observed log-return spans the gap.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from .synthetic import NOISE, SyntheticMarket

Coefficients = Literal["shared", "independent"]
Noise = Literal["gaussian", "garch_t"]
Shift = Literal["none", "abrupt", "gradual"]

GARCH_ALPHA = 0.08
GARCH_BETA = 0.90
T_DF = 4.0
MISSING = 0.10  # share of entity-steps absent (gaps)
JOINERS = 0.10  # share of entities that start late
LEAVERS = 0.10  # share of entities that stop early
RAMP = 300  # steps of a gradual shift


@dataclass(frozen=True)
class Family:
    coefficients: Coefficients = "shared"
    noise: Noise = "gaussian"
    shift: Shift = "none"
    gaps: bool = False
    learnable: bool = True
    description: str = ""


FAMILIES: dict[str, Family] = {
    "shared": Family(description="one shared regime, gaussian noise (the synthetic market)"),
    "independent": Family(
        coefficients="independent", description="per-entity coefficients of either sign"
    ),
    "garch": Family(noise="garch_t", description="GARCH(1,1) volatility, t(4) innovations"),
    "gaps": Family(gaps=True, description="10% steps missing, 10% joiners, 10% leavers"),
    "abrupt": Family(shift="abrupt", description="regime flips at 60% (the old bench learn)"),
    "gradual": Family(shift="gradual", description="regime interpolates over 300 steps from 60%"),
    "garch_abrupt": Family(
        noise="garch_t", shift="abrupt", description="GARCH t(4) noise and a flip at 60%"
    ),
    "independent_abrupt": Family(
        coefficients="independent",
        shift="abrupt",
        description="per-entity coefficients, all redrawn at 60%",
    ),
    "random_walk": Family(
        noise="garch_t",
        learnable=False,
        description="unlearnable: GARCH t(4) random walk, signal pure noise",
    ),
}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown world {name!r}; known: {', '.join(FAMILIES)}") from None


def _coefficients(fam: Family, n: int, seed: int) -> dict[str, np.ndarray]:
    base = SyntheticMarket(entities=n, steps=1, seed=seed).params()
    if fam.coefficients == "independent":
        rng = np.random.default_rng([seed, 5])
        vol = base["sigma"] / NOISE

        def draw_b() -> np.ndarray:
            return rng.choice([-1.0, 1.0], n) * rng.uniform(0.3, 1.2, n) * vol

        base = base | {
            "a": rng.uniform(-0.4, 0.4, n),
            "b": draw_b(),
            "a_shift": rng.uniform(-0.4, 0.4, n),
            "b_shift": draw_b(),
            "rho": rng.uniform(0.3, 0.95, n),
        }
    return base


def _presence(n: int, steps: int, seed: int) -> np.ndarray:
    """valid [steps, n]: missing entity-steps, late joiners and early leavers."""
    rng = np.random.default_rng([seed, 6])
    valid = rng.random((steps, n)) >= MISSING
    order = rng.permutation(n)
    n_join, n_leave = round(JOINERS * n), round(LEAVERS * n)
    joiners, leavers = order[:n_join], order[n_join : n_join + n_leave]
    t = np.arange(steps)[:, None]
    start = rng.integers(int(0.1 * steps), max(int(0.5 * steps), int(0.1 * steps) + 1), n_join)
    stop = rng.integers(int(0.5 * steps), max(int(0.9 * steps), int(0.5 * steps) + 1), n_leave)
    valid[:, joiners] &= t >= start[None, :]
    valid[:, leavers] &= t < stop[None, :]
    return valid


def simulate(
    name_or_family: str | Family,
    entities: int,
    steps: int,
    seed: int = 0,
    shift: float = 0.6,
    ramp: int = RAMP,
) -> dict[str, Any]:
    """The family's arrays [steps, entities] (module docstring) and its shift steps."""
    fam = family(name_or_family) if isinstance(name_or_family, str) else name_or_family
    if entities < 1 or steps < 1:
        raise ValueError("entities and steps must be >= 1")
    n = entities
    p = _coefficients(fam, n, seed)
    shift_at: int | None = None
    shift_end: int | None = None
    if fam.shift != "none" and fam.learnable:
        shift_at = int(steps * shift)
        shift_end = shift_at if fam.shift == "abrupt" else min(shift_at + ramp, steps)
    # The synthetic market's random stream (signal and gaussian noise, in its order); t draws
    # come from a stream of their own, so the signal path does not depend on the noise.
    rng = np.random.default_rng([seed, 2])
    t_rng = np.random.default_rng([seed, 4])
    sig_rng = np.random.default_rng([seed, 7])
    price = np.empty((steps, n))
    signal = np.empty((steps, n))
    ret = np.empty((steps, n))
    oracle = np.zeros((steps, n))
    s_prev = rng.normal(size=n)
    r_prev = np.zeros(n)
    px = p["price0"].copy()
    var_lr = p["sigma"] ** 2
    omega = var_lr * (1.0 - GARCH_ALPHA - GARCH_BETA)
    var = var_lr.copy()
    eps_prev = np.zeros(n)
    t_scale = np.sqrt((T_DF - 2.0) / T_DF)  # unit-variance Student-t
    for t in range(steps):
        if fam.learnable:
            if shift_at is None or t < shift_at:
                w = 0.0
            elif shift_end is None or shift_end <= shift_at:
                w = 1.0
            else:
                w = min((t - shift_at) / (shift_end - shift_at), 1.0)
            a = (1.0 - w) * p["a"] + w * p["a_shift"]
            b = (1.0 - w) * p["b"] + w * p["b_shift"]
            oracle[t] = a * r_prev + b * np.tanh(2.0 * s_prev)
        e = rng.normal(size=n)
        if fam.noise == "gaussian":
            eps = p["sigma"] * e
        else:
            var = omega + GARCH_ALPHA * eps_prev**2 + GARCH_BETA * var
            eps = np.sqrt(var) * t_scale * t_rng.standard_t(T_DF, size=n)
        r = oracle[t] + eps
        u = rng.normal(size=n)
        if not fam.learnable:  # the observed signal carries no information about returns
            u = sig_rng.normal(size=n)
        s = p["rho"] * s_prev + np.sqrt(1.0 - p["rho"] ** 2) * u
        px = px * np.exp(r)
        price[t], signal[t], ret[t] = px, s, r
        s_prev, r_prev, eps_prev = s, r, eps
    valid = _presence(n, steps, seed) if fam.gaps else np.ones((steps, n), bool)
    return {
        "price": price,
        "signal": signal,
        "ret": ret,
        "oracle": oracle,
        "valid": valid,
        "shift_at": shift_at,
        "shift_end": shift_end,
    }


def combine(**fields: Any) -> Family:
    """A family from fields, e.g. `combine(noise="garch_t", shift="gradual", gaps=True)`."""
    return replace(Family(), **fields)
