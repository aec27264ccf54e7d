"""One typed configuration object, read from a TOML file with environment overrides.

Precedence: built-in defaults < the TOML file < environment variables. An environment
variable `STREAMER_<SECTION>_<KEY>` overrides `[section] key`, for example
`STREAMER_MODEL_HORIZON=3` or `STREAMER_STREAM_FEATURES=price,volume`. Lists are
comma-separated in the environment. An unknown key is an error, never silently ignored: a
typo in a production config must not fall back to a default. That holds for every TOML
table and for every `STREAMER_<SECTION>_*` variable of a known section (for example
`STREAMER_KAFKA_BOOTSTRAPP`). A `STREAMER_*` variable that names no known section is
ignored (logged at debug level, without its value): Kubernetes injects
`STREAMER_SERVICE_HOST`, `STREAMER_PORT`, `STREAMER_PORT_8000_TCP_ADDR`, ... into pods
beside a Service named "streamer" (`enableServiceLinks: false` in the pod spec turns that
off, and is still advised: a Service named "streamer-kafka" would inject
`STREAMER_KAFKA_PORT`, which is a typo in a known section).

Secrets (`kafka.sasl_password`, `kafka.ssl_password`, `redis.password`) can also be read from
a file, `<name>_file` (a mounted Kubernetes Secret): the file's content without its trailing
newline. Setting both is an error. Secrets never appear in `to_dict()`, in reprs or in error
messages; a Redis URL's credentials neither.
"""

from __future__ import annotations

import dataclasses
import logging
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

log = logging.getLogger(__name__)

ENV_PREFIX = "STREAMER_"
# What to_dict() shows instead of a secret that is set.
REDACTED = "***"

DEFAULT_FEATURES = ("price", "signal")
DEFAULT_TARGET = "price"
DEFAULT_INTERVAL_S = 1.0
DEFAULT_ENTITY_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:/\-]{0,127}"
# 2000-01-01T00:00:00Z: older timestamps are almost always a unit error (ms vs s, or 0).
DEFAULT_MIN_EVENT_TIME = 946_684_800.0
DEFAULT_MAX_FUTURE_S = 86_400.0
DEFAULT_MAX_STEP_JUMP = 10_000
DEFAULT_MAX_ABS_VALUE = 1e15
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
    # Largest |value| a feature may have. The engine computes in float32 (max ~3.4e38): the
    # target transform (x - prev) and the Welford normalisation (x - mean, delta * delta)
    # overflow to inf for inputs far below that limit, e.g. 1e20 squared, and an inf would
    # poison the row's state for good. 1e15 leaves room for delta * delta with margin.
    max_abs_value: float = DEFAULT_MAX_ABS_VALUE

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
        if not math.isfinite(self.max_abs_value):
            raise ConfigError("stream.max_abs_value", f"must be finite, got {self.max_abs_value}")
        _positive("stream.max_abs_value", self.max_abs_value)
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
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


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
    # Secured brokers (kafka_io.client_kwargs maps these to kafka-python's arguments).
    security_protocol: SecurityProtocol = "PLAINTEXT"
    # Required with SASL_PLAINTEXT and SASL_SSL.
    sasl_mechanism: SaslMechanism = ""
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    sasl_password_file: str = ""
    # PEM files; an empty ssl_cafile means the system's CA certificates.
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    # Password of ssl_keyfile.
    ssl_password: str = field(default="", repr=False)
    ssl_password_file: str = ""
    ssl_check_hostname: bool = True

    def __post_init__(self) -> None:
        for name in ("input_topic", "output_topic", "group", "bootstrap"):
            if not getattr(self, name):
                raise ConfigError(f"kafka.{name}", "must not be empty")
        _check_choice("kafka.security_protocol", self.security_protocol, SecurityProtocol)
        _check_choice("kafka.sasl_mechanism", self.sasl_mechanism, SaslMechanism)
        protocol = self.security_protocol
        sasl_password = self.sasl_password_value  # validates the secret and its file
        _ = self.ssl_password_value  # the same
        if self.uses_sasl:
            if not self.sasl_mechanism:
                raise ConfigError(
                    "kafka.sasl_mechanism",
                    f"required when kafka.security_protocol is {protocol} "
                    f"(one of {[m for m in get_args(SaslMechanism) if m]})",
                )
            if not self.sasl_username:
                raise ConfigError("kafka.sasl_username", f"required with {protocol}")
            if not sasl_password:
                raise ConfigError(
                    "kafka.sasl_password",
                    f"required with {protocol} (or kafka.sasl_password_file)",
                )
        else:
            for name in ("sasl_mechanism", "sasl_username", "sasl_password", "sasl_password_file"):
                if getattr(self, name):
                    raise ConfigError(
                        f"kafka.{name}",
                        f"is set but kafka.security_protocol is {protocol}, which uses no SASL",
                    )
        if not self.uses_ssl:
            for name in (
                "ssl_cafile",
                "ssl_certfile",
                "ssl_keyfile",
                "ssl_password",
                "ssl_password_file",
            ):
                if getattr(self, name):
                    raise ConfigError(
                        f"kafka.{name}",
                        f"is set but kafka.security_protocol is {protocol}, which uses no TLS",
                    )
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

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @property
    def uses_ssl(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def sasl_password_value(self) -> str:
        """sasl_password, or the content of sasl_password_file (read now)."""
        return _secret("kafka.sasl_password", self.sasl_password, self.sasl_password_file)

    @property
    def ssl_password_value(self) -> str:
        """ssl_password, or the content of ssl_password_file (read now)."""
        return _secret("kafka.ssl_password", self.ssl_password, self.ssl_password_file)


@dataclass(frozen=True)
class RedisConfig:
    """Where states live. The URL may carry credentials; username and password win."""

    url: str = DEFAULT_REDIS_URL
    # Key namespace; empty: the consumer group name.
    namespace: str = ""
    # ACL user (Redis 6+); empty: "default" (or the URL's user).
    username: str = ""
    password: str = field(default="", repr=False)
    password_file: str = ""
    # TLS; a rediss:// URL turns it on as well. An empty tls_ca_file means the system's CAs.
    tls: bool = False
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_check_hostname: bool = True
    # Socket connect and read timeout.
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        _positive("redis.timeout_s", self.timeout_s)
        _ = self.password_value  # validates the secret and its file
        if self.url.startswith("unix://") and self.tls:
            raise ConfigError("redis.tls", "TLS does not apply to a unix:// socket URL")
        if not self.uses_tls:
            for name in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
                if getattr(self, name):
                    raise ConfigError(
                        f"redis.{name}",
                        "is set but TLS is off (set redis.tls = true or use a rediss:// URL)",
                    )

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.url.startswith("rediss://")

    @property
    def password_value(self) -> str:
        """password, or the content of password_file (read now); '' when neither is set."""
        return _secret("redis.password", self.password, self.password_file)

    def __repr__(self) -> str:
        # The generated repr, with the URL's credentials removed (password has repr=False).
        parts = []
        for f in dataclasses.fields(self):
            if f.repr:
                value = redact_url(self.url) if f.name == "url" else getattr(self, f.name)
                parts.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


@dataclass(frozen=True)
class CheckpointConfig:
    """When states and positions are written (whichever comes first, and on stop)."""

    every_steps: int = 50
    every_seconds: float = 5.0
    # While the store is unreachable the engine keeps applying steps until this many are not
    # checkpointed (what a crash then makes it replay), then pauses its partitions (still
    # polling, so it keeps its group membership) until a checkpoint succeeds.
    max_pending_steps: int = 2_000

    def __post_init__(self) -> None:
        _positive("checkpoint.every_steps", self.every_steps)
        _positive("checkpoint.every_seconds", self.every_seconds)
        _positive("checkpoint.max_pending_steps", self.max_pending_steps)


LossName = Literal["mse", "huber"]


@dataclass(frozen=True)
class LearnConfig:
    """Online learning: periodic truncated-BPTT updates on the most recent window."""

    enabled: bool = False
    # Defaults chosen on `streamer bench learn`'s matrix of worlds (docs/benchmarks.md,
    # "Learning on several worlds"): a 32-step window adapts to a shift sooner than 64, and
    # four passes over it at 1e-2 every 4 steps learn from scratch in a few hundred steps.
    window: int = 32  # batches (closed steps) per truncated-BPTT window
    update_every: int = 4  # batches between updates
    learning_rate: float = 1e-2
    clipnorm: float = 1.0
    # Gradient steps per update over the same window (one weights version either way).
    epochs: int = 4
    # Train from the first `update_every` batches on, before the window has filled (from
    # the zero initial states); off: the first update waits for a full window.
    early_updates: bool = True
    loss: LossName = "mse"
    # After an update, replay the window with the new weights from the stored window-start
    # states, so the live states match the weights that will use them ("burn-in").
    refresh_states: bool = True
    # Shadow comparison: an update whose next `shadow_steps` one-step errors are more than
    # `rollback_threshold` (relative) worse than the previous weights' is rolled back. 0: off.
    # Updates wait while a comparison runs, so keep shadow_steps < update_every.
    shadow_steps: int = 3
    rollback_threshold: float = 0.25
    # Drift detection, off by default (docs/benchmarks.md, "Learning on several worlds"): a
    # Page-Hinkley test for an increase of x = log(SE_model / SE_naive), the pooled one-step
    # squared error of a batch over the naive forecast's (zero change for diff/log_return,
    # the last value for none), which volatility moves little. `drift_delta` is the drift
    # it tolerates, `drift_threshold` the alarm level (both in units of x), tested after
    # `drift_min_batches` batches since the start or the last alarm. On an alarm the next
    # `drift_updates` updates run at `drift_boost` x the learning rate, and with
    # `drift_reset_moments` Adam's moments restart.
    drift_detection: bool = False
    drift_delta: float = 0.05
    drift_threshold: float = 2.0
    drift_min_batches: int = 30
    drift_boost: float = 4.0
    drift_updates: int = 8
    drift_reset_moments: bool = False
    # Exponential forgetting of the prequential scores, in batches.
    prequential_halflife: float = 200.0
    # Scored forecasts of each entity (per horizon) left out of every prequential figure:
    # a fresh state and a short history forecast nothing yet.
    prequential_warmup: int = 20
    # Window of the rolling-mean naive baseline, in the entity's observations.
    prequential_rolling: int = 20
    # Seasonal period of the target in steps, for the seasonal-persistence baseline of a
    # level target (target_transform "none"); 0: no seasonal baseline.
    season: int = 0
    # Weight versions kept in the store.
    keep_versions: int = 5

    def __post_init__(self) -> None:
        _positive("learn.window", self.window)
        _positive("learn.update_every", self.update_every)
        _positive("learn.learning_rate", self.learning_rate)
        _positive("learn.clipnorm", self.clipnorm)
        _positive("learn.epochs", self.epochs)
        _non_negative("learn.shadow_steps", self.shadow_steps)
        _non_negative("learn.rollback_threshold", self.rollback_threshold)
        _non_negative("learn.drift_delta", self.drift_delta)
        _positive("learn.drift_threshold", self.drift_threshold)
        _non_negative("learn.drift_min_batches", self.drift_min_batches)
        _positive("learn.drift_boost", self.drift_boost)
        _non_negative("learn.drift_updates", self.drift_updates)
        _positive("learn.prequential_halflife", self.prequential_halflife)
        _non_negative("learn.prequential_warmup", self.prequential_warmup)
        _positive("learn.prequential_rolling", self.prequential_rolling)
        _non_negative("learn.season", self.season)
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
class ForecastConfig:
    """What is published: the model shrunk toward the naive forecast, and its intervals."""

    # Publish naive + w * (model - naive) with w learned from realised errors (combiner.py);
    # false publishes the model's own forecast (w = 1).
    combine: bool = True
    # Forgetting of the shrinkage sums, in observations of one entity.
    combine_halflife: float = 500.0
    # Realised pairs an entity needs before its model forecast gets any weight.
    combine_min_count: int = 20
    # Only model-naive covariance beyond this many standard errors of zero earns weight.
    combine_threshold: float = 2.0
    # Shrink each entity's weight toward the weight of all entities together, by how much
    # the entities' weights really differ (combiner.py); false: each entity on its own.
    combine_pool: bool = True
    # Coverage levels of the published prediction intervals; empty: none.
    intervals: tuple[float, ...] = (0.8, 0.95)
    # Forgetting of the squared errors that scale the intervals (follows volatility).
    interval_halflife: float = 50.0
    # Step of the adaptive conformal multiplier (larger: faster, noisier).
    interval_gamma: float = 0.05

    def __post_init__(self) -> None:
        _positive("forecast.combine_halflife", self.combine_halflife)
        _non_negative("forecast.combine_min_count", self.combine_min_count)
        _non_negative("forecast.combine_threshold", self.combine_threshold)
        _positive("forecast.interval_halflife", self.interval_halflife)
        _positive("forecast.interval_gamma", self.interval_gamma)
        for c in self.intervals:
            if not 0.0 < c < 1.0:
                raise ConfigError("forecast.intervals", f"coverage {c} is not in (0, 1)")
        if len(set(self.intervals)) != len(self.intervals):
            raise ConfigError("forecast.intervals", f"duplicate levels in {list(self.intervals)}")


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
    forecast: ForecastConfig = field(default_factory=ForecastConfig)
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
                split = _split_env_name(name)
                if split is None:
                    # Not ours (Kubernetes service links: STREAMER_SERVICE_HOST, STREAMER_PORT).
                    log.debug("ignoring %s: it names no config section", name)
                    continue
                section, key = split
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
        """Plain data (lists, no tuples); a secret that is set shows as "***", a Redis URL
        without its credentials. Without secrets, `from_dict(to_dict())` gives it back."""
        out: dict[str, dict[str, Any]] = {}
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            out[f.name] = {
                k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(section).items()
            }
        for section, key in SECRET_FIELDS:
            if out[section][key]:
                out[section][key] = REDACTED
        out["redis"]["url"] = redact_url(out["redis"]["url"])
        return out


# (section, key) of every secret: never shown by to_dict(), never in a repr.
SECRET_FIELDS = (("kafka", "sasl_password"), ("kafka", "ssl_password"), ("redis", "password"))


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in (f.name for f in dataclasses.fields(Config))}


def _split_env_name(name: str) -> tuple[str, str] | None:
    """("kafka", "bootstrap") for STREAMER_KAFKA_BOOTSTRAP; None when no section is named.

    A section counts only when followed by "_": STREAMER_PORT or STREAMER_STREAMS_X name
    none, STREAMER_KAFKA_BOOTSTRAPP names kafka (and its unknown key is an error later).
    """
    rest = name[len(ENV_PREFIX) :].lower()
    for section in _section_types():
        if rest.startswith(section + "_"):
            return section, rest[len(section) + 1 :]
    return None


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


def redact_url(url: str) -> str:
    """`url` without user and password, for messages, logs and to_dict().

    Everything up to the LAST "@" is credentials (a raw "@", ":" or "/" in a password must
    not leak any part of it): "redis://user:p@ss@host:6379/0" -> "redis://***@host:6379/0".
    `password=` / `username=` query parameters are masked as well.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    rest = re.sub(r"(?i)([?&](?:password|username|user)=)[^&#]*", r"\1***", rest)
    return f"{scheme}{sep}{rest}"


def _secret(name: str, value: str, path: str) -> str:
    """The secret `name`: `value`, or the content of the file `path` without its trailing
    newline. Errors name the field and the path, never the secret."""
    if value and path:
        raise ConfigError(name, f"set either {name} or {name}_file, not both")
    if not path:
        return value
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{name}_file", f"cannot read {path}: {reason}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}_file", f"{path} is not UTF-8 text") from None
    secret = text.rstrip("\r\n")
    if not secret:
        raise ConfigError(f"{name}_file", f"{path} is empty")
    return secret


def _check_choice(name: str, value: Any, tp: Any) -> None:
    choices = get_args(tp)
    if value not in choices:
        raise ConfigError(name, f"{value!r} is not one of {list(choices)}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(name, f"must be > 0, got {value}")


def _non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ConfigError(name, f"must be >= 0, got {value}")
