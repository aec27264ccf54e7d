"""Producers: a validating Python producer, the synthetic market and CSV replay.

`EventProducer.send` runs the same checks as the engine (`EventParser`) before sending, so a
producer learns about a bad event at once instead of from the dead-letter topic.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import kafka.errors

from .codec import encode_event
from .config import Config
from .csv_source import CsvReport, CsvRow, CsvSource
from .errors import EventError, KafkaError, Reason
from .events import EventParser
from .kafka_io import client_kwargs, ensure_topics
from .kafka_io import producer as make_producer
from .synthetic import SyntheticMarket

log = logging.getLogger(__name__)


class EventProducer:
    """Validates and sends events keyed by entity (one entity stays in one partition)."""

    def __init__(
        self, config: Config, *, bootstrap: str | None = None, topic: str | None = None
    ) -> None:
        self._parser = EventParser(config.stream)
        self._features = config.stream.features
        self._encoding = config.kafka.encoding
        self._topic = topic or config.kafka.input_topic
        bootstrap = bootstrap or config.kafka.bootstrap
        security = client_kwargs(config.kafka)
        ensure_topics(bootstrap, [self._topic], config.kafka.partitions, security)
        self._producer = make_producer(
            bootstrap, security, acks=1, linger_ms=20, enable_idempotence=False
        )
        self.sent = 0

    def send(self, entity: str, ts: float, values: Mapping[str, float] | Sequence[float]) -> None:
        event = self._parser.parse({"entity": entity, "ts": ts, "values": values})
        self.send_raw(
            event.entity, encode_event(event.entity, event.ts, event.values, self._encoding)
        )

    def send_raw(self, key: str, value: bytes) -> None:
        """Send bytes as they are (tests use it to inject malformed messages)."""
        try:
            self._producer.send(self._topic, key=key.encode(), value=value)
        except kafka.errors.KafkaError as exc:
            raise KafkaError(f"cannot publish to {self._topic}: {exc}") from exc
        self.sent += 1

    def flush(self) -> None:
        try:
            self._producer.flush(timeout=60)
        except kafka.errors.KafkaError as exc:
            raise KafkaError(f"producer flush failed: {exc}") from exc

    def close(self) -> None:
        self.flush()
        self._producer.close(timeout=5)

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def paced(items: Iterable[Any], rate: float | None) -> Iterable[Any]:
    """Yield `items` at `rate` per second (as fast as possible when rate is None or 0)."""
    if not rate:
        yield from items
        return
    start = time.monotonic()
    for i, item in enumerate(items):
        ahead = i / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)
        yield item


def produce_synthetic(
    config: Config,
    *,
    entities: int,
    steps: int,
    seed: int = 0,
    rate: float | None = None,
    shift_at: int | None = None,
    bootstrap: str | None = None,
    progress_every_s: float = 5.0,
) -> int:
    """Stream the synthetic market (features price, signal) to the input topic."""
    if set(config.stream.features) != {"price", "signal"}:
        raise EventError(
            Reason.UNKNOWN_FEATURE,
            f"the synthetic market emits features ['price', 'signal'], the config has "
            f"{list(config.stream.features)}",
        )
    market = SyntheticMarket(
        entities=entities,
        steps=steps,
        seed=seed,
        interval=config.stream.interval,
        shift_at=shift_at,
    )
    order = config.stream.features
    sent = 0
    last = time.monotonic()
    with EventProducer(config, bootstrap=bootstrap) as out:
        for ev in paced(market.events(), rate):
            values = ev["values"]
            out.send(ev["entity"], ev["ts"], [values[name] for name in order])
            sent += 1
            now = time.monotonic()
            if now - last >= progress_every_s:
                log.info("produced %d of %d events", sent, entities * steps)
                last = now
    return sent


def produce_csv(
    config: Config,
    path: str | Path,
    *,
    columns: Mapping[str, str] | None = None,
    entity: str | None = None,
    entity_column: str | None = None,
    time_column: str | None = None,
    skip_bad: bool = False,
    rate: float | None = None,
    bootstrap: str | None = None,
    progress_every_s: float = 5.0,
) -> int:
    """Replay a long-format CSV (one row per entity and time, in time order); the events sent.

    `replay_csv` says what; this returns only how many events were sent.
    """
    return replay_csv(
        config,
        path,
        columns=columns,
        entity=entity,
        entity_column=entity_column,
        time_column=time_column,
        skip_bad=skip_bad,
        rate=rate,
        bootstrap=bootstrap,
        progress_every_s=progress_every_s,
    ).sent


def replay_csv(
    config: Config,
    path: str | Path,
    *,
    columns: Mapping[str, str] | None = None,
    entity: str | None = None,
    entity_column: str | None = None,
    time_column: str | None = None,
    skip_bad: bool = False,
    rate: float | None = None,
    bootstrap: str | None = None,
    progress_every_s: float = 5.0,
) -> CsvReport:
    """Replay a long-format CSV into the input topic (`streamer.csv_source` reads it).

    Columns are found by field or feature name, case-insensitively, or as `columns` maps
    them (`{"ts": "Date", "price": "Adj Close"}`; `entity_column` and `time_column` are
    shorthands for the `entity` and `ts` entries); `entity` names the one series of a file
    without an entity column. Times are epoch seconds or ISO 8601. A bad row, or one the
    engine's checks refuse, stops the replay naming its line, unless `skip_bad`: then it is
    skipped and counted by reason in the report. Progress is logged every
    `progress_every_s` seconds, the summary at the end.
    """
    mapping = dict(columns or {})
    if entity_column:
        mapping.setdefault("entity", entity_column)
    if time_column:
        mapping.setdefault("ts", time_column)
    source = CsvSource(path, config.stream, columns=mapping, entity=entity, skip_bad=skip_bad)
    rows = source.checked_rows()  # the header and the first rows' times, before connecting
    with EventProducer(config, bootstrap=bootstrap) as out:

        def send(row: CsvRow) -> None:
            out.send(row.entity, row.ts, row.values)

        try:
            return source.replay(
                send,
                rows=rows,
                pace=(lambda rows: paced(rows, rate)) if rate else None,
                progress_every_s=progress_every_s,
            )
        except EventError:
            log.error(
                "replay of %s stopped: %d events were sent before it", path, source.report.sent
            )
            raise
