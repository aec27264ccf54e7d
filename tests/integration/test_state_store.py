"""One contract test for every StateStore: the in-memory one and Redis."""

from __future__ import annotations

import numpy as np
import pytest

from streamer.errors import FencedError, StateError, StoreLostError
from streamer.state import Checkpoint, EntityState, MemoryStore, RowLayout
from streamer.state.format import HEADER_SIZE, NO_STEP, encode_rows
from streamer.state.redis_store import RedisStore

pytestmark = pytest.mark.integration

LAYOUT = RowLayout.from_shapes({"h0": (3,), "c0": (3,), "norm_count": (1,)})


@pytest.fixture(params=["memory", "redis"])
def store(request, unique):
    if request.param == "memory":
        s = MemoryStore()
    else:
        s = RedisStore(request.getfixturevalue("redis_url"), unique("ns"))
    yield s
    s.close()


def ent(name, partition, step, seed):
    row = np.random.default_rng(seed).normal(size=LAYOUT.size).astype(np.float32)
    return EntityState(name, partition, step, row)


def same(a: list[EntityState], b: list[EntityState]) -> bool:
    key = lambda e: (e.partition, e.entity)  # noqa: E731
    a, b = sorted(a, key=key), sorted(b, key=key)
    return len(a) == len(b) and all(
        x.entity == y.entity
        and x.partition == y.partition
        and x.last_step == y.last_step
        and np.array_equal(x.row, y.row)
        for x, y in zip(a, b, strict=True)
    )


def test_empty_store_loads_nothing(store):
    loaded = store.load("t", [0, 1], LAYOUT)
    assert loaded.positions == {} and loaded.entities == [] and loaded.steps == {}


def test_commit_then_load_round_trips_rows_positions_and_steps(store):
    tokens = store.acquire("t", [0, 1])
    rows = [ent("A", 0, 5, 1), ent("B", 1, 7, 2), ent("C", 1, NO_STEP, 3)]
    nbytes = store.commit(
        Checkpoint("t", {0: 10, 1: 20}, rows, step=7, weights_version=3), tokens, LAYOUT
    )
    assert nbytes == 3 * (HEADER_SIZE + 4 * LAYOUT.size)
    loaded = store.load("t", [0, 1], LAYOUT)
    assert loaded.positions == {0: 10, 1: 20}
    assert loaded.steps == {0: 7, 1: 7}
    assert loaded.weights_version == 3
    assert same(loaded.entities, rows)
    # Only the asked partitions come back.
    assert same(store.load("t", [1], LAYOUT).entities, rows[1:])


def test_incremental_commit_keeps_unchanged_rows_and_removes_forgotten(store):
    tokens = store.acquire("t", [0])
    store.commit(Checkpoint("t", {0: 1}, [ent("A", 0, 1, 1), ent("B", 0, 1, 2)]), tokens, LAYOUT)
    newer_a = ent("A", 0, 2, 9)
    store.commit(Checkpoint("t", {0: 2}, [newer_a], removed=[(0, "B")]), tokens, LAYOUT)
    loaded = store.load("t", [0], LAYOUT)
    assert loaded.positions == {0: 2}
    assert same(loaded.entities, [newer_a])


def test_stale_owner_is_fenced_and_writes_nothing(store):
    old = store.acquire("t", [0, 1])
    store.commit(Checkpoint("t", {0: 5, 1: 5}, [ent("A", 0, 1, 1)]), old, LAYOUT)
    new = store.acquire("t", [1])  # partition 1 moved to another engine
    assert new[1] > old[1]
    with pytest.raises(FencedError) as err:
        store.commit(
            Checkpoint("t", {0: 9, 1: 9}, [ent("A", 0, 2, 2), ent("B", 1, 2, 3)]), old, LAYOUT
        )
    assert err.value.partition == 1
    loaded = store.load("t", [0, 1], LAYOUT)
    assert loaded.positions == {0: 5, 1: 5}  # not even partition 0 moved: all or nothing
    assert same(loaded.entities, [ent("A", 0, 1, 1)])
    # The new owner writes fine.
    store.commit(Checkpoint("t", {1: 9}, [ent("B", 1, 2, 3)]), {1: new[1]}, LAYOUT)
    assert store.load("t", [1], LAYOUT).positions == {1: 9}


def test_rows_from_another_layout_are_refused(store):
    tokens = store.acquire("t", [0])
    store.commit(Checkpoint("t", {0: 1}, [ent("A", 0, 1, 1)]), tokens, LAYOUT)
    other = RowLayout.from_shapes({"h0": (4,), "c0": (4,)})
    with pytest.raises(StateError, match="layout"):
        store.load("t", [0], other)


def test_quality_report(store):
    assert store.get_quality() is None
    store.put_quality(b'{"recent": []}')
    store.put_quality(b'{"recent": [1]}')
    assert store.get_quality() == b'{"recent": [1]}'


def test_latest_forecasts(store):
    assert store.get_latest("A") is None
    store.put_latest({"A": b'{"x":1}', "B": b'{"x":2}'})
    store.put_latest({"A": b'{"x":3}'})
    assert store.get_latest("A") == b'{"x":3}'
    assert store.get_latest("B") == b'{"x":2}'


def test_corrupt_blob_in_redis_is_quarantined_not_fatal(redis_url, unique):
    store = RedisStore(redis_url, unique("ns"))
    tokens = store.acquire("t", [0])
    store.commit(Checkpoint("t", {0: 1}, [ent("A", 0, 1, 1), ent("B", 0, 1, 2)]), tokens, LAYOUT)
    import redis as redis_py

    raw = redis_py.Redis.from_url(redis_url)
    key = next(k for k in raw.scan_iter(match=f"streamer:{{{store._ns[10:-1]}}}:p:t:0:rows"))
    good = encode_rows(LAYOUT, ent("A", 0, 1, 1).row[None, :], [1])[0]
    for bad, why in [
        (b"garbage", "bytes"),
        (b"XXXX" + good[4:], "magic"),
        (good[:4] + b"\x09\x00" + good[6:], "version"),
        (good[:-4] + np.float32(np.nan).tobytes(), "non-finite"),
    ]:
        raw.hset(key, "A", bad)
        loaded = store.load("t", [0], LAYOUT)
        # One bad row costs that entity its state, never the partition's assignment.
        assert [e.entity for e in loaded.entities] == ["B"]
        assert [(p, name) for p, name, _ in loaded.quarantined] == [(0, "A")]
        assert why in loaded.quarantined[0][2]
        assert loaded.positions == {0: 1}
    store.close()


def test_sequences_detect_a_store_that_lost_writes(store):
    """A commit names the sequence it expects; a wiped store refuses it (StoreLostError)."""
    tokens = store.acquire("t", [0])
    assert store.sequences("t", [0]) == {0: 0}
    store.commit(Checkpoint("t", {0: 1}, [ent("A", 0, 1, 1)], seqs={0: 0}), tokens, LAYOUT)
    assert store.sequences("t", [0]) == {0: 1}
    with pytest.raises(StoreLostError, match="expected"):
        store.commit(Checkpoint("t", {0: 2}, seqs={0: 0}), tokens, LAYOUT)
    store.commit(Checkpoint("t", {0: 2}, seqs={0: 1}), tokens, LAYOUT)
    assert store.load("t", [0], LAYOUT).seqs == {0: 2}


def test_evicted_rows_go_cold_and_come_back_by_name(store):
    tokens = store.acquire("t", [0])
    a, b = ent("A", 0, 1, 1), ent("B", 0, 2, 2)
    store.commit(
        Checkpoint("t", {0: 1}, [a], evicted=[b], read_marks={0: 5}, watermarks={0: 1.5e9 + 0.25}),
        tokens,
        LAYOUT,
    )
    loaded = store.load("t", [0], LAYOUT)
    assert loaded.watermarks == {0: 1.5e9 + 0.25}
    assert [e.entity for e in loaded.entities] == ["A"]  # B is cold: not restored at assignment
    assert loaded.cold == {0: 1} and loaded.read_marks == {0: 5}
    found, bad = store.load_cold("t", 0, ["B", "nobody"], LAYOUT)
    assert list(found) == ["B"] and not bad and same([found["B"]], [b])
    # B reports again and is checkpointed as resident: it leaves the cold rows.
    store.commit(Checkpoint("t", {0: 2}, [b]), tokens, LAYOUT)
    loaded = store.load("t", [0], LAYOUT)
    assert sorted(e.entity for e in loaded.entities) == ["A", "B"] and loaded.cold == {0: 0}
    assert store.load_cold("t", 0, ["B"], LAYOUT) == ({}, [])
