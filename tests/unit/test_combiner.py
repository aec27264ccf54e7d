"""The published forecast: never worse than the naive one, most of the model's skill kept.

Pure NumPy: the combiner sees model forecasts, realised targets and validity, as the
Forecaster hands them over. Worlds: a random walk whose returns are heavy-tailed (Student t,
4 degrees of freedom) and volatility-clustered (GARCH(1,1)), where the "model" is noise (it
cannot beat zero change), and a learnable world where the model knows most of the signal.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamer.benchmarks.combine import garch_t
from streamer.combiner import Combiner
from streamer.config import ForecastConfig


def run(model_f, y, cfg=None, transform="log_return", valid=None):
    steps, n = y.shape
    comb = Combiner(cfg or ForecastConfig(), n, 1, transform)
    out = []
    for t in range(steps):
        ok = np.ones(n, bool) if valid is None else valid[t]
        out.append(comb.step(model_f[t][:, None], y[t], ok))
    return comb, out


def dm_stat(e_a: np.ndarray, e_b: np.ndarray) -> float:
    """Diebold-Mariano statistic of loss a minus loss b (pooled per step), horizon 1."""
    d = (e_a - e_b).mean(axis=1)
    sd = d.std(ddof=1)
    return 0.0 if sd == 0 else float(d.mean() / (sd / math.sqrt(len(d))))


@pytest.mark.parametrize("seed", range(8))
def test_on_an_unlearnable_random_walk_the_published_forecast_is_not_worse_than_zero(seed):
    rng = np.random.default_rng(seed)
    y = garch_t(rng, 1500, 20)
    model_f = rng.normal(size=y.shape) * y.std()  # no skill at all: MSE twice zero-change's
    _, out = run(model_f, y)
    pub = np.array([o.published[:, 0] for o in out])
    e_pub = (pub[:-1] - y[1:]) ** 2
    e_zero = y[1:] ** 2
    e_model = (model_f[:-1] - y[1:]) ** 2
    assert e_model.mean() / e_zero.mean() > 1.8
    assert e_pub.mean() / e_zero.mean() <= 1.005
    assert dm_stat(e_pub, e_zero) < 1.96  # never significantly worse at 5%


def test_on_a_learnable_world_the_combination_keeps_most_of_the_models_skill():
    rng = np.random.default_rng(3)
    steps, n = 2000, 30
    signal = 0.005 * np.sin(np.arange(steps)[:, None] / 7.0 + rng.uniform(0, 6, n))
    y = signal + garch_t(rng, steps, n)
    model_f = np.vstack([signal[1:], signal[-1:]]) + 0.002 * rng.normal(size=(steps, n))
    comb, out = run(model_f, y)
    pub = np.array([o.published[:, 0] for o in out])
    zero = (y[51:] ** 2).mean()
    skill_model = 1 - ((model_f[50:-1] - y[51:]) ** 2).mean() / zero
    skill_pub = 1 - ((pub[50:-1] - y[51:]) ** 2).mean() / zero
    assert skill_model > 0.05
    assert skill_pub >= 0.95 * skill_model
    assert comb.summary()[0]["mean_model_weight"] > 0.3


def test_a_diverging_model_gets_no_weight():
    rng = np.random.default_rng(5)
    y = garch_t(rng, 600, 10)
    model_f = rng.normal(size=y.shape) * 1e6
    _, out = run(model_f, y)
    assert np.abs(out[-1].published).max() < 1e-9  # the naive zero, not the model
    assert (out[-1].weight == 0).all()


def test_before_min_count_realised_pairs_the_naive_forecast_is_published():
    y = garch_t(np.random.default_rng(8), 60, 2)
    model_f = np.vstack([y[1:], y[-1:]])  # a perfect model: knows the next value
    cfg = ForecastConfig(combine_min_count=50)
    _, out = run(model_f, y, cfg)
    assert (out[49].weight == 0).all()  # 49 realised pairs at batch 49
    assert (out[-1].weight > 0).all()


def test_levels_use_the_last_value_as_the_naive_forecast():
    y = np.cumsum(np.ones((80, 3)), axis=0) + 100.0  # levels
    model_f = y + 1.0  # knows the next level exactly
    _, out = run(model_f, y, transform="none")
    np.testing.assert_allclose(out[0].published[:, 0], y[0])  # naive: the last value
    # A perfect model earns most of the weight (the threshold keeps a margin of k / sqrt(n)).
    assert (out[-1].weight[:, 0] > 0.7).all()
    assert (np.abs(out[-1].published[:, 0] - (y[-1] + 1.0)) < 0.3).all()


def test_weights_come_only_from_realised_targets():
    """What is published at batch t does not depend on targets after t (no leak)."""
    rng = np.random.default_rng(9)
    y = garch_t(rng, 300, 5)
    model_f = y + 0.001 * rng.normal(size=y.shape)
    changed = y.copy()
    changed[200:] = rng.normal(size=(100, 5))
    _, a = run(model_f, y)
    _, b = run(model_f, changed)
    for t in range(200):
        np.testing.assert_array_equal(a[t].published, b[t].published)
        np.testing.assert_array_equal(a[t].lower, b[t].lower)


@pytest.mark.parametrize("seed", range(3))
def test_intervals_cover_their_nominal_level_on_volatility_clusters(seed):
    rng = np.random.default_rng(20 + seed)
    y = garch_t(rng, 2000, 30)
    model_f = np.zeros_like(y)
    comb, _ = run(model_f, y)
    for level in comb.summary()[0]["intervals"]:
        assert abs(level["coverage"] - level["level"]) <= 0.02, level
        assert level["mean_width"] > 0 and level["interval_score"] > 0


def test_missing_steps_pair_only_rows_valid_at_both_batches():
    rng = np.random.default_rng(1)
    y = garch_t(rng, 400, 4)
    valid = rng.random((400, 4)) > 0.3
    comb, out = run(np.zeros_like(y), y, valid=valid)
    assert np.isfinite(out[-1].published).all()
    pairs = (valid[:-1] & valid[1:]).sum(axis=0)
    np.testing.assert_array_equal(comb.count[:, 0], pairs)


def test_forget_and_checkpoint_round_trip():
    rng = np.random.default_rng(2)
    y = garch_t(rng, 200, 6)
    model_f = y + 0.001 * rng.normal(size=y.shape)
    comb, _ = run(model_f, y)
    arrays = comb.export_arrays()
    assert {a.dtype for a in arrays.values()} <= {np.dtype(np.int64), np.dtype(np.uint8)}
    fresh = Combiner(ForecastConfig(), 6, 1, "log_return")
    fresh.import_rows(arrays, np.arange(6))
    after_a = comb.step(model_f[0][:, None], y[0], np.ones(6, bool))
    after_b = fresh.step(model_f[0][:, None], y[0], np.ones(6, bool))
    np.testing.assert_array_equal(after_a.published, after_b.published)
    np.testing.assert_array_equal(after_a.upper, after_b.upper)
    comb.forget_rows([2])
    assert comb.count[2, 0] == 0 and comb.weights()[2, 0] == 0


def test_persistence_of_the_last_change_replaces_zero_where_it_is_clearly_better():
    """Changes with strong autocorrelation (the repo's synthetic market is such a stream):
    the naive forecast switches to persistence, and stays on zero for a random walk."""
    rng = np.random.default_rng(4)
    steps, n = 1500, 10
    y = np.zeros((steps, n))
    for t in range(1, steps):
        y[t] = 0.9 * y[t - 1] + 0.001 * rng.standard_t(4, n)
    _, out = run(np.zeros_like(y), y)  # a model with nothing to say
    assert (out[-1].naive[:, 0] == 1).all()  # persistence
    pub = np.array([o.published[:, 0] for o in out])
    zero = (y[101:] ** 2).mean()
    assert ((pub[100:-1] - y[101:]) ** 2).mean() < 0.5 * zero
    walk, out_walk = run(np.zeros_like(y), garch_t(rng, steps, n))
    assert (out_walk[-1].naive[:, 0] == 0).all()
    assert walk.summary()[0]["naive_in_use"] == {"zero": n, "persistence": 0}


def _half_skilled_world(seed: int, steps: int = 1500, n: int = 40):
    """A model that knows the signal of the first half of the entities and forecasts noise of
    the returns' size for the second half."""
    rng = np.random.default_rng(seed)
    signal = 0.005 * np.sin(np.arange(steps)[:, None] / 7.0 + rng.uniform(0, 6, n))
    y = signal + garch_t(rng, steps, n)
    model_f = np.vstack([signal[1:], signal[-1:]]) + 0.002 * rng.normal(size=(steps, n))
    model_f[:, n // 2 :] = rng.normal(size=(steps, n - n // 2)) * y.std()
    return y, model_f


def test_pooling_gives_alike_entities_the_weight_of_all_of_them():
    """Every entity's model is equally good: each one's own sums cap its weight near
    1 - k / sqrt(n); pooled, the weight is nearer 1 and the published error lower."""
    rng = np.random.default_rng(11)
    steps, n = 1500, 40
    y = 0.004 * rng.normal(size=(steps, n))
    model_f = np.vstack([y[1:], y[-1:]]) + 0.001 * rng.normal(size=(steps, n))
    mse = {}
    weights = {}
    for pool in (False, True):
        _, out = run(model_f, y, ForecastConfig(combine_pool=pool))
        pub = np.array([o.published[:, 0] for o in out])
        mse[pool] = ((pub[100:-1] - y[101:]) ** 2).mean()
        weights[pool] = out[-1].weight[:, 0]
    assert weights[True].min() > weights[False].max()
    # least squares: cov(model, y) / var(model) = 16 / 17 = 0.94 here
    assert weights[True].min() > 0.9
    assert mse[True] < mse[False]


def test_pooling_keeps_entities_the_model_does_not_help_near_zero_weight():
    """Half the entities have a skilled model, half a useless one: the pool must not lend
    the useless half the good half's weight."""
    y, model_f = _half_skilled_world(12)
    n = y.shape[1]
    _, out = run(model_f, y, ForecastConfig(combine_pool=True))
    w = out[-1].weight[:, 0]
    assert w[: n // 2].min() > 0.5
    assert w[n // 2 :].max() < 0.1
    pub = np.array([o.published[:, 0] for o in out])
    bad = slice(n // 2, n)
    e_pub = (pub[100:-1, bad] - y[101:, bad]) ** 2
    e_zero = y[101:, bad] ** 2
    assert e_pub.mean() / e_zero.mean() <= 1.005
    assert dm_stat(e_pub, e_zero) < 1.96
