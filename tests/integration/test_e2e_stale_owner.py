"""Invariant 4 end to end: a revoked owner cannot overwrite the state of a partition.

- Contract: on RedisStore itself, a commit with a token older than the partition's current
  one raises FencedError and writes nothing, not even the partitions it still owns.
- Engines: two in-process engines on one state namespace. The first stalls inside its loop
  (a long GC pause, a stuck disk) after it has applied steps it has not checkpointed yet; the
  second takes its partitions over: it acquires them in the store (new fencing tokens), loads
  the first one's last checkpoint, reads on and checkpoints. When the first engine wakes up,
  its checkpoints are refused (FencedError), it releases the partitions it lost and goes
  on, and the store stays exactly as the second one left it.

  The second engine joins another consumer group with the same Redis namespace, which is the
  same takeover as far as the store (the source of truth for positions) can tell. Within one
  group, tansu 0.6.0 never completes the rebalance while a member is stalled: it keeps the
  silent member as leader and the newcomer's SyncGroup fails over and over (see the notes in
  streamer.services), so the in-group takeover cannot be driven on the embedded broker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import redis
from engine_harness import checkpoint_step, config_of, engine_env, redis_snapshot

from streamer.app import build_engine
from streamer.engine import Engine, EngineStats
from streamer.errors import FencedError
from streamer.forecaster import StepResult
from streamer.produce import produce_synthetic
from streamer.state.format import RowLayout
from streamer.state.redis_store import RedisStore
from streamer.state.store import Checkpoint, EntityState
from streamer.synthetic import DEFAULT_START_TS

pytestmark = pytest.mark.integration

LAYOUT = RowLayout.from_shapes({"h0": (4,), "c0": (4,)})


def _row(value: float) -> np.ndarray:
    return np.full(LAYOUT.size, value, dtype=np.float32)


def _checkpoint(topic: str, value: float, step: int, positions: dict[int, int]) -> Checkpoint:
    return Checkpoint(
        topic=topic,
        positions=positions,
        entities=[EntityState(f"ent-{p}", p, step, _row(value)) for p in positions],
        step=step,
    )


def test_redis_store_refuses_a_commit_with_an_old_token(
    redis_url: str, unique: Callable[[str], str]
) -> None:
    namespace, topic = unique("ns"), unique("topic")
    first, second = RedisStore(redis_url, namespace), RedisStore(redis_url, namespace)
    try:
        old = first.acquire(topic, [0, 1])
        assert first.commit(_checkpoint(topic, 1.0, 10, {0: 100, 1: 200}), old, LAYOUT) > 0

        # Acquired again (by another owner, or by the same one after a rebalance): the old
        # token is dead for every partition acquired again...
        new = second.acquire(topic, [0])
        assert new[0] > old[0]
        before = redis_snapshot(redis_url, namespace)
        with pytest.raises(FencedError) as err:
            first.commit(_checkpoint(topic, 2.0, 11, {0: 150, 1: 250}), old, LAYOUT)
        assert err.value.partition == 0
        # ... and the refused checkpoint wrote nothing, not even partition 1, still its own.
        after = redis_snapshot(redis_url, namespace)
        assert after == before
        # Rows alone (no position) are fenced the same way.
        rows_only = Checkpoint(topic, {}, [EntityState("ent-0", 0, 12, _row(3.0))], step=12)
        with pytest.raises(FencedError):
            first.commit(rows_only, old, LAYOUT)
        assert redis_snapshot(redis_url, namespace) == before

        # The same owner acquiring twice also retires its own older token.
        again = first.acquire(topic, [1])
        before = redis_snapshot(redis_url, namespace)
        with pytest.raises(FencedError):
            first.commit(_checkpoint(topic, 2.0, 11, {1: 250}), old, LAYOUT)
        assert redis_snapshot(redis_url, namespace) == before

        # The current tokens write.
        second.commit(_checkpoint(topic, 4.0, 13, {0: 160}), new, LAYOUT)
        first.commit(_checkpoint(topic, 5.0, 13, {1: 260}), again, LAYOUT)
        loaded = second.load(topic, [0, 1], LAYOUT)
        assert loaded.positions == {0: 160, 1: 260}
        assert loaded.steps == {0: 13, 1: 13}
        by_name = {e.entity: e for e in loaded.entities}
        assert by_name["ent-0"].last_step == 13 and by_name["ent-0"].row[0] == 4.0
        assert by_name["ent-1"].last_step == 13 and by_name["ent-1"].row[0] == 5.0
    finally:
        first.close()
        second.close()


@pytest.mark.slow
def test_stalled_engine_is_fenced_after_its_partitions_moved(
    kafka_bootstrap: str, redis_url: str, unique: Callable[[str], str]
) -> None:
    entities, steps, stall_at = 40, 120, 80
    env = engine_env(
        bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        group=unique("group"),
        input_topic=unique("market"),
        output_topic=unique("out"),
        dlq_topic=unique("dlq"),
        every_steps=10,
        # Small polls: steps close a few at a time, so checkpoints come before the stall.
        extra={"STREAMER_KAFKA_MAX_POLL_RECORDS": "100"},
    )
    config = config_of(env)
    takeover = config_of(
        {
            **env,
            "STREAMER_KAFKA_GROUP": unique("group2"),
            "STREAMER_REDIS_NAMESPACE": config.namespace,
        }
    )
    assert takeover.namespace == config.namespace
    assert produce_synthetic(config, entities=entities, steps=steps, seed=3) == entities * steps

    first = build_engine(config)
    stalled, wake = threading.Event(), threading.Event()
    at_stall: dict[str, object] = {}

    def stall(result: StepResult) -> None:
        if result.step - int(DEFAULT_START_TS) == stall_at and not stalled.is_set():
            at_stall["checkpoints"] = first.stats.checkpoints
            at_stall["steps"] = first.stats.steps
            stalled.set()
            wake.wait(timeout=120)

    first.on_step = stall
    outcome: dict[str, BaseException | None] = {}

    def run_first() -> None:
        try:
            first.run(idle_exit_s=10.0)
            outcome["error"] = None
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run_first, name="first-engine", daemon=True)
    thread.start()
    try:
        assert stalled.wait(timeout=90), "the first engine never reached the stall step"
        assert at_stall["checkpoints"] >= 1, "no checkpoint before the stall"
        # The first engine holds every partition and has steps it did not checkpoint yet.
        tokens_before = _owner_tokens(redis_url, config.namespace)
        assert len(tokens_before) == config.kafka.partitions
        resumed_from = (checkpoint_step(redis_url, config.namespace) or 0) - int(DEFAULT_START_TS)
        assert 0 <= resumed_from < stall_at

        # The second engine takes every partition over and reads on until idle.
        moved_at = time.monotonic()
        second = build_engine(takeover)
        stats2 = _run_with_timeout(second, idle_exit_s=3.0, timeout=90.0)
        takeover_s = time.monotonic() - moved_at
        assert stats2.rebalances >= 1 and stats2.checkpoints >= 1
        assert stats2.checkpoint_failures == 0
        # It resumed from the first engine's checkpoint and finished the stream.
        assert 0 < stats2.consumed < entities * steps
        assert stats2.steps < steps
        tokens_after = _owner_tokens(redis_url, config.namespace)
        moved = sorted(p for p in tokens_after if tokens_after[p] > tokens_before[p])
        assert moved, "no partition changed owner"
        snapshot = redis_snapshot(redis_url, config.namespace)
    finally:
        wake.set()
        # Awake again, the stale engine tries its overdue checkpoint within a few seconds.
        deadline = time.monotonic() + 30
        while first.stats.checkpoint_failures == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        first.request_stop()  # having lost every partition it would wait for new ones
        thread.join(timeout=60)
    assert not thread.is_alive(), "the first engine did not stop"

    # The stale owner's next checkpoints were refused and changed nothing; it released the
    # partitions it lost one by one and carried on (its run ends normally).
    error = outcome.get("error")
    assert error is None, f"the stale engine stopped with {error!r}"
    assert first.stats.checkpoint_failures >= 1
    assert set(first.assigned_partitions).isdisjoint(moved)
    assert first.stats.checkpoints == at_stall["checkpoints"]
    assert redis_snapshot(redis_url, config.namespace) == snapshot
    assert _owner_tokens(redis_url, config.namespace) == tokens_after
    print(
        f"\nstalled at step {stall_at} (checkpointed up to step {resumed_from}); ownership "
        f"moved for partitions {moved}; second engine took over and finished in "
        f"{takeover_s:.1f} s: {stats2.summary()}; "
        f"first engine: {first.stats.summary()}"
    )


def _run_with_timeout(engine: Engine, *, idle_exit_s: float, timeout: float) -> EngineStats:
    result: dict[str, EngineStats] = {}
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result["stats"] = engine.run(idle_exit_s=idle_exit_s)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="second-engine", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        engine.request_stop()
        thread.join(30)
        raise AssertionError(f"the second engine did not finish within {timeout} s")
    if errors:
        raise errors[0]
    return result["stats"]


def _owner_tokens(url: str, namespace: str) -> dict[int, int]:
    client = redis.Redis.from_url(url)
    try:
        out = {}
        for key in client.scan_iter(match=f"streamer:{{{namespace}}}:p:*:owner"):
            partition = int(key.decode().split(":")[-2])
            out[partition] = int(client.get(key))
        return out
    finally:
        client.close()
