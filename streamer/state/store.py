"""The state-store contract and its in-memory implementation.

A checkpoint is written per (topic, partition), because partitions are what engines in one
consumer group own and move between them. For each partition it holds:

- `position`: the next offset to read. Every event before it was applied (or refused);
  every event from it on may not have been. A restart seeks there.
- the changed entities of that partition: their state row and the last step applied.
- an owner token: `acquire` hands out a new, larger token per partition; `commit` refuses
  (FencedError) to write a partition whose current token is not the caller's, so an engine
  that lost a partition in a rebalance cannot overwrite its new owner's state.

- `read`: the next offset the engine had read when it wrote the checkpoint (the read mark).
  After a restart, a record below it was seen before the checkpoint, so an old step in it is
  a replay (skipped silently); a record at or above it is new, so an old step in it is late
  (dead-lettered).
- a checkpoint sequence number, incremented by every commit of the partition. A commit names
  the sequence it expects; a store that lost writes (restarted empty, or an append-only file
  that lost its last second) no longer has it, and the commit is refused with
  `StoreLostError` instead of pairing new positions with older rows.

Rows live in two places per partition: resident entities (restored at assignment) and cold
ones (evicted while idle; restored only when their next event arrives), so a partition can
hold many more entities than one engine's capacity.

Positions, rows and the checkpoint's metadata for all partitions are written in one atomic
operation: a reader sees all of a checkpoint or none of it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..errors import FencedError, StateError, StoreLostError
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
    # partition -> next offset read when the checkpoint was taken (see the module docstring)
    read_marks: Mapping[int, int] = field(default_factory=dict)
    # partition -> its watermark (newest event time) from the records before its position
    watermarks: Mapping[int, float] = field(default_factory=dict)
    # Entities evicted by this checkpoint: their rows go to the partition's cold rows.
    evicted: Sequence[EntityState] = ()
    # partition -> the checkpoint sequence the caller expects to find; None: not checked.
    seqs: Mapping[int, int] | None = None

    @property
    def partitions(self) -> list[int]:
        """Every partition this checkpoint writes (each one's sequence moves by one)."""
        touched = set(self.positions) | {e.partition for e in self.entities}
        touched |= {p for p, _ in self.removed} | {e.partition for e in self.evicted}
        return sorted(touched)


@dataclass
class LoadedState:
    positions: dict[int, int] = field(default_factory=dict)
    entities: list[EntityState] = field(default_factory=list)
    steps: dict[int, int] = field(default_factory=dict)  # partition -> last closed step
    weights_version: int | None = None
    extra: bytes | None = None
    read_marks: dict[int, int] = field(default_factory=dict)
    watermarks: dict[int, float] = field(default_factory=dict)
    seqs: dict[int, int] = field(default_factory=dict)  # partition -> checkpoint sequence
    cold: dict[int, int] = field(default_factory=dict)  # partition -> number of cold rows
    # (partition, entity, why): stored rows that could not be used (corrupt, non-finite)
    quarantined: list[tuple[int, str, str]] = field(default_factory=list)


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

    def load_cold(
        self, topic: str, partition: int, entities: Sequence[str], layout: RowLayout
    ) -> tuple[dict[str, EntityState], list[tuple[int, str, str]]]:
        """The cold (evicted) rows of these entities that exist, and the quarantined ones."""
        ...

    def sequences(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        """The checkpoint sequence of each partition (0 for one never written)."""
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


def to_entities_quarantined(
    partition: int, names: Sequence[str], blobs: Sequence[bytes], layout: RowLayout
) -> tuple[list[EntityState], list[tuple[int, str, str]]]:
    """Like `to_entities`, but a row that cannot be used is set aside, not fatal.

    Returns (usable entities, [(partition, entity, why)]): one corrupt or non-finite row
    must cost that entity its state (it starts afresh), never the assignment of a partition.
    """
    try:
        return to_entities(partition, names, blobs, layout), []
    except StateError:
        pass
    good: list[EntityState] = []
    bad: list[tuple[int, str, str]] = []
    for name, blob in zip(names, blobs, strict=True):
        try:
            good += to_entities(partition, [name], [blob], layout)
        except StateError as exc:
            bad.append((partition, name, str(exc)))
    return good, bad


class MemoryStore:
    """In-process StateStore with the same semantics as RedisStore (unit tests, demos)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: dict[tuple[str, int], int] = {}
        self._positions: dict[tuple[str, int], int] = {}
        self._steps: dict[tuple[str, int], int] = {}
        self._rows: dict[tuple[str, int], dict[str, bytes]] = {}
        self._cold: dict[tuple[str, int], dict[str, bytes]] = {}
        self._read: dict[tuple[str, int], int] = {}
        self._wm: dict[tuple[str, int], float] = {}
        self._seq: dict[tuple[str, int], int] = {}
        self._layout: str | None = None
        self._weights_version: int | None = None
        self._latest: dict[str, bytes] = {}
        self._weights: dict[int, bytes] = {}
        self._extra: bytes | None = None
        self._quality: bytes | None = None

    def wipe(self) -> None:
        """Forget everything, as a Redis restarted without persistence does (tests)."""
        with self._lock:
            self.__init__()  # type: ignore[misc]

    def load_entity(
        self, topic: str, partition: int, entity: str, layout: RowLayout
    ) -> EntityState | None:
        with self._lock:
            key = (topic, partition)
            blob = self._rows.get(key, {}).get(entity) or self._cold.get(key, {}).get(entity)
        return None if blob is None else to_entities(partition, [entity], [blob], layout)[0]

    def load_cold(
        self, topic: str, partition: int, entities: Sequence[str], layout: RowLayout
    ) -> tuple[dict[str, EntityState], list[tuple[int, str, str]]]:
        with self._lock:
            cold = self._cold.get((topic, partition), {})
            found = {e: cold[e] for e in entities if e in cold}
        good, bad = to_entities_quarantined(partition, list(found), list(found.values()), layout)
        return {e.entity: e for e in good}, bad

    def sequences(self, topic: str, partitions: Iterable[int]) -> dict[int, int]:
        with self._lock:
            return {p: self._seq.get((topic, p), 0) for p in partitions}

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
                if key in self._read:
                    out.read_marks[p] = self._read[key]
                if key in self._wm:
                    out.watermarks[p] = self._wm[key]
                out.seqs[p] = self._seq.get(key, 0)
                out.cold[p] = len(self._cold.get(key, {}))
                rows = self._rows.get(key, {})
                good, bad = to_entities_quarantined(p, list(rows), list(rows.values()), layout)
                out.entities += good
                out.quarantined += bad
            return out

    def commit(self, checkpoint: Checkpoint, tokens: Mapping[int, int], layout: RowLayout) -> int:
        blobs = rows_and_steps(checkpoint.entities, layout)
        cold_blobs = rows_and_steps(checkpoint.evicted, layout)
        topic = checkpoint.topic
        with self._lock:
            touched = checkpoint.partitions
            for p in touched:
                if (topic, p) not in self._owner:
                    raise StoreLostError(topic, p, "its owner token is gone")
                current = self._owner[(topic, p)]
                if tokens.get(p) != current:
                    raise FencedError(topic, p, tokens.get(p, -1), current)
                if checkpoint.seqs is not None:
                    have = self._seq.get((topic, p), 0)
                    if checkpoint.seqs.get(p, 0) != have:
                        raise StoreLostError(
                            topic,
                            p,
                            f"checkpoint {checkpoint.seqs.get(p, 0)} expected, {have} found",
                        )
            for p, pos in checkpoint.positions.items():
                self._positions[(topic, p)] = int(pos)
                if checkpoint.step is not None:
                    self._steps[(topic, p)] = checkpoint.step
            for p, mark in checkpoint.read_marks.items():
                self._read[(topic, p)] = int(mark)
            for p, wm in checkpoint.watermarks.items():
                self._wm[(topic, p)] = float(wm)
            for e, blob in zip(checkpoint.entities, blobs, strict=True):
                self._rows.setdefault((topic, e.partition), {})[e.entity] = blob
                self._cold.get((topic, e.partition), {}).pop(e.entity, None)
            for e, blob in zip(checkpoint.evicted, cold_blobs, strict=True):
                self._cold.setdefault((topic, e.partition), {})[e.entity] = blob
                self._rows.get((topic, e.partition), {}).pop(e.entity, None)
            for p, name in checkpoint.removed:
                self._rows.get((topic, p), {}).pop(name, None)
                self._cold.get((topic, p), {}).pop(name, None)
            for p in touched:
                self._seq[(topic, p)] = self._seq.get((topic, p), 0) + 1
            self._layout = layout.to_json()
            self._weights_version = checkpoint.weights_version
            if checkpoint.extra is not None:
                self._extra = checkpoint.extra
            return sum(map(len, blobs)) + sum(map(len, cold_blobs))

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
    "StoreLostError",
]
