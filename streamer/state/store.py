"""The state-store contract and its in-memory implementation.

A checkpoint is written per (topic, partition), because partitions are what engines in one
consumer group own and move between them. For each partition it holds:

- `position`: the next offset to read. Every event before it was applied (or refused);
  every event from it on may not have been. A restart seeks there.
- the changed entities of that partition: their state row and the last step applied.
- an owner token: `acquire` hands out a new, larger token per partition; `commit` refuses
  (FencedError) to write a partition whose current token is not the caller's, so an engine
  that lost a partition in a rebalance cannot overwrite its new owner's state.

Positions, rows and the checkpoint's metadata for all partitions are written in one atomic
operation: a reader sees all of a checkpoint or none of it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..errors import FencedError, StateError
from .format import NO_STEP, RowLayout, decode_rows, encode_rows


@dataclass(frozen=True)
class EntityState:
    entity: str
    partition: int
    last_step: int  # NO_STEP when the entity never advanced
    row: np.ndarray  # float32 [layout.size]
    slot: int = -1  # the batch row it had; -1: unknown


@dataclass(frozen=True)
class Checkpoint:
    topic: str
    positions: Mapping[int, int]  # partition -> next offset to read
    entities: Sequence[EntityState] = ()  # only those changed since the last checkpoint
    removed: Sequence[tuple[int, str]] = ()  # (partition, entity) forgotten for good
    step: int | None = None  # last closed step
    weights_version: int = 0
    # Opaque engine-wide state written atomically with the rest (the learner's window),
    # None to leave what is stored untouched.
    extra: bytes | None = None


@dataclass
class LoadedState:
    positions: dict[int, int] = field(default_factory=dict)
    entities: list[EntityState] = field(default_factory=list)
    steps: dict[int, int] = field(default_factory=dict)  # partition -> last closed step
    weights_version: int | None = None
    extra: bytes | None = None


class StateStore(Protocol):
    """Where checkpoints live. Implementations: MemoryStore, RedisStore."""

    def acquire(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        """Take ownership of partitions: a fresh fencing token per partition."""
        ...

    def load(self, topic: str, partitions: Iterable[int], layout: RowLayout) -> LoadedState:
        """The latest checkpoint of these partitions (empty for partitions never written)."""
        ...

    def commit(self, checkpoint: Checkpoint, tokens: Mapping[int, int], layout: RowLayout) -> int:
        """Write atomically if every partition is still ours; returns bytes written."""
        ...

    def load_entity(
        self, topic: str, partition: int, entity: str, layout: RowLayout
    ) -> EntityState | None:
        """One entity's stored state (an evicted entity coming back), or None."""
        ...

    def put_latest(self, forecasts: Mapping[str, bytes]) -> None:
        """Remember the latest forecast message of each entity."""
        ...

    def put_weights(self, version: int, blob: bytes, keep: int) -> None:
        """Store a weights version (weights + optimizer state); keep the newest `keep`."""
        ...

    def get_weights(self, version: int) -> bytes | None: ...

    def get_latest(self, entity: str) -> bytes | None: ...

    def put_quality(self, report: bytes) -> None:
        """Replace the forecast-quality report (prequential scores, JSON)."""
        ...

    def get_quality(self) -> bytes | None: ...

    def close(self) -> None: ...


def rows_and_steps(entities: Sequence[EntityState], layout: RowLayout) -> list[bytes]:
    if not entities:
        return []
    rows = np.stack([e.row for e in entities])
    return encode_rows(layout, rows, [e.last_step for e in entities], [e.slot for e in entities])


def to_entities(
    partition: int, names: Sequence[str], blobs: Sequence[bytes], layout: RowLayout
) -> list[EntityState]:
    rows, steps, slots = decode_rows(layout, blobs, names)
    return [
        EntityState(name, partition, int(steps[i]), rows[i], int(slots[i]))
        for i, name in enumerate(names)
    ]


class MemoryStore:
    """In-process StateStore with the same semantics as RedisStore (unit tests, demos)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: dict[tuple[str, int], int] = {}
        self._positions: dict[tuple[str, int], int] = {}
        self._steps: dict[tuple[str, int], int] = {}
        self._rows: dict[tuple[str, int], dict[str, bytes]] = {}
        self._layout: str | None = None
        self._weights_version: int | None = None
        self._latest: dict[str, bytes] = {}
        self._weights: dict[int, bytes] = {}
        self._extra: bytes | None = None
        self._quality: bytes | None = None

    def load_entity(
        self, topic: str, partition: int, entity: str, layout: RowLayout
    ) -> EntityState | None:
        with self._lock:
            blob = self._rows.get((topic, partition), {}).get(entity)
        return None if blob is None else to_entities(partition, [entity], [blob], layout)[0]

    def put_weights(self, version: int, blob: bytes, keep: int) -> None:
        with self._lock:
            self._weights[version] = blob
            for old in sorted(self._weights)[:-keep]:
                del self._weights[old]

    def get_weights(self, version: int) -> bytes | None:
        with self._lock:
            return self._weights.get(version)

    def acquire(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        with self._lock:
            tokens = {}
            for p in partitions:
                key = (topic, p)
                self._owner[key] = self._owner.get(key, 0) + 1
                tokens[p] = self._owner[key]
            return tokens

    def load(self, topic: str, partitions: Iterable[int], layout: RowLayout) -> LoadedState:
        with self._lock:
            out = LoadedState(weights_version=self._weights_version, extra=self._extra)
            partitions = list(partitions)
            if (
                self._layout is not None
                and self._layout != layout.to_json()
                and any(self._rows.get((topic, p)) for p in partitions)
            ):
                raise StateError("stored states were written with another model layout")
            for p in partitions:
                key = (topic, p)
                if key in self._positions:
                    out.positions[p] = self._positions[key]
                if key in self._steps:
                    out.steps[p] = self._steps[key]
                rows = self._rows.get(key, {})
                out.entities += to_entities(p, list(rows), list(rows.values()), layout)
            return out

    def commit(self, checkpoint: Checkpoint, tokens: Mapping[int, int], layout: RowLayout) -> int:
        blobs = rows_and_steps(checkpoint.entities, layout)
        with self._lock:
            touched = set(checkpoint.positions) | {e.partition for e in checkpoint.entities}
            touched |= {p for p, _ in checkpoint.removed}
            for p in sorted(touched):
                current = self._owner.get((checkpoint.topic, p), 0)
                if tokens.get(p) != current:
                    raise FencedError(checkpoint.topic, p, tokens.get(p, -1), current)
            for p, pos in checkpoint.positions.items():
                self._positions[(checkpoint.topic, p)] = int(pos)
                if checkpoint.step is not None:
                    self._steps[(checkpoint.topic, p)] = checkpoint.step
            for e, blob in zip(checkpoint.entities, blobs, strict=True):
                self._rows.setdefault((checkpoint.topic, e.partition), {})[e.entity] = blob
            for p, name in checkpoint.removed:
                self._rows.get((checkpoint.topic, p), {}).pop(name, None)
            self._layout = layout.to_json()
            self._weights_version = checkpoint.weights_version
            if checkpoint.extra is not None:
                self._extra = checkpoint.extra
            return sum(map(len, blobs))

    def put_latest(self, forecasts: Mapping[str, bytes]) -> None:
        with self._lock:
            self._latest.update(forecasts)

    def get_latest(self, entity: str) -> bytes | None:
        with self._lock:
            return self._latest.get(entity)

    def put_quality(self, report: bytes) -> None:
        with self._lock:
            self._quality = report

    def get_quality(self) -> bytes | None:
        with self._lock:
            return self._quality

    def close(self) -> None:
        pass


__all__ = [
    "NO_STEP",
    "Checkpoint",
    "EntityState",
    "LoadedState",
    "MemoryStore",
    "StateStore",
]
