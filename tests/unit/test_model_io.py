"""Model files: export, warm start, pretraining on a CSV."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from streamer.config import Config, LearnConfig, ModelConfig, StreamConfig
from streamer.errors import ModelError
from streamer.forecaster import Forecaster
from streamer.model_io import export_keras, load_keras_weights, pretrain, to_keras
from streamer.synthetic import SyntheticMarket


def small() -> Config:
    return Config(
        stream=StreamConfig(max_future=0.0),
        model=ModelConfig(units=(8,), seed=3),
        learn=LearnConfig(window=16, update_every=8, shadow_steps=2),
    )


def test_export_then_warm_start_gives_the_same_forecasts(tmp_path):
    cfg = small()
    a = Forecaster(cfg)
    a.model.set_weights([w + 0.01 for w in a.model.get_weights()])
    path = export_keras(a.model, tmp_path / "m.keras")
    b = Forecaster(
        dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_weights=str(path)))
    )
    for wa, wb in zip(a.model.get_weights(), b.model.get_weights(), strict=True):
        assert np.array_equal(wa, wb)
    # The exported Keras model computes what the engine's layers compute on a window.
    x = np.random.default_rng(0).normal(size=(2, 5, 2)).astype(np.float32)
    y_engine, _ = a.model.window_forward(
        x, np.ones((2, 5), bool), [(np.zeros((2, 8), np.float32),) * 2]
    )
    np.testing.assert_allclose(to_keras(a.model)(x), y_engine, atol=1e-6)


def test_warm_start_refuses_a_model_of_another_shape(tmp_path):
    other = Forecaster(dataclasses.replace(small(), model=ModelConfig(units=(4,))))
    path = export_keras(other.model, tmp_path / "other.keras")
    with pytest.raises(ModelError, match="do not fit"):
        load_keras_weights(Forecaster(small()).model, path)
    with pytest.raises(ModelError, match="no such"):
        load_keras_weights(Forecaster(small()).model, tmp_path / "missing.keras")
    with pytest.raises(ModelError, match=r"\.keras"):
        export_keras(other.model, tmp_path / "m.h5")


def test_pretrain_on_a_csv_changes_the_weights(tmp_path):
    market = SyntheticMarket(entities=4, steps=40, seed=2)
    lines = ["entity,ts,price,signal"]
    lines += [
        f"{e['entity']},{e['ts']},{e['values']['price']},{e['values']['signal']}"
        for e in market.events()
    ]
    path = tmp_path / "bars.csv"
    path.write_text("\n".join(lines) + "\n")
    before = Forecaster(small()).model.get_weights()
    model = pretrain(small(), path, passes=2)
    after = model.get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
