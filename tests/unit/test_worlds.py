"""The generator families of `bench learn`: shapes, determinism, oracles and masks."""

from __future__ import annotations

import numpy as np
import pytest

from streamer import worlds
from streamer.synthetic import SyntheticMarket

N, T = 40, 400
KEYS = ("price", "signal", "ret", "oracle", "valid")


@pytest.mark.parametrize("name", list(worlds.FAMILIES))
def test_every_family_has_the_synthetic_markets_shape_and_is_deterministic(name):
    a = worlds.simulate(name, N, T, seed=3)
    b = worlds.simulate(name, N, T, seed=3)
    c = worlds.simulate(name, N, T, seed=4)
    for key in KEYS:
        assert a[key].shape == (T, N)
        np.testing.assert_array_equal(a[key], b[key])
    assert a["valid"].dtype == bool
    assert not np.array_equal(a["ret"], c["ret"])
    for key in ("price", "signal", "ret", "oracle"):
        assert np.isfinite(a[key]).all()
    assert (a["price"] > 0).all()
    # price and return agree: price[t] = price[t-1] * exp(ret[t])
    np.testing.assert_allclose(np.diff(np.log(a["price"]), axis=0), a["ret"][1:], atol=1e-9)


@pytest.mark.parametrize("name", [n for n, f in worlds.FAMILIES.items() if f.learnable])
def test_the_oracle_beats_zero_change_on_learnable_worlds(name):
    w = worlds.simulate(name, N, T, seed=0)
    se_oracle = np.mean((w["ret"] - w["oracle"]) ** 2)
    se_zero = np.mean(w["ret"] ** 2)
    assert se_oracle < 0.8 * se_zero


def test_the_random_walk_is_unlearnable_heavy_tailed_and_its_oracle_is_zero():
    w = worlds.simulate("random_walk", 200, 2000, seed=0)
    assert w["shift_at"] is None
    assert not w["oracle"].any()
    r = w["ret"]
    assert np.mean(r**4) / np.mean(r**2) ** 2 > 6  # heavy tails (gaussian: 3)
    # volatility clusters: squared returns are autocorrelated, returns are not
    sq = r**2 - np.mean(r**2, axis=0)
    assert np.mean(sq[1:] * sq[:-1]) / np.mean(sq**2) > 0.05
    # the signal carries nothing about the next return
    corr = np.corrcoef(w["signal"][:-1].ravel(), r[1:].ravel())[0, 1]
    assert abs(corr) < 0.02


def test_shared_and_abrupt_are_exactly_the_synthetic_market():
    for name, shift_at in (("shared", None), ("abrupt", int(T * 0.6))):
        w = worlds.simulate(name, N, T, seed=5)
        s = SyntheticMarket(N, T, seed=5, shift_at=shift_at).simulate()
        for key in ("price", "signal", "ret", "oracle"):
            np.testing.assert_array_equal(w[key], s[key])
        assert w["valid"].all()
        assert w["shift_at"] == shift_at and w["shift_end"] == shift_at


def test_noise_and_gaps_keep_the_signal_path():
    base = worlds.simulate("shared", N, T, seed=1)
    for name in ("garch", "gaps"):
        np.testing.assert_array_equal(worlds.simulate(name, N, T, seed=1)["signal"], base["signal"])


def test_gradual_shift_interpolates_between_the_regimes():
    w = worlds.simulate("gradual", N, 1000, seed=2)
    assert (w["shift_at"], w["shift_end"]) == (600, 900)
    abrupt = worlds.simulate("abrupt", N, 1000, seed=2)
    np.testing.assert_array_equal(w["ret"][:600], abrupt["ret"][:600])
    # Rebuild the coefficients the oracle used: at the ramp's middle, halfway.
    p = SyntheticMarket(N, 1, seed=2).params()
    t = 750
    a = 0.5 * p["a"] + 0.5 * p["a_shift"]
    b = 0.5 * p["b"] + 0.5 * p["b_shift"]
    expected = a * w["ret"][t - 1] + b * np.tanh(2.0 * w["signal"][t - 1])
    np.testing.assert_allclose(w["oracle"][t], expected, rtol=1e-12)


def test_gaps_have_missing_steps_joiners_and_leavers():
    n, steps = 200, 1000
    v = worlds.simulate("gaps", n, steps, seed=0)["valid"]
    assert 0.8 < v.mean() < 0.9
    first = np.argmax(v, axis=0)
    last = steps - 1 - np.argmax(v[::-1], axis=0)
    joiners = first >= int(0.1 * steps)  # join between 10% and 50% of the steps
    leavers = last < int(0.9 * steps) - 1  # leave between 50% and 90%
    assert joiners.sum() == round(worlds.JOINERS * n)
    assert leavers.sum() == round(worlds.LEAVERS * n)
    assert (first[joiners] < int(0.5 * steps)).all() and (
        last[leavers] >= int(0.5 * steps) - 2
    ).all()
    assert not (joiners & leavers).any()
    # the other entities miss about 10% of their steps, at random, throughout
    regular = ~joiners & ~leavers
    assert 0.85 < v[:, regular].mean() < 0.95
    assert v[:, regular][: steps // 2].mean() == pytest.approx(
        v[:, regular][steps // 2 :].mean(), abs=0.02
    )


def test_families_combine_and_unknown_names_fail():
    fam = worlds.combine(noise="garch_t", shift="gradual", gaps=True)
    w = worlds.simulate(fam, N, T, seed=0)
    assert w["shift_end"] - w["shift_at"] == min(worlds.RAMP, T - w["shift_at"])
    assert not w["valid"].all()
    with pytest.raises(ValueError, match="unknown world"):
        worlds.simulate("nope", N, T)
