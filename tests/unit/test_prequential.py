"""Prequential scoring: delayed labels, baselines, entity spread."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.prequential import Prequential


def test_forecast_is_scored_only_when_its_target_arrives():
    p = Prequential(capacity=1, horizon=2, halflife=1e9)
    valid = np.array([True])
    p.observe(np.array([[10.0, 20.0]]), np.array([1.0]), valid)  # made at batch 0
    assert p.total.n.sum() == 0  # nothing realised yet
    p.observe(np.array([[0.0, 0.0]]), np.array([4.0]), valid)  # batch 1: h1 of batch 0 scored
    assert p.total.n[0].tolist() == [1.0, 0.0]
    assert p.total.se_model[0, 0] == (10.0 - 4.0) ** 2
    assert p.total.se_persist[0, 0] == (1.0 - 4.0) ** 2
    assert p.total.se_zero[0, 0] == 16.0
    p.observe(np.array([[0.0, 0.0]]), np.array([7.0]), valid)  # batch 2: h2 of batch 0 scored
    assert p.total.n[0].tolist() == [2.0, 1.0]
    assert p.total.se_model[0, 1] == (20.0 - 7.0) ** 2
    assert p.total.se_persist[0, 1] == (1.0 - 7.0) ** 2


def test_absent_or_warming_rows_are_not_scored():
    p = Prequential(capacity=2, horizon=1)
    p.observe(np.array([[1.0], [1.0]]), np.array([0.0, 0.0]), np.array([True, False]))
    p.observe(np.array([[1.0], [1.0]]), np.array([2.0, 2.0]), np.array([True, True]))
    assert p.total.n[:, 0].tolist() == [1.0, 0.0]  # row 1 had no forecast at batch 0


def test_summary_skill_median_and_share():
    rng = np.random.default_rng(0)
    p = Prequential(capacity=3, horizon=1, halflife=1e9)
    y = rng.normal(size=(400, 3))
    prev = np.zeros(3)
    for t in range(400):
        # Row 0 forecasts perfectly, row 1 forecasts persistence, row 2 forecasts badly.
        nxt = y[t + 1] if t + 1 < 400 else y[t]
        f = np.stack([nxt, y[t], y[t] + 5.0], axis=0)[:, :, None][[0, 1, 2], [0, 1, 2]]
        p.observe(f, y[t], np.ones(3, bool))
        prev = y[t]
    s = p.summary("total")[0]
    assert s["entities"] == 3
    assert s["share_entities_beating_persistence"] == pytest.approx(1 / 3)
    assert s["median_entity_skill"] == pytest.approx(0.0, abs=1e-12)
    assert s["rmse"] > 0 and s["mase"] > 0
    assert prev is not None


def test_forget_rows_and_growth():
    p = Prequential(capacity=1, horizon=1)
    p.observe(np.array([[1.0]]), np.array([0.0]), np.array([True]))
    p.observe(np.array([[1.0], [2.0]]), np.array([1.0, 1.0]), np.array([True, True]))
    assert p.total.n.shape == (2, 1) and p.total.n[0, 0] == 1.0
    p.forget_rows([0])
    assert p.total.n[0, 0] == 0.0
    p.observe(np.array([[1.0], [2.0]]), np.array([1.0, 1.0]), np.array([True, True]))
    assert p.total.n[:, 0].tolist() == [0.0, 1.0]  # row 0's pending forecast was dropped
