"""Helpers for the end-to-end tests: engine subprocesses, topic readers, Redis snapshots.

Engines run as `python -m streamer run --idle-exit S` subprocesses configured through
`STREAMER_*` environment variables (tests/conftest.py removes the developer's own from
os.environ, so only what `engine_env` sets applies). Output and dead-letter topics are read
with a plain KafkaConsumer (assign + seek_to_beginning, no group).
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis
from kafka import KafkaConsumer, TopicPartition

from streamer.config import Config

SESSION_TIMEOUT_MS = 6000
MAX_POLL_INTERVAL_MS = 10000
ENGINE_EXIT_TIMEOUT_S = 120.0
_ASSIGNED_RE = re.compile(r"^(\S+ \S+) INFO streamer\.engine: assigned partitions", re.M)
_RESTORED_RE = re.compile(
    r"assigned partitions \[[0-9, ]*\]: (\d+) entities restored, positions (\{.*\})"
)
_FIRST_LINE_RE = re.compile(r"^(\S+ \S+) INFO streamer\.app: streamer engine:", re.M)


def engine_env(
    *,
    bootstrap: str,
    redis_url: str,
    group: str,
    input_topic: str,
    output_topic: str,
    dlq_topic: str,
    every_steps: int = 20,
    units: int = 16,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The STREAMER_* settings of one engine (namespace = group unless `extra` says else)."""
    env = {
        "STREAMER_KAFKA_BOOTSTRAP": bootstrap,
        "STREAMER_REDIS_URL": redis_url,
        "STREAMER_KAFKA_GROUP": group,
        "STREAMER_KAFKA_INPUT_TOPIC": input_topic,
        "STREAMER_KAFKA_OUTPUT_TOPIC": output_topic,
        "STREAMER_KAFKA_DLQ_TOPIC": dlq_topic,
        "STREAMER_KAFKA_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
        "STREAMER_KAFKA_MAX_POLL_INTERVAL_MS": str(MAX_POLL_INTERVAL_MS),
        "STREAMER_CHECKPOINT_EVERY_STEPS": str(every_steps),
        "STREAMER_MODEL_UNITS": str(units),
        "STREAMER_HTTP_PORT": "0",  # no HTTP server: engines run side by side
    }
    env.update(extra or {})
    return env


def config_of(env: Mapping[str, str]) -> Config:
    """The Config an engine started with `env` reads."""
    return Config.load(env={k: v for k, v in env.items() if k.startswith("STREAMER_")})


@dataclass
class EngineProcess:
    """One `streamer run` subprocess; stdout and stderr go to files (no pipe can fill up)."""

    env: Mapping[str, str]
    logdir: Path
    name: str
    idle_exit_s: float = 3.0
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ended_at: float | None = None
    _out: Any = field(default=None, repr=False)
    _err: Any = field(default=None, repr=False)

    @property
    def stdout_path(self) -> Path:
        return self.logdir / f"{self.name}.out"

    @property
    def stderr_path(self) -> Path:
        return self.logdir / f"{self.name}.err"

    def start(self) -> EngineProcess:
        self.logdir.mkdir(parents=True, exist_ok=True)
        full = dict(os.environ)
        full.update(self.env)
        full["TF_CPP_MIN_LOG_LEVEL"] = "2"
        full["PYTHONUNBUFFERED"] = "1"
        self._out = open(self.stdout_path, "wb")  # noqa: SIM115 - closed in _close_files
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamer", "run", "--idle-exit", str(self.idle_exit_s)],
            env=full,
            stdout=self._out,
            stderr=self._err,
            stdin=subprocess.DEVNULL,
        )
        return self

    def _close_files(self) -> None:
        for fh in (self._out, self._err):
            if fh is not None and not fh.closed:
                fh.close()

    def poll(self) -> int | None:
        assert self.proc is not None
        rc = self.proc.poll()
        if rc is not None and self.ended_at is None:
            self.ended_at = time.monotonic()
        return rc

    def wait(self, timeout: float = ENGINE_EXIT_TIMEOUT_S) -> int:
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            self._close_files()
            raise AssertionError(
                f"engine {self.name} did not exit within {timeout} s\n{self.log_tail()}"
            ) from None
        if self.ended_at is None:
            self.ended_at = time.monotonic()
        self._close_files()
        return rc

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> int:
        """SIGKILL (no chance to checkpoint, flush or leave the group)."""
        self.signal(signal.SIGKILL)
        return self.wait(timeout=30)

    def stop(self) -> None:
        """Best-effort cleanup: kill this engine if it still runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._close_files()

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        text = self.stderr().splitlines()[-lines:]
        return f"--- {self.name} stderr (last {lines} lines) ---\n" + "\n".join(text)

    def summary(self) -> dict[str, Any]:
        """The JSON line `streamer run` prints on stdout when it stops normally."""
        for line in reversed(self.stdout().splitlines()):
            line = line.strip()
            if line.startswith("{"):
                return dict(json.loads(line))
        raise AssertionError(f"engine {self.name} printed no summary\n{self.log_tail()}")

    def join_seconds(self) -> float | None:
        """Seconds from 'streamer engine:' (after imports) to the first assignment."""
        text = self.stderr()
        first, assigned = _FIRST_LINE_RE.search(text), _ASSIGNED_RE.search(text)
        if first is None or assigned is None:
            return None
        return _log_time(assigned.group(1)) - _log_time(first.group(1))

    def assigned_logged(self) -> bool:
        return _ASSIGNED_RE.search(self.stderr()) is not None

    def assignments(self) -> list[tuple[int, dict[int, int | None]]]:
        """(entities restored, positions sought) of every assignment the engine logged."""
        return [
            (int(m.group(1)), ast.literal_eval(m.group(2)))
            for m in _RESTORED_RE.finditer(self.stderr())
        ]


def _log_time(stamp: str) -> float:
    # "2026-11-29 06:23:51,597" (logging's default asctime)
    _day, clock = stamp.split(" ")
    hms, ms = clock.split(",")
    h, m, s = (int(x) for x in hms.split(":"))
    return h * 3600 + m * 60 + s + int(ms) / 1000.0


# ---------------------------------------------------------------------- topics


@dataclass(frozen=True)
class Message:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]


def _consumer(bootstrap: str) -> KafkaConsumer:
    return KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        group_id=None,
        consumer_timeout_ms=1000,
        fetch_max_bytes=32 * 1024 * 1024,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )


def _partitions(consumer: KafkaConsumer, topic: str, timeout: float = 30.0) -> list[TopicPartition]:
    deadline = time.monotonic() + timeout
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return [TopicPartition(topic, p) for p in sorted(parts)]
        if time.monotonic() > deadline:
            raise AssertionError(f"topic {topic} has no partitions after {timeout} s")
        consumer.topics()  # refresh metadata
        time.sleep(0.2)


def _caught_up(consumer: KafkaConsumer, tps: list[TopicPartition]) -> bool:
    """Every partition read up to the high watermark of its latest fetch response.

    Not `end_offsets`: tansu answers ListOffsets(latest) with the base offset of the last
    record batch plus one, which is short of the end when that batch holds several records.
    """
    for tp in tps:
        high = consumer.highwater(tp)
        if high is None or consumer.position(tp) < high:
            return False
    return True


def read_topic(
    bootstrap: str, topic: str, *, idle_s: float = 2.0, timeout: float = 120.0
) -> list[Message]:
    """Every message of `topic`, read until caught up and nothing new came for `idle_s`."""
    consumer = _consumer(bootstrap)
    try:
        tps = _partitions(consumer, topic)
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list[Message] = []
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while True:
            batches = consumer.poll(timeout_ms=200, max_records=50_000)
            now = time.monotonic()
            for tp, recs in batches.items():
                for r in recs:
                    out.append(
                        Message(
                            tp.partition,
                            r.offset,
                            r.key,
                            r.value,
                            {k: bytes(v) for k, v in (r.headers or [])},
                        )
                    )
                last_new = now
            if now - last_new >= idle_s and _caught_up(consumer, tps):
                return out
            if now > deadline:
                raise AssertionError(f"reading {topic} did not finish within {timeout} s")
    finally:
        consumer.close()


class TopicCounter:
    """Reads a topic as it grows (assign + seek_to_beginning, no group).

    Call `count()` repeatedly; each call reads what arrived since the last one. (Summing
    `end_offsets` would be cheaper, but tansu reports them short, see `_caught_up`.) With
    `forecasts=True` every message is decoded and `max_step` is the newest forecast step
    read since the last `mark()`.
    """

    def __init__(self, bootstrap: str, topic: str, *, forecasts: bool = False) -> None:
        self._consumer = _consumer(bootstrap)
        self._topic = topic
        self._tps: list[TopicPartition] = []
        self._count = 0
        self._forecasts = forecasts
        self.max_step: int | None = None

    def count(self) -> int:
        if not self._tps:
            parts = self._consumer.partitions_for_topic(self._topic)
            if not parts:
                self._consumer.topics()  # refresh metadata; the engine creates the topic
                return 0
            self._tps = [TopicPartition(self._topic, p) for p in sorted(parts)]
            self._consumer.assign(self._tps)
            self._consumer.seek_to_beginning(*self._tps)
        for recs in self._consumer.poll(timeout_ms=0, max_records=100_000).values():
            self._count += len(recs)
            if self._forecasts:
                newest = max(json.loads(r.value)["step"] for r in recs)
                if self.max_step is None or newest > self.max_step:
                    self.max_step = newest
        return self._count

    def drain(self, timeout: float = 30.0) -> int:
        """Read everything there is now (the writer has stopped); the count."""
        deadline = time.monotonic() + timeout
        while True:
            self.count()
            if not self._tps:
                return 0  # the topic does not exist yet
            if _caught_up(self._consumer, self._tps):
                return self._count
            if time.monotonic() > deadline:
                raise AssertionError(f"{self._topic}: not caught up within {timeout} s")
            time.sleep(0.05)

    def mark(self) -> None:
        self.max_step = None

    def close(self) -> None:
        self._consumer.close()


def forecasts_by_key(messages: list[Message]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Forecast messages grouped by (entity, step); every message checked against its key."""
    out: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for m in messages:
        assert m.value is not None, f"tombstone in the output topic at {m.partition}/{m.offset}"
        doc = json.loads(m.value)
        assert m.key == doc["entity"].encode(), f"forecast keyed {m.key!r} for {doc['entity']}"
        out.setdefault((doc["entity"], int(doc["step"])), []).append(doc)
    return out


def assert_same_forecasts(
    got: Mapping[tuple[str, int], list[dict[str, Any]]],
    want: Mapping[tuple[str, int], list[dict[str, Any]]],
    *,
    atol: float = 1e-6,
) -> None:
    """Same (entity, step) keys; every message of `got` equals the one of `want`."""
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    assert not missing, f"{len(missing)} forecasts missing, e.g. {missing[:5]}"
    assert not extra, f"{len(extra)} unexpected forecasts, e.g. {extra[:5]}"
    keys = sorted(want)
    ref = np.array([want[k][0]["forecast"] for k in keys], dtype=np.float64)
    ref_level = np.array([want[k][0]["level"] for k in keys], dtype=np.float64)
    worst = 0.0
    for copy in range(max(len(v) for v in got.values())):
        idx = [i for i, k in enumerate(keys) if len(got[k]) > copy]
        vals = np.array([got[keys[i]][copy]["forecast"] for i in idx], dtype=np.float64)
        diff = np.abs(vals - ref[idx])
        worst = max(worst, float(diff.max(initial=0.0)))
        bad = np.flatnonzero((diff > atol).any(axis=1))
        assert bad.size == 0, (
            f"{bad.size} forecasts differ by more than {atol}, e.g. {keys[idx[bad[0]]]}: "
            f"{vals[bad[0]].tolist()} vs {ref[idx[bad[0]]].tolist()}"
        )
        levels = np.array([got[keys[i]][copy]["level"] for i in idx], dtype=np.float64)
        np.testing.assert_allclose(levels, ref_level[idx], rtol=1e-6, atol=atol)
        versions = [got[keys[i]][copy]["model_version"] for i in idx]
        want_versions = [want[keys[i]][0]["model_version"] for i in idx]
        assert versions == want_versions, "a forecast names another weights version"


# ---------------------------------------------------------------------- Redis


def checkpoint_step(url: str, namespace: str) -> int | None:
    """The step of the newest checkpoint of one namespace (None before the first one)."""
    client = redis.Redis.from_url(url)
    try:
        raw = client.hget(f"streamer:{{{namespace}}}:meta", "step")
    finally:
        client.close()
    return int(raw) if raw not in (None, b"") else None


def redis_snapshot(url: str, namespace: str, *, with_latest: bool = False) -> dict[str, Any]:
    """Every key of one namespace with its value (strings and hashes), for equality checks."""
    client = redis.Redis.from_url(url)
    try:
        out: dict[str, Any] = {}
        for key in client.scan_iter(match=f"streamer:{{{namespace}}}:*", count=1000):
            name = key.decode()
            if name.endswith(":latest") and not with_latest:
                continue
            kind = client.type(key)
            if kind == b"string":
                out[name] = client.get(key)
            elif kind == b"hash":
                out[name] = client.hgetall(key)
            else:  # pragma: no cover - the store writes strings and hashes only
                out[name] = kind
        return out
    finally:
        client.close()
