"""Prequential scoring: delayed labels, the best naive baseline, DM test, entity spread."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamer.prequential import Prequential
from streamer.state.format import pack_arrays, unpack_arrays


def test_forecast_is_scored_only_when_its_target_arrives():
    p = Prequential(capacity=1, horizon=2, halflife=1e9, warmup=0)
    valid = np.array([True])
    p.observe(np.array([[10.0, 20.0]]), np.array([1.0]), valid)  # made at batch 0
    assert p.total.n.sum() == 0  # nothing realised yet
    p.observe(np.array([[0.0, 0.0]]), np.array([4.0]), valid)  # batch 1: h1 of batch 0 scored
    assert p.total.n[0].tolist() == [1.0, 0.0]
    assert p.total.se_model[0, 0] == (10.0 - 4.0) ** 2
    assert p.total.se_pub[0, 0] == (10.0 - 4.0) ** 2  # nothing published: the model's
    assert p.total.se_persist[0, 0] == (1.0 - 4.0) ** 2
    assert p.total.se_zero[0, 0] == 16.0
    p.observe(np.array([[0.0, 0.0]]), np.array([7.0]), valid)  # batch 2: h2 of batch 0 scored
    assert p.total.n[0].tolist() == [2.0, 1.0]
    assert p.total.se_model[0, 1] == (20.0 - 7.0) ** 2
    assert p.total.se_persist[0, 1] == (1.0 - 7.0) ** 2


def test_naive_forecasts_use_only_what_was_known_when_they_were_made():
    p = Prequential(capacity=1, horizon=2, halflife=1e9, warmup=0, rolling=2)
    valid = np.array([True])
    zero = np.zeros((1, 2))
    for y in (1.0, 3.0, 8.0):
        p.observe(zero, np.array([y]), valid)
    b = p.baselines.index("rolling_mean")
    # h1 scored at batches 1, 2 from the means known at 0 (1) and 1 ((1+3)/2).
    assert p.total.se_naive[0, 0, b] == (1.0 - 3.0) ** 2 + (2.0 - 8.0) ** 2
    # h2 scored at batch 2 from the mean known at 0.
    assert p.total.se_naive[0, 1, b] == (1.0 - 8.0) ** 2
    assert p.total.se_naive[0, 0, p.baselines.index("persistence")] == 4.0 + 25.0


def test_absent_or_warming_rows_are_not_scored():
    p = Prequential(capacity=2, horizon=1, warmup=0)
    p.observe(np.array([[1.0], [1.0]]), np.array([0.0, 0.0]), np.array([True, False]))
    p.observe(np.array([[1.0], [1.0]]), np.array([2.0, 2.0]), np.array([True, True]))
    assert p.total.n[:, 0].tolist() == [1.0, 0.0]  # row 1 had no forecast at batch 0


def test_summary_skill_median_and_share():
    rng = np.random.default_rng(0)
    p = Prequential(capacity=3, horizon=1, halflife=1e9, warmup=0)
    y = rng.normal(size=(400, 3))
    for t in range(400):
        # Row 0 forecasts perfectly, row 1 forecasts persistence, row 2 forecasts badly.
        nxt = y[t + 1] if t + 1 < 400 else y[t]
        f = np.array([[nxt[0]], [y[t, 1]], [y[t, 2] + 5.0]])
        p.observe(f, y[t], np.ones(3, bool))
    s = p.summary("total")[0]
    assert s["entities"] == 3 and s["best_naive"] == "zero"
    assert s["share_entities_beating_persistence"] == pytest.approx(1 / 3)
    assert s["share_entities_beating_baseline"] == pytest.approx(1 / 3)
    assert s["median_entity_skill_vs_persistence"] == pytest.approx(0.0, abs=1e-12)
    # Persistence of an iid series has twice zero's MSE: row 1's skill vs zero is about -1.
    assert s["median_entity_skill"] == pytest.approx(-1.0, abs=0.25)
    assert s["rmse"] > 0 and s["mase"] > 0


def test_forget_rows_and_growth():
    p = Prequential(capacity=1, horizon=1, warmup=0)
    p.observe(np.array([[1.0]]), np.array([0.0]), np.array([True]))
    p.observe(np.array([[1.0], [2.0]]), np.array([1.0, 1.0]), np.array([True, True]))
    assert p.total.n.shape == (2, 1) and p.total.n[0, 0] == 1.0
    assert p.total.se_naive.shape == (2, 1, 3)
    p.forget_rows([0])
    assert p.total.n[0, 0] == 0.0 and p._hist_n[0] == 0
    p.observe(np.array([[1.0], [2.0]]), np.array([1.0, 1.0]), np.array([True, True]))
    assert p.total.n[:, 0].tolist() == [0.0, 1.0]  # row 0's pending forecast was dropped


# ------------------------------------------------------------ the best naive baseline


def _stream(p: Prequential, actual: np.ndarray, model, published=None) -> None:
    """Feed actual [T, S]; model(t) -> [S, H] forecasts, published(t) likewise (or None)."""
    valid = np.ones(actual.shape[1], bool)
    for t in range(len(actual)):
        pub = None if published is None else published(t)
        p.observe(model(t), actual[t], valid, published=pub)


def test_last_return_on_a_random_walk_is_worse_than_no_change():
    rng = np.random.default_rng(1)
    s, steps, entities, h = 0.01, 2000, 40, 3
    log_price = np.cumsum(rng.normal(0.0, s, (steps + 1, entities)), axis=0)
    ret = np.diff(log_price, axis=0)  # iid N(0, s^2)
    p = Prequential(entities, h, halflife=1e9)

    def last_return(t: int) -> np.ndarray:
        return np.repeat(ret[t][:, None], h, axis=1)

    _stream(p, ret, last_return)
    for row in p.summary("total"):
        assert row["best_naive"] == "zero"
        assert row["skill"] == pytest.approx(-1.0, abs=0.05)
        assert row["skill_vs_zero"] == pytest.approx(row["skill"])
        assert row["skill_vs_persistence"] == pytest.approx(0.0, abs=1e-12)  # the weak baseline
        assert row["model_skill"] == row["skill"]
        assert row["share_entities_beating_baseline"] == 0.0
        assert row["median_entity_skill"] == pytest.approx(-1.0, abs=0.15)
        assert row["dm_stat"] > 10 and row["dm_p_value"] < 1e-12
        assert row["mse_naive"]["rolling_mean"] == pytest.approx(1.05 * s * s, rel=0.05)
    recent = p.summary("recent")[0]
    assert recent["best_naive"] == "zero" and recent["skill"] == pytest.approx(-1.0, abs=0.05)


def test_levels_of_a_random_walk_pick_persistence():
    rng = np.random.default_rng(2)
    level = 100.0 + np.cumsum(rng.normal(0.0, 1.0, (1500, 20)), axis=0)
    p = Prequential(20, 3, halflife=1e9, transform="none")
    assert p.baselines == ("persistence", "rolling_mean")
    _stream(p, level, lambda t: np.repeat(level[t][:, None], 3, axis=1) + 0.5)
    for row in p.summary("total"):
        assert row["best_naive"] == "persistence"
        assert row["mse_best_naive"] == pytest.approx(row["horizon"], rel=0.1)  # h * sigma^2
        assert row["skill"] < 0  # persistence plus a bias


def test_a_seasonal_series_picks_seasonal_persistence():
    rng = np.random.default_rng(3)
    t = np.arange(1500)[:, None]
    y = 10.0 + np.sin(2 * np.pi * t / 7) + rng.normal(0.0, 0.05, (1500, 10))
    p = Prequential(10, 3, halflife=1e9, transform="none", season=7)
    assert p.baselines == ("persistence", "seasonal", "rolling_mean")
    _stream(p, y, lambda t: np.zeros((10, 3)))
    for row in p.summary("total"):
        assert row["best_naive"] == "seasonal"
        assert row["mse_best_naive"] == pytest.approx(2 * 0.05**2, rel=0.1)


def test_warmup_excludes_the_first_scored_forecasts_of_each_entity():
    p = Prequential(capacity=2, horizon=2, halflife=1e9, warmup=5)
    ones = np.ones((2, 2))
    for t in range(10):
        valid = np.array([True, t >= 3])  # row 1 arrives at batch 3
        p.observe(ones, np.full(2, float(t)), valid)
    # Row 0: h1 scored at batches 1..9 (9), h2 at 2..9 (8); minus 5 each.
    # Row 1: h1 at 4..9 (6), h2 at 5..9 (5); minus 5 each.
    assert p.total.n.tolist() == [[4.0, 3.0], [1.0, 0.0]]
    assert p._seen.tolist() == [[9, 8], [6, 5]]
    s = p.summary("total")
    assert s[0]["count"] == 5.0 and s[0]["entities"] == 2
    assert s[1]["count"] == 3.0 and s[1]["entities"] == 1
    # Only the kept forecasts are in the errors: row 0's h1 targets were 5..9.
    assert p.total.se_model[0, 0] == sum((1.0 - y) ** 2 for y in range(6, 10))
    p.forget_rows([0])
    assert p._seen[0].tolist() == [0, 0]


# ------------------------------------------------------------ Diebold-Mariano


def _dm_offline(d: np.ndarray, h: int, w: np.ndarray | None = None) -> float:
    """The statistic straight from its definition (weights w_t; None: all 1)."""
    w = np.ones(len(d)) if w is None else w
    big_w = w.sum()
    dbar = float((w * d).sum() / big_w)
    var = 0.0
    for lag in range(h):
        g = float((w[lag:] * (d[lag:] - dbar) * (d[: len(d) - lag] - dbar)).sum() / big_w)
        var += g if lag == 0 else 2.0 * (1.0 - lag / h) * g
    n_eff = big_w**2 / (w**2).sum()
    return dbar / math.sqrt(var / n_eff)


def test_dm_statistic_matches_an_offline_computation():
    rng = np.random.default_rng(4)
    steps, entities, h, warmup = 300, 5, 3, 4
    halflife = 40.0
    y = rng.normal(0.0, 1.0, (steps, entities))
    # A model with some skill at every horizon, absent rows at random.
    ahead = np.stack([np.roll(y, -k, axis=0) for k in range(1, h + 1)], axis=2)
    model = 0.6 * ahead + rng.normal(0.0, 0.5, (steps, entities, h))
    valid = rng.random((steps, entities)) > 0.15
    p = Prequential(entities, h, halflife=halflife, warmup=warmup)
    for t in range(steps):
        p.observe(model[t], y[t], valid[t])
    # The stored loss series, rebuilt offline: for each horizon the batches with scores.
    decay = 0.5 ** (1.0 / halflife)
    for k in (1, 3):
        seen = np.zeros(entities, int)
        d_zero, d_persist, at = [], [], []
        for t in range(k, steps):
            ok = valid[t - k] & valid[t]
            keep = ok & (seen >= warmup)
            seen += ok
            if not keep.any():
                continue
            e_model = (model[t - k, keep, k - 1] - y[t, keep]) ** 2
            d_zero.append(np.mean(e_model - y[t, keep] ** 2))
            d_persist.append(np.mean(e_model - (y[t - k, keep] - y[t, keep]) ** 2))
            at.append(t)
        w = decay ** (steps - 1 - np.asarray(at, float))
        for name, d in (("zero", d_zero), ("persistence", d_persist)):
            bi = p.baselines.index(name)
            stat, pv = p.dm_total.stat(k - 1, bi)
            expected = _dm_offline(np.asarray(d), k)
            assert stat == pytest.approx(expected, rel=1e-9, abs=1e-9)
            assert pv == pytest.approx(math.erfc(abs(expected) / math.sqrt(2)), rel=1e-9)
            recent, _ = p.dm_recent.stat(k - 1, bi)
            assert recent == pytest.approx(_dm_offline(np.asarray(d), k, w), rel=1e-9, abs=1e-9)
        row = p.summary("total")[k - 1]
        assert row["best_naive"] == "zero"
        assert row["dm_stat"] == pytest.approx(_dm_offline(np.asarray(d_zero), k), rel=1e-9)
        assert row["dm_stat"] < 0 and row["skill"] > 0  # the model is the better one


def test_a_model_equal_to_the_baseline_has_p_value_one():
    rng = np.random.default_rng(5)
    ret = rng.normal(0.0, 1.0, (200, 4))
    p = Prequential(4, 2, halflife=1e9)
    _stream(p, ret, lambda t: np.zeros((4, 2)))  # forecasts no change: the zero baseline
    for which in ("total", "recent"):
        for row in p.summary(which):
            assert row["best_naive"] == "zero"
            assert (row["dm_stat"], row["dm_p_value"]) == (0.0, 1.0)
            assert row["skill"] == 0.0 and row["share_entities_beating_baseline"] == 0.0


def test_published_and_model_forecasts_are_scored_separately():
    rng = np.random.default_rng(6)
    ret = rng.normal(0.0, 0.02, (1500, 30))
    p = Prequential(30, 2, halflife=1e9)
    _stream(
        p,
        ret,
        model=lambda t: np.repeat(ret[t][:, None], 2, axis=1),  # the last return
        published=lambda t: np.repeat(0.1 * ret[t][:, None], 2, axis=1),  # shrunk toward 0
    )
    for row in p.summary("total"):
        assert row["best_naive"] == "zero"
        assert row["model_skill"] == pytest.approx(-1.0, abs=0.08)
        assert row["skill"] == pytest.approx(-0.01, abs=0.01)  # 1 - (1 + 0.1^2)
        assert row["model_mse"] > row["mse"]
        assert row["mse"] == pytest.approx(row["rmse"] ** 2)


# ------------------------------------------------------------ checkpoints


def _feed(p: Prequential, rng: np.random.Generator, steps: int, cap: int) -> None:
    for _ in range(steps):
        y = rng.normal(size=cap)
        p.observe(rng.normal(size=(cap, p.horizon)), y, rng.random(cap) > 0.1)


@pytest.mark.parametrize(("transform", "season"), [("log_return", 0), ("none", 5)])
def test_export_import_round_trip_keeps_every_figure(transform, season):
    rng = np.random.default_rng(7)
    kw = {"halflife": 30.0, "transform": transform, "season": season, "warmup": 3, "rolling": 4}
    a = Prequential(6, 3, **kw)
    _feed(a, rng, 60, 6)
    arrays = unpack_arrays(pack_arrays(a.export_arrays()))  # through the checkpoint format
    assert all(v.dtype in (np.int64, np.uint8, np.float32) for v in a.export_arrays().values())
    b = Prequential(6, 3, **kw)
    b.import_rows(arrays, np.arange(6))
    for which in ("total", "recent"):
        assert b.summary(which) == a.summary(which)
    # Both go on identically: histories, rings, warm-up counts and DM sums all carried over.
    rng_a, rng_b = np.random.default_rng(8), np.random.default_rng(8)
    _feed(a, rng_a, 20, 6)
    _feed(b, rng_b, 20, 6)
    for which in ("total", "recent"):
        assert b.summary(which) == a.summary(which)
    # Another configuration does not carry over.
    c = Prequential(6, 3, **(kw | {"rolling": 5}))
    c.import_rows(arrays, np.arange(6))
    assert c.summary("total")[0]["count"] == 0


def test_import_into_a_larger_engine_restores_only_the_given_rows():
    rng = np.random.default_rng(9)
    a = Prequential(4, 2, warmup=0)
    _feed(a, rng, 30, 4)
    b = Prequential(8, 2, warmup=0)
    b.import_rows(a.export_arrays(), np.array([1, 3, 7]))
    assert np.array_equal(b.total.n[[1, 3]], a.total.n[[1, 3]])
    assert b.total.n[[0, 2, 4, 7]].sum() == 0.0
    assert np.array_equal(b.total.se_naive[1], a.total.se_naive[1])
