"""The Kafka adapter: one consumer (group member) and one producer behind a small interface.

Everything kafka-python raises is translated into `KafkaError` here. The engine sees plain
records, partition numbers and offsets; it never touches kafka-python types.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import kafka
import kafka.errors
from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.partitioner.default import murmur2
from kafka.structs import OffsetAndMetadata, TopicPartition

from .config import KafkaConfig
from .errors import KafkaError

log = logging.getLogger(__name__)

# Dead-letter headers (bytes values): why and where the refused message came from.
DLQ_REASON = "streamer-reason"
DLQ_ERROR = "streamer-error"
DLQ_TOPIC = "streamer-source-topic"
DLQ_PARTITION = "streamer-source-partition"
DLQ_OFFSET = "streamer-source-offset"


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


Assigned = Callable[[list[int]], Mapping[int, int | None]]
Revoked = Callable[[list[int]], None]


def client_kwargs(config: KafkaConfig) -> dict[str, Any]:
    """kafka-python arguments for the configured security (TLS, SASL); only what is set.

    Every client streamer makes (consumer, producer, admin) takes them. The SASL and key
    passwords are read here (from their `*_file` when so configured).
    """
    kwargs: dict[str, Any] = {"security_protocol": config.security_protocol}
    if config.uses_sasl:
        kwargs["sasl_mechanism"] = config.sasl_mechanism
        kwargs["sasl_plain_username"] = config.sasl_username
        kwargs["sasl_plain_password"] = config.sasl_password_value
    if config.uses_ssl:
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(config, name):
                kwargs[name] = getattr(config, name)
        ssl_password = config.ssl_password_value
        if ssl_password:
            kwargs["ssl_password"] = ssl_password
        kwargs["ssl_check_hostname"] = config.ssl_check_hostname
    return kwargs


def ensure_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int,
    security: Mapping[str, Any] | None = None,
) -> None:
    """Create the topics that do not exist yet (idempotent). `security`: client_kwargs()."""
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap, client_id="streamer-admin", **(security or {})
        )
    except kafka.errors.KafkaError as exc:
        raise KafkaError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
    try:
        existing = set(admin.list_topics())
        missing = [n for n in dict.fromkeys(names) if n not in existing]
        if missing:
            with contextlib.suppress(kafka.errors.TopicAlreadyExistsError):
                admin.create_topics(
                    [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in missing]
                )
            log.info("created topics %s with %d partitions", missing, partitions)
    except kafka.errors.KafkaError as exc:
        raise KafkaError(f"cannot create topics on {bootstrap}: {exc}") from exc
    finally:
        admin.close()


def producer(
    bootstrap: str, security: Mapping[str, Any] | None = None, **overrides: Any
) -> KafkaProducer:
    """A producer with streamer's defaults; `security`: client_kwargs(); `overrides` win."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "acks": "all",
        "linger_ms": 5,
        "batch_size": 256 * 1024,
        "max_in_flight_requests_per_connection": 1,  # keeps per-key order across retries
        "retries": 5,
        "client_id": "streamer",
    }
    kwargs.update(security or {})
    kwargs.update(overrides)
    try:
        return KafkaProducer(**kwargs)
    except kafka.errors.KafkaError as exc:
        raise KafkaError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc


class KafkaIO:
    """Consumer-group member on the input topic + producer of forecasts and dead letters."""

    def __init__(self, config: KafkaConfig) -> None:
        self._cfg = config
        self._topic = config.input_topic
        try:
            self._consumer = KafkaConsumer(
                bootstrap_servers=config.bootstrap,
                group_id=config.group,
                client_id=f"streamer-{config.group}",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                session_timeout_ms=config.session_timeout_ms,
                heartbeat_interval_ms=max(1000, config.session_timeout_ms // 3),
                max_poll_interval_ms=config.max_poll_interval_ms,
                max_poll_records=config.max_poll_records,
                fetch_max_bytes=32 * 1024 * 1024,
                max_partition_fetch_bytes=8 * 1024 * 1024,
                **client_kwargs(config),
            )
        except kafka.errors.KafkaError as exc:
            raise KafkaError(f"cannot reach Kafka at {config.bootstrap}: {exc}") from exc
        self._producer = producer(config.bootstrap, client_kwargs(config))
        self._assigned: set[int] = set()
        self._paused: set[int] = set()
        # Output partition per entity, computed once with the producer's own partitioner
        # (murmur2 of the key, as Kafka's default): the same partition as keyed sends, without
        # hashing every message.
        self._out_partition: dict[str, int] = {}
        self._out_partitions: list[int] | None = None

    # --------------------------------------------------------------- consuming

    def subscribe(self, on_assigned: Assigned, on_revoked: Revoked) -> None:
        io = self

        class Listener(ConsumerRebalanceListener):
            # An exception escaping a listener makes kafka-python fail the poll ("User
            # rebalance callback throws an error"): the engine handles its own errors, and
            # this last guard logs anything left instead of letting it through.
            def on_partitions_revoked(self, revoked: Any) -> None:
                parts = sorted(tp.partition for tp in revoked if tp.topic == io._topic)
                io._assigned.difference_update(parts)
                io._paused.difference_update(parts)
                try:
                    on_revoked(parts)
                except Exception:
                    log.exception("revoking partitions %s failed", parts)

            def on_partitions_assigned(self, assigned: Any) -> None:
                parts = sorted(tp.partition for tp in assigned if tp.topic == io._topic)
                io._assigned.update(parts)
                try:
                    seeks = on_assigned(parts)
                    for p, pos in seeks.items():
                        io.seek(p, pos)
                except Exception:
                    log.exception("assigning partitions %s failed; they stay paused", parts)
                    io.pause(parts)

        try:
            self._consumer.subscribe([self._topic], listener=Listener())
        except kafka.errors.KafkaError as exc:
            raise KafkaError(f"cannot subscribe to {self._topic}: {exc}") from exc

    def poll(self, timeout_ms: int | None = None) -> list[Record]:
        """Records of the unpaused partitions; also heartbeats and runs rebalances."""
        try:
            batches = self._consumer.poll(
                timeout_ms=self._cfg.poll_timeout_ms if timeout_ms is None else timeout_ms,
                max_records=self._cfg.max_poll_records,
            )
        except kafka.errors.KafkaError as exc:
            raise KafkaError(f"poll failed: {exc}") from exc
        out: list[Record] = []
        for tp, recs in batches.items():
            out.extend(Record(tp.topic, tp.partition, r.offset, r.key, r.value) for r in recs)
        return out

    def assigned(self) -> set[int]:
        return set(self._assigned)

    def caught_up(self, partition: int) -> bool:
        """True when the consumer's position has reached the partition's known end."""
        tp = TopicPartition(self._topic, partition)
        high = self._consumer.highwater(tp)
        try:
            pos = self._consumer.position(tp, timeout_ms=0)
        except Exception:  # no position yet: not caught up
            return False
        return high is not None and pos is not None and pos >= high

    def seek(self, partition: int, offset: int | None) -> None:
        """Read `partition` from `offset` next (None: its earliest retained offset)."""
        tp = TopicPartition(self._topic, partition)
        try:
            if offset is None:
                self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek(tp, offset)
        except (kafka.errors.KafkaError, AssertionError) as exc:
            raise KafkaError(f"cannot seek partition {partition}: {exc}") from exc

    def pause(self, partitions: Iterable[int]) -> None:
        """Stop fetching these partitions; `poll` still heartbeats and takes part in
        rebalances, so a paused engine keeps its membership."""
        parts = [p for p in partitions if p in self._assigned and p not in self._paused]
        if parts:
            self._consumer.pause(*[TopicPartition(self._topic, p) for p in parts])
            self._paused.update(parts)

    def resume(self, partitions: Iterable[int]) -> None:
        parts = [p for p in partitions if p in self._paused]
        if parts:
            self._paused.difference_update(parts)
            assigned = [p for p in parts if p in self._assigned]
            if assigned:
                self._consumer.resume(*[TopicPartition(self._topic, p) for p in assigned])

    def paused(self) -> set[int]:
        return set(self._paused)

    def lag(self) -> int | None:
        total = 0
        for p in self._assigned:
            tp = TopicPartition(self._topic, p)
            high = self._consumer.highwater(tp)
            try:
                pos = self._consumer.position(tp, timeout_ms=0)
            except Exception:
                return None
            if high is None or pos is None:
                return None
            total += max(0, high - pos)
        return total

    def commit_offsets(self, positions: Mapping[int, int]) -> None:
        """Commit positions to Kafka for lag monitoring (best effort; Redis is the truth)."""
        offsets = {
            TopicPartition(self._topic, p): OffsetAndMetadata(pos, "", -1)
            for p, pos in positions.items()
            if p in self._assigned
        }
        if not offsets:
            return
        try:
            self._consumer.commit(offsets)
        except (kafka.errors.KafkaError, AssertionError) as exc:
            log.warning("offset commit for lag monitoring failed: %s", exc)

    # --------------------------------------------------------------- producing

    def send_forecast(self, entity: str, value: bytes) -> Any:
        """Send one forecast; returns the send future (callbacks run on the I/O thread)."""
        topic = self._cfg.output_topic
        key = entity.encode()
        try:
            partition = self._out_partition.get(entity)
            if partition is None:
                if self._out_partitions is None:
                    self._out_partitions = sorted(self._producer.partitions_for(topic))
                parts = self._out_partitions
                partition = parts[(murmur2(key) & 0x7FFFFFFF) % len(parts)]
                self._out_partition[entity] = partition
            return self._producer.send(topic, key=key, value=value, partition=partition)
        except kafka.errors.KafkaError as exc:
            raise KafkaError(f"cannot publish to {self._cfg.output_topic}: {exc}") from exc

    def send_dead_letter(self, rec: Record, reason: str, message: str) -> None:
        headers = [
            (DLQ_REASON, reason.encode()),
            (DLQ_ERROR, message[:1000].encode("utf-8", "replace")),
            (DLQ_TOPIC, rec.topic.encode()),
            (DLQ_PARTITION, str(rec.partition).encode()),
            (DLQ_OFFSET, str(rec.offset).encode()),
        ]
        value = rec.value
        if value is not None and len(value) > self._cfg.max_message_bytes:
            value = value[: self._cfg.max_message_bytes]  # the original was too large
        try:
            self._producer.send(self._cfg.dlq, key=rec.key, value=value, headers=headers)
        except kafka.errors.KafkaError as exc:
            raise KafkaError(f"cannot publish to {self._cfg.dlq}: {exc}") from exc

    def flush(self, timeout_s: float = 30.0) -> None:
        try:
            self._producer.flush(timeout=timeout_s)
        except kafka.errors.KafkaError as exc:
            raise KafkaError(f"producer flush failed: {exc}") from exc

    def close(self) -> None:
        try:
            self._producer.flush(timeout=10)
        except kafka.errors.KafkaError as exc:
            log.error("producer flush on close failed: %s", exc)
        self._producer.close(timeout=5)
        self._consumer.close()


__all__ = ["KafkaIO", "Record", "ensure_topics", "kafka", "producer"]
