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
from .combiner import Combiner
from .config import Config
from .errors import CapacityError, EventError, Reason
from .events import Event, EventParser, step_of
from .learner import OnlineLearner
from .model import StatefulLSTM
from .prequential import Prequential
from .registry import SlotRegistry
from .state.format import NO_STEP, RowLayout


@dataclass(frozen=True)
class StepResult:
    """The forecasts of one closed step, one row per entity that reported in it.

    `published[j, k]` is the forecast the engine publishes for step `step + k + 1` of entity
    `entities[j]` in the target's transformed units (e.g. log-returns): the model's own
    forecast `forecasts[j, k]` shrunk toward the naive one with the model's weight
    `weights[j, k]` (combiner.py). `levels[j, k]` is the published forecast in the target's
    own units (e.g. a price); `lower`/`upper[j, k, l]` bound it at coverage `intervals[l]`
    (transformed units, NaN until the entity has an error scale).

    `valid[j]` is False while an entity warms up (its first event under a diff/log_return
    transform): its state did not move and its forecast carries no information yet.
    `rejected[j]` is True when the step would have made the entity's state or forecast
    non-finite: its state did not move (nor its last applied step), it is not valid, its
    forecast is 0, and its event is to be dead-lettered (reason non_finite_state).
    """

    step: int
    entities: tuple[str, ...]
    slots: np.ndarray
    ts: np.ndarray
    forecasts: np.ndarray
    levels: np.ndarray
    valid: np.ndarray
    rejected: np.ndarray
    published: np.ndarray
    weights: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    intervals: tuple[float, ...] = ()


class Forecaster:
    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.parser = EventParser(config.stream, clock)
        self.registry = SlotRegistry(config.capacity)
        self.aligner = StepAligner(config.stream, self.registry)
        self.model = StatefulLSTM(config, self.registry.capacity)
        self.prequential = Prequential(
            self.registry.capacity,
            config.model.horizon,
            config.learn.prequential_halflife,
            transform=config.stream.target_transform,
            season=config.learn.season,
            rolling=config.learn.prequential_rolling,
            warmup=config.learn.prequential_warmup,
        )
        self.combiner = Combiner(
            config.forecast,
            self.registry.capacity,
            config.model.horizon,
            config.stream.target_transform,
            mean_halflife=float(config.learn.prequential_rolling),
        )
        if config.model.init_weights:
            from .model_io import load_keras_weights

            load_keras_weights(self.model, config.model.init_weights)
        self.learner = OnlineLearner(self.model, config) if config.learn.enabled else None
        if self.learner is not None:
            self.learner.row_keys = self.registry.items
        self._target = config.stream.target_index
        self._transform = config.stream.target_transform
        self._interval = config.stream.interval
        # Last step applied to each slot's state (idempotent replay); NO_STEP if none.
        self.last_step = np.full(self.registry.capacity, NO_STEP, dtype=np.int64)
        # Slots whose state changed since the last `take_dirty()` (incremental checkpoints).
        self._dirty: set[int] = set()
        self.replayed = 0

    @property
    def layout(self) -> RowLayout:
        return RowLayout.from_shapes(self.model.bank.row_shapes)

    def ingest(self, event: Event | Mapping[str, Any], partition: int = 0) -> AddStatus:
        """Validate and buffer one event. Raises EventError (with a reason) if refused.

        An event at or before its entity's last applied step is skipped (REPLAYED): after a
        restart from a checkpoint the same events come again and must not apply twice.
        """
        if not isinstance(event, Event):
            event = self.parser.parse(event)
        slot = self.registry.slot_of(event.entity)
        if (
            slot is not None
            and slot < len(self.last_step)  # slots beyond it were added since the last step
            and step_of(event.ts, self._interval) <= self.last_step[slot]
        ):
            self.replayed += 1
            return AddStatus.REPLAYED
        try:
            return self.aligner.add(event, partition)
        except CapacityError as exc:
            raise EventError(Reason.CAPACITY, str(exc), event.entity) from exc

    def advance(self) -> list[StepResult]:
        """Close every step that can close and run the model on each, in step order."""
        return [self.apply(batch) for batch in self.aligner.close_ready()]

    def flush(self) -> list[StepResult]:
        """Close and apply every open step (end of a finite stream)."""
        return [self.apply(batch) for batch in self.aligner.flush()]

    def apply(self, batch: Batch) -> StepResult:
        self._sync_capacity()
        x, mask = batch.x, batch.mask
        if x.shape[0] < self.model.capacity:  # batch closed before a growth
            pad = self.model.capacity - x.shape[0]
            x = np.pad(x, ((0, pad), (0, 0)))
            mask = np.pad(mask, (0, pad))
        shadow = self.learner.shadow_step(x, mask) if self.learner is not None else None
        out = self.model.step(x, mask)
        comb = self.combiner.step(out.forecasts, out.target, out.valid)
        self.prequential.observe(out.forecasts, out.target, out.valid, published=comb.published)
        if self.learner is not None:
            self.learner.observe(out, shadow)
        rows = batch.slots
        rejected = out.rejected[rows]
        moved = rows[~rejected]  # a rejected row's state did not move
        self.last_step[moved] = batch.step
        self._dirty.update(moved.tolist())
        published = comb.published[rows]
        return StepResult(
            step=batch.step,
            entities=batch.entities,
            slots=rows,
            ts=batch.ts[rows],
            forecasts=out.forecasts[rows],
            levels=self._levels(x[rows, self._target], published),
            valid=out.valid[rows],
            rejected=rejected,
            published=published,
            weights=comb.weight[rows],
            lower=comb.lower[rows],
            upper=comb.upper[rows],
            intervals=self.combiner.levels,
        )

    def reset_entity(self, entity: str) -> None:
        """Forget one entity's state; every other row is untouched."""
        slot = self.registry.slot_of(entity)
        if slot is None:
            raise KeyError(entity)
        self.model.reset_rows([slot])
        self.last_step[slot] = NO_STEP
        self._dirty.add(slot)
        self._forget([slot])

    def remove_entities(self, entities: set[str]) -> None:
        """Free the slots of these entities (partition revoked, or evicted after a checkpoint).

        Their buffered events are dropped; their rows are zeroed for the next occupant.
        """
        self.aligner.drop_entities(entities)
        slots = [self.registry.remove(e) for e in entities if e in self.registry]
        if slots:
            self.model.reset_rows(slots)
            self.last_step[slots] = NO_STEP
            self._dirty.difference_update(slots)
            self._forget(slots)

    @property
    def weights_version(self) -> int:
        return self.learner.version if self.learner is not None else 0

    def mark_dirty(self, slots: list[int]) -> None:
        """Slots to include in the next checkpoint again (a failed write)."""
        self._dirty.update(slots)

    def _forget(self, slots: list[int]) -> None:
        self.prequential.forget_rows(slots)
        self.combiner.forget_rows(slots)
        if self.learner is not None:
            self.learner.forget_rows(slots)

    def idle_entities(self, older_than_steps: int, include_dirty: bool = False) -> set[str]:
        """Entities whose last applied step is more than `older_than_steps` behind the newest
        closed step and that have nothing buffered (safe to evict after a checkpoint; with
        `include_dirty`, also those whose latest state is not stored yet: the checkpoint that
        evicts them writes it)."""
        last_closed = self.aligner.last_closed_step
        if last_closed is None or older_than_steps <= 0:
            return set()
        limit = last_closed - older_than_steps
        pending = self.aligner.pending_entities()
        out = set()
        for entity, slot in self.registry.items():
            clean = include_dirty or slot not in self._dirty
            if self.last_step[slot] < limit and entity not in pending and clean:
                out.add(entity)
        return out

    def take_dirty(self) -> list[int]:
        """Slots changed since the last call, ascending; clears the set."""
        dirty = sorted(s for s in self._dirty if self.registry.entity_at(s) is not None)
        self._dirty.clear()
        return dirty

    def export_rows(self, slots: list[int]) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(entities, state rows [n, layout.size], last steps) of these slots."""
        entities = [self.registry.entity_at(s) or "" for s in slots]
        rows = self.layout.flatten(self.model.bank.read_rows(slots))
        return entities, rows, self.last_step[slots].copy()

    def restore_rows(
        self,
        entities: list[str],
        rows: np.ndarray,
        last_steps: np.ndarray,
        slots_hint: list[int] | None = None,
    ) -> list[int]:
        """Put checkpointed rows back: each entity gets a slot and exactly its stored state.

        With `slots_hint` (the rows they had), entities return to those rows when free;
        the slots they got are returned (a moved entity's row-indexed history is void).
        """
        slots = []
        moved = []
        for i, entity in enumerate(entities):
            hint = slots_hint[i] if slots_hint is not None else -1
            if hint >= 0 and self.registry.place(entity, hint):
                slots.append(hint)
            else:
                slots.append(self.registry.assign(entity))
                moved.append(slots[-1])
        self._sync_capacity()
        if moved and slots_hint is not None:
            self._forget(moved)
        if slots:
            self.model.bank.write_rows(slots, self.layout.unflatten(rows))
            self.last_step[slots] = last_steps
        return slots

    def _sync_capacity(self) -> None:
        cap = self.registry.capacity
        if cap > self.model.capacity:
            self.model.grow(cap)
            self.prequential.grow(cap)
            self.combiner.grow(cap)
            if self.learner is not None:
                self.learner.grow(cap)
        if cap > len(self.last_step):
            grown = np.full(cap, NO_STEP, dtype=np.int64)
            grown[: len(self.last_step)] = self.last_step
            self.last_step = grown

    def _levels(self, last: np.ndarray, forecasts: np.ndarray) -> np.ndarray:
        if self._transform == "none":
            return forecasts
        steps = np.cumsum(forecasts.astype(np.float64), axis=1)
        base = last.astype(np.float64)[:, None]
        if self._transform == "diff":
            return base + steps
        return base * np.exp(steps)
