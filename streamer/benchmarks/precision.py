"""`streamer bench precision`: what `model.precision = "mixed_bfloat16"` costs in accuracy.

Two measurements on the synthetic market of `bench learn` (known dynamics, a regime shift),
float32 and mixed_bfloat16 side by side in one run:

1. Same weights, same stream: the weights float32 learning ends with are frozen and both
   precisions forecast the first `drift_steps` steps from fresh states. Reported: the gap
   between the two forecasts (mean and max absolute, and relative to the float32 forecast
   error), and each one's MSE against the realised returns.
2. Online learning from scratch in each precision (the `bench learn` figures): ratio to the
   oracle, skill vs persistence, recovery after the shift, update time.

Forecasts are one-step log-returns (the target's transformed units).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ..config import CapacityConfig, Config, LearnConfig, Precision, StreamConfig
from ..forecaster import Forecaster
from ..synthetic import SyntheticMarket
from .learn import feed, run_learning

PRECISIONS: tuple[Precision, ...] = ("float32", "mixed_bfloat16")
LEARNING_KEYS = (
    "ratio_to_oracle",
    "skill_vs_persistence",
    "share_entities_beating_persistence",
    "steps_to_recover_after_shift",
    "update_ms_p50",
    "updates",
    "rollbacks",
    "discarded",
    "seconds",
)


def _with_precision(config: Config, precision: Precision, learn: bool) -> Config:
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, precision=precision),
        learn=dataclasses.replace(config.learn, enabled=learn),
    )


def run(
    *, entities: int = 400, steps: int = 3000, drift_steps: int = 1000, seed: int = 0
) -> dict[str, Any]:
    market = SyntheticMarket(entities=entities, steps=steps, seed=seed, shift_at=int(steps * 0.6))
    sim = market.simulate()
    base = Config(
        stream=StreamConfig(max_future=0.0),  # historical replay: no wall-clock check
        capacity=CapacityConfig(initial=entities, max_entities=entities),
        learn=LearnConfig(enabled=True),
    )
    learning: dict[str, dict[str, Any]] = {}
    trained: list[np.ndarray] = []
    for precision in PRECISIONS:
        figures, core = run_learning(_with_precision(base, precision, True), market, sim)
        learning[precision] = {k: figures[k] for k in LEARNING_KEYS}
        if precision == "float32":
            trained = core.model.get_weights()

    drift_steps = min(drift_steps, steps)
    frozen: dict[str, np.ndarray] = {}
    for precision in PRECISIONS:
        core = Forecaster(_with_precision(base, precision, False))
        core.model.set_weights(trained)
        frozen[precision] = feed(core, market, sim, drift_steps)
    full, mixed = frozen["float32"], frozen["mixed_bfloat16"]
    both = np.isfinite(full) & np.isfinite(mixed)
    gap = np.abs(full - mixed)[both]
    realised = sim["ret"][1:drift_steps]

    def mse(f: np.ndarray) -> float:
        return float(np.nanmean((f[:-1] - realised) ** 2))

    mse_full, mse_mixed = mse(full), mse(mixed)
    return {
        "benchmark": "precision",
        "entities": entities,
        "steps": steps,
        "same_weights": {
            "steps": drift_steps,
            "forecasts_compared": int(both.sum()),
            "abs_gap_mean": float(gap.mean()),
            "abs_gap_p99": float(np.percentile(gap, 99)),
            "abs_gap_max": float(gap.max()),
            "mean_abs_forecast_float32": float(np.abs(full[both]).mean()),
            # The gap against the float32 model's own error: how much of the error it adds.
            "gap_rms_over_float32_rmse": float(np.sqrt(np.mean(gap**2)) / np.sqrt(mse_full)),
            "mse_float32": mse_full,
            "mse_mixed_bfloat16": mse_mixed,
            "mse_ratio_mixed_to_float32": round(mse_mixed / mse_full, 5),
        },
        "learning": learning,
        "learning_ratio_to_oracle_mixed_over_float32": round(
            learning["mixed_bfloat16"]["ratio_to_oracle"] / learning["float32"]["ratio_to_oracle"],
            4,
        ),
    }
