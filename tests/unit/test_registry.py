"""SlotRegistry: an entity keeps its batch row for as long as it lives.

The stateful-LSTM contract: row i of every batch is the same entity, so slots are never
re-packed; growth only appends rows; freed rows are reused lowest first.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from streamer.config import CapacityConfig
from streamer.errors import CapacityError, StreamerError
from streamer.registry import SlotRegistry


def registry(initial: int = 4, max_entities: int = 20, growth: float = 2.0) -> SlotRegistry:
    return SlotRegistry(CapacityConfig(initial=initial, max_entities=max_entities, growth=growth))


def filled(reg: SlotRegistry, n: int, prefix: str = "e") -> list[str]:
    names = [f"{prefix}{i}" for i in range(n)]
    for name in names:
        reg.assign(name)
    return names


# --- assign and remove ----------------------------------------------------------------------


def test_a_new_registry_is_empty_at_its_initial_capacity() -> None:
    reg = registry(initial=3, max_entities=9)

    assert reg.capacity == 3
    assert reg.max_entities == 9
    assert len(reg) == 0
    assert list(reg) == []
    assert [reg.entity_at(s) for s in range(3)] == [None, None, None]
    assert reg.slot_of("a") is None
    assert "a" not in reg


def test_new_entities_take_consecutive_slots() -> None:
    reg = registry()

    assert [reg.assign(name) for name in ("a", "b", "c")] == [0, 1, 2]
    assert dict(reg.items()) == {"a": 0, "b": 1, "c": 2}
    assert list(reg) == ["a", "b", "c"]
    assert [reg.entity_at(s) for s in range(4)] == ["a", "b", "c", None]
    assert "b" in reg
    assert reg.slot_of("c") == 2


def test_assign_is_idempotent() -> None:
    reg = registry()
    reg.assign("a")
    reg.assign("b")

    assert reg.assign("a") == 0
    assert reg.assign("b") == 1
    assert reg.assign("a") == 0
    assert len(reg) == 2
    # A repeated assign took no slot: the next new entity still gets slot 2.
    assert reg.assign("c") == 2


def test_remove_frees_the_slot_and_returns_it() -> None:
    reg = registry()
    filled(reg, 3)

    assert reg.remove("e1") == 1
    assert "e1" not in reg
    assert reg.slot_of("e1") is None
    assert reg.entity_at(1) is None
    assert len(reg) == 2
    assert dict(reg.items()) == {"e0": 0, "e2": 2}


def test_the_lowest_free_slot_is_reused_first() -> None:
    reg = registry(initial=8, max_entities=8)
    filled(reg, 6)
    reg.remove("e4")
    reg.remove("e1")
    reg.remove("e3")

    assert reg.assign("x") == 1
    assert reg.assign("y") == 3
    assert reg.assign("z") == 4
    assert reg.assign("w") == 6  # no freed slot left: the first never-used one
    assert reg.capacity == 8


def test_a_removed_entity_coming_back_is_a_new_entity() -> None:
    reg = registry()
    filled(reg, 3)
    reg.remove("e2")
    reg.remove("e0")

    assert reg.assign("e2") == 0  # lowest free, not its old row
    assert reg.entity_at(2) is None


def test_remove_leaves_the_other_entities_in_place() -> None:
    reg = registry(initial=8, max_entities=8)
    filled(reg, 8)
    before = dict(reg.items())

    reg.remove("e3")

    assert dict(reg.items()) == {e: s for e, s in before.items() if e != "e3"}


# --- growth ---------------------------------------------------------------------------------


def test_capacity_grows_by_the_growth_factor_up_to_max_entities() -> None:
    reg = registry(initial=4, max_entities=20, growth=2.0)
    capacities = []
    for i in range(20):
        slot = reg.assign(f"e{i}")
        assert slot == i
        capacities.append(reg.capacity)

    assert capacities == [4] * 4 + [8] * 4 + [16] * 8 + [20] * 4
    assert [reg.entity_at(s) for s in range(20)] == [f"e{i}" for i in range(20)]


@pytest.mark.parametrize(
    ("initial", "growth", "grown"),
    [
        (3, 1.5, 5),  # ceil(4.5)
        (2, 1.01, 3),  # at least one new row even when the factor rounds to nothing
        (1, 1.5, 2),
        (10, 3.0, 30),
        (7, 1.25, 9),  # ceil(8.75)
    ],
)
def test_one_growth_step(initial: int, growth: float, grown: int) -> None:
    reg = registry(initial=initial, max_entities=1000, growth=growth)
    filled(reg, initial)

    assert reg.capacity == initial
    assert reg.assign("new") == initial  # the first appended row
    assert reg.capacity == grown


def test_growth_never_moves_an_existing_entity() -> None:
    reg = registry(initial=2, max_entities=64, growth=2.0)
    filled(reg, 5)
    reg.remove("e1")
    reg.remove("e3")
    before = dict(reg.items())

    filled(reg, 40, prefix="n")

    assert reg.capacity == 64
    assert {e: reg.slot_of(e) for e in before} == before


def test_capacity_error_beyond_max_entities_quotes_the_entity() -> None:
    reg = registry(initial=2, max_entities=5, growth=2.0)
    filled(reg, 5)

    with pytest.raises(CapacityError) as info:
        reg.assign("overflow-1")

    error = info.value
    assert isinstance(error, StreamerError)
    assert error.entity == "overflow-1"
    assert error.max_entities == 5
    assert '"overflow-1"' in str(error)
    assert "5" in str(error)
    # A refused assign changes nothing.
    assert "overflow-1" not in reg
    assert len(reg) == 5
    assert reg.capacity == 5
    assert reg.assign("e4") == 4  # existing entities still resolve at the cap


def test_a_freed_slot_is_usable_again_at_the_cap() -> None:
    reg = registry(initial=3, max_entities=3)
    filled(reg, 3)
    with pytest.raises(CapacityError):
        reg.assign("x")

    reg.remove("e1")

    assert reg.assign("x") == 1
    assert reg.capacity == 3


# --- restore --------------------------------------------------------------------------------


def test_restore_rebuilds_exactly() -> None:
    reg = registry(initial=4, max_entities=20)
    filled(reg, 3, prefix="old")

    reg.restore({"a": 5, "b": 0, "c": 2}, capacity=8)

    assert reg.capacity == 8
    assert len(reg) == 3
    assert dict(reg.items()) == {"a": 5, "b": 0, "c": 2}
    assert [reg.entity_at(s) for s in range(8)] == ["b", None, "c", None, None, "a", None, None]
    assert all(f"old{i}" not in reg for i in range(3))
    # Free slots after a restore are the gaps, lowest first, then growth from 8.
    assert [reg.assign(n) for n in ("d", "e", "f", "g", "h", "i")] == [1, 3, 4, 6, 7, 8]
    assert reg.capacity == 16


def test_restore_may_shrink_to_the_checkpointed_capacity() -> None:
    reg = registry(initial=16, max_entities=20)

    reg.restore({"a": 1}, capacity=2)

    assert reg.capacity == 2
    assert reg.assign("b") == 0
    assert reg.assign("c") == 2
    assert reg.capacity == 4


def test_restore_of_nothing_empties_the_registry() -> None:
    reg = registry()
    filled(reg, 4)

    reg.restore({}, capacity=4)

    assert len(reg) == 0
    assert reg.assign("x") == 0


def test_restore_accepts_max_entities_as_capacity() -> None:
    reg = registry(initial=1, max_entities=6)

    reg.restore({"a": 5}, capacity=6)

    assert reg.capacity == 6
    assert reg.entity_at(5) == "a"


@pytest.mark.parametrize(
    ("assignments", "capacity", "error"),
    [
        pytest.param({"a": 0, "b": 0}, 4, ValueError, id="overlap"),
        pytest.param({"a": 1, "b": 2, "c": 1}, 4, ValueError, id="overlap-three"),
        pytest.param({"a": 4}, 4, ValueError, id="slot-at-capacity"),
        pytest.param({"a": 9}, 4, ValueError, id="slot-beyond-capacity"),
        pytest.param({"a": -1}, 4, ValueError, id="negative-slot"),
        pytest.param({"a": 0}, 21, CapacityError, id="capacity-above-max"),
        pytest.param({}, 0, CapacityError, id="capacity-zero"),
        pytest.param({}, -3, CapacityError, id="capacity-negative"),
    ],
)
def test_restore_rejects_bad_checkpoints_and_changes_nothing(
    assignments: dict[str, int], capacity: int, error: type[Exception]
) -> None:
    reg = registry(initial=4, max_entities=20)
    filled(reg, 2)

    with pytest.raises(error):
        reg.restore(assignments, capacity)

    assert dict(reg.items()) == {"e0": 0, "e1": 1}
    assert reg.capacity == 4
    assert reg.assign("next") == 2


def test_restore_rejects_a_non_integer_slot_and_changes_nothing() -> None:
    """BUG: restore validates only uniqueness and range; a slot of 1.0 (a float from a
    decoded checkpoint) passes `0 <= s < capacity`, the registry's capacity and map are
    already replaced, then `_entity_at[1.0] = ...` raises TypeError, leaving it half-restored."""
    reg = registry(initial=4, max_entities=20)
    filled(reg, 2)

    with pytest.raises((ValueError, StreamerError)):
        reg.restore({"a": 1.0}, capacity=8)  # type: ignore[dict-item]

    assert dict(reg.items()) == {"e0": 0, "e1": 1}
    assert reg.capacity == 4


# --- properties -----------------------------------------------------------------------------

NAMES = [f"e{i}" for i in range(24)]


class RegistryMachine(RuleBasedStateMachine):
    """Random assign/remove sequences against a plain dict model of entity -> slot."""

    def __init__(self) -> None:
        super().__init__()
        self.reg: SlotRegistry
        self.model: dict[str, int] = {}
        self.capacity = 0

    @initialize(
        initial=st.integers(1, 6),
        extra=st.integers(0, 14),
        growth=st.floats(1.01, 3.0),
    )
    def start(self, initial: int, extra: int, growth: float) -> None:
        self.growth = growth
        self.reg = registry(initial=initial, max_entities=initial + extra, growth=growth)
        self.capacity = initial

    @rule(entity=st.sampled_from(NAMES))
    def assign(self, entity: str) -> None:
        if entity in self.model:
            assert self.reg.assign(entity) == self.model[entity]
            return
        free = sorted(set(range(self.capacity)) - set(self.model.values()))
        if not free and self.capacity == self.reg.max_entities:
            with pytest.raises(CapacityError):
                self.reg.assign(entity)
            return
        slot = self.reg.assign(entity)
        # Lowest free slot; with none free, the first row that growth appended.
        assert slot == (free[0] if free else self.capacity)
        if not free:
            grown = self.reg.capacity
            assert grown == self.reg.max_entities or grown >= self.capacity * self.growth
            assert grown <= max(self.capacity + 1, math.ceil(self.capacity * self.growth))
        self.model[entity] = slot

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        entity = data.draw(st.sampled_from(sorted(self.model)))
        assert self.reg.remove(entity) == self.model.pop(entity)

    @invariant()
    def slots_match_the_model(self) -> None:
        # The model keeps the slot given at assignment, so this also says that no entity's
        # slot changed while it lived, whatever growth happened in between.
        assert dict(self.reg.items()) == self.model
        assert len(self.reg) == len(self.model)

    @invariant()
    def slots_are_unique_and_inside_the_capacity(self) -> None:
        slots = list(self.model.values())
        assert len(set(slots)) == len(slots)
        assert all(0 <= s < self.reg.capacity for s in slots)
        for slot in range(self.reg.capacity):
            entity = self.reg.entity_at(slot)
            assert entity is None or self.model[entity] == slot

    @invariant()
    def capacity_never_shrinks_nor_exceeds_the_cap(self) -> None:
        assert self.capacity <= self.reg.capacity <= self.reg.max_entities
        self.capacity = self.reg.capacity


RegistryMachine.TestCase.settings = settings(
    max_examples=120, stateful_step_count=40, deadline=None
)
TestRegistryMachine = RegistryMachine.TestCase


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(st.tuples(st.booleans(), st.sampled_from(NAMES)), max_size=60),
    after=st.lists(st.sampled_from([f"n{i}" for i in range(8)]), max_size=8),
)
def test_a_restored_registry_behaves_like_the_original(
    ops: list[tuple[bool, str]], after: list[str]
) -> None:
    original = registry(initial=2, max_entities=40, growth=1.5)
    for add, entity in ops:
        if add:
            original.assign(entity)
        elif entity in original:
            original.remove(entity)
    copy = registry(initial=2, max_entities=40, growth=1.5)

    copy.restore(dict(original.items()), original.capacity)

    assert dict(copy.items()) == dict(original.items())
    assert copy.capacity == original.capacity
    assert [copy.assign(e) for e in after] == [original.assign(e) for e in after]
    assert copy.capacity == original.capacity
