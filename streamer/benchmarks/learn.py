"""`streamer bench learn`: online learning on a stream with known dynamics and a regime shift.

The synthetic market (streamer.synthetic) is fed through the engine's pure core (the same
Forecaster the Kafka engine runs; Kafka and Redis add nothing to what is measured here) with
online learning on. Because the generator is known, every figure has an absolute yardstick:

- mse_oracle_tail: the generator's own one-step forecast error (its noise), the floor;
- mse_persistence_tail: last value as the forecast (here: last log-return);
- mse_model_tail: the engine's one-step forecasts, scored against realised returns;
- steps_to_recover_after_shift: batches after the shift until the model's rolling MSE
  (50 steps, pooled over entities) is back within 1.3x the oracle's over the same steps.

"tail" is the last 20% of the steps. The whole run is repeated with state refresh (burn-in)
off, for comparison.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from ..config import CapacityConfig, Config, LearnConfig, StreamConfig
from ..events import Event
from ..forecaster import Forecaster
from ..synthetic import SyntheticMarket
from .timing import pct

ROLLING = 50
RECOVERED = 1.3


def feed(
    core: Forecaster, market: SyntheticMarket, sim: dict[str, np.ndarray], steps: int
) -> np.ndarray:
    """Stream the first `steps` steps through `core`; its one-step forecasts [steps, entities]."""
    n = market.entities
    ids = [market.entity_id(i) for i in range(n)]
    interval = core.config.stream.interval
    base = int(market.start_ts // interval)
    forecasts = np.full((steps, n), np.nan)
    for t in range(steps):
        ts = market.start_ts + (t + 0.5) * interval
        price, signal = sim["price"][t], sim["signal"][t]
        for i in range(n):
            core.ingest(Event(ids[i], ts, (float(price[i]), float(signal[i]))))
        for r in core.advance():
            idx = np.fromiter((int(e[3:]) for e in r.entities), dtype=np.int64)
            forecasts[r.step - base, idx] = np.where(r.valid, r.forecasts[:, 0], np.nan)
    return forecasts


def run_learning(
    config: Config, market: SyntheticMarket, sim: dict[str, np.ndarray]
) -> tuple[dict[str, Any], Forecaster]:
    """One learning run over the whole market: its figures, and the core it leaves."""
    steps = market.steps
    core = Forecaster(config)
    t0 = time.perf_counter()
    forecasts = feed(core, market, sim, steps)
    elapsed = time.perf_counter() - t0
    # The forecast made at step t is for step t + 1.
    ret = sim["ret"]
    err = (forecasts[:-1] - ret[1:]) ** 2
    oracle = (sim["oracle"][1:] - ret[1:]) ** 2
    persist = (ret[:-1] - ret[1:]) ** 2
    tail = slice(int(0.8 * (steps - 1)), steps - 1)
    mse_model = float(np.nanmean(err[tail]))
    mse_oracle = float(np.mean(oracle[tail]))
    mse_persist = float(np.mean(persist[tail]))
    ent_model = np.nanmean(err[tail], axis=0)
    ent_persist = np.mean(persist[tail], axis=0)
    recover = None
    if market.shift_at is not None:
        for t in range(market.shift_at, steps - 1 - ROLLING):
            w = slice(t, t + ROLLING)
            if np.nanmean(err[w]) <= RECOVERED * np.mean(oracle[w]):
                recover = t - market.shift_at
                break
    learner = core.learner
    assert learner is not None
    return {
        "mse_model_tail": mse_model,
        "mse_oracle_tail": mse_oracle,
        "mse_persistence_tail": mse_persist,
        "ratio_to_oracle": round(mse_model / mse_oracle, 4),
        "skill_vs_persistence": round(1.0 - mse_model / mse_persist, 4),
        "share_entities_beating_persistence": round(float(np.mean(ent_model < ent_persist)), 4),
        "steps_to_recover_after_shift": recover,
        "update_ms_p50": pct(np.asarray(learner.stats.update_ms or [np.nan]), 50),
        "update_ms_p99": pct(np.asarray(learner.stats.update_ms or [np.nan]), 99),
        "updates": learner.stats.updates,
        "rollbacks": learner.stats.rollbacks,
        "discarded": learner.stats.discarded,
        "engine_prequential_h1": core.prequential.summary("recent")[0],
        "seconds": round(elapsed, 1),
    }, core


def run(
    *, entities: int = 400, steps: int = 3000, shift: float = 0.6, seed: int = 0
) -> dict[str, Any]:
    market = SyntheticMarket(entities=entities, steps=steps, seed=seed, shift_at=int(steps * shift))
    sim = market.simulate()
    base = Config(
        stream=StreamConfig(max_future=0.0),  # historical replay: no wall-clock check
        capacity=CapacityConfig(initial=entities, max_entities=max(entities, 1)),
        learn=LearnConfig(enabled=True),
    )
    with_refresh, _ = run_learning(base, market, sim)
    no_refresh_cfg = dataclasses.replace(
        base, learn=dataclasses.replace(base.learn, refresh_states=False)
    )
    without, _ = run_learning(no_refresh_cfg, market, sim)
    return {
        "benchmark": "learn",
        "entities": entities,
        "steps": steps,
        "shift_at": market.shift_at,
        "tail_steps": steps - int(0.8 * (steps - 1)),
        "learn": dataclasses.asdict(base.learn),
        "units": list(base.model.units),
        **with_refresh,
        "state_refresh_off": without,
    }
