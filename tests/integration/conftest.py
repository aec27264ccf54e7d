"""Fixtures for integration tests: a real Kafka-protocol broker and a real Redis.

`kafka_bootstrap` and `redis_url` are session-scoped. By default each starts the embedded
service from `streamer.services` (tansu, redis-server) once per session on a free
127.0.0.1 port and stops it at the end. To run against servers of your own instead, set

    KAFKA_BOOTSTRAP=host:port            e.g. a docker-compose Apache Kafka
    REDIS_URL=redis://host:port/db

(read when this module is imported; names without the STREAMER_ prefix because
tests/conftest.py deletes every STREAMER_* variable). Tests use unique topic, group and
key names, so a shared external server is not disturbed, but nothing is cleaned up there.

These fixtures never skip: a service that cannot be found, started or reached fails the
test session loudly, with the end of the service's log.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from streamer.errors import ServiceError
from streamer.services import EmbeddedKafka, EmbeddedRedis

EXTERNAL_KAFKA_ENV = "KAFKA_BOOTSTRAP"
EXTERNAL_REDIS_ENV = "REDIS_URL"
_EXTERNAL_KAFKA = os.environ.get(EXTERNAL_KAFKA_ENV, "").strip()
_EXTERNAL_REDIS = os.environ.get(EXTERNAL_REDIS_ENV, "").strip()
START_TIMEOUT_S = 60.0


def _check_external_kafka(bootstrap: str) -> None:
    from kafka import KafkaAdminClient

    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=10_000, bootstrap_timeout_ms=10_000
        )
        try:
            admin.describe_cluster()
        finally:
            admin.close()
    except Exception as exc:
        pytest.fail(
            f"{EXTERNAL_KAFKA_ENV}={bootstrap!r} does not answer: {type(exc).__name__}: {exc}",
            pytrace=False,
        )


def _check_external_redis(url: str) -> None:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        pytest.fail(
            f"{EXTERNAL_REDIS_ENV}={url!r} does not answer: {type(exc).__name__}: {exc}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """`bootstrap_servers` of a running Kafka-protocol broker ("127.0.0.1:PORT")."""
    if _EXTERNAL_KAFKA:
        _check_external_kafka(_EXTERNAL_KAFKA)
        yield _EXTERNAL_KAFKA
        return
    broker = EmbeddedKafka()
    try:
        broker.start(timeout=START_TIMEOUT_S)
    except ServiceError as exc:
        pytest.fail(f"cannot start the embedded Kafka broker: {exc}", pytrace=False)
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a running Redis ("redis://127.0.0.1:PORT/0")."""
    if _EXTERNAL_REDIS:
        _check_external_redis(_EXTERNAL_REDIS)
        yield _EXTERNAL_REDIS
        return
    server = EmbeddedRedis()
    try:
        server.start(timeout=START_TIMEOUT_S)
    except ServiceError as exc:
        pytest.fail(f"cannot start the embedded Redis: {exc}", pytrace=False)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def unique() -> Callable[[str], str]:
    """unique("topic") -> "test-topic-1a2b3c4d5e": names that no other test or run shares."""

    def make(kind: str) -> str:
        return f"test-{kind}-{uuid.uuid4().hex[:10]}"

    return make
