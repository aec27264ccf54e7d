"""Replaying history: daily bars from 1997 through `streamer produce csv`, the broker and an
engine with a daily interval and min_event_time 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from engine_harness import forecasts_by_key, read_topic

from streamer.config import Config
from streamer.csv_source import parse_time
from streamer.engine import Engine
from streamer.kafka_io import KafkaIO
from streamer.state.redis_store import RedisStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DAILY = Path(__file__).resolve().parents[1] / "data" / "daily_1997.csv"
DAY = 86_400
COLUMNS = ["--column", "ts=Date", "--column", "entity=Ticker", "--column", "close=Adj Close"]


def _produce(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamer", "produce", "csv", str(DAILY), *COLUMNS],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_daily_bars_from_1997_replay_into_forecasts_for_every_ticker_and_day(
    kafka_bootstrap, redis_url, unique
):
    topic = unique("csv")
    env = {
        "STREAMER_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "STREAMER_KAFKA_INPUT_TOPIC": topic,
        "STREAMER_KAFKA_OUTPUT_TOPIC": f"{topic}.out",
        "STREAMER_KAFKA_GROUP": unique("g"),
        "STREAMER_KAFKA_PARTITIONS": "2",
        "STREAMER_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "STREAMER_KAFKA_MAX_POLL_INTERVAL_MS": "10000",
        "STREAMER_REDIS_URL": redis_url,
        "STREAMER_STREAM_FEATURES": "close,volume",
        "STREAMER_STREAM_TARGET": "close",
        "STREAMER_STREAM_INTERVAL": str(DAY),
        "STREAMER_MODEL_UNITS": "8",
        "STREAMER_HTTP_PORT": "0",
    }
    # With the default stream.min_event_time (2000-01-01) the replay stops up front, saying
    # which setting to change.
    refused = _produce(env)
    assert refused.returncode == 1, refused.stderr
    assert "STREAMER_STREAM_MIN_EVENT_TIME=0" in refused.stderr
    assert "ts 852163200 (1997-01-02) is before stream.min_event_time (2000-01-01)" in (
        refused.stderr
    )

    env["STREAMER_STREAM_MIN_EVENT_TIME"] = "0"
    done = _produce(env)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["produced"] == summary["rows"] == 180, summary
    assert summary["bad_rows"] == {} and summary["shared_step_bars"] == 0
    assert summary["steps"] == 60
    assert "180 rows, 180 events sent, 0 bad rows, 60 steps" in done.stderr

    config = Config.load(env=env)
    store = RedisStore(config.redis.url, config.namespace)
    try:
        engine = Engine(config, store, KafkaIO(config.kafka), progress_every_s=3600)
        engine.run(idle_exit_s=3.0)
        assert engine.stats.applied == 180
    finally:
        store.close()

    rows = [line.split(",") for line in DAILY.read_text().splitlines()[1:]]
    days = sorted({int(parse_time(r[0])) // DAY for r in rows})
    tickers = {r[1] for r in rows}
    assert len(days) == 60 and tickers == {"ACME", "GLOBEX", "INITECH"}
    got = forecasts_by_key(read_topic(kafka_bootstrap, config.kafka.output_topic))
    want = {(t, d) for t in tickers for d in days[1:]}
    missing = sorted(want - set(got))
    assert not missing, f"{len(missing)} (ticker, day) forecasts missing, e.g. {missing[:5]}"
    for key in want:
        doc = got[key][-1]
        assert len(doc["forecast"]) == 1 and doc["level"][0] > 0, doc
