"""`streamer bench gpu`: the step and training on the accelerator beside the CPU, one run.

Prints one JSON object: the device TensorFlow sees, the engine step's latency at 400, 10,000
and 100,000 entities on that device and on the CPU of the same machine, the throughput of a
training window (truncated BPTT, window 64) on both, and whether the Keras LSTM can take
the cuDNN kernel for those windows. Installs nothing; runs in a few minutes. Without a GPU
it reports the CPU only ("device": "cpu").
"""

from __future__ import annotations

import platform
import time
from typing import Any

import numpy as np
import tensorflow as tf

from ..config import CapacityConfig, Config, LearnConfig, ModelConfig, StreamConfig
from ..learner import OnlineLearner
from ..model import StatefulLSTM
from .timing import pct, time_calls

FEATURES = tuple(f"f{i}" for i in range(8))
WINDOW = 64


def _config(entities: int) -> Config:
    return Config(
        stream=StreamConfig(features=FEATURES, target="f0", target_transform="none"),
        model=ModelConfig(units=(64,), horizon=1),
        capacity=CapacityConfig(initial=entities, max_entities=entities),
        learn=LearnConfig(enabled=True, window=WINDOW, update_every=8),
    )


def _step(entities: int, device: str, budget_s: float) -> dict[str, float]:
    with tf.device(device):
        model = StatefulLSTM(_config(entities), entities)
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


def _train(entities: int, device: str) -> dict[str, float]:
    with tf.device(device):
        cfg = _config(entities)
        model = StatefulLSTM(cfg, entities)
        learner = OnlineLearner(model, cfg)
        rng = np.random.default_rng(1)
        s, w, f = entities, WINDOW, len(FEATURES)
        args = (
            tf.constant(rng.normal(size=(s, w, f)).astype(np.float32)),
            tf.constant(np.ones((s, w), bool)),  # full windows: the cuDNN-eligible case
            tf.constant(rng.normal(size=(s, w, 1)).astype(np.float32)),
            tf.constant(np.ones((s, w, 1), np.float32)),
            [(tf.zeros((s, 64)), tf.zeros((s, 64)))],
        )
        for _ in range(2):
            loss, grads = learner._train_fn(*args)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            loss, grads = learner._train_fn(*args)
            learner.optimizer.apply(grads, model.weights)
            float(loss)
            times.append((time.perf_counter() - t0) * 1e3)
    p50 = float(np.median(times))
    return {"update_ms_p50": round(p50, 3), "entity_steps_per_s": round(s * w / (p50 / 1e3), 1)}


def _cudnn_eligible() -> bool | None:
    """Whether Keras's TF backend would take the cuDNN kernel for our LSTM layers."""
    if not tf.config.list_physical_devices("GPU"):
        return None
    try:
        from keras.src.backend.tensorflow import rnn as tf_rnn

        return bool(
            tf_rnn.cudnn_ok("tanh", "sigmoid", unroll=False, use_bias=True, reset_after=None)
            if "reset_after" in tf_rnn.cudnn_ok.__code__.co_varnames
            else tf_rnn.cudnn_ok("tanh", "sigmoid", unroll=False, use_bias=True)
        )
    except Exception:  # the private helper moved: report unknown rather than guess
        return None


def run(entity_counts: list[int], *, budget_s: float = 3.0) -> dict[str, Any]:
    gpus = tf.config.list_physical_devices("GPU")
    device = "/GPU:0" if gpus else "/CPU:0"
    name = "cpu"
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        name = str(details.get("device_name", gpus[0].name))
    results = []
    for n in entity_counts:
        row: dict[str, Any] = {"entities": n, "cpu_step_ms": _step(n, "/CPU:0", budget_s)}
        if gpus:
            row["gpu_step_ms"] = _step(n, device, budget_s)
            row["speedup_vs_cpu"] = round(row["cpu_step_ms"]["p50"] / row["gpu_step_ms"]["p50"], 2)
        results.append(row)
    train_n = 400
    training = {"entities": train_n, "window": WINDOW, "cpu": _train(train_n, "/CPU:0")}
    if gpus:
        training["gpu"] = _train(train_n, device)
        big = 10_000
        training["gpu_10000"] = _train(big, device)
    return {
        "benchmark": "gpu",
        "device": name,
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
        "cudnn_eligible_for_training_windows": _cudnn_eligible(),
        "note": "the single step is a hand-written XLA kernel, not cuDNN; training windows use "
        "Keras LSTM layers, which take cuDNN on a GPU when every mask is right-padded",
        "step": results,
        "training": training,
    }
