"""Prequential (test-then-train) evaluation with delayed labels, judged against the best naive.

A forecast made at batch j for horizon k is scored only when batch j+k arrives with the
entity's actual value: never earlier (that would leak the future). Everything is in the
target's transformed units (the log-return, the difference, or the level itself for
`none`), which is what `observe` receives as `actual`.

Naive baselines. Beside the model the same stream scores the naive forecasts that fit the
target's transform, each made at batch j from what was known at j only:

- `log_return`, `diff` (changes): zero change (0), persistence of the last change, and the
  rolling mean of the entity's last `rolling` changes;
- `none` (levels): persistence (the last level), seasonal persistence (the level `season`
  observations before the target's step, only when `season` > 0; the last level until the
  entity has that much history) and the rolling mean of the last `rolling` levels.

Histories count the entity's own valid observations, which are batches while it reports at
every step (what a seasonal period means).

The headline. Per horizon the "best naive" is the baseline with the lowest pooled MSE over
the scored period (cumulative for "total", exponentially forgotten with `halflife` batches
for "recent"), and `skill` = 1 - MSE / MSE_best_naive. Judging against a weak baseline
flatters: on returns the last return as a forecast has about twice zero change's MSE, so a
model no better than zero change looked 50% better than persistence. Beside the pooled
skill (which the most volatile entities dominate): the median per-entity skill against the
same baseline, the share of entities that beat it, and a Diebold-Mariano test of the model
against it (below).

Published vs model. `observe` gets the model's own forecasts and the forecasts the engine
publishes (combiner.py; the model's when none are given). The headline figures (`skill`,
`mse`, `mae`, `rmse`, `dm_*`, entity figures, and the older `skill_vs_*`, `mase`) are the
published forecast's; `model_skill` and `model_mse` are the model's own.

Warm-up. The first `warmup` scored forecasts of each entity at each horizon are left out of
every figure (a fresh state and a short history forecast nothing yet).

Diebold-Mariano. For horizon h and a baseline, the loss differential of a batch t is
d_t = mean over the entities scored at t of (published error^2 - baseline error^2). With
weights w_t (1 for "total"; decay^(batches since t) for "recent"), W = sum w_t, n_eff =
W^2 / sum w_t^2, dbar = sum w_t d_t / W, and for lags l = 0..h-1

    gamma_l = sum_{t>l} w_t (d_t - dbar)(d_{t-l} - dbar) / W
    V = gamma_0 + 2 sum_{l=1}^{h-1} (1 - l/h) gamma_l        (Newey-West, Bartlett weights)
    dm_stat = dbar / sqrt(V / n_eff),   dm_p_value = erfc(|dm_stat| / sqrt 2)

(t counts the batches with a d_t; "t>l" is the point having l earlier ones). gamma_l is kept
as running sums of w_t d_t d_{t-l}, w_t d_t, w_t d_{t-l} and w_t, and only the last h
differentials are remembered, so no per-step history is kept. A negative statistic means the
published forecast is better. These sums are engine-wide (pooled over entities): forgetting a
row does not remove its past differentials.

Horizons count batches (closed steps); a step in which no entity reported produces no batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

TRANSFORMS = ("none", "diff", "log_return")
BASELINES = ("zero", "persistence", "seasonal", "rolling_mean")
_CHANGE_BASELINES = ("zero", "persistence", "rolling_mean")


@dataclass
class _Sums:
    """Per-entity, per-horizon sums: [capacity, horizon] each ([..., baselines] for naive)."""

    n: np.ndarray
    se_model: np.ndarray  # the model's own forecast
    ae_model: np.ndarray
    se_pub: np.ndarray  # the published forecast
    ae_pub: np.ndarray
    se_persist: np.ndarray  # the last value (kept for the older keys)
    ae_persist: np.ndarray
    se_zero: np.ndarray  # 0 (kept for the older keys; meaningful for changes)
    se_naive: np.ndarray  # [capacity, horizon, baselines]

    @classmethod
    def zeros(cls, capacity: int, horizon: int, baselines: int) -> _Sums:
        shape: dict[str, tuple[int, ...]] = {f.name: (capacity, horizon) for f in fields(cls)}
        shape["se_naive"] = (capacity, horizon, baselines)
        return cls(**{name: np.zeros(s, np.float64) for name, s in shape.items()})

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def arrays(self) -> list[np.ndarray]:
        return [getattr(self, name) for name in self.names()]

    def grow(self, capacity: int) -> None:
        for name in self.names():
            a = getattr(self, name)
            grown = np.zeros((capacity, *a.shape[1:]), a.dtype)
            grown[: a.shape[0]] = a
            setattr(self, name, grown)

    def forget(self, slots: np.ndarray) -> None:
        for a in self.arrays():
            a[slots] = 0.0


@dataclass
class _DmSums:
    """Engine-wide Diebold-Mariano sums per horizon h (col), baseline b and lag l (0..H-1)."""

    w: np.ndarray  # [H]        sum w_t
    w2: np.ndarray  # [H]       sum w_t^2
    s: np.ndarray  # [H, B]     sum w_t d_t
    c: np.ndarray  # [H, B, L]  sum_{t>l} w_t d_t d_{t-l}
    a: np.ndarray  # [H, B, L]  sum_{t>l} w_t d_t
    b: np.ndarray  # [H, B, L]  sum_{t>l} w_t d_{t-l}
    wl: np.ndarray  # [H, L]    sum_{t>l} w_t

    @classmethod
    def zeros(cls, horizon: int, baselines: int) -> _DmSums:
        h, nb = horizon, baselines
        return cls(
            np.zeros(h),
            np.zeros(h),
            np.zeros((h, nb)),
            np.zeros((h, nb, h)),
            np.zeros((h, nb, h)),
            np.zeros((h, nb, h)),
            np.zeros((h, h)),
        )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def add(self, col: int, d: np.ndarray, lagged: np.ndarray, lags: int) -> None:
        """One differential d [B] with its lagged values [B, lags] (lag 0 = d itself)."""
        self.w[col] += 1.0
        self.w2[col] += 1.0
        self.s[col] += d
        self.c[col, :, :lags] += d[:, None] * lagged
        self.a[col, :, :lags] += d[:, None]
        self.b[col, :, :lags] += lagged
        self.wl[col, :lags] += 1.0

    def decay(self, factor: float) -> None:
        for name in self.names():
            getattr(self, name)[...] *= factor * factor if name == "w2" else factor

    def stat(self, col: int, bi: int) -> tuple[float | None, float | None]:
        """(dm_stat, dm_p_value) of horizon col + 1 against baseline bi; None without data."""
        big_w = float(self.w[col])
        if big_w <= 0.0:
            return None, None
        h = col + 1
        dbar = float(self.s[col, bi]) / big_w
        var = 0.0
        for lag in range(h):
            gamma = (
                float(self.c[col, bi, lag])
                - dbar * (float(self.a[col, bi, lag]) + float(self.b[col, bi, lag]))
                + dbar * dbar * float(self.wl[col, lag])
            ) / big_w
            var += gamma if lag == 0 else 2.0 * (1.0 - lag / h) * gamma
        n_eff = big_w * big_w / float(self.w2[col])
        if dbar == 0.0:
            return 0.0, 1.0
        if not var > 0.0:
            return math.copysign(math.inf, dbar), 0.0
        z = dbar / math.sqrt(var / n_eff)
        return z, math.erfc(abs(z) / math.sqrt(2.0))


class Prequential:
    def __init__(
        self,
        capacity: int,
        horizon: int,
        halflife: float = 200.0,
        *,
        transform: str = "log_return",
        season: int = 0,
        rolling: int = 20,
        warmup: int = 20,
    ) -> None:
        if transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
        if season < 0 or warmup < 0 or rolling <= 0:
            raise ValueError(
                f"need season >= 0, warmup >= 0, rolling > 0: {season, warmup, rolling}"
            )
        self.horizon = horizon
        self.transform = transform
        self.season = int(season)
        self.rolling = int(rolling)
        self.warmup = int(warmup)
        if transform == "none":
            names = ("persistence",) + (("seasonal",) if season > 0 else ()) + ("rolling_mean",)
        else:
            names = _CHANGE_BASELINES
        self.baselines: tuple[str, ...] = names
        self._capacity = capacity
        self._decay = 0.5 ** (1.0 / halflife)
        nb, h = len(names), horizon
        # Ring of the last `horizon` batches: forecasts and published [H, S, H], actual [H, S],
        # valid [H, S], the rolling-mean forecast [H, S], the seasonal ones [H, S, H or 0].
        self._forecasts = np.zeros((h, capacity, h), np.float64)
        self._published = np.zeros((h, capacity, h), np.float64)
        self._actual = np.zeros((h, capacity), np.float64)
        self._valid = np.zeros((h, capacity), bool)
        self._roll = np.zeros((h, capacity), np.float64)
        self._seasonal = np.zeros((h, capacity, h if season > 0 else 0), np.float64)
        # Per entity: its last `_ring` realised targets, their count, the rolling sum, and how
        # many forecasts per horizon reached scoring (for the warm-up).
        self._ring = max(self.rolling, self.season, 1)
        self._hist = np.zeros((capacity, self._ring), np.float64)
        self._hist_n = np.zeros(capacity, np.int64)
        self._roll_sum = np.zeros(capacity, np.float64)
        self._seen = np.zeros((capacity, h), np.int64)
        self._batches = 0
        self.total = _Sums.zeros(capacity, h, nb)
        self.recent = _Sums.zeros(capacity, h, nb)
        # Diebold-Mariano: the last `horizon` differentials per horizon and baseline.
        self._d_ring = np.zeros((h, nb, h), np.float64)
        self._d_count = np.zeros(h, np.int64)
        self.dm_total = _DmSums.zeros(h, nb)
        self.dm_recent = _DmSums.zeros(h, nb)

    # ------------------------------------------------------------------ rows

    def grow(self, capacity: int) -> None:
        if capacity <= self._capacity:
            return
        pad = capacity - self._capacity
        for name in ("_forecasts", "_published", "_seasonal"):
            setattr(self, name, np.pad(getattr(self, name), ((0, 0), (0, pad), (0, 0))))
        for name in ("_actual", "_valid", "_roll"):
            setattr(self, name, np.pad(getattr(self, name), ((0, 0), (0, pad))))
        self._hist = np.pad(self._hist, ((0, pad), (0, 0)))
        self._hist_n = np.pad(self._hist_n, (0, pad))
        self._roll_sum = np.pad(self._roll_sum, (0, pad))
        self._seen = np.pad(self._seen, ((0, pad), (0, 0)))
        self.total.grow(capacity)
        self.recent.grow(capacity)
        self._capacity = capacity

    def forget_rows(self, slots: np.ndarray | list[int]) -> None:
        """A slot changed hands: drop its pending forecasts, its history and its scores."""
        idx = np.asarray(slots, dtype=np.int64)
        self._valid[:, idx] = False
        self._hist[idx] = 0.0
        self._hist_n[idx] = 0
        self._roll_sum[idx] = 0.0
        self._seen[idx] = 0
        self.total.forget(idx)
        self.recent.forget(idx)

    # ------------------------------------------------------------------ scoring

    def observe(
        self,
        forecasts: np.ndarray,
        actual: np.ndarray,
        valid: np.ndarray,
        published: np.ndarray | None = None,
    ) -> None:
        """One batch: score earlier forecasts against `actual`, then remember these.

        `forecasts` are the model's, `published` ([capacity, horizon]) what the engine
        publishes (the model's forecasts when None).
        """
        valid = np.asarray(valid, bool)
        self.grow(len(valid))
        f64 = np.asarray(forecasts, np.float64)
        pub = f64 if published is None else np.asarray(published, np.float64)
        act = np.asarray(actual, np.float64)
        self._decay_recent()
        # This batch's additions to the sums, gathered over the horizons and added at once.
        acc = _Sums.zeros(self._capacity, self.horizon, len(self.baselines))
        scored = False
        for k in range(1, self.horizon + 1):
            if self._batches < k:
                break
            scored |= self._score(k, (self._batches - k) % self.horizon, act, valid, acc)
        if scored:
            for sums in (self.total, self.recent):
                for name in _Sums.names():
                    getattr(sums, name)[...] += getattr(acc, name)
        i = self._batches % self.horizon
        self._forecasts[i] = f64
        self._published[i] = pub
        self._actual[i] = act
        self._valid[i] = valid
        self._remember_naive(i, act, valid)
        self._batches += 1

    def _score(self, k: int, j: int, act: np.ndarray, valid: np.ndarray, acc: _Sums) -> bool:
        """Score horizon k's forecasts made at ring slot j into `acc`; False: none scored."""
        col = k - 1
        rows = np.flatnonzero(self._valid[j] & valid)
        if not len(rows):
            return False
        warm = self._seen[rows, col] >= self.warmup
        self._seen[rows, col] += 1
        rows = rows[warm]
        if not len(rows):
            return False
        y = act[rows]
        err_model = self._forecasts[j, rows, col] - y
        err_pub = self._published[j, rows, col] - y
        err_persist = self._actual[j, rows] - y
        naive = {
            "zero": -y,
            "persistence": err_persist,
            "rolling_mean": self._roll[j, rows] - y,
        }
        if self.season > 0:
            naive["seasonal"] = self._seasonal[j, rows, col] - y
        se_naive = np.stack([naive[b] ** 2 for b in self.baselines], axis=1)
        se_pub = err_pub**2
        add: dict[str, np.ndarray] = {
            "n": np.ones(len(rows)),
            "se_model": err_model**2,
            "ae_model": np.abs(err_model),
            "se_pub": se_pub,
            "ae_pub": np.abs(err_pub),
            "se_persist": err_persist**2,
            "ae_persist": np.abs(err_persist),
            "se_zero": y**2,
            "se_naive": se_naive,
        }
        full = len(rows) == self._capacity
        for name, v in add.items():
            if full:
                getattr(acc, name)[:, col] = v
            else:
                getattr(acc, name)[rows, col] = v
        # Diebold-Mariano: this batch's pooled loss differential against every baseline.
        d = (se_pub[:, None] - se_naive).mean(axis=0)
        t = int(self._d_count[col])
        ring = self._d_ring[col]
        ring[:, t % self.horizon] = d
        lags = min(t + 1, k)  # lags 0..k-1 that have an earlier differential
        lagged = ring[:, [(t - lag) % self.horizon for lag in range(lags)]]
        self.dm_total.add(col, d, lagged, lags)
        self.dm_recent.add(col, d, lagged, lags)
        self._d_count[col] = t + 1
        return True

    def _remember_naive(self, i: int, act: np.ndarray, valid: np.ndarray) -> None:
        """Append this batch's targets to the histories; store the naive forecasts made now."""
        rows = np.flatnonzero(valid)
        if not len(rows):
            return
        n = self._hist_n[rows]
        ring, r = self._ring, self.rolling
        dropped = np.where(n >= r, self._hist[rows, (n - r) % ring], 0.0)
        self._hist[rows, n % ring] = act[rows]
        n = n + 1
        self._hist_n[rows] = n
        self._roll_sum[rows] += act[rows] - dropped
        # Every `rolling` observations the running sum is recomputed exactly (no drift).
        fresh = rows[n % r == 0]
        if len(fresh):
            back = (self._hist_n[fresh, None] - 1 - np.arange(r)) % ring
            self._roll_sum[fresh] = self._hist[fresh[:, None], back].sum(axis=1)
        self._roll[i, rows] = self._roll_sum[rows] / np.minimum(n, r)
        if self.season > 0:
            s = self.season
            for col in range(self.horizon):
                k = col + 1
                lag = s * math.ceil(k / s) - k  # 0: the latest value
                have = n > lag
                vals = self._hist[rows, (n - 1 - lag) % ring]
                self._seasonal[i, rows, col] = np.where(have, vals, act[rows])

    def _decay_recent(self) -> None:
        for a in self.recent.arrays():
            a *= self._decay
        self.dm_recent.decay(self._decay)

    # ------------------------------------------------------------ checkpoints

    def _config_code(self) -> np.ndarray:
        return np.array(
            [TRANSFORMS.index(self.transform), self.season, self.rolling, self.horizon], np.int64
        )

    def export_arrays(self) -> dict[str, np.ndarray]:
        """Everything an exact resume needs, as named arrays (float64 viewed as int64)."""

        def f(a: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(a, np.float64).view(np.int64)

        out: dict[str, np.ndarray] = {
            "preq_batches": np.array([self._batches], np.int64),
            "preq_config": self._config_code(),
            "preq_forecasts": f(self._forecasts),
            "preq_published": f(self._published),
            "preq_actual": f(self._actual),
            "preq_valid": self._valid.astype(np.uint8),
            "preq_roll": f(self._roll),
            "preq_seasonal": f(self._seasonal),
            "preq_hist": f(self._hist),
            "preq_hist_n": self._hist_n.copy(),
            "preq_roll_sum": f(self._roll_sum),
            "preq_seen": self._seen.copy(),
            "preq_d_ring": f(self._d_ring),
            "preq_d_count": self._d_count.copy(),
        }
        for which, sums in (("total", self.total), ("recent", self.recent)):
            for name in _Sums.names():
                out[f"preq_{which}_{name}"] = f(getattr(sums, name))
        for which, dm in (("total", self.dm_total), ("recent", self.dm_recent)):
            for name in _DmSums.names():
                out[f"preq_dm_{which}_{name}"] = f(getattr(dm, name))
        return out

    def import_rows(self, arrays: dict[str, np.ndarray], slots: np.ndarray) -> None:
        """Restore the scores of these slots (entities back in the rows they had).

        The engine-wide Diebold-Mariano sums are restored only into an instance that has
        scored nothing yet. Scores of another horizon, transform, season or rolling window,
        or of a checkpoint written before the naive baselines were kept, do not carry over.
        """
        if "preq_batches" not in arrays or "preq_config" not in arrays:
            return
        if not np.array_equal(arrays["preq_config"], self._config_code()):
            return  # another horizon or baselines: the scores do not carry over
        slots = np.asarray(slots, np.int64)
        stored_cap = arrays["preq_actual"].shape[1]
        slots = slots[slots < min(stored_cap, self._capacity)]
        self._batches = max(self._batches, int(arrays["preq_batches"][0]))
        if not self._d_count.any():
            self._d_ring[...] = arrays["preq_d_ring"].view(np.float64)
            self._d_count[...] = arrays["preq_d_count"]
            for which, dm in (("total", self.dm_total), ("recent", self.dm_recent)):
                for name in _DmSums.names():
                    getattr(dm, name)[...] = arrays[f"preq_dm_{which}_{name}"].view(np.float64)
        if not len(slots):
            return

        def f(name: str) -> np.ndarray:
            return arrays[name].view(np.float64)

        for name in ("forecasts", "published", "actual", "roll", "seasonal"):
            getattr(self, f"_{name}")[:, slots] = f(f"preq_{name}")[:, slots]
        self._valid[:, slots] = arrays["preq_valid"][:, slots].astype(bool)
        self._hist[slots] = f("preq_hist")[slots]
        self._hist_n[slots] = arrays["preq_hist_n"][slots]
        self._roll_sum[slots] = f("preq_roll_sum")[slots]
        self._seen[slots] = arrays["preq_seen"][slots]
        for which, sums in (("total", self.total), ("recent", self.recent)):
            for name in _Sums.names():
                getattr(sums, name)[slots] = f(f"preq_{which}_{name}")[slots]

    # ------------------------------------------------------------------ reports

    def summary(self, which: str = "recent") -> list[dict[str, Any]]:
        """Per horizon: skill vs the best naive, its DM test, entity spread; older figures."""
        sums = self.recent if which == "recent" else self.total
        dm = self.dm_recent if which == "recent" else self.dm_total
        out: list[dict[str, Any]] = []
        n1 = sums.n[:, 0].sum()
        mae_naive1 = sums.ae_persist[:, 0].sum() / n1 if n1 > 0 else np.nan
        for col in range(self.horizon):
            n = sums.n[:, col]
            total_n = n.sum()
            if total_n <= 0:
                out.append({"horizon": col + 1, "count": 0})
                continue
            mse = sums.se_pub[:, col].sum() / total_n
            mse_model = sums.se_model[:, col].sum() / total_n
            mse_p = sums.se_persist[:, col].sum() / total_n
            mse_z = sums.se_zero[:, col].sum() / total_n
            mse_naive = sums.se_naive[:, col].sum(axis=0) / total_n
            bi = int(np.argmin(mse_naive))
            mse_best = float(mse_naive[bi])
            mae = sums.ae_pub[:, col].sum() / total_n
            has = n > 0
            ent_mse = sums.se_pub[has, col] / n[has]
            ent_best = sums.se_naive[has, col, bi] / n[has]
            ent_p = sums.se_persist[has, col] / n[has]
            with np.errstate(divide="ignore", invalid="ignore"):
                ent_skill = 1.0 - ent_mse / ent_best
                ent_skill_p = 1.0 - ent_mse / ent_p
            dm_stat, dm_p = dm.stat(col, bi)
            out.append(
                {
                    "horizon": col + 1,
                    "count": float(total_n),
                    "entities": int(has.sum()),
                    "best_naive": self.baselines[bi],
                    "skill": _skill(mse, mse_best),
                    "mse": float(mse),
                    "mse_best_naive": mse_best,
                    "model_skill": _skill(mse_model, mse_best),
                    "model_mse": float(mse_model),
                    "mse_naive": {
                        b: float(v) for b, v in zip(self.baselines, mse_naive, strict=True)
                    },
                    "median_entity_skill": _median(ent_skill),
                    "share_entities_beating_baseline": float(np.mean(ent_mse < ent_best)),
                    "dm_stat": dm_stat,
                    "dm_p_value": dm_p,
                    "mae": float(mae),
                    "rmse": float(np.sqrt(mse)),
                    "mse_persistence": float(mse_p),
                    "mse_zero": float(mse_z),
                    "skill_vs_persistence": _skill(mse, mse_p),
                    "skill_vs_zero": _skill(mse, mse_z),
                    # MASE: MAE over the one-step persistence MAE of the same stream.
                    "mase": float(mae / mae_naive1) if mae_naive1 and mae_naive1 > 0 else None,
                    "median_entity_skill_vs_persistence": _median(ent_skill_p),
                    "share_entities_beating_persistence": float(np.mean(ent_mse < ent_p)),
                }
            )
        return out


def _skill(mse: float, mse_baseline: float) -> float | None:
    return float(1.0 - mse / mse_baseline) if mse_baseline > 0 else None


def _median(values: np.ndarray) -> float | None:
    """Median of the finite values (an entity whose baseline error is 0 has no skill)."""
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else None


def headline(row: dict[str, Any]) -> str:
    """One horizon's `summary()` row in words: skill vs its best naive, entity share, DM p."""
    if not row.get("count"):
        return "no scored forecasts yet"

    def num(key: str, fmt: str) -> str:
        value = row.get(key)
        return "n/a" if value is None or not math.isfinite(value) else format(value, fmt)

    return (
        f"skill vs {row['best_naive']} {num('skill', '+.3f')} "
        f"(model {num('model_skill', '+.3f')}), "
        f"{num('share_entities_beating_baseline', '.0%')} of {row['entities']} entities beat it, "
        f"DM p={num('dm_p_value', '.3g')}"
    )
