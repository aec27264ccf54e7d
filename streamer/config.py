"""One typed configuration object, read from a TOML file with environment overrides.

Precedence: built-in defaults < the TOML file < environment variables. An environment
variable `STREAMER_<SECTION>_<KEY>` overrides `[section] key`, for example
`STREAMER_MODEL_HORIZON=3` or `STREAMER_STREAM_FEATURES=price,volume`. Lists are
comma-separated in the environment. An unknown section or key is an error, never
silently ignored: a typo in a production config must not fall back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from .errors import ConfigError

ENV_PREFIX = "STREAMER_"

DEFAULT_FEATURES = ("price", "signal")
DEFAULT_TARGET = "price"
DEFAULT_INTERVAL_S = 1.0
DEFAULT_ENTITY_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:/\-]{0,127}"
# 2000-01-01T00:00:00Z: older timestamps are almost always a unit error (ms vs s, or 0).
DEFAULT_MIN_EVENT_TIME = 946_684_800.0
DEFAULT_MAX_FUTURE_S = 86_400.0
DEFAULT_MAX_STEP_JUMP = 10_000
DEFAULT_UNITS = (64,)
DEFAULT_HORIZON = 1
DEFAULT_INITIAL_CAPACITY = 64
DEFAULT_MAX_ENTITIES = 100_000

TargetTransform = Literal["none", "diff", "log_return"]
DEFAULT_TARGET_TRANSFORM: TargetTransform = "log_return"
DuplicatePolicy = Literal["replace", "first"]
# "mixed_bfloat16": matrix products in bfloat16, states, statistics, gate arithmetic and the
# master weights in float32 (Keras's policy of the same name for the training windows).
Precision = Literal["float32", "mixed_bfloat16"]


@dataclass(frozen=True)
class StreamConfig:
    """What an event is and how events become steps."""

    features: tuple[str, ...] = DEFAULT_FEATURES
    target: str = DEFAULT_TARGET
    target_transform: TargetTransform = DEFAULT_TARGET_TRANSFORM
    interval: float = DEFAULT_INTERVAL_S
    # Seconds the watermark trails the newest event time. Steps usually close as soon as every
    # active entity reported; this only bounds how long a straggler can hold a step open.
    allowed_lateness: float = 1.0
    # A caught-up partition that delivered nothing for this long stops holding the watermark.
    idle_partition_timeout: float = 10.0
    # A second event for the same (entity, step) before the step closes: "replace" keeps the
    # newer one (a producer's correction); "first" keeps the older one, which makes batches
    # independent of how partitions interleave even when duplicates exist.
    duplicates: DuplicatePolicy = "replace"
    entity_pattern: str = DEFAULT_ENTITY_PATTERN
    min_event_time: float = DEFAULT_MIN_EVENT_TIME
    # Seconds an event time may lie ahead of the wall clock; 0 turns the check off (replays
    # of recorded data with a skewed clock).
    max_future: float = DEFAULT_MAX_FUTURE_S
    max_step_jump: int = DEFAULT_MAX_STEP_JUMP

    def __post_init__(self) -> None:
        if not self.features:
            raise ConfigError("stream.features", "at least one feature is required")
        if len(set(self.features)) != len(self.features):
            raise ConfigError("stream.features", f"duplicate names in {list(self.features)}")
        for name in self.features:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ConfigError("stream.features", f'"{name}" is not a valid feature name')
        if self.target not in self.features:
            raise ConfigError(
                "stream.target", f'"{self.target}" is not one of {list(self.features)}'
            )
        _positive("stream.interval", self.interval)
        _non_negative("stream.allowed_lateness", self.allowed_lateness)
        _positive("stream.idle_partition_timeout", self.idle_partition_timeout)
        _non_negative("stream.max_future", self.max_future)
        _positive("stream.max_step_jump", self.max_step_jump)
        try:
            re.compile(self.entity_pattern)
        except re.error as exc:
            raise ConfigError("stream.entity_pattern", f"invalid regex: {exc}") from None

    @property
    def target_index(self) -> int:
        return self.features.index(self.target)


@dataclass(frozen=True)
class ModelConfig:
    """The stateful LSTM: layer sizes, forecast horizon and numerics."""

    units: tuple[int, ...] = DEFAULT_UNITS
    horizon: int = DEFAULT_HORIZON
    seed: int = 0
    normalize: bool = True
    # z-scores are clipped so that one outlier cannot saturate a row's state.
    clip: float = 10.0
    jit: bool = True
    # Off by default: "mixed_bfloat16" trades ~3 significant digits in the products for speed
    # on accelerators with bfloat16 units (docs/benchmarks.md has the measured difference).
    precision: Precision = "float32"
    # A `.keras` file exported by `streamer model export` (or pretrain) to start from; used
    # only when the store holds no weights version yet.
    init_weights: str = ""

    def __post_init__(self) -> None:
        if not self.units:
            raise ConfigError("model.units", "at least one LSTM layer is required")
        for u in self.units:
            _positive("model.units", u)
        _positive("model.horizon", self.horizon)
        _positive("model.clip", self.clip)
        if self.precision not in get_args(Precision):
            raise ConfigError(
                "model.precision", f"{self.precision!r} is not one of {list(get_args(Precision))}"
            )


@dataclass(frozen=True)
class CapacityConfig:
    """How many entities (batch rows) the engine holds and how the batch grows."""

    initial: int = DEFAULT_INITIAL_CAPACITY
    max_entities: int = DEFAULT_MAX_ENTITIES
    growth: float = 2.0
    # Entities without an event for this many steps are evicted after the next successful
    # checkpoint (their state stays in the store and comes back if they do); 0: never.
    evict_idle_steps: int = 0

    def __post_init__(self) -> None:
        _positive("capacity.initial", self.initial)
        _positive("capacity.max_entities", self.max_entities)
        if self.initial > self.max_entities:
            raise ConfigError(
                "capacity.initial",
                f"{self.initial} exceeds capacity.max_entities={self.max_entities}",
            )
        if not self.growth > 1.0:
            raise ConfigError("capacity.growth", f"must be > 1, got {self.growth}")
        _non_negative("capacity.evict_idle_steps", self.evict_idle_steps)


DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_INPUT_TOPIC = "events"
DEFAULT_OUTPUT_TOPIC = "forecasts"
DEFAULT_GROUP = "streamer"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024

Encoding = Literal["json", "binary"]


@dataclass(frozen=True)
class KafkaConfig:
    """Where events come from and forecasts go."""

    bootstrap: str = DEFAULT_BOOTSTRAP
    input_topic: str = DEFAULT_INPUT_TOPIC
    output_topic: str = DEFAULT_OUTPUT_TOPIC
    # Empty: "<input_topic>.dlq".
    dlq_topic: str = ""
    group: str = DEFAULT_GROUP
    # Partitions of topics streamer creates when they are missing.
    partitions: int = 4
    encoding: Encoding = "json"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    session_timeout_ms: int = 10_000
    # Also the rebalance timeout: how long a rejoin waits for a member that died silently.
    max_poll_interval_ms: int = 60_000
    max_poll_records: int = 5_000
    poll_timeout_ms: int = 100

    def __post_init__(self) -> None:
        for name in ("input_topic", "output_topic", "group", "bootstrap"):
            if not getattr(self, name):
                raise ConfigError(f"kafka.{name}", "must not be empty")
        for name in (
            "partitions",
            "max_message_bytes",
            "max_poll_records",
            "poll_timeout_ms",
            "session_timeout_ms",
            "max_poll_interval_ms",
        ):
            _positive(f"kafka.{name}", getattr(self, name))

    @property
    def dlq(self) -> str:
        return self.dlq_topic or f"{self.input_topic}.dlq"


@dataclass(frozen=True)
class RedisConfig:
    url: str = DEFAULT_REDIS_URL
    # Key namespace; empty: the consumer group name.
    namespace: str = ""


@dataclass(frozen=True)
class CheckpointConfig:
    """When states and positions are written (whichever comes first, and on stop)."""

    every_steps: int = 50
    every_seconds: float = 5.0

    def __post_init__(self) -> None:
        _positive("checkpoint.every_steps", self.every_steps)
        _positive("checkpoint.every_seconds", self.every_seconds)


LossName = Literal["mse", "huber"]


@dataclass(frozen=True)
class LearnConfig:
    """Online learning: periodic truncated-BPTT updates on the most recent window."""

    enabled: bool = False
    window: int = 64  # batches (closed steps) per truncated-BPTT window
    update_every: int = 8  # batches between updates
    learning_rate: float = 5e-3
    clipnorm: float = 1.0
    loss: LossName = "mse"
    # After an update, replay the window with the new weights from the stored window-start
    # states, so the live states match the weights that will use them ("burn-in").
    refresh_states: bool = True
    # Shadow comparison: an update whose next `shadow_steps` one-step errors are more than
    # `rollback_threshold` (relative) worse than the previous weights' is rolled back. 0: off.
    # Updates wait while a comparison runs, so keep shadow_steps < update_every.
    shadow_steps: int = 4
    rollback_threshold: float = 0.25
    # Exponential forgetting of the prequential scores, in batches.
    prequential_halflife: float = 200.0
    # Weight versions kept in the store.
    keep_versions: int = 5

    def __post_init__(self) -> None:
        _positive("learn.window", self.window)
        _positive("learn.update_every", self.update_every)
        _positive("learn.learning_rate", self.learning_rate)
        _positive("learn.clipnorm", self.clipnorm)
        _non_negative("learn.shadow_steps", self.shadow_steps)
        _non_negative("learn.rollback_threshold", self.rollback_threshold)
        _positive("learn.prequential_halflife", self.prequential_halflife)
        _positive("learn.keep_versions", self.keep_versions)
        if self.update_every > self.window:
            raise ConfigError(
                "learn.update_every",
                f"{self.update_every} exceeds learn.window={self.window}: batches between "
                "windows would never be trained on",
            )


DEFAULT_HTTP_PORT = 8000


@dataclass(frozen=True)
class HttpConfig:
    """The engine's HTTP port: /metrics, /healthz, /readyz, /forecast/<entity>."""

    host: str = "0.0.0.0"
    # 0 turns the HTTP server off.
    port: int = DEFAULT_HTTP_PORT

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("http.host", "must not be empty")
        if not 0 <= self.port <= 65535:
            raise ConfigError("http.port", f"must be in 0..65535 (0 disables), got {self.port}")


@dataclass(frozen=True)
class Config:
    """Everything streamer reads from its configuration, typed and validated."""

    stream: StreamConfig = field(default_factory=StreamConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    learn: LearnConfig = field(default_factory=LearnConfig)
    http: HttpConfig = field(default_factory=HttpConfig)

    @property
    def namespace(self) -> str:
        return self.redis.namespace or self.kafka.group

    @classmethod
    def load(cls, path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
        """Read `path` (TOML; None for defaults only), then apply `STREAMER_*` overrides."""
        data: dict[str, Any] = {}
        if path is not None:
            try:
                with open(path, "rb") as fh:
                    data = tomllib.load(fh)
            except FileNotFoundError:
                raise ConfigError("<file>", f"{path} does not exist") from None
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError("<file>", f"{path} is not valid TOML: {exc}") from None
            except OSError as exc:
                raise ConfigError("<file>", f"{path} cannot be read: {exc}") from None
        env = os.environ if env is None else env
        for name, raw in env.items():
            if name.startswith(ENV_PREFIX):
                section, key = _split_env_name(name)
                table = data.setdefault(section, {})
                if not isinstance(table, dict):
                    raise ConfigError(section, "must be a table")
                table[key] = raw
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Config:
        sections = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for section, values in data.items():
            if section not in sections:
                raise ConfigError(section, f"unknown section (known: {sorted(sections)})")
            if not isinstance(values, Mapping):
                raise ConfigError(section, "must be a table")
            section_cls = _section_types()[section]
            kwargs[section] = _build_section(section, section_cls, values)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            out[f.name] = {
                k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(section).items()
            }
        return out


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in (f.name for f in dataclasses.fields(Config))}


def _split_env_name(name: str) -> tuple[str, str]:
    rest = name[len(ENV_PREFIX) :].lower()
    for section in _section_types():
        if rest.startswith(section + "_"):
            return section, rest[len(section) + 1 :]
    raise ConfigError(
        name, f"environment variable names no known section (known: {sorted(_section_types())})"
    )


def _build_section(section: str, section_cls: type, values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(section_cls)
    known = {f.name for f in dataclasses.fields(section_cls)}
    kwargs = {}
    for key, raw in values.items():
        if key not in known:
            raise ConfigError(f"{section}.{key}", f"unknown key (known: {sorted(known)})")
        kwargs[key] = _coerce(f"{section}.{key}", hints[key], raw)
    return section_cls(**kwargs)


def _coerce(name: str, tp: Any, raw: Any) -> Any:
    """Turn a TOML value or an environment string into `tp`, or raise ConfigError."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if raw not in choices:
            raise ConfigError(name, f"{raw!r} is not one of {list(choices)}")
        return raw
    if origin is tuple:
        (item_tp, _ellipsis) = get_args(tp)
        if isinstance(raw, str):
            raw = [part.strip() for part in raw.split(",") if part.strip()]
        if not isinstance(raw, list | tuple):
            raise ConfigError(name, f"expected a list, got {type(raw).__name__}")
        return tuple(_coerce(name, item_tp, item) for item in raw)
    if origin in (types.UnionType, typing.Union):
        raise ConfigError(name, "union types are not supported")  # pragma: no cover
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in {
            "1",
            "true",
            "yes",
            "on",
            "0",
            "false",
            "no",
            "off",
        }:
            return raw.lower() in {"1", "true", "yes", "on"}
        raise ConfigError(name, f"expected true or false, got {raw!r}")
    if tp is int:
        if isinstance(raw, bool):
            raise ConfigError(name, f"expected an integer, got {raw!r}")
        if isinstance(raw, int):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(name, f"expected an integer, got {raw!r}")
    if tp is float:
        if isinstance(raw, bool):
            raise ConfigError(name, f"expected a number, got {raw!r}")
        try:
            value = float(raw)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(name, f"expected a finite number, got {raw!r}") from None
        if not math.isfinite(value):
            raise ConfigError(name, f"must be finite, got {raw!r}")
        return value
    if tp is str:
        if not isinstance(raw, str):
            raise ConfigError(name, f"expected a string, got {raw!r}")
        return raw
    raise ConfigError(name, f"unsupported type {tp}")  # pragma: no cover


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(name, f"must be > 0, got {value}")


def _non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ConfigError(name, f"must be >= 0, got {value}")
