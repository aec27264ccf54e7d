"""The input contract: one event is one timestep of one entity.

An event is a mapping (decoded JSON by default)::

    {"entity": "AAPL", "ts": 1767225600.0, "values": {"price": 187.2, "signal": 0.13}}

`values` is either an object keyed by feature name or a list in the configured feature
order. `ts` is the event time in seconds since the epoch (UTC). `parse_event` checks all
of it and raises `EventError` with a machine-readable `Reason`; nothing that fails here may
reach a state.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import StreamConfig
from .errors import EventError, Reason

FIELDS = frozenset({"entity", "ts", "values"})
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# Smallest positive normal float32: a log_return target below it is 0 or a subnormal in
# float32 (log() of it is -inf or loses all precision).
_FLOAT32_TINY = np.float32(np.finfo(np.float32).tiny)


@dataclass(frozen=True, slots=True)
class Event:
    """A validated event: values are in the configured feature order."""

    entity: str
    ts: float
    values: tuple[float, ...]


def step_of(ts: float, interval: float) -> int:
    """The step an event time falls in: floor(ts / interval).

    Steps are compared as integers everywhere (never `ts` against `step * interval`), so the
    float rounding of the division cannot put an event and its step's end on two sides.
    """
    return math.floor(ts / interval)


class EventParser:
    """Validates raw event mappings against one `StreamConfig`.

    `clock` returns the wall-clock time used to refuse events from the future; tests and
    replays of historical data can pin it.
    """

    def __init__(self, config: StreamConfig, clock: Callable[[], float] = time.time) -> None:
        self._features = config.features
        self._index = {name: i for i, name in enumerate(config.features)}
        self._entity_re = re.compile(config.entity_pattern)
        self._min_ts = config.min_event_time
        self._max_future = config.max_future
        self._clock = clock
        self._max_abs = config.max_abs_value
        self._positive_index = (
            config.target_index if config.target_transform == "log_return" else None
        )

    def parse(self, obj: Any) -> Event:
        if not isinstance(obj, Mapping):
            raise EventError(
                Reason.NOT_AN_OBJECT, f"event must be an object, got {type(obj).__name__}"
            )
        missing = FIELDS - obj.keys()
        if missing:
            who = _entity_or_none(obj.get("entity"))
            raise EventError(Reason.MISSING_FIELD, f"{_quote(who)}lacks {sorted(missing)}", who)
        extra = obj.keys() - FIELDS
        if extra:
            who = _entity_or_none(obj.get("entity"))
            raise EventError(
                Reason.UNKNOWN_FIELD,
                f"{_quote(who)}has unknown fields {sorted(map(str, extra))}",
                who,
            )
        entity = self._entity(obj["entity"])
        ts = self._ts(obj["ts"], entity)
        values = self._values(obj["values"], entity)
        return Event(entity, ts, values)

    def _entity(self, raw: Any) -> str:
        if not isinstance(raw, str):
            raise EventError(
                Reason.WRONG_TYPE, f"entity must be a string, got {type(raw).__name__}"
            )
        if not self._entity_re.fullmatch(raw):
            shown = raw if len(raw) <= 64 else raw[:61] + "..."
            raise EventError(
                Reason.BAD_ENTITY, f'entity "{shown}" does not match the entity pattern'
            )
        return raw

    def _ts(self, raw: Any, entity: str) -> float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise EventError(
                Reason.WRONG_TYPE,
                f'entity "{entity}": ts must be a number, got {type(raw).__name__}',
                entity,
            )
        ts = _to_float(raw)
        if not math.isfinite(ts):
            raise EventError(Reason.NON_FINITE, f'entity "{entity}": ts is {raw}', entity)
        if ts < self._min_ts:
            raise EventError(
                Reason.TS_TOO_OLD,
                f'entity "{entity}": ts {ts} is before stream.min_event_time {self._min_ts} '
                "(to replay history set stream.min_event_time = 0, "
                "STREAMER_STREAM_MIN_EVENT_TIME=0)",
                entity,
            )
        if self._max_future > 0 and ts > self._clock() + self._max_future:
            raise EventError(
                Reason.TS_IN_FUTURE,
                f'entity "{entity}": ts {ts} is more than {self._max_future} s in the future',
                entity,
            )
        return ts

    def _values(self, raw: Any, entity: str) -> tuple[float, ...]:
        n = len(self._features)
        if isinstance(raw, Mapping):
            unknown = [k for k in raw if k not in self._index]
            if unknown:
                raise EventError(
                    Reason.UNKNOWN_FEATURE,
                    f'entity "{entity}" has unknown features {sorted(map(str, unknown))}',
                    entity,
                )
            if len(raw) != n:
                missing = [f for f in self._features if f not in raw]
                raise EventError(
                    Reason.FEATURE_COUNT,
                    f'entity "{entity}" has {len(raw)} features, expected {n} (missing {missing})',
                    entity,
                )
            items = [raw[name] for name in self._features]
        elif isinstance(raw, list | tuple):
            if len(raw) != n:
                raise EventError(
                    Reason.FEATURE_COUNT,
                    f'entity "{entity}" has {len(raw)} features, expected {n}',
                    entity,
                )
            items = list(raw)
        else:
            raise EventError(
                Reason.WRONG_TYPE,
                f'entity "{entity}": values must be an object or a list, got {type(raw).__name__}',
                entity,
            )
        out = []
        for name, item in zip(self._features, items, strict=True):
            if isinstance(item, bool) or not isinstance(item, int | float):
                raise EventError(
                    Reason.WRONG_TYPE,
                    f'entity "{entity}": feature "{name}" must be a number, '
                    f"got {type(item).__name__}",
                    entity,
                )
            value = _to_float(item)
            if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
                raise EventError(
                    Reason.NON_FINITE,
                    f'entity "{entity}": feature "{name}" is {item!r} (not a finite float32)',
                    entity,
                )
            if abs(value) > self._max_abs:
                raise EventError(
                    Reason.OUT_OF_RANGE,
                    f'entity "{entity}": feature "{name}" is {item!r}, beyond '
                    f"stream.max_abs_value {self._max_abs:g}",
                    entity,
                )
            out.append(value)
        if self._positive_index is not None:
            target = out[self._positive_index]
            name = self._features[self._positive_index]
            if not target > 0:
                raise EventError(
                    Reason.NON_POSITIVE_TARGET,
                    f'entity "{entity}": target "{name}" is {target}, '
                    "log_return needs a positive value",
                    entity,
                )
            if not np.float32(target) >= _FLOAT32_TINY:
                raise EventError(
                    Reason.OUT_OF_RANGE,
                    f'entity "{entity}": target "{name}" is {target!r}, below the smallest '
                    f"normal float32 ({float(_FLOAT32_TINY):g}): log_return cannot take it",
                    entity,
                )
        return tuple(out)


def _to_float(raw: int | float) -> float:
    """float(raw), with integers too large for a float becoming inf (refused as non-finite)."""
    try:
        return float(raw)
    except OverflowError:
        return math.inf


def _entity_or_none(raw: Any) -> str | None:
    return raw if isinstance(raw, str) and len(raw) <= 256 else None


def _quote(entity: str | None) -> str:
    return f'event of entity "{entity}" ' if entity is not None else "event "
