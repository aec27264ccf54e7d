"""Step aligner: batching, closing rules, duplicates and late events."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.aligner import AddStatus, StepAligner
from streamer.config import CapacityConfig, StreamConfig
from streamer.errors import EventError, Reason
from streamer.events import Event
from streamer.registry import SlotRegistry

T0 = 1_767_225_600.0  # a step boundary for interval 1 and 10


def make(
    lateness=0.0, interval=1.0, max_jump=10_000, capacity=4, max_entities=64, duplicates="replace"
):
    cfg = StreamConfig(
        duplicates=duplicates,
        features=("a", "b"),
        target="a",
        target_transform="none",
        interval=interval,
        allowed_lateness=lateness,
        max_step_jump=max_jump,
    )
    registry = SlotRegistry(CapacityConfig(initial=capacity, max_entities=max_entities))
    return StepAligner(cfg, registry), registry


def ev(entity, step, value, offset=0.5, interval=1.0):
    return Event(entity, T0 + (step + offset) * interval, (float(value), -float(value)))


def as_dicts(batches, registry):
    """Batches as (step, {entity: values}) so row order does not matter."""
    out = []
    for b in batches:
        rows = {}
        for entity, slot in zip(b.entities, b.slots, strict=True):
            assert registry.slot_of(entity) == slot
            assert b.mask[slot]
            rows[entity] = tuple(b.x[slot].tolist())
        assert int(b.mask.sum()) == len(rows)
        out.append((b.step, rows))
    return out


def test_first_step_closes_by_watermark_only():
    """At a cold start the entity set is unknown: one event must not look complete."""
    al, reg = make(lateness=0.0)
    base = math.floor(T0)
    assert al.add(ev("A", 0, 1)) is AddStatus.ACCEPTED
    assert al.close_ready() == []
    assert al.add(ev("B", 0, 2)) is AddStatus.ACCEPTED
    assert al.close_ready() == []
    al.add(ev("A", 1, 3, offset=0.0))  # watermark reaches the end of step 0
    [batch] = al.close_ready()
    assert batch.step == base
    assert batch.entities == ("A", "B")
    assert batch.x[reg.slot_of("A")].tolist() == [1.0, -1.0]
    assert batch.mask.tolist() == [True, True, False, False]
    assert al.last_closed_step == base


def test_later_steps_close_when_every_active_entity_reported():
    al, _ = make(lateness=100.0)
    al.add(ev("A", 0, 1))
    al.add(ev("B", 0, 1))
    assert len(al.flush()) == 1
    al.add(ev("A", 1, 1))
    assert al.close_ready() == []
    al.add(ev("B", 1, 1))
    [batch] = al.close_ready()
    assert batch.step == math.floor(T0) + 1


def test_incomplete_step_waits_for_watermark_and_masks_absent_rows():
    al, reg = make(lateness=2.0)
    for e in ("A", "B", "C"):
        al.add(ev(e, 0, 1))
    assert len(al.flush()) == 1
    al.add(ev("A", 1, 5))
    al.add(ev("B", 1, 6))
    assert al.close_ready() == []  # C has not reported for step 1
    al.add(ev("A", 2, 7))
    al.add(ev("A", 3, 8))
    assert al.close_ready() == []  # watermark = T0+3.5-2 = end of step 1 not yet passed
    al.add(ev("A", 4, 9, offset=0.0))  # watermark reaches T0 + 2.0: step 1 is over
    [b1] = al.close_ready()
    assert b1.step == math.floor(T0) + 1
    assert not b1.mask[reg.slot_of("C")]
    assert b1.entities == ("A", "B")


def test_duplicate_in_open_step_replaces_and_is_counted():
    al, _ = make(lateness=100.0)
    al.add(ev("A", 0, 1))
    al.add(ev("B", 0, 1))
    al.add(ev("B", 1, 2))
    assert al.add(ev("B", 1, 3)) is AddStatus.REPLACED
    assert al.duplicates == 1
    batches = al.close_ready() + al.flush()
    assert batches[-1].x[batches[-1].slots[list(batches[-1].entities).index("B")]][0] == 3.0


def test_event_for_closed_step_is_late_and_not_applied():
    al, reg = make()
    al.add(ev("A", 0, 1))
    [_] = al.flush()
    assert al.add(ev("A", 0, 99)) is AddStatus.LATE
    assert al.add(ev("B", -3, 99)) is AddStatus.LATE
    assert al.late == 2
    assert "B" not in reg  # a late event does not even register its entity
    assert al.flush() == []


def test_steps_close_in_order_even_if_a_later_one_completes_first():
    al, _ = make(lateness=100.0)
    al.add(ev("A", 0, 1))
    al.add(ev("B", 0, 1))
    assert len(al.flush()) == 1
    al.add(ev("A", 1, 1))  # step 1 waits for B
    al.add(ev("A", 2, 2))
    al.add(ev("B", 2, 2))  # step 2 is complete, but step 1 is not
    assert al.close_ready() == []
    al.add(ev("B", 1, 1))
    assert [b.step - math.floor(T0) for b in al.close_ready()] == [1, 2]


def test_event_too_far_ahead_is_refused():
    al, _ = make(max_jump=5)
    al.add(ev("A", 0, 1))
    with pytest.raises(EventError) as err:
        al.add(ev("A", 6, 1))
    assert err.value.reason is Reason.TS_TOO_FAR_AHEAD
    assert al.add(ev("A", 5, 1)) is AddStatus.ACCEPTED


def test_batch_rows_follow_registry_slots_across_growth():
    al, reg = make(capacity=2, lateness=100.0)
    for e in ("A", "B", "C"):
        al.add(ev(e, 0, ord(e)))
    [b] = al.flush()
    assert reg.capacity == 4 and b.x.shape == (4, 2)
    for e in ("A", "B", "C"):
        assert b.x[reg.slot_of(e)][0] == ord(e)


# ------------------------------------------------------------------ properties

ENTITIES = ("A", "B", "C", "D")


@st.composite
def streams(draw, duplicates=True):
    """Per-entity event lists (ordered, as one Kafka partition keeps them)."""
    n_steps = draw(st.integers(1, 6))
    per_entity = {}
    for e in ENTITIES:
        steps = sorted(
            draw(st.lists(st.integers(0, n_steps - 1), max_size=8, unique=not duplicates))
        )
        per_entity[e] = [
            ev(e, s, draw(st.integers(-50, 50)), offset=draw(st.floats(0.0, 0.99))) for s in steps
        ]
    return per_entity


@st.composite
def interleavings(draw, per_entity):
    """An arbitrary merge of the per-entity lists that keeps each entity's order."""
    queues = {e: list(evs) for e, evs in per_entity.items() if evs}
    order = []
    while queues:
        e = draw(st.sampled_from(sorted(queues)))
        order.append(queues[e].pop(0))
        if not queues[e]:
            del queues[e]
    return order


def run_stream(events, lateness, known=ENTITIES, duplicates="replace"):
    al, reg = make(lateness=lateness, duplicates=duplicates)
    for e in known:  # a fixed entity set, as after a restart from a checkpoint
        reg.assign(e)
    al.resume_after(math.floor(T0) - 1)
    statuses = []
    batches = []
    for event in events:
        statuses.append(al.add(event))
        batches += al.close_ready()
    batches += al.flush()
    return as_dicts(batches, reg), statuses, al


@settings(max_examples=150, deadline=None)
@given(data=st.data(), policy=st.sampled_from(["replace", "first"]))
def test_any_interleaving_gives_the_same_batches(data, policy):
    # Under "replace" a duplicate may land after its step closed, so only duplicate-free
    # streams are order-independent; under "first" every stream is.
    per_entity = data.draw(streams(duplicates=policy == "first"))
    a = data.draw(interleavings(per_entity))
    b = data.draw(interleavings(per_entity))
    # Lateness that covers the whole stream: steps close by completeness or at flush only.
    batches_a, status_a, _ = run_stream(a, lateness=1e6, duplicates=policy)
    batches_b, _, _ = run_stream(b, lateness=1e6, duplicates=policy)
    assert batches_a == batches_b
    n_events = sum(len(v) for v in per_entity.values())
    assert sum(len(rows) for _, rows in batches_a) == len(
        {(e.entity, math.floor(e.ts)) for v in per_entity.values() for e in v}
    )
    assert len(status_a) == n_events


def test_keep_first_drops_the_second_event():
    al, _ = make(lateness=100.0, duplicates="first")
    al.add(ev("A", 0, 1))
    assert al.add(ev("A", 0, 2)) is AddStatus.DUPLICATE
    [b] = al.flush()
    assert b.x[b.slots[0]][0] == 1.0
    assert al.duplicates == 1


@settings(max_examples=200, deadline=None)
@given(data=st.data(), lateness=st.floats(0.0, 3.0))
def test_late_and_duplicate_events_are_never_applied(data, lateness):
    per_entity = data.draw(streams())
    order = data.draw(interleavings(per_entity))
    batches, statuses, al = run_stream(order, lateness=lateness)
    # Every closed step appears once, in increasing order.
    steps = [s for s, _ in batches]
    assert steps == sorted(set(steps))
    # What each batch holds is, per (entity, step), the last *accepted* event, and a late
    # event's value never shows up in place of it.
    expected: dict[tuple[str, int], tuple[float, float]] = {}
    for event, status in zip(order, statuses, strict=True):
        key = (event.entity, math.floor(event.ts))
        if status is AddStatus.LATE:
            continue
        expected[key] = event.values
    got = {(e, s): values for s, rows in batches for e, values in rows.items()}
    assert got == expected
    assert al.late == statuses.count(AddStatus.LATE)
    assert al.duplicates == statuses.count(AddStatus.REPLACED)
    # A late event is always for a step at or before a step that had closed when it came.
    closed_before = -np.inf
    al2, reg2 = make(lateness=lateness)
    for e in ENTITIES:
        reg2.assign(e)
    al2.resume_after(math.floor(T0) - 1)
    newest = -np.inf  # newest event time accepted from the (single) partition so far
    for event in order:
        status = al2.add(event)
        if status is AddStatus.LATE:
            # Late: its step had closed, or the partition's own watermark had passed it.
            assert math.floor(event.ts) <= closed_before or math.floor(event.ts) < math.floor(
                newest - lateness
            )
        else:
            newest = max(newest, event.ts)
        for b in al2.close_ready():
            closed_before = b.step


def test_watermark_waits_for_partitions_that_are_behind():
    al, _ = make(lateness=0.0)
    al.set_watermark_partitions({0, 1})
    al.add(ev("A", 0, 1), partition=0)
    al.add(ev("A", 5, 1), partition=0)  # partition 0 has moved on to step 5
    assert al.close_ready() == []  # partition 1 has said nothing yet: it may hold step 0
    al.add(ev("B", 0, 2), partition=1)
    assert al.close_ready() == []
    al.add(ev("B", 1, 2, offset=0.0), partition=1)
    [b] = al.close_ready()
    assert b.entities == ("A", "B")
    al.set_watermark_partitions(set())  # both caught up: the newest event time rules
    assert [x.step - math.floor(T0) for x in al.close_ready()] == [1]


def test_late_depends_on_the_partition_order_alone_not_on_when_steps_close():
    """A correction for an old step read after its partition moved on is late, whether the
    step has closed (live) or is still open (a backlog read in one poll)."""
    for close_between in (True, False):
        al, _ = make(lateness=1.0)
        al.set_watermark_partitions({0, 1})
        al.add(ev("A", 2, 1), partition=0)
        al.add(ev("B", 2, 1), partition=1)
        for s in range(3, 90):
            al.add(ev("A", s, 1), partition=0)
        if close_between:
            al.add(ev("B", 50, 1), partition=1)
            assert al.close_ready()  # step 2 closed
        assert al.add(ev("A", 2, 9), partition=0) is AddStatus.LATE
        assert al.add(ev("B", 2, 9), partition=1) is (
            AddStatus.LATE if close_between else AddStatus.REPLACED
        )


def test_a_replayed_event_moves_its_partition_watermark():
    al, _ = make(lateness=0.0)
    al.observe_time(0, T0 + 10.5)
    assert al.add(ev("A", 3, 1), partition=0) is AddStatus.LATE
    assert al.add(ev("A", 3, 1), partition=1) is AddStatus.ACCEPTED


def test_jump_is_checked_against_the_checkpoint_after_a_restart():
    al, _ = make(max_jump=5)
    al.resume_after(math.floor(T0) + 10)  # restored: nothing seen yet, step 10 closed
    with pytest.raises(EventError) as err:
        al.add(ev("A", 10 + 6, 1))
    assert err.value.reason is Reason.TS_TOO_FAR_AHEAD
    assert al.add(ev("A", 10 + 5, 1)) is AddStatus.ACCEPTED


def test_a_partition_whose_events_are_all_refused_still_moves_its_watermark():
    """Found under an entity flood: every event of partition 1 refused for capacity froze the
    watermark at -inf, no step closed, nobody became idle, nothing could be evicted."""
    from streamer.errors import CapacityError

    al, _ = make(capacity=1, max_entities=1, lateness=1.0)
    al.set_watermark_partitions({0, 1})
    for s in range(10):
        al.add(ev("A", s, 1), partition=0)
        with pytest.raises(CapacityError):
            al.add(ev(f"C{s}", s, 1), partition=1)
    assert al.partition_max_ts(1) == T0 + 9.5
    closed = [b.step for b in al.close_ready()]
    assert closed[:8] == list(range(int(T0), int(T0) + 8))  # by watermark (or completeness)
