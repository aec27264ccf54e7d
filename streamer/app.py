"""Wiring of the adapters for the command line: engine, embedded services."""

from __future__ import annotations

import logging
import signal
import threading

from .config import Config
from .engine import Engine, EngineStats
from .http_api import serve as serve_http
from .kafka_io import KafkaIO, client_kwargs, ensure_topics
from .services import EmbeddedStack
from .state.redis_store import RedisStore

log = logging.getLogger(__name__)


def build_engine(config: Config) -> Engine:
    """An engine on the configured Kafka and Redis; fails fast if either is unreachable."""
    store = RedisStore.from_config(config.redis, config.namespace)
    store.ping()
    k = config.kafka
    ensure_topics(
        k.bootstrap, [k.input_topic, k.output_topic, k.dlq], k.partitions, client_kwargs(k)
    )
    return Engine(config, store, KafkaIO(k))


def run_engine(
    config: Config, *, max_steps: int | None = None, idle_exit_s: float | None = None
) -> EngineStats:
    from .model import configure_devices, describe_device

    configure_devices()  # before the model places anything on a GPU
    engine = build_engine(config)
    engine.install_signal_handlers()
    log.info(describe_device(config.model.jit, config.model.precision))
    log.info(
        "streamer engine: group %s, %s -> %s (dead letters: %s)",
        config.kafka.group,
        config.kafka.input_topic,
        config.kafka.output_topic,
        config.kafka.dlq,
    )
    http = serve_http(engine, config)
    if http is not None:
        engine.learning_metrics = http.metrics.learning
    try:
        return engine.run(max_steps=max_steps, idle_exit_s=idle_exit_s)
    finally:
        if http is not None:
            http.close()
        engine.store.close()


def run_services(*, kafka_port: int, redis_port: int, workdir: str | None, persist: bool) -> None:
    """Run the embedded broker and Redis in the foreground until SIGINT/SIGTERM."""
    stack = EmbeddedStack(
        kafka_port=kafka_port, redis_port=redis_port, workdir=workdir, redis_persist=persist
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stack.start()
    try:
        print(
            f"Kafka (tansu) on {stack.bootstrap}, Redis on {stack.redis_url}\n"
            f"export STREAMER_KAFKA_BOOTSTRAP={stack.bootstrap} "
            f"STREAMER_REDIS_URL={stack.redis_url}\nCtrl-C stops both.",
            flush=True,
        )
        while not stop.wait(1.0):
            if not stack.running:
                log.error("a service exited; stopping")
                break
    finally:
        stack.stop()
