"""The benchmarks that a device session runs once must not rot: tiny runs, every field there.

Figures are not asserted here (benchmarks report them, tests do not time anything); what is
asserted is the shape of the JSON and the facts that do not depend on speed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from streamer import worlds
from streamer.benchmarks import gpu, learn, precision
from streamer.config import LearnConfig
from streamer.model import StatefulLSTM

pytestmark = pytest.mark.slow


def test_gpu_benchmark_reports_every_figure_at_tiny_size():
    result = gpu.run([50, 120], budget_s=0.1)
    json.dumps(result)  # printable as JSON
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    where = "gpu" if has_gpu else "cpu"
    assert [row["entities"] for row in result["step"]] == [50, 120]
    for row in result["step"]:
        for key in ("cpu_step_ms", f"{where}_step_ms_mixed_bfloat16"):
            assert row[key]["p50"] > 0 and row[key]["p99"] >= row[key]["p50"]
        assert row["mixed_bfloat16_speedup"] > 0
    train = result["training"]
    assert train["cpu"]["kernel"] == "generic" and train["cpu"]["loss_finite"]
    assert train["cpu"]["entity_steps_per_s"] > 0
    if has_gpu:  # pragma: no cover - exercised on a device
        assert result["cudnn_used_for_training_windows"] is True
    else:
        assert result["device"] == "cpu" and result["cudnn_used_for_training_windows"] is None
        assert train["cpu_mixed_bfloat16"]["loss_finite"]


def test_precision_benchmark_compares_both_precisions():
    result = precision.run(entities=12, steps=150, drift_steps=60)
    json.dumps(result)
    same = result["same_weights"]
    assert same["forecasts_compared"] > 0
    # the products really differ, and only slightly
    assert 0 < same["abs_gap_mean"] <= same["abs_gap_max"]
    assert same["gap_rms_over_float32_rmse"] < 0.1
    assert set(result["learning"]) == {"float32", "mixed_bfloat16"}
    for figures in result["learning"].values():
        assert figures["updates"] > 0 and figures["discarded"] == 0


# ------------------------------------------------------------------ bench learn (the matrix)


def _finite_figures(block):
    for key, value in block.items():
        if key == "steps_to_recover":
            assert value is None or value >= 0
        elif key == "dm_vs_zero":  # None where the loss differential never varies
            assert value is None or np.isfinite(value)
        elif key == "intervals":
            for level in value:
                assert 0 < level["level"] < 1
                if level["pairs"]:
                    assert 0 <= level["coverage"] <= 1 and level["mean_width"] > 0
                    assert level["interval_score"] >= level["mean_width"]
        else:
            assert np.isfinite(value), (key, value)


def test_learn_matrix_reports_every_case_and_the_worst_at_tiny_size():
    result = learn.run(worlds=["garch_abrupt", "random_walk"], seeds=[0], entities=16, steps=120)
    json.dumps(result)
    assert [(c["world"], c["seed"]) for c in result["cases"]] == [
        ("garch_abrupt", 0),
        ("random_walk", 0),
    ]
    for case in result["cases"]:
        for name in ("model", "frozen", "linear", "zero", "persistence"):
            _finite_figures(case[name])
        if "published" in case:
            _finite_figures(case["published"])
            assert [lv["level"] for lv in case["published"]["intervals"]] == [0.8, 0.95]
        assert case["zero"]["dm_vs_zero"] is None
        assert case["oracle"]["pairs"] > 0 and case["learning"]["updates"] > 0
        assert case["zero"]["skill_vs_zero"] == 0.0
    shifted, walk = result["cases"]
    assert shifted["shift_at"] == 72 and "steps_to_recover" in shifted["model"]
    assert walk["shift_at"] is None and "steps_to_recover" not in walk["model"]
    # the random walk's oracle is zero change
    assert walk["zero"]["ratio_to_oracle"] == 1.0
    worst = result["worst"]
    assert worst["model"]["ratio_to_oracle"] == max(
        c["model"]["ratio_to_oracle"] for c in result["cases"]
    )
    assert worst["model"]["unlearnable_mse_over_zero"] == pytest.approx(
        walk["model"]["mse"] / walk["zero"]["mse"], rel=1e-3
    )
    assert set(worst["targets"]) == {
        "ratio_to_oracle",
        "ratio_met",
        "steps_to_recover",
        "recovery_met",
        "unlearnable_published_over_zero",
        "unlearnable_met",
        "share_of_model_skill_kept",
        "skill_kept_met",
        "coverage_gap_points",
        "coverage_met",
    }
    assert worst["published"]["share_of_model_skill_kept_case"] == "garch_abrupt/0"


def test_linear_baseline_learns_a_linear_world_and_does_not_diverge():
    """RLS with forgetting on the LSTM's own inputs: near the oracle where the truth is
    linear in them, finite on heavy tails."""
    rng = np.random.default_rng(0)
    steps, n = 600, 8
    signal = rng.normal(size=(steps, n))
    ret = np.zeros((steps, n))
    oracle = np.zeros((steps, n))
    for t in range(1, steps):
        oracle[t] = 0.004 * signal[t - 1]
        ret[t] = oracle[t] + 0.002 * rng.standard_t(4, size=n)
    world = {
        "price": 100.0 * np.exp(np.cumsum(ret, axis=0)),
        "signal": signal,
        "ret": ret,
        "oracle": oracle,
        "valid": rng.random((steps, n)) > 0.1,
    }
    inputs = learn.engine_inputs(world)
    forecasts = learn.online_linear(inputs)
    assert np.isfinite(forecasts[inputs["ok"]]).all()
    figures = learn.score_case(world, {"linear": forecasts}, inputs["seen"])
    assert figures["linear"]["ratio_to_oracle"] < 1.1
    assert figures["zero"]["ratio_to_oracle"] > 2.5


def test_engine_inputs_are_what_the_model_sees():
    world = worlds.simulate("gaps", 12, 80, seed=1)
    inputs = learn.engine_inputs(world)
    cfg = learn._matrix_config(12, LearnConfig(enabled=True, window=8, update_every=8))
    model = StatefulLSTM(cfg, 12)
    assert model.window is not None
    for t in range(80):
        x = np.stack([world["price"][t], world["signal"][t]], axis=1).astype(np.float32)
        out = model.step(x, world["valid"][t])
        np.testing.assert_array_equal(out.valid, inputs["ok"][t])
        seen = model.window.numpy()
        slot = t % 8
        ok = inputs["ok"][t]
        np.testing.assert_allclose(seen["inputs"][slot][ok], inputs["z"][t][ok], atol=2e-3)
        np.testing.assert_allclose(seen["mean"][slot][ok], inputs["mean"][t][ok], atol=1e-6)


def test_drift_lever_alarms_on_a_jump_only_and_boosts_the_learning_rate():
    """learn.drift_detection (a lever `bench learn` measures): Page-Hinkley on the log error
    ratio; quiet on noise, one alarm on a jump, then `drift_updates` boosted updates."""
    from streamer.config import CapacityConfig, Config, ModelConfig
    from streamer.learner import OnlineLearner

    cfg = Config(
        model=ModelConfig(units=(3,)),
        capacity=CapacityConfig(initial=4, max_entities=4),
        learn=LearnConfig(enabled=True, window=8, update_every=8, drift_detection=True),
    )
    learner = OnlineLearner(StatefulLSTM(cfg, 4), cfg)
    rng = np.random.default_rng(0)
    for x in -1.5 + 0.15 * rng.normal(size=300):
        learner._page_hinkley(float(x))
    assert learner.stats.drift_alarms == []
    for x in 0.15 * rng.normal(size=10):
        learner._page_hinkley(float(x))
    assert len(learner.stats.drift_alarms) == 1
    assert learner._drift.boost_left == cfg.learn.drift_updates and learner._drift.n < 10
    # the detector's state travels with the learner's state
    other = OnlineLearner(StatefulLSTM(cfg, 4), cfg)
    other.import_state(learner.export_state())
    assert other._drift.boost_left == learner._drift.boost_left
    assert other._drift.cum == learner._drift.cum and other._drift.n == learner._drift.n
