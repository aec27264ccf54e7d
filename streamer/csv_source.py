"""Reading event rows from a CSV file: header mapping, time parsing, row validation.

Shared by `streamer produce csv` (replay into Kafka) and `streamer model pretrain` (offline
fit). Pure: no Kafka, no model; the caller says what to do with each row.

The file is long-format: one row per entity and time, in time order. Columns are found by
name, case-insensitively (and with spaces, dashes and underscores alike: feature
`adj_close` finds a column "Adj Close"); `columns` maps an engine field (`ts`, `entity`) or a
feature name to a CSV column of another name (`{"ts": "Date", "price": "Adj Close"}`), and
`entity` names the one series of a file without an entity column.

Times are epoch seconds or ISO 8601 dates and datetimes ("1997-01-02", "1997-01-02 09:30:00",
"1997-01-02T09:30:00-05:00"); a time without a zone is UTC.

A bad row (a value that is no number or missing, an unparsable time, NaN or inf, a target
<= 0 under log_return, more fields than the header) stops the read with `BadRowError`
naming its line, or with `skip_bad` is skipped and counted by reason. So is a row the
caller's `send` refuses with an `EventError` (the engine's own checks), counted under that
error's reason. Nothing is skipped silently.
"""

from __future__ import annotations

import csv
import itertools
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .config import StreamConfig
from .errors import EventError, Reason
from .events import step_of

log = logging.getLogger(__name__)

ENTITY = "entity"
TS = "ts"

# Reasons of bad rows found while reading (the engine's own reasons are added to them).
BAD_NUMBER = "bad_number"
MISSING_VALUE = "missing_value"
BAD_TIME = "bad_time"
NON_FINITE = "non_finite"
NON_POSITIVE_TARGET = "non_positive_target"
EXTRA_FIELDS = "extra_fields"
_REASON_OF = {
    BAD_NUMBER: Reason.WRONG_TYPE,
    MISSING_VALUE: Reason.MISSING_FIELD,
    BAD_TIME: Reason.WRONG_TYPE,
    NON_FINITE: Reason.NON_FINITE,
    NON_POSITIVE_TARGET: Reason.NON_POSITIVE_TARGET,
    EXTRA_FIELDS: Reason.UNKNOWN_FIELD,
}
# Cells that mean "no value" (compared case-insensitively, after stripping).
_MISSING = frozenset({"", "na", "n/a", "null", "none"})
# Rows whose times are checked against stream.min_event_time / max_future before any is
# handed on, so that a replay of history fails at once with the setting to change.
LOOKAHEAD_ROWS = 1000
# Line numbers kept per bad-row reason, for the report.
FIRST_LINES = 5


class CsvError(EventError):
    """The file as a whole cannot be read as configured (columns, mapping, time range)."""


class BadRowError(CsvError):
    """One row is bad; `line` is its line number in the file, `why` the bad-row reason."""

    def __init__(
        self, reason: Reason, message: str, *, line: int, why: str, entity: str | None = None
    ) -> None:
        super().__init__(reason, message, entity)
        self.line = line
        self.why = why


@dataclass(frozen=True, slots=True)
class CsvRow:
    """A row that passed the CSV checks: values in `stream.features` order."""

    line: int
    entity: str
    ts: float
    values: tuple[float, ...]


def parse_time(text: str) -> float:
    """Epoch seconds, or ISO 8601 (a date, or a datetime; without a zone it is UTC).

    Raises ValueError when the text is neither. A number that is NaN or inf comes back as it
    is: the caller refuses it as non-finite.
    """
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def describe_time(ts: float) -> str:
    """The UTC date ("1997-01-02") at midnight, else date and time ("... 09:30:00 UTC")."""
    try:
        moment = datetime.fromtimestamp(ts, UTC)
    except (OverflowError, OSError, ValueError):
        return "beyond year 9999" if ts > 0 else "before year 1"
    if moment.hour == moment.minute == moment.second == moment.microsecond == 0:
        return moment.strftime("%Y-%m-%d")
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _number(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e18 else repr(value)


def parse_column_spec(text: str) -> tuple[str, str]:
    """`ts=Datetime` -> ("ts", "Datetime"); ValueError without a name on both sides."""
    name, sep, column = text.partition("=")
    name, column = name.strip(), column.strip()
    if not sep or not name or not column:
        raise ValueError(f"expected FIELD=COLUMN (e.g. ts=Date), got {text!r}")
    return name, column


def _loose(name: str) -> str:
    """Case, spaces, dashes and underscores do not matter: "Adj Close" ~ "adj_close"."""
    return re.sub(r"[\s_\-]+", "_", name.strip().casefold()).strip("_")


def _find(header: Sequence[str], wanted: str) -> list[int]:
    for key in (lambda s: s, lambda s: s.strip().casefold(), _loose):
        hits = [i for i, col in enumerate(header) if key(col) == key(wanted)]
        if hits:
            return hits
    return []


@dataclass
class BadRows:
    """Bad rows by reason, with the first few line numbers of each."""

    counts: dict[str, int] = field(default_factory=dict)
    lines: dict[str, list[int]] = field(default_factory=dict)

    def add(self, why: str, line: int) -> None:
        self.counts[why] = self.counts.get(why, 0) + 1
        first = self.lines.setdefault(why, [])
        if len(first) < FIRST_LINES:
            first.append(line)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        if not self.counts:
            return "0 bad rows"
        parts = []
        for why, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            shown = ", ".join(map(str, self.lines[why]))
            more = ", ..." if n > len(self.lines[why]) else ""
            parts.append(f"{why} {n} (line{'s' if n > 1 else ''} {shown}{more})")
        return f"{self.total} bad rows skipped: " + "; ".join(parts)


@dataclass
class CsvReport:
    """What one read of a file saw; `summary()` is the final line of a replay."""

    path: str
    interval: float
    rows: int = 0  # data rows read (the header and empty lines are not rows)
    sent: int = 0  # rows the caller's `send` took
    bad: BadRows = field(default_factory=BadRows)
    steps: set[int] = field(default_factory=set)
    # Rows of an entity in a step that entity already had a row in: one step, several bars.
    shared_step: int = 0
    # Rows in a step before the newest step already read (the file is not in time order).
    out_of_order: int = 0
    # The smallest time between two successive bars of one entity (None: no entity had two).
    min_gap: float | None = None

    def summary(self, sent_label: str = "events sent") -> str:
        text = f"{self.path}: {self.rows} rows, {self.sent} {sent_label}, {self.bad.describe()}"
        if self.steps:
            first, last = min(self.steps), max(self.steps)
            text += (
                f", {len(self.steps)} steps of {_number(self.interval)} s spanned "
                f"({describe_time(first * self.interval)} .. "
                f"{describe_time(last * self.interval)})"
            )
        else:
            text += ", 0 steps"
        text += f", {self.shared_step} bars sharing a step"
        if self.shared_step:
            gap = self.min_gap if self.min_gap is not None and self.min_gap < self.interval else 0
            example = (
                f"STREAMER_STREAM_INTERVAL={_number(gap)} (the shortest time between two bars "
                "of one entity)"
                if gap
                else "STREAMER_STREAM_INTERVAL=60 for minute bars"
            )
            text += (
                f" (several bars of one entity in one step of stream.interval = "
                f"{_number(self.interval)} s: the engine keeps one per entity and step, as "
                'stream.duplicates says ("replace": the newest, "first": the oldest); to keep '
                f"every bar set stream.interval to the bar length, e.g. {example}, or "
                "aggregate the bars)"
            )
        if self.out_of_order:
            text += (
                f", {self.out_of_order} rows out of time order (the engine refuses them as "
                "late once their step closed: sort the file by time)"
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "sent": self.sent,
            "bad_rows": dict(self.bad.counts),
            "bad_lines": {k: list(v) for k, v in self.bad.lines.items()},
            "steps": len(self.steps),
            "first_step": min(self.steps) if self.steps else None,
            "last_step": max(self.steps) if self.steps else None,
            "shared_step_bars": self.shared_step,
            "out_of_order": self.out_of_order,
            "min_gap_s": self.min_gap,
        }


class CsvSource:
    """The rows of one CSV file, checked against one `StreamConfig`."""

    def __init__(
        self,
        path: str | Path,
        stream: StreamConfig,
        *,
        columns: Mapping[str, str] | None = None,
        entity: str | None = None,
        skip_bad: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self._stream = stream
        self._features = stream.features
        self._columns = self._fields_of(columns or {})
        self._entity = entity
        self.skip_bad = skip_bad
        self._clock = clock
        self._positive = stream.target_index if stream.target_transform == "log_return" else None
        self.report = CsvReport(str(path), stream.interval)
        self._last_step: dict[str, int] = {}
        self._last_ts: dict[str, float] = {}
        self._newest_step: int | None = None
        self._check_fields()

    # ------------------------------------------------------------------ the header

    def _fields_of(self, columns: Mapping[str, str]) -> dict[str, str]:
        """The mapping keyed by field names as configured (`TS=Date` means `ts=Date`)."""
        fields = [ENTITY, TS, *self._features]
        out: dict[str, str] = {}
        for key, column in columns.items():
            hits = [f for f in fields if f == key] or [
                f for f in fields if f.casefold() == key.strip().casefold()
            ]
            if len(hits) != 1:
                raise CsvError(
                    Reason.UNKNOWN_FEATURE,
                    f"column mapping {key}={column}: {key!r} is neither ts, entity nor one "
                    f"of stream.features {list(self._features)}",
                )
            if hits[0] in out and out[hits[0]] != column:
                raise CsvError(
                    Reason.UNKNOWN_FIELD,
                    f"column mapping {key}={column}: {hits[0]} is already mapped to "
                    f"{out[hits[0]]!r}",
                )
            out[hits[0]] = column
        return out

    def _check_fields(self) -> None:
        if self._entity is not None:
            if ENTITY in self._columns:
                raise CsvError(
                    Reason.UNKNOWN_FIELD,
                    "give either an entity name (--entity) or an entity column "
                    "(--column entity=...), not both",
                )
            if not self._entity.strip():
                raise CsvError(Reason.BAD_ENTITY, "the entity name (--entity) is empty")

    def _resolve(self, header: Sequence[str]) -> dict[str, int]:
        """The index of the column of every field; CsvError naming each one not found."""
        fields = ([] if self._entity is not None else [ENTITY]) + [TS, *self._features]
        where: dict[str, int] = {}
        problems = []
        for name in fields:
            wanted = self._columns.get(name, name)
            hits = _find(header, wanted)
            if len(hits) == 1:
                where[name] = hits[0]
                continue
            how = f"column {wanted!r}" if wanted == name else f"column {wanted!r} (for {name})"
            if hits:
                cols = [header[i] for i in hits]
                problems.append(f"{how} matches several columns {cols}")
            elif name == ENTITY:
                problems.append(
                    f"no {how}: map one with --column entity=COLUMN, or name the one "
                    "series of the file with --entity NAME"
                )
            else:
                problems.append(f"no {how}: map one with --column {name}=COLUMN")
        if problems:
            raise CsvError(
                Reason.MISSING_FIELD,
                f"{self.path}: " + "; ".join(problems) + f" (the header is {list(header)})",
            )
        return where

    # ------------------------------------------------------------------ rows

    def rows(self) -> Iterator[CsvRow]:
        """The rows that pass the CSV checks, in file order; bad ones raise or are counted.

        The times of the first `LOOKAHEAD_ROWS` rows are checked against
        `stream.min_event_time` and `stream.max_future` before the first row is yielded.
        """
        with open(self.path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise CsvError(Reason.MISSING_FIELD, f"{self.path}: the file is empty")
            where = self._resolve(header)
            width = len(header)
            ahead: list[CsvRow] | None = []
            for fields in reader:
                if not fields:
                    continue  # an empty line
                self.report.rows += 1
                row = self._row(fields, where, width, reader.line_num)
                if row is None:
                    continue
                if ahead is None:
                    yield row
                    continue
                self._check_time(row)
                ahead.append(row)
                if len(ahead) >= LOOKAHEAD_ROWS:
                    yield from ahead
                    ahead = None
            if ahead:
                yield from ahead

    def checked_rows(self) -> Iterator[CsvRow]:
        """`rows()` with the header and the first rows already read and checked (so that
        a wrong mapping or a history setting fails before the caller connects anywhere)."""
        rows = self.rows()
        first = next(rows, None)
        return iter(()) if first is None else itertools.chain((first,), rows)

    def _bad(self, why: str, line: int, message: str, entity: str | None = None) -> None:
        if self.skip_bad:
            self.report.bad.add(why, line)
            return
        raise BadRowError(
            _REASON_OF.get(why, Reason.WRONG_TYPE),
            f"{self.path}:{line}: {message} ({why}; --skip-bad skips such rows and reports "
            "them at the end)",
            line=line,
            why=why,
            entity=entity,
        )

    def _row(
        self, fields: list[str], where: Mapping[str, int], width: int, line: int
    ) -> CsvRow | None:
        if len(fields) > width and any(f.strip() for f in fields[width:]):
            self._bad(
                EXTRA_FIELDS,
                line,
                f"{len(fields)} fields, the header has {width} (an unquoted comma?)",
            )
            return None

        def cell(name: str) -> str | None:
            i = where[name]
            if i >= len(fields) or fields[i].strip().casefold() in _MISSING:
                return None
            return fields[i].strip()

        if self._entity is not None:
            entity = self._entity
        else:
            raw_entity = cell(ENTITY)
            if raw_entity is None:
                self._bad(MISSING_VALUE, line, "the entity is missing")
                return None
            entity = raw_entity
        raw_ts = cell(TS)
        if raw_ts is None:
            self._bad(MISSING_VALUE, line, f'entity "{entity}": the time is missing', entity)
            return None
        try:
            ts = parse_time(raw_ts)
        except ValueError:
            self._bad(
                BAD_TIME,
                line,
                f'entity "{entity}": time {raw_ts!r} is neither epoch seconds nor ISO 8601',
                entity,
            )
            return None
        if not math.isfinite(ts):
            self._bad(NON_FINITE, line, f'entity "{entity}": time is {raw_ts!r}', entity)
            return None
        values = []
        for i, name in enumerate(self._features):
            raw = cell(name)
            if raw is None:
                self._bad(
                    MISSING_VALUE, line, f'entity "{entity}": feature "{name}" is missing', entity
                )
                return None
            try:
                value = float(raw)
            except ValueError:
                self._bad(
                    BAD_NUMBER,
                    line,
                    f'entity "{entity}": feature "{name}" is {raw!r}, not a number',
                    entity,
                )
                return None
            if not math.isfinite(value):
                self._bad(
                    NON_FINITE, line, f'entity "{entity}": feature "{name}" is {raw!r}', entity
                )
                return None
            if i == self._positive and not value > 0:
                self._bad(
                    NON_POSITIVE_TARGET,
                    line,
                    f'entity "{entity}": target "{name}" is {raw!r}, log_return needs a '
                    "positive value",
                    entity,
                )
                return None
            values.append(value)
        return CsvRow(line, entity, ts, tuple(values))

    def _check_time(self, row: CsvRow) -> None:
        stream = self._stream
        if row.ts < stream.min_event_time:
            raise CsvError(
                Reason.TS_TOO_OLD,
                f"{self.path}:{row.line}: ts {_number(row.ts)} ({describe_time(row.ts)}) is "
                f"before stream.min_event_time ({describe_time(stream.min_event_time)}): set "
                "STREAMER_STREAM_MIN_EVENT_TIME=0 or [stream] min_event_time = 0 to replay "
                "history (the engine needs the same setting; stream.max_future only limits "
                "times ahead of the clock and can stay)",
                row.entity,
            )
        if stream.max_future > 0 and row.ts > self._clock() + stream.max_future:
            raise CsvError(
                Reason.TS_IN_FUTURE,
                f"{self.path}:{row.line}: ts {_number(row.ts)} ({describe_time(row.ts)}) is "
                f"more than stream.max_future ({_number(stream.max_future)} s) ahead of the "
                "clock: times must be epoch seconds (not milliseconds) or ISO 8601; set "
                "STREAMER_STREAM_MAX_FUTURE=0 or [stream] max_future = 0 to accept times "
                "ahead of the clock",
                row.entity,
            )

    # ------------------------------------------------------------------ a whole read

    def refused(self, row: CsvRow, exc: EventError) -> None:
        """The caller refused `row` (the engine's checks): raise, or count it under
        the error's reason with `skip_bad`."""
        why = exc.reason.value
        if self.skip_bad:
            self.report.bad.add(why, row.line)
            return
        raise BadRowError(
            exc.reason,
            f"{self.path}:{row.line}: {exc} ({why}; --skip-bad skips such rows and reports "
            "them at the end)",
            line=row.line,
            why=why,
            entity=row.entity,
        ) from exc

    def taken(self, row: CsvRow) -> None:
        """The caller took `row`: count it, its step, and whether it shares that step."""
        report = self.report
        report.sent += 1
        step = step_of(row.ts, self._stream.interval)
        report.steps.add(step)
        last = self._last_step.get(row.entity)
        if last is not None and step == last:
            if not report.shared_step:
                log.warning(
                    '%s:%d: entity "%s" has a second bar in step %s (%s): several bars share '
                    "a stream.interval step of %s s (counted in the summary)",
                    self.path,
                    row.line,
                    row.entity,
                    step,
                    describe_time(step * self._stream.interval),
                    _number(self._stream.interval),
                )
            report.shared_step += 1
        if last is None or step > last:
            self._last_step[row.entity] = step
        before = self._last_ts.get(row.entity)
        if before is not None and row.ts > before:
            gap = row.ts - before
            if report.min_gap is None or gap < report.min_gap:
                report.min_gap = gap
        self._last_ts[row.entity] = row.ts
        if self._newest_step is not None and step < self._newest_step:
            if not report.out_of_order:
                log.warning(
                    "%s:%d: ts %s goes back to step %d after step %d: the file is not in "
                    "time order (counted in the summary)",
                    self.path,
                    row.line,
                    _number(row.ts),
                    step,
                    self._newest_step,
                )
            report.out_of_order += 1
        else:
            self._newest_step = step

    def replay(
        self,
        send: Callable[[CsvRow], None],
        *,
        rows: Iterable[CsvRow] | None = None,
        pace: Callable[[Iterable[CsvRow]], Iterable[CsvRow]] | None = None,
        progress_every_s: float = 5.0,
        sent_label: str = "events sent",
    ) -> CsvReport:
        """Hand every row (of `rows`, by default `rows()`) to `send`; an `EventError` from
        it counts as a bad row. Logs progress every `progress_every_s` seconds and the
        summary at the end.
        """
        if rows is None:
            rows = self.rows()
        if pace is not None:
            rows = pace(rows)
        start = last = time.monotonic()
        report = self.report
        for row in rows:
            try:
                send(row)
            except EventError as exc:
                self.refused(row, exc)
            else:
                self.taken(row)
            now = time.monotonic()
            if now - last >= progress_every_s:
                last = now
                log.info(
                    "%s: %d rows read, %d %s, %d bad rows, %.0f rows/s",
                    self.path,
                    report.rows,
                    report.sent,
                    sent_label,
                    report.bad.total,
                    report.rows / max(now - start, 1e-9),
                )
        log.info("replayed %s", report.summary(sent_label))
        return report
