"""`streamer bench gpu`: the step and training on the accelerator beside the CPU, one run.

Prints one JSON object: the device TensorFlow sees, the engine step's latency at 400, 10,000
and 100,000 entities on that device and on the CPU of the same machine (float32, and with
`model.precision = "mixed_bfloat16"` on the device), the throughput of a training window
(truncated BPTT, window 64, 10% of the steps missing as in a live stream) on both, and the
LSTM kernel each training window ran on, read from its traced graph ("cudnn" or "generic");
optionally (`--precision-steps`) `bench precision` on the device. A measurement that fails
is reported as {"error": ...} in its place. Installs nothing; runs in a few minutes. Without
a GPU it reports the CPU only ("device": "cpu").
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf

from ..config import CapacityConfig, Config, LearnConfig, ModelConfig, Precision, StreamConfig
from ..learner import OnlineLearner
from ..model import StatefulLSTM, window_kernel
from .timing import pct, time_calls

FEATURES = tuple(f"f{i}" for i in range(8))
WINDOW = 64
UNITS = 64
MIXED: Precision = "mixed_bfloat16"


def _config(entities: int, precision: Precision = "float32") -> Config:
    return Config(
        stream=StreamConfig(features=FEATURES, target="f0", target_transform="none"),
        model=ModelConfig(units=(UNITS,), horizon=1, precision=precision),
        capacity=CapacityConfig(initial=entities, max_entities=entities),
        learn=LearnConfig(enabled=True, window=WINDOW, update_every=8),
    )


def _step(
    entities: int, device: str, budget_s: float, precision: Precision = "float32"
) -> dict[str, float]:
    with tf.device(device):
        model = StatefulLSTM(_config(entities, precision), entities)
        rng = np.random.default_rng(0)
        xs = rng.normal(size=(8, entities, len(FEATURES))).astype(np.float32)
        mask = rng.random((8, entities)) < 0.9
        i = [0]

        def call() -> None:
            k = i[0] % 8
            i[0] += 1
            model.step(xs[k], mask[k])

        ms = time_calls(call, warmup=5, max_calls=200, budget_s=budget_s)
    return {"p50": pct(ms, 50), "p99": pct(ms, 99), "calls": len(ms)}


def _train(entities: int, device: str, precision: Precision = "float32") -> dict[str, Any]:
    """An update as the engine runs it: window and start states where the model runs."""
    with tf.device(device):
        cfg = _config(entities, precision)
        model = StatefulLSTM(cfg, entities)
        learner = OnlineLearner(model, cfg)
        rng = np.random.default_rng(1)
        s, w, f = entities, WINDOW, len(FEATURES)
        valid = rng.random((w, s)) < 0.9  # entities miss steps: windows with holes
        assert model.window is not None
        model.window.load(
            {
                "inputs": rng.normal(size=(w, s, f)),
                "valid": valid,
                "target": rng.normal(size=(w, s)),
                "mean": np.zeros((w, s)),
                "std": np.ones((w, s)),
            },
            steps_seen=0,
        )
        start = [(tf.zeros((s, UNITS)), tf.zeros((s, UNITS)))]
        rank = learner._rank()
        for _ in range(2):
            loss, grads, _, _ = learner._update_fn(start, rank)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            loss, grads, _, _ = learner._update_fn(start, rank)
            learner.optimizer.apply(grads, model.weights)
            float(loss)
            times.append((time.perf_counter() - t0) * 1e3)
        kernel = window_kernel(learner._update_fn.get_concrete_function(start, rank))
    p50 = float(np.median(times))
    return {
        "update_ms_p50": round(p50, 3),
        "entity_steps_per_s": round(s * w / (p50 / 1e3), 1),
        "kernel": kernel,
        "loss_finite": bool(np.isfinite(float(loss))),
    }


def _ratio(base: dict[str, Any], other: dict[str, Any]) -> float | None:
    if "p50" not in base or "p50" not in other:
        return None
    return round(base["p50"] / other["p50"], 2)


def _guarded(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """One measurement; a failure is reported in its place and the others still run, since a
    device session gets one try."""
    try:
        return fn(*args)
    except (tf.errors.OpError, RuntimeError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}


def run(
    entity_counts: list[int], *, budget_s: float = 3.0, precision_steps: int = 0
) -> dict[str, Any]:
    """`precision_steps` > 0 adds `bench precision` (400 entities, that many steps) on the
    device, so that one device session also measures bfloat16's accuracy there."""
    gpus = tf.config.list_physical_devices("GPU")
    device = "/GPU:0" if gpus else "/CPU:0"
    where = "gpu" if gpus else "cpu"
    name = "cpu"
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        name = str(details.get("device_name", gpus[0].name))
    results = []
    for n in entity_counts:
        row: dict[str, Any] = {"entities": n, "cpu_step_ms": _guarded(_step, n, "/CPU:0", budget_s)}
        if gpus:
            row["gpu_step_ms"] = _guarded(_step, n, device, budget_s)
            row["speedup_vs_cpu"] = _ratio(row["cpu_step_ms"], row["gpu_step_ms"])
        mixed = row[f"{where}_step_ms_{MIXED}"] = _guarded(_step, n, device, budget_s, MIXED)
        row[f"{MIXED}_speedup"] = _ratio(row[f"{where}_step_ms"], mixed)
        results.append(row)
    train_n = 400
    training: dict[str, Any] = {
        "entities": train_n,
        "window": WINDOW,
        "cpu": _guarded(_train, train_n, "/CPU:0"),
    }
    if gpus:
        training["gpu"] = _guarded(_train, train_n, device)
        training["gpu_10000"] = _guarded(_train, 10_000, device)
        training[f"gpu_10000_{MIXED}"] = _guarded(_train, 10_000, device, MIXED)
    else:
        training[f"cpu_{MIXED}"] = _guarded(_train, train_n, device, MIXED)
    gpu_kernels = {v.get("kernel") for k, v in training.items() if k.startswith("gpu")}
    extra: dict[str, Any] = {}
    if precision_steps:
        from . import precision

        extra["precision"] = _guarded(
            lambda: precision.run(
                entities=400, steps=precision_steps, drift_steps=min(500, precision_steps)
            )
        )
    return {
        "benchmark": "gpu",
        "device": name,
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
        # Read from the traced training graphs on the device; null without a GPU.
        "cudnn_used_for_training_windows": gpu_kernels == {"cudnn"} if gpus else None,
        "note": "the single step is a hand-written XLA kernel (one fused matmul per layer), "
        "not cuDNN; training windows use the Keras LSTM layers, packed right-padded so that "
        "cuDNN takes every window on a GPU",
        "step": results,
        "training": training,
        **extra,
    }
