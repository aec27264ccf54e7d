"""`streamer bench step`: one model step over all entities, engine vs the seed's loop vs NumPy.

All three run the same weights on the same inputs in the same process:

- engine: `StatefulLSTM.step` (target transform, Welford normalisation, LSTM, Dense head,
  masked state update; one XLA-compiled call; NumPy in, NumPy out);
- keras_predict: the seed's loop, `model.predict` on a Keras `stateful=True` model with
  `batch_size == entities`, one step per call;
- numpy: the engine's exact math in NumPy (the single-thread floor at small sizes), plus the
  LSTM-and-head part alone for reference.
"""

from __future__ import annotations

import platform
from typing import Any

import numpy as np

from ..config import CapacityConfig, Config, ModelConfig, StreamConfig
from ..model import VARIANCE_EPSILON, StatefulLSTM
from .timing import pct, time_calls

BENCH_FEATURES = tuple(f"f{i}" for i in range(8))
BENCH_UNITS = 64


def _sigmoid(a: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-a))


class NumpyStep:
    """The engine step's math in NumPy, float32, with the same masked updates."""

    def __init__(self, model: StatefulLSTM, capacity: int, clip: float) -> None:
        w = model.get_weights()
        self.kernel = np.concatenate([w[0], w[1]], axis=0)
        self.bias = w[2]
        self.head_k, self.head_b = w[3], w[4]
        units = self.bias.shape[0] // 4
        f = model.n_features
        self.h = np.zeros((capacity, units), np.float32)
        self.c = np.zeros((capacity, units), np.float32)
        self.count = np.zeros((capacity, 1), np.float32)
        self.mean = np.zeros((capacity, f), np.float32)
        self.m2 = np.zeros((capacity, f), np.float32)
        self.clip = np.float32(clip)

    def lstm(self, z: np.ndarray, valid: np.ndarray) -> np.ndarray:
        gates = np.concatenate([z, self.h], axis=1) @ self.kernel + self.bias
        zi, zf, zc, zo = np.split(gates, 4, axis=1)
        c = _sigmoid(zf) * self.c + _sigmoid(zi) * np.tanh(zc)
        h = _sigmoid(zo) * np.tanh(c)
        self.h = np.where(valid, h, self.h)
        self.c = np.where(valid, c, self.c)
        return self.h @ self.head_k + self.head_b

    def step(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray:
        v = mask[:, None]
        one = np.float32(1)
        count = np.where(v, self.count + one, self.count)
        delta = x - self.mean
        mean = np.where(v, self.mean + delta / np.maximum(count, one), self.mean)
        m2 = np.where(v, self.m2 + delta * (x - mean), self.m2)
        self.count, self.mean, self.m2 = count, mean, m2
        std = np.sqrt(m2 / np.maximum(count, one) + np.float32(VARIANCE_EPSILON))
        z = np.clip((x - mean) / std, -self.clip, self.clip)
        y = self.lstm(z, v)
        return y * std[:, :1] + mean[:, :1]


def bench_one(entities: int, *, seed: int = 0, budget_s: float = 3.0) -> dict[str, Any]:
    config = Config(
        stream=StreamConfig(features=BENCH_FEATURES, target="f0", target_transform="none"),
        model=ModelConfig(units=(BENCH_UNITS,), horizon=1, seed=seed),
        capacity=CapacityConfig(initial=entities, max_entities=entities),
    )
    model = StatefulLSTM(config, entities)
    rng = np.random.default_rng(seed)
    n_inputs = 64
    xs = rng.normal(size=(n_inputs, entities, len(BENCH_FEATURES))).astype(np.float32)
    masks = rng.random((n_inputs, entities)) < 0.9
    calls = max(20, min(400, 400_000 // entities))
    i = [0]

    def engine() -> None:
        k = i[0] % n_inputs
        i[0] += 1
        model.step(xs[k], masks[k])

    engine_ms = time_calls(engine, warmup=10, max_calls=calls, budget_s=budget_s)

    ref = NumpyStep(model, entities, config.model.clip)

    def numpy_full() -> None:
        k = i[0] % n_inputs
        i[0] += 1
        ref.step(xs[k], masks[k])

    numpy_ms = time_calls(numpy_full, warmup=5, max_calls=calls, budget_s=budget_s)

    def numpy_lstm() -> None:
        k = i[0] % n_inputs
        i[0] += 1
        ref.lstm(xs[k], masks[k][:, None])

    numpy_lstm_ms = time_calls(numpy_lstm, warmup=5, max_calls=calls, budget_s=budget_s)

    keras_model = model.reference_model(batch_size=entities, masking=False)
    seq = xs[:, :, None, :]

    def keras_predict() -> None:
        k = i[0] % n_inputs
        i[0] += 1
        keras_model.predict(seq[k], batch_size=entities, verbose=0)

    keras_ms = time_calls(keras_predict, warmup=3, max_calls=max(10, calls // 4), budget_s=budget_s)
    engine_p50 = pct(engine_ms, 50)
    return {
        "entities": entities,
        "engine_step_ms_p50": engine_p50,
        "engine_step_ms_p99": pct(engine_ms, 99),
        "keras_predict_ms_p50": pct(keras_ms, 50),
        "numpy_step_ms_p50": pct(numpy_ms, 50),
        "numpy_lstm_only_ms_p50": pct(numpy_lstm_ms, 50),
        "speedup_vs_predict": round(pct(keras_ms, 50) / engine_p50, 2),
        "ratio_to_numpy": round(engine_p50 / pct(numpy_ms, 50), 3),
        "calls": {"engine": len(engine_ms), "numpy": len(numpy_ms), "keras": len(keras_ms)},
    }


def run(entity_counts: list[int], *, seed: int = 0, budget_s: float = 3.0) -> dict[str, Any]:
    import tensorflow as tf

    results = [bench_one(n, seed=seed, budget_s=budget_s) for n in entity_counts]
    return {
        "benchmark": "step",
        "setup": {
            "features": len(BENCH_FEATURES),
            "units": [BENCH_UNITS],
            "horizon": 1,
            "mask_present_share": 0.9,
            "engine": "explicit-state step, XLA concrete function, normalisation included",
            "numpy": "same math incl. normalisation; numpy_lstm_only excludes it",
        },
        "machine": {
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "cpus": _cpu_count(),
            "devices": [d.name for d in tf.config.list_logical_devices()],
        },
        "results": results,
    }


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
