"""Bounded memory: idle entities are evicted after a checkpoint and come back exactly."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from streamer.config import CapacityConfig, CheckpointConfig, Config, KafkaConfig, RedisConfig
from streamer.engine import Engine
from streamer.forecaster import StepResult
from streamer.kafka_io import KafkaIO
from streamer.produce import EventProducer
from streamer.state.redis_store import RedisStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

T0 = 1_767_225_600.0


def stream() -> list[tuple[str, int]]:
    """(entity, step): a heartbeat H always; cohort A at 0-9 and again 30-35; B at 14-23.

    With at most 6 rows, B only fits once A is evicted, and A only once B is.
    """
    out = []
    for t in range(36):
        out.append(("H", t))
        if t < 10 or t >= 30:
            out += [(f"A{i}", t) for i in range(4)]
        if 14 <= t < 24:
            out += [(f"B{i}", t) for i in range(4)]
    return out


def run_engine(config: Config) -> tuple[dict[tuple[str, int], np.ndarray], Engine]:
    store = RedisStore(config.redis.url, config.namespace)
    engine = Engine(config, store, KafkaIO(config.kafka), progress_every_s=3600)
    seen: dict[tuple[str, int], np.ndarray] = {}

    def on_step(result: StepResult) -> None:
        for j, entity in enumerate(result.entities):
            if result.valid[j]:
                seen[(entity, result.step)] = result.forecasts[j].copy()

    engine.on_step = on_step
    engine.run(idle_exit_s=3.0)
    store.close()
    return seen, engine


def test_idle_entities_are_evicted_and_restored_exactly(kafka_bootstrap, redis_url, unique):
    topic = unique("evict")
    base = Config(
        kafka=KafkaConfig(
            bootstrap=kafka_bootstrap,
            input_topic=topic,
            output_topic=f"{topic}.out",
            group=unique("g"),
            partitions=1,  # the heartbeat's own partition moves the watermark
            session_timeout_ms=6000,
            max_poll_interval_ms=10000,
        ),
        redis=RedisConfig(url=redis_url),
        checkpoint=CheckpointConfig(every_steps=50),
    )
    rng = np.random.default_rng(0)
    with EventProducer(base) as producer:
        for entity, t in stream():
            price = float(100 + rng.normal())
            producer.send(entity, T0 + t + 0.5, [price, float(rng.normal())])
    roomy = dataclasses.replace(
        base,
        kafka=dataclasses.replace(base.kafka, group=unique("g")),
        capacity=CapacityConfig(initial=16, max_entities=16),
    )
    tight = dataclasses.replace(
        base, capacity=CapacityConfig(initial=2, max_entities=6, evict_idle_steps=2)
    )
    expected, _ = run_engine(roomy)
    got, engine = run_engine(tight)
    assert engine.stats.dead_lettered == {}  # nobody was refused for lack of a slot
    assert engine.stats.evicted >= 8  # A's four, then B's four
    assert engine.stats.restored_after_eviction == 4  # A came back with its state
    assert len(engine.core.registry) <= 6
    # Without eviction the idle B rows keep the last steps incomplete, so they close only by
    # watermark and the final ones stay open at the stop; with eviction they are complete.
    assert expected.keys() <= got.keys()
    assert {s for _, s in expected} >= set(range(int(T0) + 1, int(T0) + 34))  # 0 warms up
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, atol=1e-6, err_msg=str(key))
