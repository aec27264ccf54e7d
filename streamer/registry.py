"""Entity -> slot: which batch row an entity occupies, for as long as it lives.

Row i of every batch is the same entity (the stateful-LSTM contract), so a slot is never
re-packed or shuffled. New entities take the lowest free slot; when none is free the
capacity grows geometrically up to `max_entities`, which only appends rows: existing rows
keep their index and therefore their state.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator

from .config import CapacityConfig
from .errors import CapacityError


class SlotRegistry:
    def __init__(self, config: CapacityConfig) -> None:
        self._max = config.max_entities
        self._growth = config.growth
        self._capacity = config.initial
        self._slot_of: dict[str, int] = {}
        self._entity_at: list[str | None] = [None] * self._capacity
        self._free: list[int] = list(range(self._capacity))
        heapq.heapify(self._free)

    @property
    def capacity(self) -> int:
        """Number of batch rows; every batch has exactly this many."""
        return self._capacity

    @property
    def max_entities(self) -> int:
        return self._max

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, entity: object) -> bool:
        return entity in self._slot_of

    def __iter__(self) -> Iterator[str]:
        return iter(self._slot_of)

    def slot_of(self, entity: str) -> int | None:
        return self._slot_of.get(entity)

    def entity_at(self, slot: int) -> str | None:
        return self._entity_at[slot]

    def items(self) -> Iterator[tuple[str, int]]:
        return iter(self._slot_of.items())

    def assign(self, entity: str) -> int:
        """The entity's slot, taking the lowest free one (growing if needed) for a new entity."""
        slot = self._slot_of.get(entity)
        if slot is not None:
            return slot
        if not self._free:
            self._grow(entity)
        slot = heapq.heappop(self._free)
        self._slot_of[entity] = slot
        self._entity_at[slot] = entity
        return slot

    def place(self, entity: str, slot: int) -> bool:
        """Put an entity back at the row it had (restore); False if that row is taken.

        Grows the capacity as `assign` would until the row exists. Restoring the same rows
        keeps everything indexed by row (the learner's window) valid across a restart.
        """
        if entity in self._slot_of:
            return self._slot_of[entity] == slot
        while slot >= self._capacity:
            self._grow(entity)
        if self._entity_at[slot] is not None:
            return False
        self._free.remove(slot)
        heapq.heapify(self._free)
        self._slot_of[entity] = slot
        self._entity_at[slot] = entity
        return True

    def remove(self, entity: str) -> int:
        """Free the entity's slot and return it; the caller must reset that row's state."""
        slot = self._slot_of.pop(entity)
        self._entity_at[slot] = None
        heapq.heappush(self._free, slot)
        return slot

    def restore(self, assignments: dict[str, int], capacity: int) -> None:
        """Rebuild from a checkpoint: exactly these entity -> slot pairs at this capacity."""
        if capacity > self._max or capacity < 1:
            raise CapacityError("<restore>", self._max)
        slots = list(assignments.values())
        if any(isinstance(s, bool) or not isinstance(s, int) for s in slots):
            raise ValueError("slot assignments must be integers")
        if len(set(slots)) != len(slots) or any(not 0 <= s < capacity for s in slots):
            raise ValueError("slot assignments overlap or fall outside the capacity")
        self._capacity = capacity
        self._slot_of = dict(assignments)
        self._entity_at = [None] * capacity
        for entity, slot in assignments.items():
            self._entity_at[slot] = entity
        taken = set(assignments.values())
        self._free = [s for s in range(capacity) if s not in taken]
        heapq.heapify(self._free)

    def _grow(self, entity: str) -> None:
        if self._capacity >= self._max:
            raise CapacityError(entity, self._max)
        new = min(self._max, max(self._capacity + 1, math.ceil(self._capacity * self._growth)))
        self._entity_at.extend([None] * (new - self._capacity))
        for s in range(self._capacity, new):
            heapq.heappush(self._free, s)
        self._capacity = new
