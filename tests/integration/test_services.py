"""The embedded stack answers real clients: kafka-python against tansu, redis-py against Redis.

The kafka-python settings used here are the ones the engine is meant to use against the
embedded broker; see `PRODUCER_KWARGS` and `GROUP_CONSUMER_KWARGS`.
"""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic

from streamer.errors import ServiceError, StreamerError
from streamer.services import (
    EmbeddedKafka,
    EmbeddedRedis,
    EmbeddedStack,
    free_port,
    resolve_redis_server,
    resolve_tansu,
)

pytestmark = pytest.mark.integration

PARTITIONS = 4
# kafka-python 3.x defaults (api_version negotiated, idempotent producer, acks=all) work
# against tansu; these only make the tests fast and explicit.
PRODUCER_KWARGS: dict[str, object] = {"acks": "all", "linger_ms": 0}
# A group join takes ~3 s on tansu (initial rebalance delay). Short session/poll intervals
# keep a rejoin after a crashed member near 10 s instead of the 45 s session default.
GROUP_CONSUMER_KWARGS: dict[str, object] = {
    "auto_offset_reset": "earliest",
    "enable_auto_commit": False,
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 1000,
    "max_poll_interval_ms": 10000,
}
JOIN_TIMEOUT_S = 30.0


@pytest.fixture
def topic(kafka_bootstrap: str, unique: Callable[[str], str]) -> Iterator[str]:
    """A fresh topic with PARTITIONS partitions."""
    name = unique("topic")
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(name, num_partitions=PARTITIONS, replication_factor=1)])
        yield name
    finally:
        admin.close()


def _produce(bootstrap: str, topic: str, count: int, offset: int = 0) -> dict[bytes, set[int]]:
    """Send `count` keyed messages with headers; return the partitions each key went to."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, **PRODUCER_KWARGS)
    partitions: dict[bytes, set[int]] = {}
    try:
        futures = []
        for i in range(offset, offset + count):
            key = f"entity-{i % 8}".encode()
            headers = [("source", b"test"), ("seq", str(i).encode())]
            futures.append((key, producer.send(topic, key=key, value=b"v%d" % i, headers=headers)))
        producer.flush(timeout=30)
        for key, future in futures:
            partitions.setdefault(key, set()).add(future.get(timeout=30).partition)
    finally:
        producer.close()
    return partitions


def _poll_until(consumer: KafkaConsumer, count: int, timeout: float = JOIN_TIMEOUT_S) -> list:
    records: list = []
    deadline = time.monotonic() + timeout
    while len(records) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
    return records


def _group_consumer(bootstrap: str, topic: str, group: str) -> KafkaConsumer:
    return KafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=group, **GROUP_CONSUMER_KWARGS
    )


# -- Kafka -----------------------------------------------------------------------------------


def test_topic_has_the_requested_partitions(kafka_bootstrap: str, topic: str) -> None:
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
    try:
        assert consumer.partitions_for_topic(topic) == set(range(PARTITIONS))
    finally:
        consumer.close()


def test_keyed_messages_with_headers_come_back_by_assign_and_seek(
    kafka_bootstrap: str, topic: str
) -> None:
    partitions_of_key = _produce(kafka_bootstrap, topic, 40)
    # One key, one partition: the per-entity ordering the engine relies on.
    assert all(len(parts) == 1 for parts in partitions_of_key.values())

    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        consumer.seek_to_beginning()
        records = _poll_until(consumer, 40, timeout=15)
        assert len(records) == 40
        for record in records:
            seq = int(dict(record.headers)["seq"])
            assert dict(record.headers)["source"] == b"test"
            assert record.value == b"v%d" % seq
            assert record.key == f"entity-{seq % 8}".encode()
            assert {record.partition} == partitions_of_key[record.key]
        # Offsets per partition are dense from 0 and keep send order per key.
        by_partition: dict[int, list[int]] = {}
        for record in records:
            by_partition.setdefault(record.partition, []).append(record.offset)
        for offsets in by_partition.values():
            assert offsets == list(range(len(offsets)))

        # Seek back into the middle of the busiest partition and read from there.
        busiest = max(by_partition, key=lambda p: len(by_partition[p]))
        tp = TopicPartition(topic, busiest)
        consumer.assign([tp])
        consumer.seek(tp, 2)
        again = _poll_until(consumer, len(by_partition[busiest]) - 2, timeout=15)
        assert [r.offset for r in again] == list(range(2, len(by_partition[busiest])))
        # No end_offsets()/seek_to_end() check: tansu 0.6.0 answers them wrongly (see the
        # notes in streamer.services).
    finally:
        consumer.close()


@pytest.mark.slow
def test_consumer_group_joins_commits_and_resumes(
    kafka_bootstrap: str, topic: str, unique: Callable[[str], str]
) -> None:
    group = unique("group")
    _produce(kafka_bootstrap, topic, 20)

    first = _group_consumer(kafka_bootstrap, topic, group)
    try:
        began = time.monotonic()
        records = _poll_until(first, 20)
        joined_after = time.monotonic() - began
        assert len(records) == 20, f"group consumer got {len(records)}/20 in {JOIN_TIMEOUT_S} s"
        assert len(first.assignment()) == PARTITIONS
        first.commit()
        committed = {tp.partition: first.committed(tp) for tp in first.assignment()}
        assert sum(committed.values()) == 20
    finally:
        first.close()
    print(f"first consumer-group join + fetch: {joined_after:.2f} s")

    _produce(kafka_bootstrap, topic, 5, offset=100)
    second = _group_consumer(kafka_bootstrap, topic, group)
    try:
        resumed = _poll_until(second, 5)
        # Only what came after the commit: the group resumed from committed offsets.
        assert sorted(int(dict(r.headers)["seq"]) for r in resumed) == list(range(100, 105))
        assert second.poll(timeout_ms=500) == {}
    finally:
        second.close()


@pytest.mark.slow
def test_two_group_members_split_the_partitions(
    kafka_bootstrap: str, topic: str, unique: Callable[[str], str]
) -> None:
    group = unique("group")
    members = [_group_consumer(kafka_bootstrap, topic, group) for _ in range(2)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def keep_polling(consumer: KafkaConsumer) -> None:
        # One thread per member, like separate engine processes. Polling both from one
        # thread in turn makes the follower's join fail over and over on tansu.
        try:
            while not stop.is_set():
                consumer.poll(timeout_ms=100)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=keep_polling, args=(c,), daemon=True) for c in members]
    for thread in threads:
        thread.start()
    try:
        began = time.monotonic()
        deadline = began + JOIN_TIMEOUT_S
        a, b = members
        while time.monotonic() < deadline and not errors:
            owned_a, owned_b = a.assignment(), b.assignment()
            if owned_a and owned_b and len(owned_a | owned_b) == PARTITIONS:
                break
            time.sleep(0.05)
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        assert not errors, errors
        owned_a, owned_b = a.assignment(), b.assignment()
        assert owned_a and owned_b, f"both members should own partitions: {owned_a} {owned_b}"
        assert not owned_a & owned_b
        assert {tp.partition for tp in owned_a | owned_b} == set(range(PARTITIONS))
        print(f"two members split the partitions after {time.monotonic() - began:.2f} s")
    finally:
        stop.set()
        # Both leave at once, which wedges this group on tansu 0.6.0 (see the notes in
        # streamer.services); harmless here because the group id is never used again.
        for consumer in members:
            consumer.close()


# -- Redis -----------------------------------------------------------------------------------


def test_redis_set_get(redis_url: str, unique: Callable[[str], str]) -> None:
    client = redis.Redis.from_url(redis_url)
    key = unique("key")
    try:
        assert client.ping()
        assert client.set(key, b"\x00\x01binary", ex=60)
        assert client.get(key) == b"\x00\x01binary"
        assert 0 < client.ttl(key) <= 60
    finally:
        client.delete(key)
        client.close()


def test_redis_multi_exec_and_watch(redis_url: str, unique: Callable[[str], str]) -> None:
    client = redis.Redis.from_url(redis_url)
    other = redis.Redis.from_url(redis_url)
    counter, state = unique("counter"), unique("state")
    try:
        pipe = client.pipeline(transaction=True)
        pipe.incr(counter)
        pipe.hset(state, mapping={"step": "7", "slot": "3"})
        pipe.hgetall(state)
        assert pipe.execute() == [1, 2, {b"step": b"7", b"slot": b"3"}]

        # Optimistic locking: a write by someone else between WATCH and EXEC aborts EXEC.
        with client.pipeline(transaction=True) as watched:
            watched.watch(state)
            other.hset(state, "step", "8")
            watched.multi()
            watched.hset(state, "step", "9")
            with pytest.raises(redis.WatchError):
                watched.execute()
        assert client.hget(state, "step") == b"8"
    finally:
        client.delete(counter, state)
        client.close()
        other.close()


# -- lifecycle and failures ---------------------------------------------------------------------


def test_binaries_resolve_to_executables() -> None:
    for path in (resolve_tansu(), resolve_redis_server()):
        assert os.path.isfile(path) and os.access(path, os.X_OK)


def test_stack_starts_both_and_cleans_up() -> None:
    with EmbeddedStack() as stack:
        assert stack.running
        assert stack.bootstrap.startswith("127.0.0.1:")
        assert stack.redis_url.startswith("redis://127.0.0.1:")
        assert redis.Redis.from_url(stack.redis_url).ping()
        workdirs = [stack.kafka.workdir, stack.redis.workdir]
        assert all(w is not None and w.is_dir() for w in workdirs)
        pids = [stack.kafka.pid, stack.redis.pid]
        print(
            f"start: kafka {stack.kafka.startup_seconds:.2f} s, "
            f"redis {stack.redis.startup_seconds:.2f} s"
        )
    assert not stack.running
    assert all(w is not None and not w.exists() for w in workdirs)
    for pid in pids:
        assert pid is not None and not _alive(pid)


def test_redis_persists_across_restart_in_a_workdir(tmp_path: Path) -> None:
    server = EmbeddedRedis(workdir=tmp_path, persist=True)
    with server:
        redis.Redis.from_url(server.url).set("kept", "yes")
    with server:
        assert redis.Redis.from_url(server.url).get("kept") == b"yes"
    assert (tmp_path / "redis.log").is_file()


def test_persist_without_workdir_is_refused() -> None:
    with pytest.raises(ValueError, match="workdir"):
        EmbeddedRedis(persist=True)


@pytest.mark.parametrize(
    ("service", "bogus"),
    [(EmbeddedKafka, "--no-such-flag"), (EmbeddedRedis, "--no-such-directive")],
)
def test_early_exit_raises_with_the_log_tail(
    service: type[EmbeddedKafka] | type[EmbeddedRedis], bogus: str
) -> None:
    server = service(extra_args=[bogus])
    with pytest.raises(ServiceError) as caught:
        server.start(timeout=20)
    error = caught.value
    assert isinstance(error, StreamerError)
    assert error.service == service.name
    assert "exited with code" in str(error)
    assert "no-such" in error.log_tail, error.log_tail
    assert error.log_tail in str(error)
    assert not server.running
    assert server.workdir is None  # the temp dir went; the error carries the log tail
    server.stop()  # idempotent after a failed start


def test_fixed_port_in_use_is_refused() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ServiceError, match=f"port {port} .* already in use"):
            EmbeddedRedis(port).start()


def test_no_answer_times_out_with_the_log_tail_and_kills_the_process(tmp_path: Path) -> None:
    script = tmp_path / "silent-server"
    pidfile = tmp_path / "pid"
    script.write_text(f'#!/bin/sh\necho $$ > {pidfile}\necho "warming up forever"\nexec sleep 60\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    server = EmbeddedRedis(binary=script, workdir=tmp_path / "work")
    began = time.monotonic()
    with pytest.raises(ServiceError, match="no answer") as caught:
        server.start(timeout=1.5)
    assert time.monotonic() - began < 10
    assert "warming up forever" in caught.value.log_tail
    assert not server.running
    assert not _alive(int(pidfile.read_text()))
    assert "warming up forever" in (tmp_path / "work" / "redis.log").read_text()  # kept


def test_missing_binary_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match="not an executable"):
        EmbeddedKafka(binary=tmp_path / "no-tansu-here").start()


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
