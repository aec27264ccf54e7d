"""Model files: export to `.keras`, warm start from one, offline pretraining on a CSV.

The `.keras` file holds a plain (not stateful) Keras model: Input [batch, time, features] ->
the LSTM layers -> the Dense head, with streamer's weights. It takes normalised, transformed
inputs, exactly what `StatefulLSTM` feeds its layers. Keras's native format stores a JSON
config and the weights; loading it never unpickles anything (safe_mode stays on).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np

from .config import Config
from .errors import EventError, ModelError, Reason
from .events import Event
from .model import StatefulLSTM
from .produce import _parse_time

log = logging.getLogger(__name__)


def to_keras(model: StatefulLSTM) -> keras.Model:
    inp = keras.Input(shape=(None, model.n_features), name="inputs")
    x = inp
    for i, layer in enumerate(model.lstm_layers):
        x = keras.layers.LSTM(layer.units, return_sequences=True, name=f"lstm_{i}")(x)
    out = keras.layers.Dense(model.horizon, name="head")(x)
    exported = keras.Model(inp, out, name="streamer_lstm")
    exported.set_weights(model.get_weights())
    return exported


def export_keras(model: StatefulLSTM, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix != ".keras":
        raise ModelError(f"{path}: the file name must end in .keras")
    to_keras(model).save(path)
    return path


def load_keras_weights(model: StatefulLSTM, path: str | Path) -> None:
    """Warm start: copy the weights of an exported `.keras` file into `model`."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    try:
        loaded = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:
        raise ModelError(f"{path}: cannot load the model: {exc}") from exc
    weights = loaded.get_weights()
    expected = [tuple(w.shape) for w in model.weights]
    got = [tuple(w.shape) for w in weights]
    if got != expected:
        raise ModelError(
            f"{path}: weight shapes {got} do not fit the configured model {expected} "
            "(check model.units, model.horizon and stream.features)"
        )
    model.set_weights(weights)


def csv_events(
    path: str | Path, config: Config, entity_column: str = "entity", time_column: str = "ts"
) -> Iterator[Event]:
    features = config.stream.features
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in (entity_column, time_column, *features) if c not in header]
        if missing:
            raise EventError(Reason.MISSING_FIELD, f"{path}: CSV lacks columns {missing}")
        for lineno, row in enumerate(reader, start=2):
            try:
                yield Event(
                    row[entity_column],
                    _parse_time(row[time_column]),
                    tuple(float(row[f]) for f in features),
                )
            except ValueError as exc:
                raise EventError(Reason.WRONG_TYPE, f"{path}:{lineno}: {exc}") from exc


def pretrain(config: Config, path: str | Path, *, passes: int = 1) -> StatefulLSTM:
    """Fit offline by streaming the CSV through the engine's core with learning on.

    The same code path as online learning (windows, delayed labels, guard rails), run over
    recorded data; each pass starts from fresh states and keeps the weights.
    """
    import dataclasses

    from .forecaster import Forecaster

    cfg = dataclasses.replace(
        config,
        learn=dataclasses.replace(config.learn, enabled=True),
        stream=dataclasses.replace(config.stream, max_future=0.0),
    )
    weights: list[np.ndarray] | None = None
    core = None
    for p in range(passes):
        core = Forecaster(cfg)
        if weights is not None:
            core.model.set_weights(weights)
        n = 0
        for event in csv_events(path, cfg):
            core.ingest(event)
            core.advance()
            n += 1
        core.flush()
        assert core.learner is not None
        weights = core.model.get_weights()
        summary = core.prequential.summary("recent")[0]
        log.info(
            "pretrain pass %d/%d: %d events, %d updates, recent one-step skill %s",
            p + 1,
            passes,
            n,
            core.learner.stats.updates,
            summary.get("skill_vs_persistence"),
        )
    assert core is not None
    return core.model
