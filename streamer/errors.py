"""Exceptions raised by streamer.

One base class, one subclass per area, so callers can catch as broadly or as narrowly
as they need::

    StreamerError
    ├── ConfigError      invalid configuration (names the offending field)
    ├── EventError       an input event breaks the contract (carries a machine-readable reason)
    ├── CapacityError    no slot is left for a new entity
    ├── ModelError       shapes or weights do not fit the configured model
    ├── StateError       a stored state or checkpoint is invalid or cannot be read/written
    │   ├── FencedError  this engine no longer owns a partition it tried to write
    │   └── StoreLostError  the store lost what this engine last wrote (restarted empty)
    ├── KafkaError       the broker cannot be reached or refused an operation
    └── ServiceError     an embedded service (Kafka broker, Redis) cannot be found, started
                         or reached (names the service, quotes the end of its log)

Messages quote identifiers (`entity "AAPL" has 7 features, expected 5`) so a log line is
enough to find the culprit.
"""

from __future__ import annotations

from enum import StrEnum


class StreamerError(Exception):
    """Base class of every error streamer raises on purpose."""


class ConfigError(StreamerError):
    """The configuration is invalid; `field` is the dotted name of the offending key."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"config {field}: {message}")


class Reason(StrEnum):
    """Why an event was refused. The value is what a dead-letter header carries."""

    UNDECODABLE = "undecodable"
    TOO_LARGE = "too_large"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    UNKNOWN_FIELD = "unknown_field"
    WRONG_TYPE = "wrong_type"
    FEATURE_COUNT = "feature_count"
    UNKNOWN_FEATURE = "unknown_feature"
    NON_FINITE = "non_finite"
    BAD_ENTITY = "bad_entity"
    TS_TOO_OLD = "ts_too_old"
    TS_IN_FUTURE = "ts_in_future"
    TS_TOO_FAR_AHEAD = "ts_too_far_ahead"
    NON_POSITIVE_TARGET = "non_positive_target"
    # A JSON object repeats a field name (json.loads would silently keep the last one).
    DUPLICATE_FIELD = "duplicate_field"
    # A value the engine's float32 arithmetic cannot carry (|x| beyond stream.max_abs_value,
    # or a log_return target that is not a positive normal float32).
    OUT_OF_RANGE = "out_of_range"
    # The Kafka message key is missing or is not the UTF-8 entity id of its value.
    KEY_MISMATCH = "key_mismatch"
    CAPACITY = "capacity"
    LATE = "late"
    # The step would have made this entity's state or forecast non-finite: the row kept its
    # old state and the event was refused.
    NON_FINITE_STATE = "non_finite_state"


class EventError(StreamerError):
    """An event breaks the input contract. It must never reach a state."""

    def __init__(self, reason: Reason, message: str, entity: str | None = None) -> None:
        self.reason = reason
        self.entity = entity
        super().__init__(message)


class CapacityError(StreamerError):
    """Every slot up to `capacity.max_entities` is taken."""

    def __init__(self, entity: str, max_entities: int) -> None:
        self.entity = entity
        self.max_entities = max_entities
        super().__init__(
            f'no free slot for entity "{entity}": all {max_entities} slots are taken '
            "(raise capacity.max_entities or enable idle eviction)"
        )


class ModelError(StreamerError):
    """Arrays, shapes or weights do not fit the configured model."""


class ServiceError(StreamerError):
    """An embedded service (area "services") cannot be found, started or reached.

    `service` names it ("kafka", "redis"); `log_tail` holds the last lines of its log when
    the process had started (empty otherwise) and is already quoted in the message.
    """

    def __init__(self, service: str, message: str, log_tail: str = "") -> None:
        self.service = service
        self.log_tail = log_tail
        text = f"{service}: {message}"
        if log_tail:
            text += f"\n--- last lines of the {service} log ---\n{log_tail}"
        super().__init__(text)


class StateError(StreamerError):
    """A stored state or checkpoint is invalid, or the state store cannot be used."""


class FencedError(StateError):
    """A checkpoint was refused because another engine now owns one of its partitions."""

    def __init__(self, topic: str, partition: int, token: int, current: int) -> None:
        self.topic = topic
        self.partition = partition
        super().__init__(
            f'partition {partition} of "{topic}" is owned by generation {current}, '
            f"this engine holds {token}: it was revoked, its write is refused"
        )


class StoreLostError(StateError):
    """The store no longer holds what this engine last wrote to a partition: it was restarted
    without its data, or lost its last writes. Checkpoints are refused until the engine
    re-seeds the store from its memory (see the recovery policy in the README)."""

    def __init__(self, topic: str, partition: int, detail: str) -> None:
        self.topic = topic
        self.partition = partition
        super().__init__(f'the store lost partition {partition} of "{topic}": {detail}')


class KafkaError(StreamerError):
    """The Kafka broker cannot be reached or refused an operation."""
