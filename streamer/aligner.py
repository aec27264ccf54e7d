"""Lines the events of all entities up into one batch per step.

`step = floor(ts / interval)`. A step closes, strictly in step order, when every active
entity has reported for it or when the watermark (max event time seen minus
`allowed_lateness`) passes the step's end. "Active" means registered in the slot registry.
Before the first step has closed the set of entities is not known yet (at a cold start the
first event alone would look "complete"), so the first step closes by watermark only.

The watermark is per source partition (as in Flink): the engine names the partitions that
still hold unread data (`set_watermark_partitions`), and the watermark is the smallest of
their newest event times, so a step does not close while a partition that is behind may still
hold events for it. Whether an event is late then depends only on its own partition's order,
not on how the consumer happens to interleave partitions; replays after a crash close the
same steps with the same events.

A closed step becomes a `Batch`: X[capacity, features] with the row of each entity at its
registry slot, and a mask that is False for entities without an event in that step.

Within an open step, a second event for the same entity replaces the first (counted as a
duplicate), or is dropped under `stream.duplicates = "first"`. An event is late, counted and
reported to the caller, never applied, when its step is at or before the last closed step, or
when its own partition's watermark (the newest event time read from that partition minus
`allowed_lateness`) has already passed the step's end. The second rule is what makes the
decision depend on the order of records in the partition alone: a correction for step 2 read
after its partition reached step 90 is late whether the consumer reads it live (step 2 long
closed) or from a backlog in one large poll (step 2 perhaps still open).

Determinism: with a known entity set, the batches do not depend on how the events of
different entities interleave (each entity's own events keep their order, as one Kafka
partition keeps them). Under "replace", a duplicate that arrives after its step closed is
late instead of replacing, so with duplicates the outcome depends on arrival order; "first"
removes that dependence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from .config import StreamConfig
from .errors import EventError, Reason
from .events import Event, step_of
from .registry import SlotRegistry


class AddStatus(StrEnum):
    ACCEPTED = "accepted"
    REPLACED = "replaced"  # a duplicate (entity, step): the newer event replaced the older
    DUPLICATE = "duplicate"  # a duplicate (entity, step) dropped under duplicates = "first"
    REPLAYED = "replayed"  # at or before the entity's last applied step: skipped (idempotence)
    LATE = "late"  # its step already closed; not applied


@dataclass(frozen=True)
class Batch:
    """One closed step. Row i is the entity at slot i; `mask[i]` says whether it reported."""

    step: int
    x: np.ndarray  # float32 [capacity, features]
    mask: np.ndarray  # bool [capacity]
    ts: np.ndarray  # float64 [capacity]; event time of each present row, NaN elsewhere
    entities: tuple[str, ...]  # present entities, in slot order
    slots: np.ndarray  # int64 [present]: their slots, ascending


class StepAligner:
    def __init__(self, config: StreamConfig, registry: SlotRegistry) -> None:
        self._interval = config.interval
        self._lateness = config.allowed_lateness
        self._max_jump = config.max_step_jump
        self._keep_first = config.duplicates == "first"
        self._n_features = len(config.features)
        self._registry = registry
        self._open: dict[int, dict[str, Event]] = {}
        self._last_closed: int | None = None
        self._max_ts = -math.inf
        self._partition_max_ts: dict[int, float] = {}
        self._watermark_partitions: frozenset[int] = frozenset()
        self.duplicates = 0
        self.late = 0

    @property
    def last_closed_step(self) -> int | None:
        return self._last_closed

    @property
    def watermark(self) -> float:
        if self._watermark_partitions:
            newest = min(
                self._partition_max_ts.get(p, -math.inf) for p in self._watermark_partitions
            )
        else:
            newest = self._max_ts
        return newest - self._lateness

    def set_watermark_partitions(self, partitions: set[int] | frozenset[int]) -> None:
        """Partitions that may still hold older events (not caught up); empty: all are."""
        self._watermark_partitions = frozenset(partitions)

    @property
    def open_steps(self) -> list[int]:
        return sorted(self._open)

    def pending_entities(self) -> set[str]:
        """Entities with an event waiting in an open step (must not be evicted)."""
        return {e for bucket in self._open.values() for e in bucket}

    def drop_entities(self, entities: set[str]) -> int:
        """Forget buffered events of these entities (their partition moved away)."""
        dropped = 0
        for bucket in self._open.values():
            for entity in entities & bucket.keys():
                del bucket[entity]
                dropped += 1
        for step in [s for s, b in self._open.items() if not b]:
            del self._open[step]
        return dropped

    def resume_after(self, step: int | None) -> None:
        """Treat every step up to `step` as closed (restart from a checkpoint)."""
        self._last_closed = step

    def add(self, event: Event, partition: int = 0) -> AddStatus:
        """Buffer `event` in its step. Raises EventError/CapacityError for refused events."""
        step = step_of(event.ts, self._interval)
        if self._last_closed is not None and step <= self._last_closed:
            self.late += 1
            return AddStatus.LATE
        own = self._partition_max_ts.get(partition, -math.inf) - self._lateness
        if own > -math.inf and step < step_of(own, self._interval):
            self.late += 1
            return AddStatus.LATE
        # The newest step known: from the events seen, or after a restart (no event seen yet)
        # the checkpoint's last closed step, so a stray first event cannot jump ahead either.
        newest = (
            step_of(self._max_ts, self._interval) if self._max_ts > -math.inf else self._last_closed
        )
        if newest is not None and step - newest > self._max_jump:
            raise EventError(
                Reason.TS_TOO_FAR_AHEAD,
                f'entity "{event.entity}": step {step} is {step - newest} steps ahead of the '
                f"newest step known (stream.max_step_jump={self._max_jump})",
                event.entity,
            )
        # The partition's time moves with every event in its order, even one refused for
        # lack of a row below: a partition whose events are all refused must still let
        # steps close (and entities become idle), and lateness must not depend on capacity.
        self.observe_time(partition, event.ts)
        self._registry.assign(event.entity)
        bucket = self._open.setdefault(step, {})
        status = AddStatus.ACCEPTED
        if event.entity in bucket:
            self.duplicates += 1
            if self._keep_first:
                return AddStatus.DUPLICATE
            status = AddStatus.REPLACED
        bucket[event.entity] = event
        return status

    def observe_time(self, partition: int, ts: float) -> None:
        """Advance a partition's newest event time without buffering anything: a replayed
        event (already applied before a restart) moves the watermark as it did then."""
        if ts > self._partition_max_ts.get(partition, -math.inf):
            self._partition_max_ts[partition] = ts
        if ts > self._max_ts:
            self._max_ts = ts

    def partition_max_ts(self, partition: int) -> float:
        return self._partition_max_ts.get(partition, -math.inf)

    def forget_partition(self, partition: int) -> None:
        self._partition_max_ts.pop(partition, None)

    def close_ready(self, limit: int | None = None) -> list[Batch]:
        """Close, in step order, every step that is complete or behind the watermark (at most
        `limit` of them: the caller bounds the work between two polls)."""
        out: list[Batch] = []
        watermark = self.watermark
        # The step the watermark is in; every step before it is over. Integer steps (not
        # `watermark >= (step + 1) * interval`) keep this consistent with `step_of`.
        watermark_step = step_of(watermark, self._interval) if watermark > -math.inf else None
        while self._open and (limit is None or len(out) < limit):
            step = min(self._open)
            complete = self._last_closed is not None and len(self._open[step]) >= len(
                self._registry
            )
            if complete or (watermark_step is not None and watermark_step > step):
                out.append(self._close(step))
            else:
                break
        return out

    def flush(self) -> list[Batch]:
        """Close every open step (end of a finite stream)."""
        return [self._close(step) for step in sorted(self._open)]

    def _close(self, step: int) -> Batch:
        bucket = self._open.pop(step)
        capacity = self._registry.capacity
        x = np.zeros((capacity, self._n_features), dtype=np.float32)
        mask = np.zeros(capacity, dtype=bool)
        ts = np.full(capacity, np.nan)
        placed = []
        for entity, event in bucket.items():
            slot = self._registry.assign(entity)
            x[slot] = event.values
            mask[slot] = True
            ts[slot] = event.ts
            placed.append((slot, entity))
        placed.sort()
        self._last_closed = step
        return Batch(
            step=step,
            x=x,
            mask=mask,
            ts=ts,
            entities=tuple(e for _, e in placed),
            slots=np.fromiter((s for s, _ in placed), dtype=np.int64, count=len(placed)),
        )
