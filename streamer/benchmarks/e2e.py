"""`streamer bench e2e`: the engine end to end against bare kafka-python baselines.

All figures come from one run on one broker and one Redis (the embedded stack unless
STREAMER_KAFKA_BOOTSTRAP / STREAMER_REDIS_URL point elsewhere), on the same input topic:

- raw_consumer_events_per_s: a bare consumer draining the topic (assign + seek, no group);
- passthrough_events_per_s: a bare consumer that re-produces every message to another topic
  and waits for the acknowledgements: the ceiling for anything emitting one message per input;
- events_per_s: the engine, from its first record to the acknowledgement of the forecasts of
  the last step (group join excluded; checkpoints every `checkpoint.every_steps` included);
- forecast_latency_ms_*: a step closing -> its last forecast acknowledged by the broker, in a
  live run: the producer paced at `live_rate` events/s (below the engine's capacity), the
  engine consuming as events arrive. The same figure for the backlog run
  (backlog_forecast_latency_ms_*) mostly measures the producer's queue, since a poll of
  5,000 records closes a dozen steps at once;
- checkpoint_*: from the run (400 entities, incremental), and for 40,000 entities with every
  row changed and with 1% changed, to show that the cost follows the changed rows.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from typing import Any

import numpy as np
from kafka import KafkaConsumer, TopicPartition

from ..config import CheckpointConfig, Config, KafkaConfig, RedisConfig
from ..engine import Engine
from ..kafka_io import KafkaIO, client_kwargs, ensure_topics
from ..kafka_io import producer as make_producer
from ..produce import produce_synthetic
from ..services import EmbeddedStack
from ..state.redis_store import RedisStore
from ..state.store import Checkpoint, EntityState
from .timing import pct

log = logging.getLogger(__name__)


def _drain(
    bootstrap: str, topic: str, partitions: int, expected: int, on_batch: Any = None
) -> float:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        fetch_max_bytes=32 * 1024 * 1024,
        max_partition_fetch_bytes=8 * 1024 * 1024,
        max_poll_records=5000,
    )
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    seen = 0
    t0 = None
    deadline = time.monotonic() + 300
    while seen < expected and time.monotonic() < deadline:
        batch = consumer.poll(timeout_ms=200)
        for recs in batch.values():
            if t0 is None:
                t0 = time.perf_counter()
            seen += len(recs)
            if on_batch is not None:
                on_batch(recs)
    elapsed = time.perf_counter() - (t0 or time.perf_counter())
    consumer.close()
    if seen < expected:
        raise RuntimeError(f"drained {seen} of {expected} messages from {topic}")
    return elapsed


def _raw_consumer(bootstrap: str, topic: str, partitions: int, n: int) -> float:
    return n / _drain(bootstrap, topic, partitions, n)


def _passthrough(bootstrap: str, topic: str, partitions: int, n: int) -> float:
    out_topic = f"{topic}.passthrough"
    ensure_topics(bootstrap, [out_topic], partitions)
    prod = make_producer(bootstrap)

    def forward(recs: list[Any]) -> None:
        for r in recs:
            prod.send(out_topic, key=r.key, value=r.value)

    t0 = time.perf_counter()
    _drain(bootstrap, topic, partitions, n, forward)
    prod.flush()
    elapsed = time.perf_counter() - t0
    prod.close()
    return n / elapsed


def _engine(config: Config, n_events: int) -> tuple[float, Engine]:
    store = RedisStore.from_config(config.redis, config.namespace)
    engine = Engine(config, store, KafkaIO(config.kafka), progress_every_s=3600)
    first: list[float] = []
    done_at: list[float] = []
    consumed_target = n_events

    original_ingest = engine._ingest

    def timed_ingest(records: Any) -> None:
        if not first:
            first.append(time.perf_counter())
        original_ingest(records)
        if engine.stats.consumed >= consumed_target and not done_at:
            engine.request_stop()

    engine._ingest = timed_ingest  # type: ignore[method-assign]
    engine.run(idle_exit_s=30)
    # run() ends with the final checkpoint, which flushes the producer: every forecast is
    # acknowledged by now.
    done_at.append(time.perf_counter())
    store.close()
    if not first:
        raise RuntimeError("the engine consumed nothing")
    return n_events / (done_at[0] - first[0]), engine


def _live_latency(config: Config, entities: int, steps: int, rate: float) -> dict[str, Any]:
    """Run the engine on a paced live stream; latency of step close -> forecast ack."""
    import threading

    run_id = uuid.uuid4().hex[:8]
    k = config.kafka
    live = dataclasses.replace(
        config,
        kafka=dataclasses.replace(
            k,
            input_topic=f"live-{run_id}",
            output_topic=f"live-{run_id}.forecasts",
            group=f"live-{run_id}",
        ),
    )
    lk = live.kafka
    ensure_topics(
        lk.bootstrap, [lk.input_topic, lk.output_topic, lk.dlq], lk.partitions, client_kwargs(lk)
    )
    store = RedisStore.from_config(live.redis, live.namespace)
    engine = Engine(live, store, KafkaIO(lk), progress_every_s=3600)
    started = threading.Event()
    original = engine._on_assigned

    def on_assigned(parts: list[int]) -> Any:
        out = original(parts)
        started.set()
        return out

    engine._on_assigned = on_assigned  # type: ignore[method-assign,assignment]

    def produce() -> None:
        started.wait(60)
        produce_synthetic(
            live, entities=entities, steps=steps, seed=1, rate=rate, bootstrap=lk.bootstrap
        )

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    engine.run(idle_exit_s=3.0)
    thread.join(timeout=60)
    store.close()
    lat = np.asarray(list(engine.stats.forecast_latency_ms) or [np.nan])
    return {
        "rate_events_per_s": rate,
        "steps": engine.stats.steps,
        "p50": pct(lat, 50),
        "p99": pct(lat, 99),
    }


def _checkpoint_cost(
    redis_url: str, entities: int, changed_share: float, repeats: int = 5
) -> dict[str, float]:
    """Commit `changed_share` of `entities` rows of a 64-unit layout, as the engine would."""
    from ..forecaster import Forecaster

    config = Config()
    layout = Forecaster(config).layout
    store = RedisStore(redis_url, f"bench-{uuid.uuid4().hex[:8]}")
    tokens = store.acquire("bench", range(4))
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(entities, layout.size)).astype(np.float32)
    base = [EntityState(f"E{i:06d}", i % 4, 1, rows[i]) for i in range(entities)]
    store.commit(Checkpoint("bench", {p: 0 for p in range(4)}, base), tokens, layout)
    n_changed = max(1, int(entities * changed_share))
    times = []
    nbytes = 0
    for r in range(repeats):
        changed = [dataclasses.replace(e, last_step=2 + r) for e in base[:n_changed]]
        t0 = time.perf_counter()
        nbytes = store.commit(
            Checkpoint("bench", {p: r for p in range(4)}, changed), tokens, layout
        )
        times.append((time.perf_counter() - t0) * 1e3)
    store.close()
    return {"ms_p50": pct(np.asarray(times), 50), "bytes": nbytes, "changed": n_changed}


def run(
    entities: int, steps: int, *, seed: int = 0, units: int = 64, live_rate: float = 8000.0
) -> dict[str, Any]:
    stack = None
    bootstrap = os.environ.get("STREAMER_KAFKA_BOOTSTRAP")
    redis_url = os.environ.get("STREAMER_REDIS_URL")
    if not bootstrap or not redis_url:
        stack = EmbeddedStack()
        stack.start()
        bootstrap, redis_url = stack.bootstrap, stack.redis_url
    try:
        run_id = uuid.uuid4().hex[:8]
        topic = f"bench-{run_id}"
        partitions = 4
        base = Config()
        config = dataclasses.replace(
            base,
            model=dataclasses.replace(base.model, units=(units,), seed=seed),
            kafka=KafkaConfig(
                bootstrap=bootstrap,
                input_topic=topic,
                output_topic=f"{topic}.forecasts",
                group=f"bench-{run_id}",
                partitions=partitions,
                session_timeout_ms=6000,
                max_poll_interval_ms=30000,
            ),
            redis=RedisConfig(url=redis_url),
            checkpoint=CheckpointConfig(every_steps=50, every_seconds=5.0),
        )
        ensure_topics(
            bootstrap,
            [topic, config.kafka.output_topic, config.kafka.dlq],
            partitions,
            client_kwargs(config.kafka),
        )
        n = entities * steps
        t0 = time.perf_counter()
        produce_synthetic(config, entities=entities, steps=steps, seed=seed, bootstrap=bootstrap)
        produce_s = time.perf_counter() - t0
        raw = _raw_consumer(bootstrap, topic, partitions, n)
        passthrough = _passthrough(bootstrap, topic, partitions, n)
        engine_rate, engine = _engine(config, n)
        st = engine.stats
        lat = np.asarray(list(st.forecast_latency_ms) or [np.nan])
        live = _live_latency(config, entities, min(steps, 200), live_rate)
        big_all = _checkpoint_cost(redis_url, 40_000, 1.0)
        big_1pct = _checkpoint_cost(redis_url, 40_000, 0.01)
        return {
            "benchmark": "e2e",
            "entities": entities,
            "steps": steps,
            "events": n,
            "units": units,
            "produce_events_per_s": round(n / produce_s, 1),
            "events_per_s": round(engine_rate, 1),
            "raw_consumer_events_per_s": round(raw, 1),
            "passthrough_events_per_s": round(passthrough, 1),
            "ratio_to_passthrough": round(engine_rate / passthrough, 3),
            "forecast_latency_ms_p50": live["p50"],
            "forecast_latency_ms_p99": live["p99"],
            "live_run": live,
            "backlog_forecast_latency_ms_p50": pct(lat, 50),
            "backlog_forecast_latency_ms_p99": pct(lat, 99),
            "step_ms_p50": pct(np.asarray(list(st.step_ms)), 50),
            "checkpoint_ms_p50": pct(np.asarray(list(st.checkpoint_ms)), 50),
            "checkpoint_bytes": int(np.median(list(st.checkpoint_bytes)))
            if st.checkpoint_bytes
            else 0,
            "checkpoints": st.checkpoints,
            "checkpoint_40000_all_changed": big_all,
            "checkpoint_40000_1pct_changed": big_1pct,
            "engine": st.summary(),
        }
    finally:
        if stack is not None:
            stack.stop()
