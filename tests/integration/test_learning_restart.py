"""Online learning against real services: weights versions survive a restart."""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamer.config import (
    CheckpointConfig,
    Config,
    KafkaConfig,
    LearnConfig,
    ModelConfig,
    RedisConfig,
)
from streamer.engine import Engine
from streamer.kafka_io import KafkaIO
from streamer.produce import produce_synthetic
from streamer.state.redis_store import RedisStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_restart_after_updates_resumes_with_the_checkpointed_weights_version(
    kafka_bootstrap, redis_url, unique
):
    topic = unique("learn")
    config = Config(
        model=ModelConfig(units=(8,)),
        kafka=KafkaConfig(
            bootstrap=kafka_bootstrap,
            input_topic=topic,
            output_topic=f"{topic}.out",
            group=unique("g"),
            partitions=2,
            session_timeout_ms=6000,
            max_poll_interval_ms=10000,
        ),
        redis=RedisConfig(url=redis_url),
        checkpoint=CheckpointConfig(every_steps=10),
        learn=LearnConfig(enabled=True, window=16, update_every=8, shadow_steps=2),
    )
    produce_synthetic(config, entities=20, steps=60, seed=4)

    def engine() -> tuple[Engine, RedisStore]:
        store = RedisStore(config.redis.url, config.namespace)
        return Engine(config, store, KafkaIO(config.kafka), progress_every_s=3600), store

    first, store = engine()
    first.run(idle_exit_s=3.0)
    assert first.core.learner is not None
    version = first.weights_version
    assert version >= 3, "60 steps with updates every 8 should give several versions"
    weights = first.core.model.get_weights()
    assert store.get_weights(version) is not None
    assert first.stats.checkpoints >= 1
    # The prequential scores are in Redis beside the states, as JSON.
    quality = json.loads(store.get_quality() or b"{}")
    assert quality["weights_version"] == version
    assert quality["recent"][0]["horizon"] == 1 and quality["recent"][0]["count"] > 0
    assert quality["learning"]["updates"] >= 3
    store.close()

    second, store = engine()
    second.run(idle_exit_s=2.0)  # nothing new to read: it restores and stops
    assert second.stats.replayed == 0 and second.stats.applied == 0
    assert second.weights_version == version
    for a, b in zip(weights, second.core.model.get_weights(), strict=True):
        assert np.array_equal(a, b)
    learner = second.core.learner
    assert learner is not None and learner.batches == first.core.learner.batches
    store.close()
