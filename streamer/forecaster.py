"""The pure core of the engine: events in, per-entity forecasts out.

`Forecaster` wires the parser, the slot registry, the step aligner and the stateful model
together. It does no I/O: the Kafka/Redis engine (and the in-process demo) feed it decoded
events and publish what it returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .aligner import AddStatus, Batch, StepAligner
from .config import Config
from .errors import CapacityError, EventError, Reason
from .events import Event, EventParser
from .model import StatefulLSTM
from .registry import SlotRegistry


@dataclass(frozen=True)
class StepResult:
    """The forecasts of one closed step, one row per entity that reported in it.

    `forecasts[j, k]` is the forecast for step `step + k + 1` of entity `entities[j]` in the
    target's transformed units (e.g. log-returns); `levels[j, k]` is the same forecast in the
    target's own units (e.g. a price). `valid[j]` is False while an entity warms up (its
    first event under a diff/log_return transform): its state did not move and its forecast
    carries no information yet.
    """

    step: int
    entities: tuple[str, ...]
    slots: np.ndarray
    ts: np.ndarray
    forecasts: np.ndarray
    levels: np.ndarray
    valid: np.ndarray


class Forecaster:
    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.parser = EventParser(config.stream, clock)
        self.registry = SlotRegistry(config.capacity)
        self.aligner = StepAligner(config.stream, self.registry)
        self.model = StatefulLSTM(config, self.registry.capacity)
        self._target = config.stream.target_index
        self._transform = config.stream.target_transform

    def ingest(self, event: Event | Mapping[str, Any]) -> AddStatus:
        """Validate and buffer one event. Raises EventError (with a reason) if refused."""
        if not isinstance(event, Event):
            event = self.parser.parse(event)
        try:
            return self.aligner.add(event)
        except CapacityError as exc:
            raise EventError(Reason.CAPACITY, str(exc), event.entity) from exc

    def advance(self) -> list[StepResult]:
        """Close every step that can close and run the model on each, in step order."""
        return [self.apply(batch) for batch in self.aligner.close_ready()]

    def flush(self) -> list[StepResult]:
        """Close and apply every open step (end of a finite stream)."""
        return [self.apply(batch) for batch in self.aligner.flush()]

    def apply(self, batch: Batch) -> StepResult:
        if self.registry.capacity > self.model.capacity:
            self.model.grow(self.registry.capacity)
        x, mask = batch.x, batch.mask
        if x.shape[0] < self.model.capacity:  # batch closed before a growth
            pad = self.model.capacity - x.shape[0]
            x = np.pad(x, ((0, pad), (0, 0)))
            mask = np.pad(mask, (0, pad))
        out = self.model.step(x, mask)
        rows = batch.slots
        forecasts = out.forecasts[rows]
        return StepResult(
            step=batch.step,
            entities=batch.entities,
            slots=rows,
            ts=batch.ts[rows],
            forecasts=forecasts,
            levels=self._levels(x[rows, self._target], forecasts),
            valid=out.valid[rows],
        )

    def reset_entity(self, entity: str) -> None:
        """Forget one entity's state; every other row is untouched."""
        slot = self.registry.slot_of(entity)
        if slot is None:
            raise KeyError(entity)
        self.model.reset_rows([slot])

    def _levels(self, last: np.ndarray, forecasts: np.ndarray) -> np.ndarray:
        if self._transform == "none":
            return forecasts
        steps = np.cumsum(forecasts.astype(np.float64), axis=1)
        base = last.astype(np.float64)[:, None]
        if self._transform == "diff":
            return base + steps
        return base * np.exp(steps)
