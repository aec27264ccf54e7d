"""What the engine publishes: the model's forecast shrunk toward the naive one, with intervals.

A model that cannot beat the naive forecast on a stream should not make the published
forecast worse than that. Per entity and horizon step k the published value is

    published = naive + w * (model - naive),     0 <= w <= 1

Naive candidates fit the target's transform: zero change and persistence of the last change
for `log_return` and `diff`; the last value and an exponentially weighted mean (halflife
`learn.prequential_rolling` observations) for `none`. Each entity uses the first candidate
(zero change, or the last value) unless, once it has `forecast.combine_min_count` realised
targets, the second one's advantage in forgotten squared error is significant (the same
soft threshold as below).

`w` is the online least-squares shrinkage of the model toward that naive forecast, learned
only from realised targets (delayed labels: the forecast made at batch j for horizon k is
paired with the actual of batch j + k):

    u = model - naive,  v = actual - naive,  w_i = clip((S_uv - k * se(S_uv)) / S_uu, 0, 1)

with exponentially forgotten sums per entity and candidate (`forecast.combine_halflife`
observations of that entity). k (`forecast.combine_threshold`, default 2) is a soft
threshold: only the covariance beyond k standard errors of zero earns the model weight (the
standard error is estimated from the products u * v themselves, so heavy tails and volatility
clusters widen it), and the noise of the sums costs next to nothing when the model has no
skill. Until an entity has `forecast.combine_min_count` realised pairs, w = 0: the naive
forecast is published. A diverging model (huge u) gets no weight.

One entity's sums are noisy (the threshold alone caps a perfect model's weight near
1 - k / sqrt(n)), so with `forecast.combine_pool` (default) each entity's weight is shrunk
toward the weight of all ready entities together (`_pooled_weights`: empirical Bayes, the
entities' spread of weights beyond their sampling noise as the prior's variance): entities
alike in how much the model helps them get the pooled weight, whose noise shrinks with the
number of entities; entities that really differ keep their own thresholded estimate.

Intervals. For every coverage level c (`forecast.intervals`, default 80% and 95%) the
interval is published +- m * scale, with `scale` the square root of an exponentially
weighted mean of the squared published errors (halflife `forecast.interval_halflife`
observations, so it follows volatility clusters), and `m` tracked online per entity,
horizon and level by adaptive conformal inference (quantile tracking, Gibbs and Candes
2021): after each realised target, m += gamma * (miss - (1 - c)), so the long-run share of
misses is 1 - c whatever the error distribution. Intervals are in the target's transformed
units (a log-return interval for `log_return`), NaN while an entity has no error scale yet.

Every per-row array has the batch row (slot) first; everything is NumPy, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from .config import ForecastConfig

_EPS = 1e-30


@dataclass(frozen=True)
class Combined:
    """This batch's published forecasts for every row ([capacity, ...])."""

    published: np.ndarray  # float64 [S, H]
    weight: np.ndarray  # float64 [S, H]: the model's weight w
    naive: np.ndarray  # int64 [S, H]: index of the naive candidate used (see `candidates`)
    lower: np.ndarray  # float64 [S, H, L], NaN without a scale yet
    upper: np.ndarray  # float64 [S, H, L]


def candidates_for(transform: str) -> tuple[str, ...]:
    return ("persistence", "mean") if transform == "none" else ("zero", "persistence")


class Combiner:
    s_uu: np.ndarray
    s_uv: np.ndarray
    s_q: np.ndarray
    naive_d: np.ndarray
    naive_dd: np.ndarray
    n_eff: np.ndarray
    n_sq: np.ndarray
    count: np.ndarray
    sq_err: np.ndarray
    scale_n: np.ndarray
    mult: np.ndarray
    last: np.ndarray
    mean: np.ndarray
    seen: np.ndarray
    r_model: np.ndarray
    r_naive: np.ndarray
    r_published: np.ndarray
    r_lower: np.ndarray
    r_upper: np.ndarray
    r_valid: np.ndarray

    # Per-row arrays (slot axis first) and what a fresh row holds.
    _ROWS = (
        "s_uu",  # [S, C, H] forgotten sum of u^2 per naive candidate
        "s_uv",  # [S, C, H] forgotten sum of u * v
        "s_q",  # [S, C, H] forgotten sum of (u v)^2: the noise of s_uv
        "naive_d",  # [S, H] forgotten sum of d = (first's - second's squared error)
        "naive_dd",  # [S, H] forgotten sum of d^2
        "n_eff",  # [S, H] forgotten count (sum of the forgetting weights)
        "n_sq",  # [S, H] sum of the squared forgetting weights
        "count",  # [S, H] realised pairs
        "sq_err",  # [S, H] forgotten squared published error (interval scale)
        "scale_n",  # [S, H]
        "mult",  # [S, H, L] interval multipliers
        "last",  # [S] last realised target
        "mean",  # [S] exponentially weighted mean of the target
        "seen",  # [S] realised targets of the row (mean's warm-up)
        "r_model",  # [S, R, H] ring of the last R = horizon batches: model forecasts
        "r_naive",  # [S, R, C, H] the naive candidates' forecasts
        "r_published",  # [S, R, H]
        "r_lower",  # [S, R, H, L]
        "r_upper",  # [S, R, H, L]
        "r_valid",  # [S, R] bool
    )

    def __init__(
        self,
        config: ForecastConfig,
        capacity: int,
        horizon: int,
        transform: str,
        mean_halflife: float = 20.0,
    ) -> None:
        self.cfg = config
        self.horizon = horizon
        self.levels = tuple(config.intervals)
        self.candidates = candidates_for(transform)
        self._keep = 0.5 ** (1.0 / config.combine_halflife)
        self._keep_scale = 0.5 ** (1.0 / config.interval_halflife)
        self._keep_mean = 0.5 ** (1.0 / mean_halflife)
        self._alpha = np.array([1.0 - c for c in self.levels])
        self._z = np.array([NormalDist().inv_cdf(1.0 - a / 2.0) for a in self._alpha])
        h, c, n_levels = horizon, len(self.candidates), len(self.levels)
        self._shapes: dict[str, tuple[int, ...]] = {
            "s_uu": (c, h),
            "s_uv": (c, h),
            "s_q": (c, h),
            "naive_d": (h,),
            "naive_dd": (h,),
            "n_eff": (h,),
            "n_sq": (h,),
            "count": (h,),
            "sq_err": (h,),
            "scale_n": (h,),
            "mult": (h, n_levels),
            "last": (),
            "mean": (),
            "seen": (),
            "r_model": (h, h),
            "r_naive": (h, c, h),
            "r_published": (h, h),
            "r_lower": (h, h, n_levels),
            "r_upper": (h, h, n_levels),
            "r_valid": (h,),
        }
        for name, shape in self._shapes.items():
            setattr(self, name, np.zeros((0, *shape), bool if name == "r_valid" else np.float64))
        # Interval scores pooled over rows: per horizon and level.
        self.scored = np.zeros((h, n_levels))
        self.missed = np.zeros((h, n_levels))
        self.width = np.zeros((h, n_levels))
        self.interval_score = np.zeros((h, n_levels))
        self._batches = 0
        self._capacity = 0
        self.grow(capacity)

    # ------------------------------------------------------------------ rows

    def _fresh(self, name: str, rows: int) -> np.ndarray:
        shape = (rows, *self._shapes[name])
        if name == "mult":
            return np.broadcast_to(self._z, shape).copy()
        return np.zeros(shape, bool if name == "r_valid" else np.float64)

    def grow(self, capacity: int) -> None:
        if capacity <= self._capacity:
            return
        pad = capacity - self._capacity
        for name in self._ROWS:
            setattr(self, name, np.concatenate([getattr(self, name), self._fresh(name, pad)]))
        self._capacity = capacity

    def forget_rows(self, slots: np.ndarray | list[int]) -> None:
        """A slot changed hands: its weights, scale and pending forecasts start afresh."""
        idx = np.asarray(slots, dtype=np.int64)
        for name in self._ROWS:
            getattr(self, name)[idx] = self._fresh(name, len(idx))

    # ------------------------------------------------------------------ per batch

    def step(self, model: np.ndarray, actual: np.ndarray, valid: np.ndarray) -> Combined:
        """One batch: learn from the targets realised now, then combine this batch's forecasts.

        model [S, H] (transformed units), actual [S] (this batch's target), valid [S].
        """
        self.grow(len(valid))
        model = np.asarray(model, np.float64)
        act = np.asarray(actual, np.float64)
        valid = np.asarray(valid, bool)
        self._learn(act, valid)
        self._remember(act, valid)
        naive_all = self._naive_now()  # [S, C, H]
        choice = self.choice()  # [S, H]
        naive = np.take_along_axis(naive_all, choice[:, None, :], axis=1)[:, 0, :]
        w = self.weights(choice)
        published = naive + w * (model - naive)
        scale = np.sqrt(self.sq_err / np.maximum(self.scale_n, _EPS))
        scale = np.where(self.scale_n > 0, scale, np.nan)
        half = np.maximum(self.mult, 0.0) * scale[:, :, None]
        lower = published[:, :, None] - half
        upper = published[:, :, None] + half
        i = self._batches % self.horizon
        self.r_model[:, i] = model
        self.r_naive[:, i] = naive_all
        self.r_published[:, i] = published
        self.r_lower[:, i] = lower
        self.r_upper[:, i] = upper
        self.r_valid[:, i] = valid
        self._batches += 1
        return Combined(published=published, weight=w, naive=choice, lower=lower, upper=upper)

    def choice(self) -> np.ndarray:
        """Index of the naive candidate each row and horizon uses [S, H].

        The second candidate replaces the first only when its advantage in squared error is
        significant (beyond `forecast.combine_threshold` standard errors, estimated from the
        differences themselves): in a volatility burst a few huge errors decide a plain
        comparison, and a coin-flip switch there publishes an outlier as the next forecast.
        """
        n = np.maximum(self.n_eff, _EPS)
        noise = self.cfg.combine_threshold * np.sqrt(self.naive_dd / n * self.n_sq)
        better = self.naive_d > noise
        return np.where((self.count >= self.cfg.combine_min_count) & better, 1, 0)

    def weights(self, choice: np.ndarray | None = None) -> np.ndarray:
        """The model's weight per row and horizon [S, H] (see the module docstring)."""
        if not self.cfg.combine:
            return np.ones((self._capacity, self.horizon))
        if choice is None:
            choice = self.choice()
        pick = choice[:, None, :]
        s_uu = np.take_along_axis(self.s_uu, pick, axis=1)[:, 0, :]
        s_uv = np.take_along_axis(self.s_uv, pick, axis=1)[:, 0, :]
        s_q = np.take_along_axis(self.s_q, pick, axis=1)[:, 0, :]
        # var(sum_i l_i x_i) ~ E[x^2] sum_i l_i^2 for x = u v. The uncentred E[x^2] keeps a
        # margin even for a strong model (w <= 1 - k / sqrt(n)); centring it made the
        # threshold too thin on unlearnable streams.
        n = np.maximum(self.n_eff, _EPS)
        var_uv = s_q / n * self.n_sq  # the variance of s_uv
        k = self.cfg.combine_threshold
        ready = self.count >= self.cfg.combine_min_count
        if not self.cfg.combine_pool:
            w = np.clip((s_uv - k * np.sqrt(var_uv)) / (s_uu + _EPS), 0.0, 1.0)
            return np.where(ready, w, 0.0)
        return np.where(ready, self._pooled_weights(s_uu, s_uv, var_uv, ready), 0.0)

    def _pooled_weights(
        self, s_uu: np.ndarray, s_uv: np.ndarray, var_uv: np.ndarray, ready: np.ndarray
    ) -> np.ndarray:
        """Per-entity weights shrunk toward the weight of all entities together [S, H].

        Pooled over the ready rows of a horizon, w_pool = clip((S_uv - k sqrt(V)) / S_uu,
        0, 1) with V the sum of the rows' variances: its noise shrinks like 1 / sqrt(rows),
        so a model good for every entity earns nearly full weight, and one good for none
        earns none. Each row's own estimate w_i = s_uv / s_uu (sampling variance
        var_uv / s_uu^2) is combined with w_pool by precision, with the spread of the true
        weights between entities, tau^2 (method of moments: the variance of the w_i beyond
        their sampling variance), as the prior's variance; then thresholded again by k of
        its posterior standard deviations. Alike entities (tau^2 ~ 0) get w_pool; very
        different ones keep their own soft-thresholded estimate.
        """
        k = self.cfg.combine_threshold
        out = np.zeros_like(s_uu)
        for col in range(self.horizon):
            rows = np.flatnonzero(ready[:, col] & (s_uu[:, col] > 0))
            if not rows.size:
                continue
            uu, uv, var = s_uu[rows, col], s_uv[rows, col], var_uv[rows, col]
            total_uu = float(uu.sum())
            w_pool = float(np.clip((uv.sum() - k * np.sqrt(var.sum())) / total_uu, 0.0, 1.0))
            raw = uv / uu
            var_raw = np.maximum(var / (uu * uu), _EPS)
            if rows.size >= 3:
                spread = float(np.mean((raw - uv.sum() / total_uu) ** 2))
                tau2 = max(spread - float(np.mean(var_raw)), 0.0)
            else:
                tau2 = 0.0
            if tau2 <= 0.0:
                out[rows, col] = w_pool
                continue
            precision = 1.0 / var_raw + 1.0 / tau2
            post = (raw / var_raw + w_pool / tau2) / precision
            out[rows, col] = np.clip(post - k / np.sqrt(precision), 0.0, 1.0)
        return out

    def _naive_now(self) -> np.ndarray:
        """Each candidate's forecast for every horizon, from what is known now [S, C, H]."""
        s, h = self._capacity, self.horizon
        # zero change and persistence of the last change, or the last value and the mean
        first = np.zeros(s) if self.candidates[0] == "zero" else self.last
        second = self.last if self.candidates[1] == "persistence" else self.mean
        return np.repeat(np.stack([first, second], axis=1)[:, :, None], h, axis=2)

    def _remember(self, act: np.ndarray, valid: np.ndarray) -> None:
        rows = np.flatnonzero(valid)
        self.last[rows] = act[rows]
        seen = self.seen[rows]
        keep = np.where(seen > 0, self._keep_mean, 0.0)
        self.mean[rows] = keep * self.mean[rows] + (1.0 - keep) * act[rows]
        self.seen[rows] = seen + 1.0

    def _learn(self, act: np.ndarray, valid: np.ndarray) -> None:
        keep, ks = self._keep, self._keep_scale
        for k in range(1, self.horizon + 1):
            if self._batches < k:
                break
            j = (self._batches - k) % self.horizon
            rows = np.flatnonzero(self.r_valid[:, j] & valid)
            if not len(rows):
                continue
            col = k - 1
            y = act[rows]
            naive = self.r_naive[rows, j, :, col]  # [n, C]
            u = self.r_model[rows, j, col][:, None] - naive
            v = y[:, None] - naive
            uv = u * v
            self.s_uu[rows, :, col] = keep * self.s_uu[rows, :, col] + u * u
            self.s_uv[rows, :, col] = keep * self.s_uv[rows, :, col] + uv
            self.s_q[rows, :, col] = keep * self.s_q[rows, :, col] + uv * uv
            d = v[:, 0] ** 2 - v[:, 1] ** 2  # > 0: the second candidate did better
            self.naive_d[rows, col] = keep * self.naive_d[rows, col] + d
            self.naive_dd[rows, col] = keep * self.naive_dd[rows, col] + d * d
            self.n_eff[rows, col] = keep * self.n_eff[rows, col] + 1.0
            self.n_sq[rows, col] = keep * keep * self.n_sq[rows, col] + 1.0
            self.count[rows, col] += 1.0
            # Intervals made at j for this target: score, then adapt the multipliers.
            lo, hi = self.r_lower[rows, j, col], self.r_upper[rows, j, col]  # [n, L]
            has = np.isfinite(lo[:, 0])
            if has.any():
                yy = y[has, None]
                miss = (yy < lo[has]) | (yy > hi[has])
                width = hi[has] - lo[has]
                alpha = self._alpha[None, :]
                outside = np.maximum(lo[has] - yy, 0.0) + np.maximum(yy - hi[has], 0.0)
                self.scored[col] += has.sum()
                self.missed[col] += miss.sum(axis=0)
                self.width[col] += width.sum(axis=0)
                self.interval_score[col] += (width + 2.0 / alpha * outside).sum(axis=0)
                self.mult[rows[has], col] += self.cfg.interval_gamma * (miss - alpha)
            err = y - self.r_published[rows, j, col]
            self.sq_err[rows, col] = ks * self.sq_err[rows, col] + err * err
            self.scale_n[rows, col] = ks * self.scale_n[rows, col] + 1.0

    # ------------------------------------------------------------------ reports

    def summary(self) -> list[dict[str, Any]]:
        """Per horizon: the mean model weight, the naive candidates in use and, per level,
        coverage, mean width and interval score (pooled over rows)."""
        out: list[dict[str, Any]] = []
        choice = self.choice()
        weights = self.weights(choice)
        for col in range(self.horizon):
            seen = self.count[:, col] >= self.cfg.combine_min_count
            w = weights[seen, col]
            used = {
                name: int((choice[seen, col] == c).sum()) for c, name in enumerate(self.candidates)
            }
            levels = []
            for li, c in enumerate(self.levels):
                n = self.scored[col, li]
                levels.append(
                    {
                        "level": c,
                        "count": float(n),
                        "coverage": float(1.0 - self.missed[col, li] / n) if n else None,
                        "mean_width": float(self.width[col, li] / n) if n else None,
                        "interval_score": float(self.interval_score[col, li] / n) if n else None,
                    }
                )
            out.append(
                {
                    "horizon": col + 1,
                    "mean_model_weight": float(w.mean()) if w.size else None,
                    "entities_weighted": int(seen.sum()),
                    "naive_in_use": used,
                    "intervals": levels,
                }
            )
        return out

    # ------------------------------------------------------------------ checkpoints

    _POOLED = ("scored", "missed", "width", "interval_score")

    def export_arrays(self) -> dict[str, np.ndarray]:
        """Named arrays for a checkpoint (float64 viewed as int64, bool as uint8)."""
        out: dict[str, np.ndarray] = {"comb_batches": np.array([self._batches], np.int64)}
        for name in self._ROWS + self._POOLED:
            a = np.ascontiguousarray(getattr(self, name))
            out[f"comb_{name}"] = a.astype(np.uint8) if a.dtype == bool else a.view(np.int64)
        return out

    def import_rows(self, arrays: dict[str, np.ndarray], slots: np.ndarray) -> None:
        """Restore these slots (entities back in the rows they had) and the pooled scores."""
        if "comb_batches" not in arrays:
            return
        stored = {}
        for name in self._ROWS + self._POOLED:
            key = f"comb_{name}"
            if key not in arrays:
                return  # an older or other layout: start afresh
            a = arrays[key]
            stored[name] = a.astype(bool) if name == "r_valid" else a.view(np.float64)
            want = self._shapes.get(name, self.scored.shape)
            got = stored[name].shape[1:] if name in self._shapes else stored[name].shape
            if tuple(got) != tuple(want):
                return  # another horizon, other levels or candidates: start afresh
        self._batches = max(self._batches, int(arrays["comb_batches"][0]))
        for name in self._POOLED:
            setattr(self, name, stored[name].copy())
        slots = np.asarray(slots, np.int64)
        rows = len(stored["last"])
        slots = slots[(slots < rows) & (slots < self._capacity)]
        for name in self._ROWS:
            getattr(self, name)[slots] = stored[name][slots]
