"""The benchmarks that a device session runs once must not rot: tiny runs, every field there.

Figures are not asserted here (benchmarks report them, tests do not time anything); what is
asserted is the shape of the JSON and the facts that do not depend on speed.
"""

from __future__ import annotations

import json

import pytest
import tensorflow as tf

from streamer.benchmarks import gpu, precision

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
