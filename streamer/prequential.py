"""Prequential (test-then-train) evaluation with delayed labels, always on.

A forecast made at batch j for horizon k is scored only when batch j+k arrives with the
entity's actual value: never earlier (that would leak the future). Beside the model, the same
stream scores two naive forecasters:

- persistence: the last observed value, for every horizon;
- zero change: 0, meaningful when the target is a change or a return (diff, log_return).

Per entity and horizon it accumulates squared and absolute errors twice: cumulatively and
with exponential forgetting (`halflife` batches), so a dashboard shows current quality and the
engine's guard rails react to recent errors. Summaries report pooled figures and, because a
pooled MSE is dominated by the most volatile entities, the median per-entity skill and the
share of entities that beat persistence.

Horizons count batches (closed steps); a step in which no entity reported produces no batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class _Sums:
    """Per-entity, per-horizon sums: [capacity, horizon] each."""

    n: np.ndarray
    se_model: np.ndarray
    se_persist: np.ndarray
    se_zero: np.ndarray
    ae_model: np.ndarray
    ae_persist: np.ndarray

    @classmethod
    def zeros(cls, capacity: int, horizon: int) -> _Sums:
        z = np.zeros((capacity, horizon), np.float64)
        return cls(*(z.copy() for _ in range(6)))

    def arrays(self) -> list[np.ndarray]:
        return [
            self.n,
            self.se_model,
            self.se_persist,
            self.se_zero,
            self.ae_model,
            self.ae_persist,
        ]

    def grow(self, capacity: int) -> None:
        for name, a in zip(
            ("n", "se_model", "se_persist", "se_zero", "ae_model", "ae_persist"),
            self.arrays(),
            strict=True,
        ):
            grown = np.zeros((capacity, a.shape[1]), a.dtype)
            grown[: a.shape[0]] = a
            setattr(self, name, grown)

    def forget(self, slots: np.ndarray) -> None:
        for a in self.arrays():
            a[slots] = 0.0


class Prequential:
    def __init__(self, capacity: int, horizon: int, halflife: float = 200.0) -> None:
        self.horizon = horizon
        self._capacity = capacity
        self._decay = 0.5 ** (1.0 / halflife)
        # Ring of the last `horizon` batches: forecasts [H, S, H], actual [H, S], valid [H, S].
        self._forecasts = np.zeros((horizon, capacity, horizon), np.float64)
        self._actual = np.zeros((horizon, capacity), np.float64)
        self._valid = np.zeros((horizon, capacity), bool)
        self._batches = 0
        self.total = _Sums.zeros(capacity, horizon)
        self.recent = _Sums.zeros(capacity, horizon)

    def grow(self, capacity: int) -> None:
        if capacity <= self._capacity:
            return
        pad = capacity - self._capacity
        self._forecasts = np.pad(self._forecasts, ((0, 0), (0, pad), (0, 0)))
        self._actual = np.pad(self._actual, ((0, 0), (0, pad)))
        self._valid = np.pad(self._valid, ((0, 0), (0, pad)))
        self.total.grow(capacity)
        self.recent.grow(capacity)
        self._capacity = capacity

    def forget_rows(self, slots: np.ndarray | list[int]) -> None:
        """A slot changed hands: drop its pending forecasts and its scores."""
        idx = np.asarray(slots, dtype=np.int64)
        self._valid[:, idx] = False
        self.total.forget(idx)
        self.recent.forget(idx)

    def observe(self, forecasts: np.ndarray, actual: np.ndarray, valid: np.ndarray) -> None:
        """One batch: score earlier forecasts against `actual`, then remember these."""
        self.grow(len(valid))
        f64 = np.asarray(forecasts, np.float64)
        act = np.asarray(actual, np.float64)
        self._decay_recent()
        for k in range(1, self.horizon + 1):
            if self._batches < k:
                break
            j = (self._batches - k) % self.horizon
            ok = self._valid[j] & valid
            if not ok.any():
                continue
            err_model = self._forecasts[j, :, k - 1] - act
            err_persist = self._actual[j] - act
            err_zero = -act
            for sums in (self.total, self.recent):
                col = k - 1
                sums.n[ok, col] += 1.0
                sums.se_model[ok, col] += err_model[ok] ** 2
                sums.se_persist[ok, col] += err_persist[ok] ** 2
                sums.se_zero[ok, col] += err_zero[ok] ** 2
                sums.ae_model[ok, col] += np.abs(err_model[ok])
                sums.ae_persist[ok, col] += np.abs(err_persist[ok])
        i = self._batches % self.horizon
        self._forecasts[i] = f64
        self._actual[i] = act
        self._valid[i] = valid
        self._batches += 1

    # ------------------------------------------------------------ checkpoints

    _SUMS = ("n", "se_model", "se_persist", "se_zero", "ae_model", "ae_persist")

    def export_arrays(self) -> dict[str, np.ndarray]:
        """Everything an exact resume needs, as named arrays (float64 viewed as int64)."""
        out: dict[str, np.ndarray] = {
            "preq_batches": np.array([self._batches], np.int64),
            "preq_forecasts": self._forecasts.view(np.int64),
            "preq_actual": self._actual.view(np.int64),
            "preq_valid": self._valid.astype(np.uint8),
        }
        for which, sums in (("total", self.total), ("recent", self.recent)):
            for name in self._SUMS:
                out[f"preq_{which}_{name}"] = getattr(sums, name).view(np.int64)
        return out

    def import_rows(self, arrays: dict[str, np.ndarray], slots: np.ndarray) -> None:
        """Restore the scores of these slots (entities back in the rows they had)."""
        if "preq_batches" not in arrays:
            return
        slots = np.asarray(slots, np.int64)
        stored_cap = arrays["preq_actual"].shape[1]
        slots = slots[slots < min(stored_cap, self._capacity)]
        if arrays["preq_actual"].shape[0] != self.horizon:
            return  # another horizon: the scores do not carry over
        self._batches = max(self._batches, int(arrays["preq_batches"][0]))
        if not len(slots):
            return
        self._forecasts[:, slots] = arrays["preq_forecasts"].view(np.float64)[:, slots]
        self._actual[:, slots] = arrays["preq_actual"].view(np.float64)[:, slots]
        self._valid[:, slots] = arrays["preq_valid"][:, slots].astype(bool)
        for which, sums in (("total", self.total), ("recent", self.recent)):
            for name in self._SUMS:
                getattr(sums, name)[slots] = arrays[f"preq_{which}_{name}"].view(np.float64)[slots]

    def _decay_recent(self) -> None:
        for a in self.recent.arrays():
            a *= self._decay

    def summary(self, which: str = "recent") -> list[dict[str, Any]]:
        """Per horizon: pooled MAE, RMSE, skill vs persistence and zero, MASE; entity spread."""
        sums = self.recent if which == "recent" else self.total
        out: list[dict[str, Any]] = []
        for col in range(self.horizon):
            n = sums.n[:, col]
            total_n = n.sum()
            if total_n <= 0:
                out.append({"horizon": col + 1, "count": 0})
                continue
            mse = sums.se_model[:, col].sum() / total_n
            mse_p = sums.se_persist[:, col].sum() / total_n
            mse_z = sums.se_zero[:, col].sum() / total_n
            mae = sums.ae_model[:, col].sum() / total_n
            # MASE: model MAE over the one-step persistence MAE of the same stream.
            n1 = sums.n[:, 0].sum()
            mae_naive1 = sums.ae_persist[:, 0].sum() / n1 if n1 > 0 else np.nan
            has = n > 0
            ent_mse = sums.se_model[has, col] / n[has]
            ent_mse_p = sums.se_persist[has, col] / n[has]
            with np.errstate(divide="ignore", invalid="ignore"):
                ent_skill = 1.0 - ent_mse / ent_mse_p
            out.append(
                {
                    "horizon": col + 1,
                    "count": float(total_n),
                    "mae": float(mae),
                    "rmse": float(np.sqrt(mse)),
                    "mse": float(mse),
                    "mse_persistence": float(mse_p),
                    "mse_zero": float(mse_z),
                    "skill_vs_persistence": float(1.0 - mse / mse_p) if mse_p > 0 else None,
                    "skill_vs_zero": float(1.0 - mse / mse_z) if mse_z > 0 else None,
                    "mase": float(mae / mae_naive1) if mae_naive1 and mae_naive1 > 0 else None,
                    "median_entity_skill": float(np.nanmedian(ent_skill)) if has.any() else None,
                    "share_entities_beating_persistence": float(np.mean(ent_mse < ent_mse_p))
                    if has.any()
                    else None,
                    "entities": int(has.sum()),
                }
            )
        return out
