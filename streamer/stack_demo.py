"""The README's main job: the whole product on the embedded stack, from nothing.

Starts a Kafka-protocol broker (tansu) and Redis on free loopback ports, streams a synthetic
market of N stocks into the input topic at a steady rate, runs the engine on it (consumer
group, aligned steps, stateful LSTM, forecasts to Kafka and Redis, checkpoints), prints live
progress and sample forecasts, then stops everything cleanly. STREAMER_KAFKA_BOOTSTRAP /
STREAMER_REDIS_URL use existing servers instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import threading
import time
import uuid
from typing import Any, TextIO

from .config import Config
from .engine import Engine
from .forecaster import StepResult
from .kafka_io import KafkaIO, client_kwargs, ensure_topics
from .prequential import headline
from .produce import produce_synthetic
from .services import EmbeddedStack
from .state.redis_store import RedisStore

log = logging.getLogger(__name__)


def run_stack_demo(
    config: Config,
    *,
    entities: int,
    steps: int,
    rate: float,
    seed: int,
    out: TextIO = sys.stdout,
) -> dict[str, Any]:
    stack = None
    bootstrap = os.environ.get("STREAMER_KAFKA_BOOTSTRAP")
    redis_url = os.environ.get("STREAMER_REDIS_URL")
    if not bootstrap or not redis_url:
        print("starting the embedded stack (tansu broker + Redis) on free ports ...", file=out)
        stack = EmbeddedStack()
        stack.start()
        bootstrap, redis_url = stack.bootstrap, stack.redis_url
    print(f"Kafka at {bootstrap}, Redis at {redis_url}", file=out, flush=True)
    run = uuid.uuid4().hex[:6]
    config = dataclasses.replace(
        config,
        kafka=dataclasses.replace(
            config.kafka,
            bootstrap=bootstrap,
            input_topic=f"demo-{run}-events",
            output_topic=f"demo-{run}-forecasts",
            group=f"demo-{run}",
            session_timeout_ms=6000,
            max_poll_interval_ms=30000,
        ),
        redis=dataclasses.replace(config.redis, url=redis_url),
        # The demo shows the whole product: the engine learns online from the stream.
        learn=dataclasses.replace(config.learn, enabled=True),
    )
    k = config.kafka
    ensure_topics(bootstrap, [k.input_topic, k.output_topic, k.dlq], k.partitions, client_kwargs(k))
    produced: dict[str, Any] = {}

    def producer() -> None:
        try:
            produced["n"] = produce_synthetic(
                config, entities=entities, steps=steps, seed=seed, rate=rate, bootstrap=bootstrap
            )
        except Exception as exc:  # reported below; the engine stops on idleness
            produced["error"] = exc

    store = RedisStore.from_config(config.redis, config.namespace)
    engine = Engine(config, store, KafkaIO(k), progress_every_s=2.0)
    engine.install_signal_handlers()
    show = [f"SYN{i:05d}" for i in range(min(3, entities))]
    every = max(1, steps // 10)

    def on_step(result: StepResult) -> None:
        if engine.stats.steps % every:
            return
        parts = []
        for entity in show:
            if entity in result.entities:
                j = result.entities.index(entity)
                if result.valid[j]:
                    parts.append(f"{entity} next price {result.levels[j, 0]:.2f}")
        if parts:
            quality = headline(engine.core.prequential.summary("recent")[0])
            print(
                f"  step {engine.stats.steps} (weights v{engine.weights_version}, recent "
                f"one-step {quality}): " + "; ".join(parts),
                file=out,
                flush=True,
            )

    engine.on_step = on_step
    thread = threading.Thread(target=producer, name="producer", daemon=True)
    print(
        f"streaming {entities} synthetic stocks x {steps} steps at {rate:,.0f} events/s "
        f"into {k.input_topic}; forecasts go to {k.output_topic}",
        file=out,
        flush=True,
    )
    t0 = time.monotonic()
    thread.start()
    try:
        stats = engine.run(idle_exit_s=4.0)
    finally:
        store.close()
        if stack is not None:
            stack.stop()
    thread.join(timeout=5)
    if "error" in produced:
        raise produced["error"]
    summary = {
        "elapsed_s": round(time.monotonic() - t0, 1),
        **stats.summary(),
        "checkpoint_ms_p50": round(sorted(stats.checkpoint_ms)[len(stats.checkpoint_ms) // 2], 2)
        if stats.checkpoint_ms
        else None,
        "prequential": engine.core.prequential.summary("total"),
    }
    for row in summary["prequential"]:
        print(f"  horizon {row['horizon']} over all steps: {headline(row)}", file=out)
    print("done:", json.dumps(summary), file=out, flush=True)
    return summary
