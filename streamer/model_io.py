"""Model files: export to `.keras`, warm start from one, offline pretraining on a CSV.

The `.keras` file holds a plain (not stateful) Keras model: Input [batch, time, features] ->
the LSTM layers -> the Dense head, with streamer's weights. It takes normalised, transformed
inputs, exactly what `StatefulLSTM` feeds its layers. Keras's native format stores a JSON
config and the weights; loading it never unpickles anything (safe_mode stays on).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import keras
import numpy as np

from .config import Config
from .csv_source import CsvRow, CsvSource
from .errors import ModelError
from .model import StatefulLSTM

if TYPE_CHECKING:
    from .forecaster import Forecaster

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


def pretrain(
    config: Config,
    path: str | Path,
    *,
    passes: int = 1,
    columns: Mapping[str, str] | None = None,
    entity: str | None = None,
    skip_bad: bool = False,
) -> StatefulLSTM:
    """Fit offline by streaming the CSV through the engine's core with learning on.

    The same code path as online learning (windows, delayed labels, guard rails), run over
    recorded data; each pass starts from fresh states and keeps the weights. The CSV is read
    as `streamer produce csv` reads it (`streamer.csv_source`: `columns`, `entity`,
    `skip_bad`); recorded data may lie in any past, so `stream.min_event_time` and
    `stream.max_future` do not apply here.
    """
    import dataclasses
    import math

    from .forecaster import Forecaster

    cfg = dataclasses.replace(
        config,
        learn=dataclasses.replace(config.learn, enabled=True),
        stream=dataclasses.replace(config.stream, max_future=0.0, min_event_time=-math.inf),
    )
    weights: list[np.ndarray] | None = None
    core = None
    for p in range(passes):
        core = Forecaster(cfg)
        if weights is not None:
            core.model.set_weights(weights)
        source = CsvSource(path, cfg.stream, columns=columns, entity=entity, skip_bad=skip_bad)
        n = source.replay(_feeder(core), sent_label="events learned from").sent
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


def _feeder(core: Forecaster) -> Callable[[CsvRow], None]:
    """Each row through the engine's checks into `core`, then every step that can close."""
    parse = core.parser.parse

    def feed(row: CsvRow) -> None:
        core.ingest(parse({"entity": row.entity, "ts": row.ts, "values": row.values}))
        core.advance()

    return feed
