"""The input contract: `EventParser` accepts exactly the events the brief allows.

Every refusal is an `EventError` with the right `Reason` (the dead-letter header) and the
entity when one is known; nothing else may escape the parser (brief, invariant 5).
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamer.config import DEFAULT_ENTITY_PATTERN, DEFAULT_MIN_EVENT_TIME, StreamConfig
from streamer.errors import EventError, Reason, StreamerError
from streamer.events import Event, EventParser, step_of

FEATURES = ("price", "signal", "volume")
NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z, the pinned wall clock
MAX_FUTURE = 3_600.0
F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)  # smallest positive normal float32
MAX_ABS = StreamConfig().max_abs_value
NAN = float("nan")
INF = float("inf")


def stream_config(transform: str = "log_return") -> StreamConfig:
    return StreamConfig(
        features=FEATURES, target="price", target_transform=transform, max_future=MAX_FUTURE
    )


@pytest.fixture
def parser() -> EventParser:
    return EventParser(stream_config(), clock=lambda: NOW)


def event(**fields: Any) -> dict[str, Any]:
    """A valid raw event, with `fields` replaced; a value of `...` removes the field."""
    base: dict[str, Any] = {"entity": "AAPL", "ts": NOW - 10.0, "values": [187.5, -0.25, 1200]}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not ...}


def refused(parser: EventParser, obj: Any) -> EventError:
    with pytest.raises(EventError) as info:
        parser.parse(obj)
    return info.value


# --- valid events ---------------------------------------------------------------------------


def test_values_as_a_list_are_taken_in_feature_order(parser: EventParser) -> None:
    parsed = parser.parse(event(values=[187.5, -0.25, 1200]))

    assert parsed == Event("AAPL", NOW - 10.0, (187.5, -0.25, 1200.0))
    assert all(type(v) is float for v in parsed.values)


def test_values_as_an_object_are_reordered_to_feature_order(parser: EventParser) -> None:
    parsed = parser.parse(event(values={"volume": 1200, "signal": -0.25, "price": 187.5}))

    assert parsed.values == (187.5, -0.25, 1200.0)


def test_values_as_a_tuple_are_accepted(parser: EventParser) -> None:
    assert parser.parse(event(values=(1.0, 2.0, 3.0))).values == (1.0, 2.0, 3.0)


def test_an_integer_ts_becomes_a_float(parser: EventParser) -> None:
    parsed = parser.parse(event(ts=int(NOW)))

    assert parsed.ts == NOW
    assert type(parsed.ts) is float


def test_a_decoded_json_event_parses(parser: EventParser) -> None:
    raw = (
        '{"entity": "BRK.B", "ts": 1767225000.5, "values": {"price": 1, "signal": 0, "volume": 2}}'
    )

    assert parser.parse(json.loads(raw)) == Event("BRK.B", 1767225000.5, (1.0, 0.0, 2.0))


@pytest.mark.parametrize(
    "entity", ["A", "0", "a" * 128, "BRK.B", "tank-7", "eu:de/site_3", "x.y_z:w/v-u"]
)
def test_valid_entities(parser: EventParser, entity: str) -> None:
    assert parser.parse(event(entity=entity)).entity == entity


@pytest.mark.parametrize(
    ("ts", "values"),
    [
        pytest.param(DEFAULT_MIN_EVENT_TIME, [1.0, 0.0, 0.0], id="ts-at-min-event-time"),
        pytest.param(NOW + MAX_FUTURE, [1.0, 0.0, 0.0], id="ts-at-max-future"),
        pytest.param(NOW, [MAX_ABS, -MAX_ABS, 0.0], id="max-abs-value"),
        pytest.param(NOW, [F32_TINY, -0.0, 1e-45], id="tiny"),
        pytest.param(NOW, [1.0, 1e-40, 5e-324], id="subnormal-non-target"),
        pytest.param(NOW, [1, -1, 0], id="ints"),
    ],
)
def test_boundary_values_are_accepted(parser: EventParser, ts: float, values: list) -> None:
    parsed = parser.parse(event(ts=ts, values=values))

    assert parsed.ts == ts
    assert parsed.values == tuple(float(v) for v in values)


@pytest.mark.parametrize("transform", ["none", "diff"])
@pytest.mark.parametrize("price", [0.0, -0.0, -1.5])
def test_non_positive_target_is_fine_without_log_return(transform: str, price: float) -> None:
    parser = EventParser(stream_config(transform), clock=lambda: NOW)

    assert parser.parse(event(values=[price, 1.0, 2.0])).values[0] == price


def test_only_the_target_must_be_positive_under_log_return(parser: EventParser) -> None:
    assert parser.parse(event(values=[1.0, -5.0, 0.0])).values == (1.0, -5.0, 0.0)


def test_the_positive_check_follows_the_target_column() -> None:
    config = StreamConfig(features=FEATURES, target="volume", target_transform="log_return")
    parser = EventParser(config, clock=lambda: NOW)

    assert parser.parse(event(values=[-1.0, 0.0, 3.0])).values == (-1.0, 0.0, 3.0)
    assert refused(parser, event(values=[1.0, 1.0, 0.0])).reason is Reason.NON_POSITIVE_TARGET


# --- refusals -------------------------------------------------------------------------------

VALUES = {"price": 1.0, "signal": 2.0, "volume": 3.0}

REFUSALS = [
    # NOT_AN_OBJECT: no entity can be known
    pytest.param(None, Reason.NOT_AN_OBJECT, None, id="null"),
    pytest.param([], Reason.NOT_AN_OBJECT, None, id="list"),
    pytest.param("AAPL", Reason.NOT_AN_OBJECT, None, id="string"),
    pytest.param(42, Reason.NOT_AN_OBJECT, None, id="number"),
    pytest.param([("entity", "AAPL")], Reason.NOT_AN_OBJECT, None, id="pairs"),
    # MISSING_FIELD: the entity is reported when it is there
    pytest.param({}, Reason.MISSING_FIELD, None, id="empty-object"),
    pytest.param(event(values=...), Reason.MISSING_FIELD, "AAPL", id="no-values"),
    pytest.param(event(ts=...), Reason.MISSING_FIELD, "AAPL", id="no-ts"),
    pytest.param(event(entity=...), Reason.MISSING_FIELD, None, id="no-entity"),
    # UNKNOWN_FIELD
    pytest.param({**event(), "extra": 1}, Reason.UNKNOWN_FIELD, "AAPL", id="extra-field"),
    pytest.param({**event(), "Entity": "x"}, Reason.UNKNOWN_FIELD, "AAPL", id="case-field"),
    # WRONG_TYPE: entity (no entity can be reported)
    pytest.param(event(entity=5), Reason.WRONG_TYPE, None, id="entity-int"),
    pytest.param(event(entity=None), Reason.WRONG_TYPE, None, id="entity-null"),
    pytest.param(event(entity=b"AAPL"), Reason.WRONG_TYPE, None, id="entity-bytes"),
    pytest.param(event(entity=["AAPL"]), Reason.WRONG_TYPE, None, id="entity-list"),
    pytest.param(event(entity=True), Reason.WRONG_TYPE, None, id="entity-bool"),
    # WRONG_TYPE: ts
    pytest.param(event(ts=str(NOW)), Reason.WRONG_TYPE, "AAPL", id="ts-string"),
    pytest.param(event(ts=None), Reason.WRONG_TYPE, "AAPL", id="ts-null"),
    pytest.param(event(ts=True), Reason.WRONG_TYPE, "AAPL", id="ts-bool"),
    pytest.param(event(ts=[NOW]), Reason.WRONG_TYPE, "AAPL", id="ts-list"),
    # WRONG_TYPE: values
    pytest.param(event(values="1,2,3"), Reason.WRONG_TYPE, "AAPL", id="values-string"),
    pytest.param(event(values=None), Reason.WRONG_TYPE, "AAPL", id="values-null"),
    pytest.param(event(values=1.0), Reason.WRONG_TYPE, "AAPL", id="values-number"),
    pytest.param(event(values={1.0, 2.0, 3.0}), Reason.WRONG_TYPE, "AAPL", id="values-set"),
    # WRONG_TYPE: one feature value
    pytest.param(event(values=["1.0", 2, 3]), Reason.WRONG_TYPE, "AAPL", id="feature-string"),
    pytest.param(event(values=[1, None, 3]), Reason.WRONG_TYPE, "AAPL", id="feature-null"),
    pytest.param(event(values=[1, 2, True]), Reason.WRONG_TYPE, "AAPL", id="feature-true"),
    pytest.param(event(values=[False, 2, 3]), Reason.WRONG_TYPE, "AAPL", id="feature-false"),
    pytest.param(event(values=[[1.0], 2, 3]), Reason.WRONG_TYPE, "AAPL", id="feature-list"),
    pytest.param(
        event(values={**VALUES, "signal": "2"}), Reason.WRONG_TYPE, "AAPL", id="object-string"
    ),
    pytest.param(
        event(values={**VALUES, "volume": True}), Reason.WRONG_TYPE, "AAPL", id="object-bool"
    ),
    # FEATURE_COUNT
    pytest.param(event(values=[1.0, 2.0]), Reason.FEATURE_COUNT, "AAPL", id="list-too-few"),
    pytest.param(event(values=[1, 2, 3, 4]), Reason.FEATURE_COUNT, "AAPL", id="list-too-many"),
    pytest.param(event(values=[]), Reason.FEATURE_COUNT, "AAPL", id="list-empty"),
    pytest.param(
        event(values={"price": 1.0, "signal": 2.0}), Reason.FEATURE_COUNT, "AAPL", id="obj-missing"
    ),
    pytest.param(event(values={}), Reason.FEATURE_COUNT, "AAPL", id="obj-empty"),
    # UNKNOWN_FEATURE (checked before the count)
    pytest.param(
        event(values={**VALUES, "extra": 4.0}), Reason.UNKNOWN_FEATURE, "AAPL", id="obj-extra"
    ),
    pytest.param(
        event(values={"price": 1.0, "signal": 2.0, "volum": 3.0}),
        Reason.UNKNOWN_FEATURE,
        "AAPL",
        id="obj-typo",
    ),
    pytest.param(
        event(values={**VALUES, 7: 4.0}), Reason.UNKNOWN_FEATURE, "AAPL", id="obj-int-key"
    ),
    # NON_FINITE
    pytest.param(event(values=[NAN, 2, 3]), Reason.NON_FINITE, "AAPL", id="nan"),
    pytest.param(event(values=[1, INF, 3]), Reason.NON_FINITE, "AAPL", id="inf"),
    pytest.param(event(values=[1, 2, -INF]), Reason.NON_FINITE, "AAPL", id="minus-inf"),
    pytest.param(event(values=[1, 2, 1e39]), Reason.NON_FINITE, "AAPL", id="beyond-float32"),
    pytest.param(event(values=[1, -1e39, 3]), Reason.NON_FINITE, "AAPL", id="below-float32"),
    pytest.param(event(values=[1, 2, 10**39]), Reason.NON_FINITE, "AAPL", id="int-beyond-f32"),
    pytest.param(
        event(values={**VALUES, "signal": NAN}), Reason.NON_FINITE, "AAPL", id="object-nan"
    ),
    pytest.param(event(ts=NAN), Reason.NON_FINITE, "AAPL", id="ts-nan"),
    pytest.param(event(ts=INF), Reason.NON_FINITE, "AAPL", id="ts-inf"),
    pytest.param(event(ts=-INF), Reason.NON_FINITE, "AAPL", id="ts-minus-inf"),
    # BAD_ENTITY: an id that breaks the pattern is not reported as an entity
    pytest.param(event(entity=""), Reason.BAD_ENTITY, None, id="entity-empty"),
    pytest.param(event(entity="a" * 129), Reason.BAD_ENTITY, None, id="entity-129-chars"),
    pytest.param(event(entity="AA PL"), Reason.BAD_ENTITY, None, id="entity-space"),
    pytest.param(event(entity=" AAPL"), Reason.BAD_ENTITY, None, id="entity-leading-space"),
    pytest.param(event(entity="AAPL\n"), Reason.BAD_ENTITY, None, id="entity-newline"),
    pytest.param(event(entity="AAPL\x00"), Reason.BAD_ENTITY, None, id="entity-nul"),
    pytest.param(event(entity="Zürich"), Reason.BAD_ENTITY, None, id="entity-non-ascii"),
    pytest.param(event(entity="٣"), Reason.BAD_ENTITY, None, id="entity-arabic-digit"),
    pytest.param(event(entity="-AAPL"), Reason.BAD_ENTITY, None, id="entity-leading-dash"),
    pytest.param(event(entity=".AAPL"), Reason.BAD_ENTITY, None, id="entity-leading-dot"),
    pytest.param(event(entity="a,b"), Reason.BAD_ENTITY, None, id="entity-comma"),
    # TS_TOO_OLD
    pytest.param(event(ts=0), Reason.TS_TOO_OLD, "AAPL", id="ts-zero"),
    pytest.param(event(ts=-1.0), Reason.TS_TOO_OLD, "AAPL", id="ts-negative"),
    pytest.param(
        event(ts=DEFAULT_MIN_EVENT_TIME - 0.001), Reason.TS_TOO_OLD, "AAPL", id="ts-before-min"
    ),
    # TS_IN_FUTURE (clock pinned to NOW)
    pytest.param(
        event(ts=NOW + MAX_FUTURE + 0.001), Reason.TS_IN_FUTURE, "AAPL", id="ts-past-max-future"
    ),
    pytest.param(event(ts=NOW * 1000), Reason.TS_IN_FUTURE, "AAPL", id="ts-milliseconds"),
    # NON_POSITIVE_TARGET (log_return on price)
    pytest.param(event(values=[0.0, 1, 1]), Reason.NON_POSITIVE_TARGET, "AAPL", id="target-zero"),
    pytest.param(
        event(values=[-0.0, 1, 1]), Reason.NON_POSITIVE_TARGET, "AAPL", id="target-minus-zero"
    ),
    pytest.param(
        event(values=[-3.5, 1, 1]), Reason.NON_POSITIVE_TARGET, "AAPL", id="target-negative"
    ),
    pytest.param(
        event(values={**VALUES, "price": -1}),
        Reason.NON_POSITIVE_TARGET,
        "AAPL",
        id="object-target-negative",
    ),
    # OUT_OF_RANGE: finite float32, but beyond stream.max_abs_value, or a log_return target
    # that is not a positive normal float32
    pytest.param(event(values=[1e16, 1, 1]), Reason.OUT_OF_RANGE, "AAPL", id="target-1e16"),
    pytest.param(event(values=[1, 1e16, 1]), Reason.OUT_OF_RANGE, "AAPL", id="feature-1e16"),
    pytest.param(event(values=[1, -1e16, 1]), Reason.OUT_OF_RANGE, "AAPL", id="feature-minus-1e16"),
    pytest.param(event(values=[1, 1, 3e38]), Reason.OUT_OF_RANGE, "AAPL", id="feature-3e38"),
    pytest.param(event(values=[1, 1, 10**16]), Reason.OUT_OF_RANGE, "AAPL", id="int-1e16"),
    pytest.param(
        event(values={**VALUES, "signal": -1e16}), Reason.OUT_OF_RANGE, "AAPL", id="object-1e16"
    ),
    pytest.param(event(values=[1e-310, 1, 1]), Reason.OUT_OF_RANGE, "AAPL", id="target-f64-sub"),
    pytest.param(event(values=[5e-324, 1, 1]), Reason.OUT_OF_RANGE, "AAPL", id="target-f64-min"),
    pytest.param(event(values=[1e-40, 1, 1]), Reason.OUT_OF_RANGE, "AAPL", id="target-f32-sub"),
    pytest.param(
        event(values=[F32_TINY * 0.999, 1, 1]), Reason.OUT_OF_RANGE, "AAPL", id="target-below-tiny"
    ),
]


@pytest.mark.parametrize(("obj", "reason", "entity"), REFUSALS)
def test_refusals_carry_reason_and_entity(
    parser: EventParser, obj: Any, reason: Reason, entity: str | None
) -> None:
    error = refused(parser, obj)

    assert error.reason is reason
    assert error.entity == entity
    assert isinstance(error, StreamerError)
    if entity is not None and reason not in (Reason.MISSING_FIELD, Reason.UNKNOWN_FIELD):
        assert f'"{entity}"' in str(error)


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param(event(values=...), id="missing-field"),
        pytest.param({**event(), "extra": 1}, id="unknown-field"),
    ],
)
def test_field_errors_quote_the_entity_they_report(parser: EventParser, obj: Any) -> None:
    """BUG (minor): MISSING_FIELD and UNKNOWN_FIELD set `.entity` but their messages do not
    quote it ("event lacks ['values']"), unlike every other refusal; errors.py promises
    that a log line is enough to find the culprit."""
    error = refused(parser, obj)

    assert error.entity == "AAPL"
    assert '"AAPL"' in str(error)


@pytest.mark.parametrize("entity", ["", "AA PL", "Zürich", "AAPL\n", "-AAPL", "a" * 64], ids=repr)
def test_bad_entity_message_quotes_the_entity(parser: EventParser, entity: str) -> None:
    # "a" * 64 matches the pattern, so make it bad with a trailing space (65 chars, shortened).
    raw = entity + " " if len(entity) == 64 else entity
    error = refused(parser, event(entity=raw))

    assert error.reason is Reason.BAD_ENTITY
    shown = raw if len(raw) <= 64 else raw[:61] + "..."
    assert f'"{shown}"' in str(error)


def test_a_very_long_bad_entity_is_shortened_in_the_message(parser: EventParser) -> None:
    error = refused(parser, event(entity="x" * 10_000))

    assert error.reason is Reason.BAD_ENTITY
    assert f'"{"x" * 61}..."' in str(error)
    assert len(str(error)) < 200


def test_missing_field_ignores_a_long_or_non_string_entity(parser: EventParser) -> None:
    assert refused(parser, event(entity="a" * 257, ts=...)).entity is None
    assert refused(parser, event(entity=7, ts=...)).entity is None
    assert refused(parser, event(entity="a" * 256, ts=...)).entity == "a" * 256


def test_messages_name_the_missing_and_unknown_parts(parser: EventParser) -> None:
    assert "'ts'" in str(refused(parser, event(ts=...)))
    assert "'extra'" in str(refused(parser, {**event(), "extra": 1}))
    assert "volume" in str(refused(parser, event(values={"price": 1.0, "signal": 2.0})))
    assert "volum" in str(refused(parser, event(values={"price": 1, "signal": 2, "volum": 3})))
    assert '"signal"' in str(refused(parser, event(values=[1, "x", 3])))
    assert '"volume"' in str(refused(parser, event(values=[1, 2, NAN])))


def test_the_entity_is_checked_before_ts_and_values(parser: EventParser) -> None:
    error = refused(parser, event(entity="bad id", ts="never", values=None))

    assert error.reason is Reason.BAD_ENTITY


def test_the_clock_is_read_at_parse_time() -> None:
    now = [NOW]
    parser = EventParser(stream_config(), clock=lambda: now[0])
    future = event(ts=NOW + MAX_FUTURE + 60.0)

    assert refused(parser, future).reason is Reason.TS_IN_FUTURE
    now[0] += 120.0
    assert parser.parse(future).ts == NOW + MAX_FUTURE + 60.0


@pytest.mark.parametrize(
    "obj",
    [
        pytest.param(event(ts=10**400), id="ts"),
        pytest.param(event(values=[1.0, 10**400, 3.0]), id="feature"),
    ],
)
def test_an_integer_too_large_for_a_float_is_refused(parser: EventParser, obj: Any) -> None:
    """BUG: `_ts` and `_values` call float() on JSON integers of any size; float(10**400)
    raises OverflowError, which escapes the parser (json.loads produces such ints)."""
    assert refused(parser, obj).reason is Reason.NON_FINITE


# --- properties -----------------------------------------------------------------------------

ENTITIES = st.from_regex(DEFAULT_ENTITY_PATTERN, fullmatch=True)
FEATURE_VALUES = st.floats(min_value=-MAX_ABS, max_value=MAX_ABS, allow_nan=False)
PRICES = st.floats(min_value=F32_TINY, max_value=MAX_ABS)
TIMES = st.floats(min_value=DEFAULT_MIN_EVENT_TIME, max_value=NOW + MAX_FUTURE)


@settings(max_examples=200, deadline=None)
@given(
    entity=ENTITIES,
    ts=TIMES,
    price=PRICES,
    rest=st.lists(FEATURE_VALUES, min_size=2, max_size=2),
    seed=st.randoms(use_true_random=False),
)
def test_every_valid_event_parses_the_same_as_a_list_or_an_object(
    entity: str, ts: float, price: float, rest: list[float], seed: random.Random
) -> None:
    parser = EventParser(stream_config(), clock=lambda: NOW)
    values = [price, *rest]
    keyed = list(zip(FEATURES, values, strict=True))
    seed.shuffle(keyed)

    as_list = parser.parse({"entity": entity, "ts": ts, "values": values})
    as_object = parser.parse({"values": dict(keyed), "ts": ts, "entity": entity})

    assert as_list == as_object == Event(entity, ts, tuple(values))


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)  # bigger ints: see test_an_integer_too_large_...
    | st.floats()
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
ALMOST_EVENTS = st.fixed_dictionaries(
    {},
    optional={
        "entity": ENTITIES | JSON,
        "ts": TIMES | JSON,
        "values": st.lists(FEATURE_VALUES | JSON, max_size=4)
        | st.dictionaries(st.sampled_from([*FEATURES, "other"]), FEATURE_VALUES | JSON)
        | JSON,
        "extra": JSON,
    },
)


@settings(max_examples=300, deadline=None)
@given(ALMOST_EVENTS | JSON)
def test_anything_either_parses_to_a_sound_event_or_raises_event_error(obj: Any) -> None:
    parser = EventParser(stream_config(), clock=lambda: NOW)
    try:
        parsed = parser.parse(obj)
    except EventError as error:
        assert error.reason in set(Reason)
        assert error.entity is None or isinstance(error.entity, str)
        return
    assert parsed.entity == obj["entity"]
    assert DEFAULT_MIN_EVENT_TIME <= parsed.ts <= NOW + MAX_FUTURE
    assert len(parsed.values) == len(FEATURES)
    assert all(math.isfinite(v) and abs(v) <= MAX_ABS for v in parsed.values)
    assert np.float32(parsed.values[0]) >= F32_TINY


# --- step_of --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ts", "interval", "step"),
    [
        (0.0, 1.0, 0),
        (-0.0, 1.0, 0),
        (0.999, 1.0, 0),
        (1.0, 1.0, 1),
        (1e-300, 1.0, 0),
        (-1e-300, 1.0, -1),
        (-0.5, 1.0, -1),
        (-1.0, 1.0, -1),
        (-1.000001, 1.0, -2),
        (59.999, 60.0, 0),
        (60.0, 60.0, 1),
        (-60.0, 60.0, -1),
        (-60.001, 60.0, -2),
        (2.5, 0.5, 5),
        (2.4999, 0.5, 4),
        (NOW, 60.0, 29_453_760),
        (NOW - 0.001, 60.0, 29_453_759),
        (NOW, 1.0, 1_767_225_600),
    ],
)
def test_step_of(ts: float, interval: float, step: int) -> None:
    result = step_of(ts, interval)

    assert result == step
    assert type(result) is int


@settings(max_examples=300, deadline=None)
@given(
    a=st.floats(min_value=-1e12, max_value=1e12),
    b=st.floats(min_value=-1e12, max_value=1e12),
    interval=st.floats(min_value=1e-3, max_value=1e5),
)
def test_step_of_never_decreases_with_time(a: float, b: float, interval: float) -> None:
    lo, hi = sorted((a, b))

    assert step_of(lo, interval) <= step_of(hi, interval)


@settings(max_examples=300, deadline=None)
@given(
    # Subnormal ts / interval can underflow to -0.0; no event time is that close to 0.
    ts=st.floats(min_value=-1e12, max_value=1e12, allow_subnormal=False),
    exponent=st.integers(-10, 10),
)
def test_a_ts_lies_inside_its_step_for_power_of_two_intervals(ts: float, exponent: int) -> None:
    interval = 2.0**exponent  # exact division: no rounding to argue about
    step = step_of(ts, interval)

    assert step * interval <= ts < (step + 1) * interval


@pytest.mark.parametrize(
    ("ts", "interval"),
    [(1_147_698_820.8, 0.2), (1_075_641_915.6, 0.001), (2_484_445_796.6, 0.1)],
)
def test_events_at_one_ts_never_close_their_own_step(ts: float, interval: float) -> None:
    """Regression: for these values (step_of(ts) + 1) * interval == ts in float arithmetic.
    The aligner once compared the watermark with that product, so with allowed_lateness=0 the
    first event closed its own step and a second entity's event at the same ts was LATE. It
    now compares integer steps, consistent with step_of."""
    from streamer.aligner import AddStatus, StepAligner
    from streamer.config import CapacityConfig
    from streamer.registry import SlotRegistry

    cfg = StreamConfig(features=("a",), target="a", target_transform="none", interval=interval)
    aligner = StepAligner(cfg, SlotRegistry(CapacityConfig(initial=4, max_entities=4)))
    assert aligner.add(Event("A", ts, (1.0,))) is AddStatus.ACCEPTED
    assert aligner.close_ready() == []
    assert aligner.add(Event("B", ts, (2.0,))) is AddStatus.ACCEPTED
    assert aligner.late == 0


# --- stream.max_abs_value, float32 range, duplicate field names --------------------------------


@pytest.mark.parametrize("bad", [0.0, -1.0, INF, NAN])
def test_max_abs_value_must_be_positive_and_finite(bad: float) -> None:
    from streamer.config import ConfigError

    with pytest.raises(ConfigError) as info:
        StreamConfig(max_abs_value=bad)
    assert info.value.field == "stream.max_abs_value"


def test_out_of_range_names_entity_and_feature_and_follows_the_config() -> None:
    config = StreamConfig(
        features=FEATURES, target="price", max_future=MAX_FUTURE, max_abs_value=100.0
    )
    parser = EventParser(config, clock=lambda: NOW)

    assert parser.parse(event(values=[100.0, -100.0, 0.0])).values == (100.0, -100.0, 0.0)
    error = refused(parser, event(values=[1.0, 2.0, -100.5]))
    assert error.reason is Reason.OUT_OF_RANGE
    assert '"AAPL"' in str(error) and '"volume"' in str(error)


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        pytest.param([1e16, 1, 1], Reason.OUT_OF_RANGE, id="1e16"),
        pytest.param([1, -1e16, 1], Reason.OUT_OF_RANGE, id="-1e16"),
        pytest.param([1e-310, 1, 1], Reason.OUT_OF_RANGE, id="target-1e-310"),
        pytest.param([1e-40, 1, 1], Reason.OUT_OF_RANGE, id="target-1e-40"),
        pytest.param([1, 1e-40, 1], None, id="feature-1e-40-is-fine"),
        pytest.param([1, 1, 1e-310], None, id="feature-1e-310-is-fine"),
        pytest.param([0.0, 1, 1], Reason.NON_POSITIVE_TARGET, id="target-0-keeps-its-reason"),
        pytest.param([1e39, 1, 1], Reason.NON_FINITE, id="1e39-keeps-its-reason"),
    ],
)
def test_float32_range_table(parser: EventParser, values: list, reason: Reason | None) -> None:
    if reason is None:
        assert parser.parse(event(values=values)).values == tuple(map(float, values))
    else:
        assert refused(parser, event(values=values)).reason is reason


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"entity":"A","entity":"B","ts":1767225590,"values":[1,2,3]}', id="entity"),
        pytest.param(b'{"entity":"A","ts":1767225590,"ts":1767225591,"values":[1,2,3]}', id="ts"),
        pytest.param(
            b'{"entity":"A","ts":1767225590,"values":{"price":1,"signal":2,"volume":3,"price":4}}',
            id="nested-feature",
        ),
        pytest.param(b'{"a":{"b":{"c":1,"c":1}}}', id="deep-equal-values"),
    ],
)
def test_duplicate_field_names_are_refused(raw: bytes) -> None:
    from streamer.codec import decode_event

    with pytest.raises(EventError) as info:
        decode_event(raw, "json", 1024)
    assert info.value.reason is Reason.DUPLICATE_FIELD


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param('{"entity":"A","ts":1,"values":[]}'.encode("utf-16"), id="utf-16-bom"),
        pytest.param('{"entity":"A","ts":1,"values":[]}'.encode("utf-16-le"), id="utf-16-le"),
        pytest.param(b'\xef\xbb\xbf{"entity":"A","ts":1,"values":[]}', id="utf-8-bom"),
        pytest.param(b'{"entity":"\xed\xa0\x80","ts":1,"values":[]}', id="encoded-surrogate"),
        pytest.param(b'{"entity":"A","ts":' + b"1" * 5000 + b',"values":[]}', id="5000-digits"),
    ],
)
def test_only_utf8_json_decodes(raw: bytes) -> None:
    """json.loads(bytes) would take UTF-16/32 and encoded surrogates; an integer literal of
    more than 4300 digits raised a bare ValueError that escaped decode_event."""
    from streamer.codec import decode_event

    with pytest.raises(EventError) as info:
        decode_event(raw, "json", 1 << 20)
    assert info.value.reason is Reason.UNDECODABLE


def test_a_clean_json_event_still_decodes() -> None:
    from streamer.codec import decode_event

    raw = b'{"entity":"E001","ts":1767225600.5,"values":{"price":101.3,"signal":0.2}}'
    assert decode_event(raw, "json", 1024) == {
        "entity": "E001",
        "ts": 1767225600.5,
        "values": {"price": 101.3, "signal": 0.2},
    }
