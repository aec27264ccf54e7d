"""Floods, long backlogs and corrupt stored rows, end to end against real services.

- A flood of 200,000 entity ids that each report once, at `capacity.max_entities=2048` with
  idle eviction, beside 8 heartbeat entities: the engine must stay up, keep its memory
  bounded, refuse what does not fit with reason `capacity` (never a checkpoint per refused
  event), keep the heartbeats' forecasts complete, and leave every applied id in the store.
- A backlog of 8,000 steps with online learning: bounded work between polls keeps the engine
  in its group (one assignment, no revoke, no failed commit) and every forecast comes out.
- A stored row overwritten with garbage and another whose floats are NaN: both entities are
  quarantined and start afresh; the others continue exactly as a run that never had a
  corrupt row.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from engine_harness import (
    EngineProcess,
    assert_same_forecasts,
    config_of,
    engine_env,
    forecasts_by_key,
    read_topic,
)
from kafka import KafkaConsumer, TopicPartition

from streamer.config import Config
from streamer.forecaster import Forecaster
from streamer.produce import EventProducer
from streamer.state.redis_store import RedisStore
from streamer.synthetic import DEFAULT_START_TS, SyntheticMarket

pytestmark = [pytest.mark.integration, pytest.mark.slow]

T0 = DEFAULT_START_TS
FIRST_STEP = int(T0)
GIB = 1024**3


def _env(
    kafka_bootstrap: str,
    redis_url: str,
    unique: Callable[[str], str],
    *,
    input_topic: str | None = None,
    every_steps: int = 20,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    group = unique("group")
    return engine_env(
        bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        group=group,
        input_topic=input_topic or unique("in"),
        output_topic=f"{group}.out",
        dlq_topic=f"{group}.dlq",
        every_steps=every_steps,
        extra=extra,
    )


def _run(engine: EngineProcess, timeout: float = 180.0) -> int:
    engine.start()
    try:
        return engine.wait(timeout=timeout)
    finally:
        engine.stop()


def _assert_clean_exit(engine: EngineProcess, rc: int) -> None:
    assert rc == 0, f"{engine.name}: exit status {rc}\n{engine.log_tail()}"
    assert "Traceback" not in engine.stderr(), engine.log_tail(200)


def _produce_market(config: Config, market: SyntheticMarket, steps: range) -> int:
    features = config.stream.features
    sent = 0
    with EventProducer(config) as out:
        for ev in market.events():
            if int(ev["ts"] - T0) in steps:
                out.send(ev["entity"], ev["ts"], [ev["values"][f] for f in features])
                sent += 1
    return sent


def _keys_of(bootstrap: str, topic: str, timeout: float = 120.0) -> Counter[bytes]:
    """How many messages of `topic` carry each key (read to the end, no group)."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        group_id=None,
        fetch_max_bytes=32 * 1024 * 1024,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    try:
        deadline = time.monotonic() + timeout
        while not (parts := consumer.partitions_for_topic(topic)):
            assert time.monotonic() < deadline, f"topic {topic} has no partitions"
            consumer.topics()
            time.sleep(0.2)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        keys: Counter[bytes] = Counter()
        while True:
            for recs in consumer.poll(timeout_ms=200, max_records=100_000).values():
                keys.update(r.key for r in recs)
            # Not end_offsets (tansu reports them short): the fetch responses' high watermark.
            ends = [(consumer.highwater(tp), consumer.position(tp)) for tp in tps]
            if all(high is not None and pos >= high for high, pos in ends):
                return keys
            assert time.monotonic() < deadline, f"reading {topic} did not finish in {timeout} s"
    finally:
        consumer.close()


class RssSampler:
    """Samples VmRSS of one process every `every_s` seconds on a thread (bytes)."""

    def __init__(self, pid: int, every_s: float = 0.5) -> None:
        self._path = Path(f"/proc/{pid}/status")
        self._every = every_s
        self._stop = threading.Event()
        self.samples: list[int] = []
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _read(self) -> int | None:
        try:
            text = self._path.read_text()
        except OSError:  # the process has exited
            return None
        for line in text.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # kB
        return None  # a zombie has no VmRSS

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss = self._read()
            if rss is not None:
                self.samples.append(rss)
            self._stop.wait(self._every)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def max_bytes(self) -> int:
        return max(self.samples, default=0)


# ---------------------------------------------------------------------- 1. id flood

FLOOD_IDS = 200_000
FLOOD_PER_STEP = 2_000
FLOOD_STEPS = FLOOD_IDS // FLOOD_PER_STEP  # 100
HEARTBEATS = [f"HB{i}" for i in range(8)]
FLOOD_CAPACITY = 2048


def test_flood_of_new_ids_keeps_the_engine_up_with_bounded_memory(
    kafka_bootstrap: str, redis_url: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    env = _env(
        kafka_bootstrap,
        redis_url,
        unique,
        extra={
            "STREAMER_CAPACITY_MAX_ENTITIES": str(FLOOD_CAPACITY),
            "STREAMER_CAPACITY_EVICT_IDLE_STEPS": "2",
        },
    )
    config = config_of(env)
    rng = np.random.default_rng(11)
    hb_price = rng.uniform(50.0, 150.0, len(HEARTBEATS))
    t_produce = time.monotonic()
    with EventProducer(config) as out:
        for step in range(FLOOD_STEPS):
            ts = T0 + step + 0.5
            hb_price *= np.exp(rng.normal(0.0, 0.01, len(HEARTBEATS)))
            for h, price in zip(HEARTBEATS, hb_price, strict=True):
                out.send(h, ts, [float(price), float(rng.normal())])
            for i in range(step * FLOOD_PER_STEP, (step + 1) * FLOOD_PER_STEP):
                out.send(f"N{i:06d}", ts, [100.0 + (i % 97), 0.0])
        produced = out.sent
    produce_s = time.monotonic() - t_produce
    assert produced == FLOOD_IDS + FLOOD_STEPS * len(HEARTBEATS)

    engine = EngineProcess(env, tmp_path, "flood", idle_exit_s=3.0).start()
    assert engine.proc is not None
    sampler = RssSampler(engine.proc.pid).start()
    try:
        rc = engine.wait(timeout=180)
    finally:
        sampler.stop()
        engine.stop()
    _assert_clean_exit(engine, rc)
    run_s = (engine.ended_at or time.monotonic()) - engine.started_at
    stats = engine.summary()
    dead = stats["dead_lettered"]
    out = forecasts_by_key(read_topic(kafka_bootstrap, env["STREAMER_KAFKA_OUTPUT_TOPIC"]))
    hb_steps = {h: sorted(s - FIRST_STEP for (e, s) in out if e == h) for h in HEARTBEATS}
    dead_by_key = _keys_of(kafka_bootstrap, env["STREAMER_KAFKA_DLQ_TOPIC"])
    dead_letters_in_topic = sum(dead_by_key.values())
    client = redis.Redis.from_url(redis_url)
    try:
        prefix = f"streamer:{{{config.namespace}}}:p:{config.kafka.input_topic}"
        cold = sum(client.hlen(f"{prefix}:{p}:cold") for p in range(config.kafka.partitions))
        rows = sum(client.hlen(f"{prefix}:{p}:rows") for p in range(config.kafka.partitions))
    finally:
        client.close()
    # Ids with at least one applied event: each flood id reports once, a heartbeat 100 times.
    refused_flood = sum(n for k, n in dead_by_key.items() if k.startswith(b"N"))
    admitted_heartbeats = sum(dead_by_key.get(h.encode(), 0) < FLOOD_STEPS for h in HEARTBEATS)
    distinct_applied = FLOOD_IDS - refused_flood + admitted_heartbeats
    heartbeat_forecasts = sum(len(v) for v in hb_steps.values())
    max_rss = sampler.max_bytes
    first_forecast = {h: (v[0] if v else None) for h, v in hb_steps.items()}
    print(
        f"\nflood: produced {produced} in {produce_s:.1f} s; engine run {run_s:.1f} s; "
        f"max RSS {max_rss / 2**20:.0f} MiB ({len(sampler.samples)} samples); "
        f"checkpoints {stats['checkpoints']}; dead letters {dead} ({dead_letters_in_topic} "
        f"in the topic); applied {stats['applied']}; evicted {stats['evicted']}; store rows "
        f"{rows} resident + {cold} cold ({distinct_applied} distinct ids applied); "
        f"heartbeat forecasts {heartbeat_forecasts} of "
        f"{len(HEARTBEATS) * (FLOOD_STEPS - 1)}, first step with one {first_forecast}"
        f"\nsummary {stats}"
    )

    # Every input message was applied or dead-lettered, and only for lack of a row.
    assert stats["consumed"] == produced, stats
    assert set(dead) <= {"capacity"}, stats
    assert stats["duplicates"] == 0 and stats["replayed"] == 0 and stats["late"] == 0, stats
    assert stats["applied"] + sum(dead.values()) == produced, stats
    assert dead_letters_in_topic == sum(dead.values())
    assert all(n == 1 for k, n in dead_by_key.items() if k.startswith(b"N"))
    assert stats["checkpoint_failures"] == 0, stats
    assert stats["steps"] == FLOOD_STEPS, stats
    # Refused events cost dead letters, not a checkpoint each.
    assert stats["checkpoints"] <= 3 * FLOOD_STEPS, stats

    # A heartbeat that got a row keeps it: a forecast for every step after its first, exactly
    # once (an active entity is never evicted). Rows are given first come, first served, and
    # the backlog is read partition by partition with ~500 new ids per partition and step
    # against one heartbeat event, so a heartbeat may never win a freed row at all.
    assert any(hb_steps.values()), "no heartbeat ever got a row"
    for h, steps in hb_steps.items():
        if steps:
            assert steps == list(range(steps[0], FLOOD_STEPS)), (h, steps[:5], len(steps))
    twice = [k for k, v in out.items() if len(v) > 1]
    assert not twice, f"{len(twice)} forecasts published twice, e.g. {twice[:5]}"

    # Evicted entities stay in the store: cold rows + resident rows cover every applied id.
    assert rows <= FLOOD_CAPACITY
    assert cold + rows >= distinct_applied, (cold, rows, distinct_applied)

    assert len(sampler.samples) >= 2, "RSS was not sampled"
    assert max_rss < 3 * GIB, f"max RSS {max_rss / 2**20:.0f} MiB"


# ---------------------------------------------------------------------- 2. long backlog

BACKLOG_ENTITIES = 8
BACKLOG_STEPS = 8_000


def test_backlog_of_thousands_of_steps_with_learning_stays_in_the_group(
    kafka_bootstrap: str, redis_url: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    env = _env(kafka_bootstrap, redis_url, unique, extra={"STREAMER_LEARN_ENABLED": "true"})
    config = config_of(env)
    market = SyntheticMarket(entities=BACKLOG_ENTITIES, steps=BACKLOG_STEPS, seed=21)
    produced = _produce_market(config, market, range(BACKLOG_STEPS))
    assert produced == BACKLOG_ENTITIES * BACKLOG_STEPS

    engine = EngineProcess(env, tmp_path, "backlog", idle_exit_s=3.0)
    # 2,000 updates of 4 epochs each (the learner's defaults): about 4 minutes on 2 cores.
    rc = _run(engine, timeout=480)
    _assert_clean_exit(engine, rc)
    run_s = (engine.ended_at or time.monotonic()) - engine.started_at
    err = engine.stderr()
    stats = engine.summary()

    # Never thrown out of the group: one assignment, no revoke, no failed commit.
    assert len(engine.assignments()) == 1, engine.assignments()
    assert "CommitFailedError" not in err, engine.log_tail(100)
    # (the summary's "rebalances" key counts the one assignment; any other mention is one)
    rebalance_lines = [
        line
        for line in err.splitlines()
        if "rebalanc" in re.sub(r"'rebalances': \d+", "", line).lower()
    ]
    assert not rebalance_lines, rebalance_lines[:5]
    assert stats["rebalances"] == 1, stats
    assert "revoked partitions" not in err, engine.log_tail(100)
    assert stats["consumed"] == produced and stats["steps"] == BACKLOG_STEPS, stats
    assert stats["dead_lettered"] == {} and stats["late"] == 0, stats

    out = forecasts_by_key(read_topic(kafka_bootstrap, env["STREAMER_KAFKA_OUTPUT_TOPIC"]))
    want = {
        (market.entity_id(i), FIRST_STEP + t)
        for i in range(BACKLOG_ENTITIES)
        for t in range(1, BACKLOG_STEPS)  # the first step only warms up (log_return)
    }
    assert set(out) == want, (len(out), len(want))
    assert stats["forecasts"] == len(want), stats
    print(
        f"\nbacklog: {produced} events, {stats['steps']} steps with learning in {run_s:.1f} s "
        f"(join {engine.join_seconds()} s); checkpoints {stats['checkpoints']}"
    )


# ---------------------------------------------------------------------- 3. corrupt rows

CORRUPT_ENTITIES = 6
FIRST_RUN_STEPS = 40
MORE_STEPS = 20


def _row_partition(client: redis.Redis, prefix: str, partitions: int, entity: str) -> int:
    for p in range(partitions):
        if client.hexists(f"{prefix}:{p}:rows", entity):
            return p
    raise AssertionError(f"no stored row for {entity}")


def test_a_corrupt_row_in_redis_is_quarantined_and_the_engine_carries_on(
    kafka_bootstrap: str, redis_url: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    env = _env(kafka_bootstrap, redis_url, unique, every_steps=10)
    config = config_of(env)
    total = FIRST_RUN_STEPS + MORE_STEPS
    market = SyntheticMarket(entities=CORRUPT_ENTITIES, steps=total, seed=31)
    ids = [market.entity_id(i) for i in range(CORRUPT_ENTITIES)]
    garbage, nan_row = ids[1], ids[4]
    healthy = [e for e in ids if e not in (garbage, nan_row)]
    _produce_market(config, market, range(FIRST_RUN_STEPS))

    first = EngineProcess(env, tmp_path, "first", idle_exit_s=3.0)
    rc = _run(first)
    _assert_clean_exit(first, rc)
    assert first.summary()["steps"] == FIRST_RUN_STEPS

    # Corrupt two stored rows.
    prefix = f"streamer:{{{config.namespace}}}:p:{config.kafka.input_topic}"
    parts = config.kafka.partitions
    client = redis.Redis.from_url(redis_url)
    try:
        p_garbage = _row_partition(client, prefix, parts, garbage)
        client.hset(f"{prefix}:{p_garbage}:rows", garbage, b"\xde\xad\xbe\xef not a state row")
        p_nan = _row_partition(client, prefix, parts, nan_row)
        blob = client.hget(f"{prefix}:{p_nan}:rows", nan_row)
        assert blob is not None and len(blob) > 4
        client.hset(f"{prefix}:{p_nan}:rows", nan_row, blob[:-4] + np.float32("nan").tobytes())
    finally:
        client.close()

    _produce_market(config, market, range(FIRST_RUN_STEPS, total))
    # The reference: the whole stream, read in another group and namespace, never corrupted.
    ref_env = _env(
        kafka_bootstrap,
        redis_url,
        unique,
        every_steps=10,
        input_topic=env["STREAMER_KAFKA_INPUT_TOPIC"],
    )
    second = EngineProcess(env, tmp_path, "second", idle_exit_s=3.0).start()
    reference = EngineProcess(ref_env, tmp_path, "reference", idle_exit_s=3.0).start()
    try:
        rc2 = second.wait(timeout=180)
        rc_ref = reference.wait(timeout=180)
    finally:
        second.stop()
        reference.stop()
    _assert_clean_exit(second, rc2)
    _assert_clean_exit(reference, rc_ref)

    stats = second.summary()
    assert stats["quarantined"] == 2, stats
    assert stats["steps"] == MORE_STEPS and stats["dead_lettered"] == {}, stats
    lines = [line for line in second.stderr().splitlines() if "quarantined" in line]
    for entity in (garbage, nan_row):
        assert any(f'"{entity}"' in line for line in lines), lines

    got = forecasts_by_key(read_topic(kafka_bootstrap, env["STREAMER_KAFKA_OUTPUT_TOPIC"]))
    ref = forecasts_by_key(read_topic(kafka_bootstrap, ref_env["STREAMER_KAFKA_OUTPUT_TOPIC"]))
    new_steps = range(FIRST_STEP + FIRST_RUN_STEPS, FIRST_STEP + total)
    # The first run published the first 40 steps; the second run only the new ones.
    assert {s for _, s in got} <= set(range(FIRST_STEP + 1, FIRST_STEP + total))

    def new_of(out: dict[tuple[str, int], list[dict[str, Any]]], entities: list[str]) -> dict:
        return {k: v for k, v in out.items() if k[0] in entities and k[1] in new_steps}

    # The quarantined entities started afresh: their first new step warms up (log_return),
    # every later one has a forecast, and their states are stored again, whole.
    for entity in (garbage, nan_row):
        steps = sorted(s for (e, s) in new_of(got, [entity]))
        assert steps == list(new_steps)[1:], (entity, steps)
    # The others continue exactly like the run that never had a corrupt row.
    assert_same_forecasts(new_of(got, healthy), new_of(ref, healthy), atol=1e-6)
    twice = [k for k, v in got.items() if len(v) > 1]
    assert not twice, twice[:5]

    layout = Forecaster(config).layout
    store = RedisStore(redis_url, config.namespace)
    try:
        loaded = store.load(config.kafka.input_topic, range(parts), layout)
    finally:
        store.close()
    assert not loaded.quarantined, loaded.quarantined
    assert sorted(e.entity for e in loaded.entities) == sorted(ids)
    print(
        f"\ncorrupt rows: quarantined {stats['quarantined']}; second run "
        f"{(second.ended_at or 0) - second.started_at:.1f} s"
    )
