"""Invariant 6 end to end: SIGTERM stops the engine cleanly and a restart replays nothing.

A live stream (the synthetic market: a backlog first, then paced events from a producer
thread) is consumed by an engine that gets SIGTERM while it consumes (once some forecasts
exist, so the group join is behind it). It must exit 0 and print its counts; its last
checkpoint must cover everything it published. A second engine then reads the rest: it skips
nothing as a replay (`replayed == 0`), and across both runs every (entity, step) forecast is
published exactly once: the graceful path produces no duplicates and loses nothing.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from engine_harness import (
    EngineProcess,
    TopicCounter,
    config_of,
    engine_env,
    forecasts_by_key,
    read_topic,
)

from streamer.config import Config
from streamer.forecaster import Forecaster
from streamer.produce import EventProducer, paced
from streamer.state.redis_store import RedisStore
from streamer.synthetic import DEFAULT_START_TS, SyntheticMarket

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENTITIES = 200
STEPS = 150
BACKLOG_STEPS = 40  # produced before the engine starts
RATE = 2500.0  # events per second for the rest
SEED = 6


def _produce(config: Config, market: SyntheticMarket, steps: range, rate: float | None) -> None:
    features = config.stream.features
    events = [e for e in market.events() if int(e["ts"] - DEFAULT_START_TS) in steps]
    with EventProducer(config) as out:
        for ev in paced(events, rate):
            out.send(ev["entity"], ev["ts"], [ev["values"][f] for f in features])


def test_sigterm_then_restart_replays_nothing_and_duplicates_nothing(
    kafka_bootstrap: str, redis_url: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    env = engine_env(
        bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        group=unique("group"),
        input_topic=unique("live"),
        output_topic=unique("out"),
        dlq_topic=unique("dlq"),
        every_steps=20,
    )
    config = config_of(env)
    layout = Forecaster(config).layout
    market = SyntheticMarket(entities=ENTITIES, steps=STEPS, seed=SEED)
    _produce(config, market, range(BACKLOG_STEPS), None)

    errors: list[BaseException] = []

    def live() -> None:
        try:
            _produce(config, market, range(BACKLOG_STEPS, STEPS), RATE)
        except BaseException as exc:
            errors.append(exc)

    producer = threading.Thread(target=live, name="live-producer", daemon=True)
    counter = TopicCounter(kafka_bootstrap, env["STREAMER_KAFKA_OUTPUT_TOPIC"])
    first = EngineProcess(env, tmp_path, "first", idle_exit_s=30.0).start()
    try:
        # SIGTERM once the backlog's forecasts are out and a random part of the live stream
        # is too: the engine has joined, holds partitions and is consuming.
        threshold = (BACKLOG_STEPS - 1) * ENTITIES + rng.randint(0, 10 * ENTITIES)
        deadline = time.monotonic() + 90
        while counter.count() < BACKLOG_STEPS // 2 * ENTITIES:
            assert first.poll() is None, f"engine exited early\n{first.log_tail()}"
            assert time.monotonic() < deadline, f"no forecasts\n{first.log_tail()}"
            time.sleep(0.02)
        producer.start()
        while counter.count() < threshold:
            assert first.poll() is None, f"engine exited early\n{first.log_tail()}"
            assert time.monotonic() < deadline, f"no forecasts\n{first.log_tail()}"
            time.sleep(0.01)
        sigterm_at = time.monotonic()
        first.signal(signal.SIGTERM)
        rc = first.wait(timeout=60)
        stop_s = time.monotonic() - sigterm_at
    finally:
        first.stop()
    assert rc == 0, f"SIGTERM: exit status {rc}\n{first.log_tail()}"
    assert "received SIGTERM" in first.stderr()
    assert producer.is_alive(), "the stream ended before SIGTERM: the test did not stop a consumer"
    stats1 = first.summary()
    assert stats1["consumed"] > 0 and stats1["steps"] > 0 and stats1["forecasts"] > 0
    assert stats1["checkpoints"] >= 1 and stats1["checkpoint_failures"] == 0
    assert stats1["dead_lettered"] == {} and stats1["late"] == 0
    assert stats1["replayed"] == 0
    # Everything the first run published was flushed before it exited.
    published_by_first = len(read_topic(kafka_bootstrap, env["STREAMER_KAFKA_OUTPUT_TOPIC"]))
    assert published_by_first == stats1["forecasts"]
    # Its last checkpoint covers every step it closed.
    stored = RedisStore(redis_url, config.namespace).load(
        config.kafka.input_topic, range(config.kafka.partitions), layout
    )
    assert len(stored.positions) == config.kafka.partitions
    resume_at = sum(stored.positions.values())
    assert resume_at <= stats1["consumed"]
    last_step = max(stored.steps.values())
    assert last_step - int(DEFAULT_START_TS) + 1 == stats1["steps"]
    assert {e.last_step for e in stored.entities} == {last_step}

    # ---- restart: reads the rest of the stream, replays nothing
    restart_at = time.monotonic()
    second = EngineProcess(env, tmp_path, "second", idle_exit_s=3.0).start()
    try:
        producer.join(timeout=120)
        assert not producer.is_alive(), "the live producer did not finish"
        assert not errors, errors
        rc = second.wait()
    finally:
        second.stop()
        counter.close()
    assert rc == 0, f"restart: exit status {rc}\n{second.log_tail()}"
    stats2 = second.summary()
    assert stats2["replayed"] == 0, stats2
    assert stats2["duplicates"] == 0 and stats2["late"] == 0 and stats2["dead_lettered"] == {}
    restored, positions = second.assignments()[0]
    assert restored == ENTITIES and sum(v or 0 for v in positions.values()) == resume_at
    assert stats1["steps"] + stats2["steps"] == STEPS
    # The restart reads from the checkpointed positions to the end; what it reads again is
    # only the buffered events of the steps that were still open at the stop.
    assert stats2["consumed"] == ENTITIES * STEPS - resume_at
    reread = stats1["consumed"] - resume_at
    assert 0 <= reread < 3 * ENTITIES  # one open step, or two when a partition lagged

    messages = read_topic(kafka_bootstrap, env["STREAMER_KAFKA_OUTPUT_TOPIC"])
    out = forecasts_by_key(messages)
    twice = sorted(k for k, v in out.items() if len(v) > 1)
    assert not twice, f"{len(twice)} forecasts published twice, e.g. {twice[:5]}"
    first_step = int(DEFAULT_START_TS)
    want = {(market.entity_id(i), first_step + t) for i in range(ENTITIES) for t in range(1, STEPS)}
    assert set(out) == want
    assert len(messages) == stats1["forecasts"] + stats2["forecasts"]
    print(
        f"\nSIGTERM -> exit {stop_s:.2f} s; first run {stats1}; restart to exit "
        f"{time.monotonic() - restart_at:.1f} s (join {second.join_seconds()} s), "
        f"re-read {reread} events of the open step; second run {stats2}"
    )
