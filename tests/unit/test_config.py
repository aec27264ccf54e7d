"""Config: defaults, TOML file, `STREAMER_<SECTION>_<KEY>` overrides and validation.

Every invalid value must raise `ConfigError` naming the dotted field, never fall back to a
default and never escape as a built-in exception. Tests pass `env=` explicitly and never
touch `os.environ`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from streamer.config import (
    DEFAULT_ENTITY_PATTERN,
    DEFAULT_FEATURES,
    DEFAULT_HORIZON,
    DEFAULT_INITIAL_CAPACITY,
    DEFAULT_INTERVAL_S,
    DEFAULT_MAX_ENTITIES,
    DEFAULT_MAX_FUTURE_S,
    DEFAULT_MAX_STEP_JUMP,
    DEFAULT_MIN_EVENT_TIME,
    DEFAULT_TARGET,
    DEFAULT_TARGET_TRANSFORM,
    DEFAULT_UNITS,
    CapacityConfig,
    CheckpointConfig,
    Config,
    KafkaConfig,
    ModelConfig,
    RedisConfig,
    StreamConfig,
)
from streamer.errors import ConfigError, StreamerError
from streamer.kafka_io import client_kwargs
from streamer.state.redis_conn import safe_url
from streamer.state.redis_store import _safe_url

NO_ENV: dict[str, str] = {}


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "streamer.toml"
    path.write_text(text, encoding="utf-8")
    return path


@contextmanager
def raises_config_error(field: str) -> Iterator[pytest.ExceptionInfo[ConfigError]]:
    """The block raises ConfigError for exactly `field`."""
    with pytest.raises(ConfigError) as info:
        yield info
    assert info.value.field == field


# --- defaults -------------------------------------------------------------------------------


def test_defaults_are_valid_and_equal_the_named_constants() -> None:
    config = Config.load(None, env=NO_ENV)

    assert config == Config()
    assert config.stream.features == DEFAULT_FEATURES
    assert config.stream.target == DEFAULT_TARGET
    assert config.stream.target_transform == DEFAULT_TARGET_TRANSFORM
    assert config.stream.interval == DEFAULT_INTERVAL_S
    assert config.stream.duplicates == "replace"
    assert config.stream.entity_pattern == DEFAULT_ENTITY_PATTERN
    assert config.stream.min_event_time == DEFAULT_MIN_EVENT_TIME
    assert config.stream.max_future == DEFAULT_MAX_FUTURE_S
    assert config.stream.max_step_jump == DEFAULT_MAX_STEP_JUMP
    assert config.model.units == DEFAULT_UNITS
    assert config.model.horizon == DEFAULT_HORIZON
    assert config.capacity.initial == DEFAULT_INITIAL_CAPACITY
    assert config.capacity.max_entities == DEFAULT_MAX_ENTITIES
    assert config.stream.target_index == DEFAULT_FEATURES.index(DEFAULT_TARGET)


def test_environment_without_the_exact_prefix_is_ignored() -> None:
    env = {"PATH": "/usr/bin", "STREAMERMODEL_HORIZON": "9", "XSTREAMER_MODEL_HORIZON": "9"}

    assert Config.load(None, env=env) == Config()


def test_derived_names_fall_back_to_their_documented_defaults() -> None:
    config = Config.load(
        None, env={"STREAMER_KAFKA_GROUP": "g1", "STREAMER_KAFKA_INPUT_TOPIC": "in"}
    )

    assert config.kafka.dlq == "in.dlq"
    assert config.namespace == "g1"
    named = Config.load(
        None, env={"STREAMER_KAFKA_DLQ_TOPIC": "bad", "STREAMER_REDIS_NAMESPACE": "ns"}
    )
    assert named.kafka.dlq == "bad"
    assert named.namespace == "ns"


def test_target_index_follows_the_feature_order() -> None:
    stream = StreamConfig(features=("a", "b", "c"), target="c")

    assert stream.target_index == 2


# --- TOML file ------------------------------------------------------------------------------

FULL_TOML = """
[stream]
features = ["close", "volume", "spread"]
target = "volume"
target_transform = "diff"
interval = 60
allowed_lateness = 2.5
duplicates = "first"
entity_pattern = "[A-Z]{1,5}"
min_event_time = 1_600_000_000.0
max_future = 0.0
max_step_jump = 12

[model]
units = [32, 16]
horizon = 4
seed = -3
normalize = false
clip = 4.5
jit = false

[capacity]
initial = 8
max_entities = 1_000
growth = 1.5
"""


def test_toml_file_sets_every_field_with_the_declared_types(tmp_path: Path) -> None:
    config = Config.load(write_toml(tmp_path, FULL_TOML), env=NO_ENV)

    assert config.stream == StreamConfig(
        features=("close", "volume", "spread"),
        target="volume",
        target_transform="diff",
        interval=60.0,
        allowed_lateness=2.5,
        duplicates="first",
        entity_pattern="[A-Z]{1,5}",
        min_event_time=1_600_000_000.0,
        max_future=0.0,
        max_step_jump=12,
    )
    assert config.model == ModelConfig(
        units=(32, 16), horizon=4, seed=-3, normalize=False, clip=4.5, jit=False
    )
    assert config.capacity == CapacityConfig(initial=8, max_entities=1000, growth=1.5)
    # A TOML integer given for a float field becomes a float; lists become tuples.
    assert type(config.stream.interval) is float
    assert type(config.stream.features) is tuple
    assert type(config.model.units) is tuple
    assert config.stream.target_index == 1


def test_a_partial_file_keeps_the_defaults_of_everything_else(tmp_path: Path) -> None:
    config = Config.load(write_toml(tmp_path, "[model]\nhorizon = 5\n"), env=NO_ENV)

    assert config.model.horizon == 5
    assert config.model.units == DEFAULT_UNITS
    assert config.stream == StreamConfig()
    assert config.capacity == CapacityConfig()


def test_path_may_be_a_string(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[capacity]\ninitial = 3\n")

    assert Config.load(str(path), env=NO_ENV).capacity.initial == 3


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert Config.load(write_toml(tmp_path, ""), env=NO_ENV) == Config()


# --- environment overrides ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "section", "key", "expected"),
    [
        pytest.param({"STREAMER_STREAM_TARGET": "signal"}, "stream", "target", "signal", id="str"),
        pytest.param(
            {"STREAMER_STREAM_ENTITY_PATTERN": "[a-z]+,[0-9]+"},
            "stream",
            "entity_pattern",
            "[a-z]+,[0-9]+",
            id="str-with-comma-is-not-split",
        ),
        pytest.param({"STREAMER_MODEL_HORIZON": "3"}, "model", "horizon", 3, id="int"),
        pytest.param({"STREAMER_MODEL_SEED": "-7"}, "model", "seed", -7, id="int-negative"),
        pytest.param({"STREAMER_MODEL_SEED": "1_000"}, "model", "seed", 1000, id="int-underscores"),
        pytest.param(
            {"STREAMER_STREAM_MAX_STEP_JUMP": "25"},
            "stream",
            "max_step_jump",
            25,
            id="int-key-with-underscores",
        ),
        pytest.param({"STREAMER_STREAM_INTERVAL": "0.25"}, "stream", "interval", 0.25, id="float"),
        pytest.param(
            {"STREAMER_STREAM_INTERVAL": "60"}, "stream", "interval", 60.0, id="float-int"
        ),
        pytest.param(
            {"STREAMER_STREAM_ALLOWED_LATENESS": "1e-3"},
            "stream",
            "allowed_lateness",
            0.001,
            id="float-exponent",
        ),
        pytest.param({"STREAMER_CAPACITY_GROWTH": "1.25"}, "capacity", "growth", 1.25, id="growth"),
        pytest.param(
            {"STREAMER_STREAM_FEATURES": "price,volume"},
            "stream",
            "features",
            ("price", "volume"),
            id="tuple-str",
        ),
        pytest.param(
            {"STREAMER_STREAM_FEATURES": " price , volume ,"},
            "stream",
            "features",
            ("price", "volume"),
            id="tuple-str-spaces-trailing-comma",
        ),
        pytest.param({"STREAMER_MODEL_UNITS": "64,32"}, "model", "units", (64, 32), id="tuple-int"),
        pytest.param({"STREAMER_MODEL_UNITS": "8"}, "model", "units", (8,), id="tuple-int-one"),
        pytest.param(
            {"STREAMER_STREAM_TARGET_TRANSFORM": "diff"},
            "stream",
            "target_transform",
            "diff",
            id="literal-diff",
        ),
        pytest.param(
            {"STREAMER_STREAM_TARGET_TRANSFORM": "none"},
            "stream",
            "target_transform",
            "none",
            id="literal-none",
        ),
        pytest.param(
            {"STREAMER_STREAM_DUPLICATES": "first"},
            "stream",
            "duplicates",
            "first",
            id="literal-duplicates",
        ),
        pytest.param(
            {"STREAMER_CAPACITY_MAX_ENTITIES": "100"},
            "capacity",
            "max_entities",
            100,
            id="capacity-int",
        ),
        pytest.param(
            {"STREAMER_KAFKA_BOOTSTRAP": "a:9092,b:9092"},
            "kafka",
            "bootstrap",
            "a:9092,b:9092",
            id="kafka-str-with-comma",
        ),
        pytest.param(
            {"STREAMER_KAFKA_INPUT_TOPIC": "ticks"},
            "kafka",
            "input_topic",
            "ticks",
            id="kafka-key-with-underscore",
        ),
        pytest.param(
            {"STREAMER_KAFKA_PARTITIONS": "12"}, "kafka", "partitions", 12, id="kafka-int"
        ),
        pytest.param(
            {"STREAMER_KAFKA_ENCODING": "binary"}, "kafka", "encoding", "binary", id="kafka-literal"
        ),
        pytest.param(
            {"STREAMER_REDIS_URL": "redis://r:6380/1"},
            "redis",
            "url",
            "redis://r:6380/1",
            id="redis-str",
        ),
        pytest.param(
            {"STREAMER_CHECKPOINT_EVERY_SECONDS": "0.5"},
            "checkpoint",
            "every_seconds",
            0.5,
            id="checkpoint-float",
        ),
    ],
)
def test_environment_overrides_one_field(
    env: dict[str, str], section: str, key: str, expected: object
) -> None:
    config = Config.load(None, env=env)

    value = getattr(getattr(config, section), key)
    assert value == expected
    assert type(value) is type(expected)
    if isinstance(value, tuple):
        assert all(type(item) is type(expected[0]) for item in value)  # type: ignore[index]


@pytest.mark.parametrize("raw", ["0", "false", "False", "FALSE", "no", "off", "Off"])
def test_environment_false_values(raw: str) -> None:
    config = Config.load(None, env={"STREAMER_MODEL_NORMALIZE": raw, "STREAMER_MODEL_JIT": raw})

    assert config.model.normalize is False
    assert config.model.jit is False


@pytest.mark.parametrize("raw", ["1", "true", "True", "TRUE", "yes", "on", "ON"])
def test_environment_true_values(tmp_path: Path, raw: str) -> None:
    # The file turns both off, so a True here can only come from the environment.
    path = write_toml(tmp_path, "[model]\nnormalize = false\njit = false\n")

    config = Config.load(path, env={"STREAMER_MODEL_NORMALIZE": raw, "STREAMER_MODEL_JIT": raw})

    assert config.model.normalize is True
    assert config.model.jit is True


def test_environment_can_set_features_and_target_together() -> None:
    env = {"STREAMER_STREAM_FEATURES": "a,b", "STREAMER_STREAM_TARGET": "b"}

    stream = Config.load(None, env=env).stream

    assert stream.features == ("a", "b")
    assert stream.target == "b"
    assert stream.target_index == 1


def test_precedence_defaults_then_file_then_environment(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        '[model]\nhorizon = 2\nclip = 5.0\n[stream]\nfeatures = ["x", "y"]\ntarget = "x"\n',
    )
    env = {"STREAMER_MODEL_HORIZON": "3", "STREAMER_STREAM_TARGET": "y"}

    config = Config.load(path, env=env)

    assert config.model.horizon == 3  # environment beats file
    assert config.stream.target == "y"  # environment beats file within a file's section
    assert config.model.clip == 5.0  # file beats default
    assert config.stream.features == ("x", "y")  # file kept where the environment is silent
    assert config.model.seed == 0  # default where neither speaks
    assert config.capacity == CapacityConfig()


def test_environment_overrides_a_section_the_file_does_not_have(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[model]\nhorizon = 2\n")

    config = Config.load(path, env={"STREAMER_CAPACITY_INITIAL": "7"})

    assert config.capacity.initial == 7
    assert config.model.horizon == 2


# --- invalid values -------------------------------------------------------------------------

INVALID_TOML = [
    ("[bogus]\nx = 1\n", "bogus"),
    ("[model]\nhorizn = 2\n", "model.horizn"),
    ("model = 1\n", "model"),
    ("[model]\nhorizon = 2.5\n", "model.horizon"),
    ("[model]\nhorizon = true\n", "model.horizon"),
    ("[model]\nseed = false\n", "model.seed"),
    ('[model]\nseed = "abc"\n', "model.seed"),
    ("[model]\nnormalize = 1\n", "model.normalize"),
    ('[model]\nnormalize = "maybe"\n', "model.normalize"),
    ("[model]\nunits = []\n", "model.units"),
    ("[model]\nunits = 64\n", "model.units"),
    ("[model]\nunits = [64, 0]\n", "model.units"),
    ("[model]\nunits = [64, -8]\n", "model.units"),
    ("[model]\nunits = [64, 1.5]\n", "model.units"),
    ("[model]\nunits = [true]\n", "model.units"),
    ("[model]\nhorizon = 0\n", "model.horizon"),
    ("[model]\nclip = 0.0\n", "model.clip"),
    ("[model]\nclip = nan\n", "model.clip"),
    ("[stream]\ninterval = nan\n", "stream.interval"),
    ("[stream]\ninterval = inf\n", "stream.interval"),
    ("[stream]\nmin_event_time = -inf\n", "stream.min_event_time"),
    ("[stream]\ninterval = true\n", "stream.interval"),
    ('[stream]\ninterval = "fast"\n', "stream.interval"),
    ("[stream]\ninterval = [1.0]\n", "stream.interval"),
    ("[stream]\ninterval = 0\n", "stream.interval"),
    ("[stream]\ninterval = -1.0\n", "stream.interval"),
    ("[stream]\nallowed_lateness = -0.5\n", "stream.allowed_lateness"),
    ("[stream]\nmax_future = -1\n", "stream.max_future"),
    ("[stream]\nmax_step_jump = 0\n", "stream.max_step_jump"),
    ("[stream]\nmax_step_jump = 1.5\n", "stream.max_step_jump"),
    ("[stream]\ntarget = 3\n", "stream.target"),
    ('[stream]\ntarget = "volume"\n', "stream.target"),
    ('[stream]\nfeatures = ["a", "b"]\n', "stream.target"),
    ('[stream]\nfeatures = ["a", "a"]\ntarget = "a"\n', "stream.features"),
    ("[stream]\nfeatures = []\n", "stream.features"),
    ("[stream]\nfeatures = [1, 2]\n", "stream.features"),
    ("[stream]\nfeatures = 5\n", "stream.features"),
    ('[stream]\nfeatures = ["price", "bad name"]\n', "stream.features"),
    ('[stream]\ntarget_transform = "log"\n', "stream.target_transform"),
    ('[stream]\nduplicates = "last"\n', "stream.duplicates"),
    ("[stream]\nduplicates = true\n", "stream.duplicates"),
    ("[stream]\ntarget_transform = 1\n", "stream.target_transform"),
    ('[stream]\nentity_pattern = "[a-"\n', "stream.entity_pattern"),
    ("[stream]\nentity_pattern = 1\n", "stream.entity_pattern"),
    ("[capacity]\ninitial = 0\n", "capacity.initial"),
    ("[capacity]\nmax_entities = 0\n", "capacity.max_entities"),
    ("[capacity]\ninitial = 10\nmax_entities = 5\n", "capacity.initial"),
    ("[capacity]\ngrowth = 1.0\n", "capacity.growth"),
    ("[capacity]\ngrowth = 0.5\n", "capacity.growth"),
    ("[capacity]\ngrowth = inf\n", "capacity.growth"),
    ('[kafka]\ninput_topic = ""\n', "kafka.input_topic"),
    ('[kafka]\nbootstrap = ""\n', "kafka.bootstrap"),
    ("[kafka]\npartitions = 0\n", "kafka.partitions"),
    ("[kafka]\nmax_message_bytes = -1\n", "kafka.max_message_bytes"),
    ('[kafka]\nencoding = "xml"\n', "kafka.encoding"),
    ("[redis]\nurl = 6379\n", "redis.url"),
    ("[checkpoint]\nevery_steps = 0\n", "checkpoint.every_steps"),
    ("[checkpoint]\nevery_seconds = 0.0\n", "checkpoint.every_seconds"),
]


@pytest.mark.parametrize(("text", "field"), INVALID_TOML, ids=[f for _, f in INVALID_TOML])
def test_invalid_file_value_names_its_field(tmp_path: Path, text: str, field: str) -> None:
    with raises_config_error(field) as info:
        Config.load(write_toml(tmp_path, text), env=NO_ENV)

    assert str(info.value).startswith(f"config {field}: ")
    assert isinstance(info.value, StreamerError)


INVALID_ENV = [
    ({"STREAMER_MODEL_HORIZN": "2"}, "model.horizn"),
    ({"STREAMER_MODEL_": "2"}, "model."),
    ({"STREAMER_MODEL_HORIZON": "two"}, "model.horizon"),
    ({"STREAMER_MODEL_HORIZON": "2.0"}, "model.horizon"),
    ({"STREAMER_MODEL_HORIZON": ""}, "model.horizon"),
    ({"STREAMER_MODEL_HORIZON": "0"}, "model.horizon"),
    ({"STREAMER_MODEL_NORMALIZE": "maybe"}, "model.normalize"),
    ({"STREAMER_MODEL_NORMALIZE": ""}, "model.normalize"),
    ({"STREAMER_MODEL_UNITS": "64,x"}, "model.units"),
    ({"STREAMER_MODEL_UNITS": "64,-1"}, "model.units"),
    ({"STREAMER_MODEL_UNITS": ""}, "model.units"),
    ({"STREAMER_STREAM_INTERVAL": "nan"}, "stream.interval"),
    ({"STREAMER_STREAM_INTERVAL": "inf"}, "stream.interval"),
    ({"STREAMER_STREAM_INTERVAL": "-inf"}, "stream.interval"),
    ({"STREAMER_STREAM_INTERVAL": "1e400"}, "stream.interval"),
    ({"STREAMER_STREAM_INTERVAL": "fast"}, "stream.interval"),
    ({"STREAMER_STREAM_INTERVAL": "0"}, "stream.interval"),
    ({"STREAMER_STREAM_TARGET_TRANSFORM": "log"}, "stream.target_transform"),
    ({"STREAMER_STREAM_DUPLICATES": "keep"}, "stream.duplicates"),
    ({"STREAMER_STREAM_FEATURES": "a,a", "STREAMER_STREAM_TARGET": "a"}, "stream.features"),
    ({"STREAMER_STREAM_FEATURES": ""}, "stream.features"),
    ({"STREAMER_STREAM_FEATURES": "price,1x"}, "stream.features"),
    ({"STREAMER_STREAM_FEATURES": "volume"}, "stream.target"),
    ({"STREAMER_STREAM_ENTITY_PATTERN": "("}, "stream.entity_pattern"),
    ({"STREAMER_CAPACITY_INITIAL": "200000"}, "capacity.initial"),
    ({"STREAMER_CAPACITY_GROWTH": "1"}, "capacity.growth"),
    ({"STREAMER_KAFKA_GROUP": ""}, "kafka.group"),
    ({"STREAMER_KAFKA_TOPIC": "x"}, "kafka.topic"),
    ({"STREAMER_CHECKPOINT_EVERY_STEPS": "often"}, "checkpoint.every_steps"),
]


@pytest.mark.parametrize(("env", "field"), INVALID_ENV, ids=[f for _, f in INVALID_ENV])
def test_invalid_environment_value_names_its_field(env: dict[str, str], field: str) -> None:
    with raises_config_error(field):
        Config.load(None, env=env)


def test_an_invalid_environment_value_is_an_error_even_when_the_file_is_valid(
    tmp_path: Path,
) -> None:
    path = write_toml(tmp_path, "[model]\nhorizon = 2\n")

    with raises_config_error("model.horizon"):
        Config.load(path, env={"STREAMER_MODEL_HORIZON": "-1"})


@pytest.mark.parametrize("name", ["a", "A1", "_hidden", "price_2", "x" * 100])
def test_valid_feature_names(name: str) -> None:
    stream = StreamConfig(features=(name,), target=name)

    assert stream.features == (name,)


@pytest.mark.parametrize("name", ["", "1a", "a-b", "a b", "a.b", "é", "a\n", " a"])
def test_invalid_feature_names(name: str) -> None:
    with raises_config_error("stream.features") as info:
        StreamConfig(features=("ok", name), target="ok")

    assert f'"{name}"' in str(info.value)


def test_duplicate_features_are_quoted_in_the_message() -> None:
    with raises_config_error("stream.features") as info:
        StreamConfig(features=("a", "b", "a"), target="a")

    assert "duplicate" in str(info.value)


def test_target_not_in_features_quotes_the_target() -> None:
    with raises_config_error("stream.target") as info:
        StreamConfig(features=("a", "b"), target="c")

    assert '"c"' in str(info.value)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"bogus": {}}, "bogus"),
        ({"model": 3}, "model"),
        ({"model": ["horizon", 2]}, "model"),
        ({"model": {"horizon": None}}, "model.horizon"),
        ({"stream": {"features": None}}, "stream.features"),
        ({"stream": {"interval": None}}, "stream.interval"),
        ({"stream": {"target_transform": None}}, "stream.target_transform"),
        ({"model": {"normalize": None}}, "model.normalize"),
    ],
)
def test_from_dict_rejects_wrong_shapes(data: dict[str, Any], field: str) -> None:
    with raises_config_error(field):
        Config.from_dict(data)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"

    with raises_config_error("<file>") as info:
        Config.load(path, env=NO_ENV)

    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "text",
    ["[model\nhorizon = 2\n", "[model]\nhorizon = \n", "[model]\nhorizon = 2\nhorizon = 3\n"],
)
def test_invalid_toml_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = write_toml(tmp_path, text)

    with raises_config_error("<file>") as info:
        Config.load(path, env=NO_ENV)

    assert str(path) in str(info.value)


# --- known bugs: each assertion below fails against the current streamer/config.py ----------


def test_an_integer_too_large_for_a_float_is_a_config_error(tmp_path: Path) -> None:
    """BUG: `_coerce` catches TypeError/ValueError around float(), not OverflowError."""
    path = write_toml(tmp_path, "[stream]\ninterval = 1" + "0" * 400 + "\n")

    with raises_config_error("stream.interval"):
        Config.load(path, env=NO_ENV)


def test_env_override_of_a_section_the_file_gives_as_a_scalar_is_a_config_error(
    tmp_path: Path,
) -> None:
    """BUG: `load` does data.setdefault(section, {})[key] on the file's scalar: TypeError."""
    path = write_toml(tmp_path, "model = 1\n")

    with raises_config_error("model"):
        Config.load(path, env={"STREAMER_MODEL_HORIZON": "3"})


@pytest.mark.parametrize("kind", ["not-utf8", "directory"])
def test_an_unreadable_file_is_a_config_error(tmp_path: Path, kind: str) -> None:
    """BUG: only FileNotFoundError and TOMLDecodeError are translated; a file that is not
    UTF-8 (TOML requires UTF-8) escapes as UnicodeDecodeError, a directory as
    IsADirectoryError."""
    if kind == "not-utf8":
        path = tmp_path / "latin1.toml"
        path.write_bytes(b'[stream]\ntarget = "\xe9"\n')
    else:
        path = tmp_path

    with raises_config_error("<file>"):
        Config.load(path, env=NO_ENV)


# --- round trips ----------------------------------------------------------------------------

FEATURE_NAME = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,11}", fullmatch=True)
FINITE = {"allow_nan": False, "allow_infinity": False}
TOPIC = st.from_regex(r"[a-z][a-z0-9._-]{0,15}", fullmatch=True)


@st.composite
def configs(draw: st.DrawFn) -> Config:
    features = tuple(draw(st.lists(FEATURE_NAME, min_size=1, max_size=5, unique=True)))
    initial = draw(st.integers(1, 1000))
    stream = StreamConfig(
        features=features,
        target=draw(st.sampled_from(features)),
        target_transform=draw(st.sampled_from(["none", "diff", "log_return"])),
        interval=draw(st.floats(min_value=1e-6, max_value=1e6, **FINITE)),
        allowed_lateness=draw(st.floats(min_value=0, max_value=1e6, **FINITE)),
        duplicates=draw(st.sampled_from(["replace", "first"])),
        entity_pattern=draw(st.sampled_from([DEFAULT_ENTITY_PATTERN, "[a-z]+", r"\w{1,8}"])),
        min_event_time=draw(st.floats(min_value=-1e12, max_value=1e12, **FINITE)),
        max_future=draw(st.floats(min_value=0, max_value=1e9, **FINITE)),
        max_step_jump=draw(st.integers(1, 10**9)),
    )
    model = ModelConfig(
        units=tuple(draw(st.lists(st.integers(1, 4096), min_size=1, max_size=4))),
        horizon=draw(st.integers(1, 100)),
        seed=draw(st.integers(-(2**63), 2**63 - 1)),
        normalize=draw(st.booleans()),
        clip=draw(st.floats(min_value=1e-3, max_value=1e3, **FINITE)),
        jit=draw(st.booleans()),
    )
    capacity = CapacityConfig(
        initial=initial,
        max_entities=initial + draw(st.integers(0, 10**6)),
        growth=draw(st.floats(min_value=1.001, max_value=16, **FINITE)),
    )
    kafka = KafkaConfig(
        bootstrap=draw(st.sampled_from(["127.0.0.1:9092", "a:9092,b:9092"])),
        input_topic=draw(TOPIC),
        output_topic=draw(TOPIC),
        dlq_topic=draw(st.just("") | TOPIC),
        group=draw(TOPIC),
        partitions=draw(st.integers(1, 64)),
        encoding=draw(st.sampled_from(["json", "binary"])),
        max_message_bytes=draw(st.integers(1, 2**24)),
        max_poll_records=draw(st.integers(1, 10**5)),
        poll_timeout_ms=draw(st.integers(1, 10**4)),
    )
    redis = RedisConfig(
        url=draw(st.sampled_from(["redis://127.0.0.1:6379/0", "redis://h:1/2"])),
        namespace=draw(st.just("") | TOPIC),
    )
    checkpoint = CheckpointConfig(
        every_steps=draw(st.integers(1, 10**6)),
        every_seconds=draw(st.floats(min_value=1e-3, max_value=1e5, **FINITE)),
    )
    return Config(
        stream=stream,
        model=model,
        capacity=capacity,
        kafka=kafka,
        redis=redis,
        checkpoint=checkpoint,
    )


def test_defaults_round_trip_through_to_dict() -> None:
    config = Config()

    assert Config.from_dict(config.to_dict()) == config


@settings(max_examples=150, deadline=None)
@given(configs())
def test_to_dict_round_trips_through_from_dict_and_json(config: Config) -> None:
    data = config.to_dict()

    assert {"stream", "model", "capacity", "kafka", "redis", "checkpoint"} <= set(data)
    assert Config.from_dict(data) == config
    # Plain data: lists, not tuples, so that it serialises to TOML or JSON as it is.
    assert isinstance(data["stream"]["features"], list)
    assert isinstance(data["model"]["units"], list)
    assert Config.from_dict(json.loads(json.dumps(data))) == config


def env_string(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(str(item) for item in value)
    return repr(value) if isinstance(value, float) else str(value)


@settings(max_examples=150, deadline=None)
@given(configs())
def test_every_field_can_be_set_from_the_environment(config: Config) -> None:
    env = {
        f"STREAMER_{section.upper()}_{key.upper()}": env_string(value)
        for section, values in config.to_dict().items()
        for key, value in values.items()
    }

    assert Config.load(None, env=env) == config


# --- variables of no section (Kubernetes service links) --------------------------------------

SERVICE_LINKS = {
    # What Kubernetes injects for a Service named "streamer" with an "http" port 8000.
    "STREAMER_SERVICE_HOST": "10.0.0.12",
    "STREAMER_SERVICE_PORT": "8000",
    "STREAMER_SERVICE_PORT_HTTP": "8000",
    "STREAMER_PORT": "tcp://10.0.0.12:8000",
    "STREAMER_PORT_8000_TCP": "tcp://10.0.0.12:8000",
    "STREAMER_PORT_8000_TCP_PROTO": "tcp",
    "STREAMER_PORT_8000_TCP_PORT": "8000",
    "STREAMER_PORT_8000_TCP_ADDR": "10.0.0.12",
    "STREAMER_BOGUS_X": "1",
    "STREAMER_HORIZON": "1",
    "STREAMER_STREAMS_X": "1",  # "stream" only counts followed by "_"
    "STREAMER_": "x",
}


def test_variables_that_name_no_section_are_ignored() -> None:
    config = Config.load(None, env={**SERVICE_LINKS, "STREAMER_MODEL_HORIZON": "3"})

    assert config == Config(model=ModelConfig(horizon=3))
    assert config.http.port == 8000


@pytest.mark.parametrize("name", sorted(SERVICE_LINKS))
def test_each_service_link_variable_alone_loads_the_defaults(name: str) -> None:
    assert Config.load(None, env={name: SERVICE_LINKS[name]}) == Config()


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("STREAMER_KAFKA_BOOTSTRAPP", "kafka.bootstrapp"),
        ("STREAMER_REDIS_PASSWORD_FIL", "redis.password_fil"),
        ("STREAMER_HTTP_PORTS", "http.ports"),
        ("STREAMER_STREAM_PORT", "stream.port"),
    ],
)
def test_a_typo_inside_a_known_section_is_still_an_error(name: str, field: str) -> None:
    with raises_config_error(field):
        Config.load(None, env={**SERVICE_LINKS, name: "x"})


# --- secured connections ---------------------------------------------------------------------

SECRET = "S3cr@t:pw/#%"


def sasl(**kw: Any) -> KafkaConfig:
    fields = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512"}
    fields.update({"sasl_username": "alice", **kw})
    return KafkaConfig(**fields)


def test_security_defaults_are_plaintext_without_credentials() -> None:
    k, r = KafkaConfig(), RedisConfig()

    assert (k.security_protocol, k.sasl_mechanism, k.ssl_check_hostname) == ("PLAINTEXT", "", True)
    assert (r.username, r.password_value, r.tls, r.tls_check_hostname) == ("", "", False, True)
    assert r.timeout_s == 5.0


def test_secured_settings_load_from_toml_and_environment(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        [kafka]
        security_protocol = "SASL_SSL"
        sasl_mechanism = "SCRAM-SHA-256"
        sasl_username = "alice"
        ssl_cafile = "/etc/ca.pem"
        ssl_check_hostname = false

        [redis]
        username = "bob"
        tls = true
        tls_ca_file = "/etc/redis-ca.pem"
        timeout_s = 2.5
        """,
    )
    env = {"STREAMER_KAFKA_SASL_PASSWORD": SECRET, "STREAMER_REDIS_PASSWORD": "pw2"}

    config = Config.load(path, env=env)

    assert config.kafka.sasl_password_value == SECRET
    assert config.kafka.ssl_check_hostname is False
    assert config.redis.password_value == "pw2"
    assert (config.redis.username, config.redis.tls, config.redis.timeout_s) == ("bob", True, 2.5)


@pytest.mark.parametrize("content", [SECRET, SECRET + "\n", SECRET + "\r\n"])
def test_a_secret_is_read_from_its_file_without_the_trailing_newline(
    tmp_path: Path, content: str
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(content.encode())
    env = {
        "STREAMER_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "STREAMER_KAFKA_SASL_MECHANISM": "PLAIN",
        "STREAMER_KAFKA_SASL_USERNAME": "alice",
        "STREAMER_KAFKA_SASL_PASSWORD_FILE": str(secret_file),
        "STREAMER_REDIS_PASSWORD_FILE": str(secret_file),
    }

    config = Config.load(None, env=env)

    assert config.kafka.sasl_password_value == SECRET
    assert config.redis.password_value == SECRET
    assert config.kafka.sasl_password == "" and config.redis.password == ""


def test_the_ssl_key_password_is_read_from_its_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "key-password"
    secret_file.write_text(SECRET + "\n")

    k = KafkaConfig(security_protocol="SSL", ssl_password_file=str(secret_file))

    assert k.ssl_password_value == SECRET


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda f: sasl(sasl_password=SECRET, sasl_password_file=f), "kafka.sasl_password"),
        (
            lambda f: KafkaConfig(
                security_protocol="SSL", ssl_password=SECRET, ssl_password_file=f
            ),
            "kafka.ssl_password",
        ),
        (lambda f: RedisConfig(password=SECRET, password_file=f), "redis.password"),
    ],
    ids=["sasl", "ssl", "redis"],
)
def test_a_secret_and_its_file_together_is_an_error(tmp_path: Path, make: Any, field: str) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET)

    with raises_config_error(field) as info:
        make(str(secret_file))
    assert "not both" in str(info.value)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda f: sasl(sasl_password_file=f), "kafka.sasl_password_file"),
        (
            lambda f: KafkaConfig(security_protocol="SSL", ssl_password_file=f),
            "kafka.ssl_password_file",
        ),
        (lambda f: RedisConfig(password_file=f), "redis.password_file"),
    ],
    ids=["sasl", "ssl", "redis"],
)
def test_a_missing_secret_file_is_an_error_naming_field_and_path(
    tmp_path: Path, make: Any, field: str
) -> None:
    missing = tmp_path / "no-such-secret"

    with raises_config_error(field) as info:
        make(str(missing))
    assert str(missing) in str(info.value)


def test_unreadable_empty_and_binary_secret_files_are_errors_without_the_secret(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "a-directory"
    directory.mkdir()
    empty = tmp_path / "empty"
    empty.write_text("\n")
    binary = tmp_path / "binary"
    binary.write_bytes(b"S3cr\xff\xfet")

    for path in (directory, empty, binary):
        with raises_config_error("redis.password_file") as info:
            RedisConfig(password_file=str(path))
        assert str(path) in str(info.value)
        assert "S3cr" not in str(info.value)


def test_a_file_secret_loaded_from_the_environment_fails_at_load(tmp_path: Path) -> None:
    env = {"STREAMER_REDIS_PASSWORD_FILE": str(tmp_path / "gone")}

    with raises_config_error("redis.password_file"):
        Config.load(None, env=env)


@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
def test_sasl_without_a_mechanism_is_an_error(protocol: str) -> None:
    env = {
        "STREAMER_KAFKA_SECURITY_PROTOCOL": protocol,
        "STREAMER_KAFKA_SASL_USERNAME": "alice",
        "STREAMER_KAFKA_SASL_PASSWORD": SECRET,
    }

    with raises_config_error("kafka.sasl_mechanism") as info:
        Config.load(None, env=env)
    assert protocol in str(info.value) and "SCRAM-SHA-256" in str(info.value)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"security_protocol": "TLS"}, "kafka.security_protocol"),
        ({"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI"}, "kafka.sasl_mechanism"),
        (
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_password": SECRET},
            "kafka.sasl_username",
        ),
        (
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "sasl_username": "a"},
            "kafka.sasl_password",
        ),
        ({"sasl_mechanism": "PLAIN"}, "kafka.sasl_mechanism"),
        ({"sasl_password": SECRET}, "kafka.sasl_password"),
        ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN",
          "sasl_username": "a", "sasl_password": SECRET, "ssl_cafile": "/ca.pem"},
         "kafka.ssl_cafile"),
        ({"ssl_certfile": "/c.pem"}, "kafka.ssl_certfile"),
    ],
)  # fmt: skip
def test_inconsistent_kafka_security_is_an_error(kwargs: dict[str, Any], field: str) -> None:
    with raises_config_error(field) as info:
        KafkaConfig(**kwargs)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tls_ca_file": "/ca.pem"}, "redis.tls_ca_file"),
        ({"tls_cert_file": "/c.pem"}, "redis.tls_cert_file"),
        ({"url": "unix:///tmp/redis.sock", "tls": True}, "redis.tls"),
        ({"timeout_s": 0.0}, "redis.timeout_s"),
    ],
)
def test_inconsistent_redis_settings_are_errors(kwargs: dict[str, Any], field: str) -> None:
    with raises_config_error(field):
        RedisConfig(**kwargs)


def test_a_rediss_url_turns_tls_on() -> None:
    r = RedisConfig(url="rediss://h:6380/0", tls_ca_file="/ca.pem")

    assert r.uses_tls and not r.tls


def secured_config(tmp_path: Path) -> Config:
    key_password = tmp_path / "key-password"
    key_password.write_text(SECRET + "-key\n")
    return Config(
        kafka=sasl(sasl_password=SECRET, ssl_password_file=str(key_password)),
        redis=RedisConfig(
            url=f"redis://bob:{SECRET}-url@h:6379/0",
            username="bob",
            password=SECRET + "-redis",
        ),
    )


def test_to_dict_shows_set_secrets_as_stars(tmp_path: Path) -> None:
    config = secured_config(tmp_path)

    data = config.to_dict()

    assert data["kafka"]["sasl_password"] == "***"
    assert data["kafka"]["ssl_password"] == ""  # unset (it is in the file)
    assert data["kafka"]["ssl_password_file"] == str(tmp_path / "key-password")
    assert data["redis"]["password"] == "***"
    assert data["redis"]["url"] == "redis://***@h:6379/0"
    assert data["redis"]["username"] == "bob"
    assert "S3cr" not in json.dumps(data)


def test_reprs_show_no_secret(tmp_path: Path) -> None:
    config = secured_config(tmp_path)

    for text in (repr(config), str(config), repr(config.kafka), repr(config.redis)):
        assert "S3cr" not in text
    assert "sasl_username='alice'" in repr(config.kafka)
    assert "url='redis://***@h:6379/0'" in repr(config.redis)
    assert "username='bob'" in repr(config.redis)


def test_client_kwargs_of_a_plaintext_config() -> None:
    assert client_kwargs(KafkaConfig()) == {"security_protocol": "PLAINTEXT"}


def test_client_kwargs_maps_sasl_ssl_to_kafka_python_names(tmp_path: Path) -> None:
    password_file = tmp_path / "sasl"
    password_file.write_text(SECRET + "\n")
    k = KafkaConfig(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-256",
        sasl_username="alice",
        sasl_password_file=str(password_file),
        ssl_cafile="/ca.pem",
        ssl_certfile="/cert.pem",
        ssl_keyfile="/key.pem",
        ssl_password="kp",
        ssl_check_hostname=False,
    )

    assert client_kwargs(k) == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "alice",
        "sasl_plain_password": SECRET,
        "ssl_cafile": "/ca.pem",
        "ssl_certfile": "/cert.pem",
        "ssl_keyfile": "/key.pem",
        "ssl_password": "kp",
        "ssl_check_hostname": False,
    }


def test_client_kwargs_passes_only_what_is_set() -> None:
    plain_sasl = KafkaConfig(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username="alice",
        sasl_password=SECRET,
    )
    ssl_only = KafkaConfig(security_protocol="SSL", ssl_cafile="/ca.pem")

    assert client_kwargs(plain_sasl) == {
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": "PLAIN",
        "sasl_plain_username": "alice",
        "sasl_plain_password": SECRET,
    }
    assert client_kwargs(ssl_only) == {
        "security_protocol": "SSL",
        "ssl_cafile": "/ca.pem",
        "ssl_check_hostname": True,
    }


def test_client_kwargs_are_accepted_by_every_kafka_python_client() -> None:
    k = sasl(sasl_password=SECRET, ssl_cafile="/ca.pem", ssl_password="kp")

    for cls in (KafkaConsumer, KafkaProducer, KafkaAdminClient):
        assert set(client_kwargs(k)) <= set(cls.DEFAULT_CONFIG), cls.__name__


@pytest.mark.parametrize(
    "url",
    [
        f"redis://:{SECRET}@db.example:6379/0",
        f"redis://alice:{SECRET}@db.example:6379/0",
        f"rediss://alice:{SECRET}@db.example:6379/0",
        "redis://alice:S3cr@t:pw@db.example:6379/0",
        "redis://alice:S3cr%40t%3Apw@db.example:6379/0",
    ],
)
def test_safe_url_drops_user_and_every_part_of_the_password(url: str) -> None:
    shown = safe_url(url)

    assert shown.endswith("://***@db.example:6379/0")
    for part in ("S3cr", "t:pw", "pw", "alice", "%40"):
        assert part not in shown
    assert _safe_url(url) == shown  # RedisStore's messages use the same


def test_safe_url_masks_query_credentials_and_keeps_plain_urls() -> None:
    assert safe_url("redis://h:1/0?password=S3cr&db=2") == "redis://h:1/0?password=***&db=2"
    assert safe_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert safe_url("unix:///run/redis.sock?db=1") == "unix:///run/redis.sock?db=1"
