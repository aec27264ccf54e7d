"""Reading CSV files (streamer.csv_source): mapping, times, bad rows, history, shared steps."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest

from streamer.cli import build_parser
from streamer.config import StreamConfig
from streamer.csv_source import BadRowError, CsvError, CsvRow, CsvSource, parse_time
from streamer.errors import EventError, Reason
from streamer.events import EventParser

DATA = Path(__file__).resolve().parents[1] / "data"
DAILY = DATA / "daily_1997.csv"
DAY = 86_400.0
JAN2_1997 = 852_163_200.0  # 1997-01-02T00:00:00Z
T0 = 1_700_000_000.0  # 2023-11-14, after the default stream.min_event_time


def stream(**kw: object) -> StreamConfig:
    base: dict[str, object] = {"features": ("price", "volume"), "target": "price"}
    base.update(kw)
    return StreamConfig(**base)  # type: ignore[arg-type]


def write(tmp_path: Path, text: str, name: str = "in.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def read(path: Path, cfg: StreamConfig | None = None, **kw: object) -> list[CsvRow]:
    return list(CsvSource(path, cfg or stream(), **kw).rows())  # type: ignore[arg-type]


# ---------------------------------------------------------------------- times


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("852163200", JAN2_1997),
        (" 852163200.5 ", JAN2_1997 + 0.5),
        ("1997-01-02", JAN2_1997),
        ("1997-01-02 09:30:00", JAN2_1997 + 9.5 * 3600),
        ("1997-01-02T09:30:00", JAN2_1997 + 9.5 * 3600),
        ("1997-01-02T09:30:00Z", JAN2_1997 + 9.5 * 3600),
        ("1997-01-02 09:30:00+00:00", JAN2_1997 + 9.5 * 3600),
        ("1997-01-02T09:30:00-05:00", JAN2_1997 + 14.5 * 3600),
    ],
)
def test_times_are_epoch_seconds_or_iso_8601_naive_meaning_utc(text, want):
    assert parse_time(text) == want


def test_an_unparsable_time_raises_value_error():
    with pytest.raises(ValueError):
        parse_time("02/01/1997")


# ---------------------------------------------------------------------- mapping


def test_columns_match_case_insensitively_in_any_order(tmp_path):
    path = write(tmp_path, "VOLUME,Price,TS,Entity\n10,1.5,1700000000,AAPL\n")
    assert read(path) == [CsvRow(2, "AAPL", T0, (1.5, 10.0))]


def test_column_mapping_with_spaces_and_case_in_names(tmp_path):
    path = write(
        tmp_path,
        "Datetime,Ticker,Close,Adj Close,Volume\n2023-11-14 22:13:20,MSFT,10,9.5,300\n",
    )
    columns = {"ts": "datetime", "ENTITY": "ticker", "price": "Adj Close"}
    assert read(path, columns=columns) == [CsvRow(2, "MSFT", T0, (9.5, 300.0))]


def test_feature_names_find_columns_with_spaces(tmp_path):
    path = write(tmp_path, "ts,entity,Adj Close,volume\n1700000000,A,2.0,1\n")
    cfg = StreamConfig(features=("adj_close", "volume"), target="adj_close")
    assert read(path, cfg) == [CsvRow(2, "A", T0, (2.0, 1.0))]


def test_entity_names_a_single_series_file(tmp_path):
    path = write(tmp_path, "Date,Price,Volume\n2023-11-14T22:13:20Z,3,4\n")
    rows = read(path, columns={"ts": "Date"}, entity="SPY")
    assert rows == [CsvRow(2, "SPY", T0, (3.0, 4.0))]
    with pytest.raises(CsvError, match="not both"):
        CsvSource(path, stream(), columns={"entity": "x"}, entity="SPY")


def test_missing_columns_are_all_named_with_the_fix(tmp_path):
    path = write(tmp_path, "Date,Close\n2023-11-14,1\n")
    with pytest.raises(CsvError) as exc:
        read(path)
    text = str(exc.value)
    assert exc.value.reason is Reason.MISSING_FIELD
    for part in ("'entity'", "--entity NAME", "'ts'", "--column ts=COLUMN", "'price'", "Date"):
        assert part in text, text


def test_unknown_and_ambiguous_mappings_are_refused(tmp_path):
    with pytest.raises(CsvError, match="neither ts, entity nor"):
        CsvSource(DAILY, stream(), columns={"close": "Close"})
    path = write(tmp_path, "ts,entity,PRICE,Price,volume\n1700000000,A,1,2,3\n")
    with pytest.raises(CsvError, match="several columns"):
        read(path)
    # An exact (case-sensitive) match wins over case-insensitive ones.
    path = write(tmp_path, "ts,entity,price,PRICE,volume\n1700000000,A,1,2,3\n")
    assert read(path)[0].values == (1.0, 3.0)


def test_cli_column_options_parse(tmp_path):
    args = build_parser().parse_args(
        ["produce", "csv", "f.csv", "--column", "ts=Date", "--column", "price=Adj Close"]
    )
    assert args.column == [("ts", "Date"), ("price", "Adj Close")]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["produce", "csv", "f.csv", "--column", "ts"])


# ---------------------------------------------------------------------- bad rows

HEADER = "ts,entity,price,volume\n"
BAD_ROWS = [
    ("1700000000,A,abc,1", "bad_number", Reason.WRONG_TYPE),
    ("1700000000,A,,1", "missing_value", Reason.MISSING_FIELD),
    ("1700000000,A,NA,1", "missing_value", Reason.MISSING_FIELD),
    ("1700000000,A,1", "missing_value", Reason.MISSING_FIELD),
    (",A,1,1", "missing_value", Reason.MISSING_FIELD),
    ("1700000000,,1,1", "missing_value", Reason.MISSING_FIELD),
    ("14/11/2023,A,1,1", "bad_time", Reason.WRONG_TYPE),
    ("nan,A,1,1", "non_finite", Reason.NON_FINITE),
    ("1700000000,A,nan,1", "non_finite", Reason.NON_FINITE),
    ("1700000000,A,1,inf", "non_finite", Reason.NON_FINITE),
    ("1700000000,A,1e999,1", "non_finite", Reason.NON_FINITE),
    ("1700000000,A,0,1", "non_positive_target", Reason.NON_POSITIVE_TARGET),
    ("1700000000,A,-2.5,1", "non_positive_target", Reason.NON_POSITIVE_TARGET),
    ("1700000000,A,1,1,oops", "extra_fields", Reason.UNKNOWN_FIELD),
]


@pytest.mark.parametrize(("line", "why", "reason"), BAD_ROWS)
def test_a_bad_row_stops_with_its_line_and_reason(tmp_path, line, why, reason):
    path = write(tmp_path, HEADER + "1700000000,A,1,1\n" + line + "\n")
    with pytest.raises(BadRowError) as exc:
        read(path)
    assert exc.value.line == 3
    assert exc.value.why == why
    assert exc.value.reason is reason
    assert f"{path}:3:" in str(exc.value) and why in str(exc.value)
    assert "--skip-bad" in str(exc.value)


def test_skip_bad_counts_every_reason_with_the_first_lines(tmp_path):
    lines = [line for line, _, _ in BAD_ROWS]
    path = write(
        tmp_path, HEADER + "1700000000,A,1,1\n" + "\n".join(lines) + "\n1700000001,A,2,2\n"
    )
    source = CsvSource(path, stream(), skip_bad=True)
    rows = list(source.rows())
    assert [r.line for r in rows] == [2, len(BAD_ROWS) + 3]
    bad = source.report.bad
    want: dict[str, int] = {}
    for _, why, _ in BAD_ROWS:
        want[why] = want.get(why, 0) + 1
    assert bad.counts == want
    assert bad.total == len(BAD_ROWS)
    assert bad.lines["missing_value"] == [4, 5, 6, 7, 8]
    assert "14 bad rows skipped" in bad.describe()
    assert "missing_value 5 (lines 4, 5, 6, 7, 8)" in bad.describe()
    assert source.report.rows == len(BAD_ROWS) + 2


def test_first_lines_are_capped_and_a_diff_target_may_be_negative(tmp_path):
    body = "".join(f"{T0 + i},A,x,1\n" for i in range(8))
    source = CsvSource(write(tmp_path, HEADER + body), stream(), skip_bad=True)
    assert list(source.rows()) == []
    assert source.report.bad.lines["bad_number"] == [2, 3, 4, 5, 6]
    assert "..." in source.report.bad.describe()
    path = write(tmp_path, HEADER + "1700000000,A,-1,1\n")
    assert read(path, stream(target_transform="diff"))[0].values == (-1.0, 1.0)


def test_rows_the_engines_checks_refuse_count_under_the_parsers_reason(tmp_path):
    path = write(
        tmp_path,
        HEADER + "1700000000,A,1,1\n1700000000,bad entity!,1,1\n1700000001,A,1e20,1\n",
    )
    cfg = stream()
    parser = EventParser(cfg)

    def send(row: CsvRow) -> None:
        parser.parse({"entity": row.entity, "ts": row.ts, "values": row.values})

    report = CsvSource(path, cfg, skip_bad=True).replay(send)
    assert report.sent == 1
    assert report.bad.counts == {"bad_entity": 1, "out_of_range": 1}
    assert report.bad.lines == {"bad_entity": [3], "out_of_range": [4]}
    with pytest.raises(BadRowError) as exc:
        CsvSource(path, cfg).replay(send)
    assert exc.value.line == 3 and exc.value.why == "bad_entity"
    assert exc.value.reason is Reason.BAD_ENTITY
    assert isinstance(exc.value.__cause__, EventError)


# ---------------------------------------------------------------------- history


def test_history_before_min_event_time_fails_up_front_naming_the_setting():
    cfg = StreamConfig(features=("close", "volume"), target="close", interval=DAY)
    source = CsvSource(DAILY, cfg, columns={"ts": "Date", "entity": "Ticker"})
    sent: list[CsvRow] = []
    with pytest.raises(CsvError) as exc:
        source.replay(sent.append)
    assert sent == [], "nothing may be handed on before the check"
    assert exc.value.reason is Reason.TS_TOO_OLD
    text = str(exc.value)
    assert (
        "ts 852163200 (1997-01-02) is before stream.min_event_time (2000-01-01): set "
        "STREAMER_STREAM_MIN_EVENT_TIME=0 or [stream] min_event_time = 0 to replay history"
    ) in text
    assert f"{DAILY}:2:" in text
    # --skip-bad does not turn a setting into bad rows.
    with pytest.raises(CsvError, match="min_event_time"):
        list(
            CsvSource(DAILY, cfg, columns={"ts": "Date", "entity": "Ticker"}, skip_bad=True).rows()
        )


def test_a_later_old_row_is_left_to_the_parser_whose_message_names_the_setting(tmp_path):
    body = "".join(f"{T0 + i},A,1,1\n" for i in range(1000)) + "852163200,A,1,1\n"
    cfg = stream()
    parser = EventParser(cfg)
    source = CsvSource(write(tmp_path, HEADER + body), cfg, skip_bad=True)

    def send(row: CsvRow) -> None:
        parser.parse({"entity": row.entity, "ts": row.ts, "values": row.values})

    report = source.replay(send)
    assert report.sent == 1000 and report.bad.counts == {"ts_too_old": 1}
    with pytest.raises(EventError, match="STREAMER_STREAM_MIN_EVENT_TIME=0"):
        parser.parse({"entity": "A", "ts": JAN2_1997, "values": [1, 1]})


def test_times_far_ahead_of_the_clock_fail_up_front(tmp_path):
    path = write(tmp_path, HEADER + "1700000000000,A,1,1\n")  # milliseconds
    with pytest.raises(CsvError, match="STREAMER_STREAM_MAX_FUTURE=0") as exc:
        read(path, clock=lambda: T0)
    assert exc.value.reason is Reason.TS_IN_FUTURE
    assert "milliseconds" in str(exc.value)
    assert read(path, stream(max_future=0.0), clock=lambda: T0)[0].ts == T0 * 1000


def test_the_1997_fixture_reads_with_history_allowed():
    cfg = StreamConfig(
        features=("close", "volume"), target="close", interval=DAY, min_event_time=0.0
    )
    source = CsvSource(DAILY, cfg, columns={"ts": "Date", "entity": "Ticker", "close": "Adj Close"})
    report = source.replay(lambda r: None)
    assert report.rows == report.sent == 180 and report.bad.total == 0
    assert len(report.steps) == 60 and report.shared_step == 0 and report.out_of_order == 0
    assert min(report.steps) == JAN2_1997 // DAY
    assert "60 steps of 86400 s spanned (1997-01-02 .. 1997-03-26)" in report.summary()
    assert {r.entity for r in source.checked_rows()} == {"ACME", "GLOBEX", "INITECH"}


# ---------------------------------------------------------------------- steps


def test_bars_sharing_a_step_are_counted_with_a_hint(tmp_path, caplog):
    day = datetime(2023, 11, 14, tzinfo=UTC)
    lines = [HEADER.strip()]
    for minute in range(0, 30, 10):  # three 10-minute bars of A and B in one day
        for who in ("A", "B"):
            t = day.replace(hour=9, minute=30 + minute).isoformat()
            lines.append(f"{t},{who},1,1")
    lines.append(f"{day.replace(day=15).isoformat()},A,1,1")
    cfg = stream(interval=DAY)
    with caplog.at_level(logging.WARNING, "streamer.csv_source"):
        report = CsvSource(write(tmp_path, "\n".join(lines) + "\n"), cfg).replay(lambda r: None)
    assert report.shared_step == 4  # the second and third bar of A and of B
    assert len(report.steps) == 2
    assert report.min_gap == 600.0
    text = report.summary()
    assert "4 bars sharing a step" in text
    assert "stream.interval" in text and "STREAMER_STREAM_INTERVAL=600" in text
    assert "stream.duplicates" in text
    assert report.to_dict()["shared_step_bars"] == 4
    assert "second bar" in caplog.text


def test_rows_out_of_time_order_are_counted(tmp_path):
    body = "1700000000,A,1,1\n1700000005,B,1,1\n1700000001,A,1,1\n"
    report = CsvSource(write(tmp_path, HEADER + body), stream()).replay(lambda r: None)
    assert report.out_of_order == 1 and "sort the file by time" in report.summary()


def test_progress_is_logged(tmp_path, caplog):
    body = "".join(f"{T0 + i},A,1,1\n" for i in range(5))
    with caplog.at_level(logging.INFO, "streamer.csv_source"):
        CsvSource(write(tmp_path, HEADER + body), stream()).replay(
            lambda r: None, progress_every_s=0.0
        )
    assert "rows read" in caplog.text and "rows/s" in caplog.text
    assert "replayed" in caplog.text and "5 rows, 5 events sent, 0 bad rows" in caplog.text
