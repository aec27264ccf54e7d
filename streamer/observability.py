"""Prometheus metrics: the engine's public state, read at scrape time.

The hot path pays nothing for metrics. `EngineCollector` is a custom collector: each scrape
reads `engine.stats` (plain counters and append-only lists of timings), the slot registry,
the weights version and the consumer lag, and turns them into metric families. Histograms
are folded from the timing lists: the collector remembers how far it has read each list and
adds only the items appended since the last scrape. It assumes those lists only grow; a list
replaced by a new object is read again from its start.

Naming follows the Prometheus conventions: prefix `streamer_`, base units (seconds, bytes),
`_total` on counters, no per-entity labels (entities are unbounded; ask `/forecast/<entity>`
for one entity). Labels have small, fixed value sets: `reason`, `partition`, `horizon`,
`baseline`.

Online-learning metrics are ordinary instruments in `LearningMetrics`, fed by whoever runs
the updates and the prequential scoring, through `record_learning`, `record_rollback` and
`record_prequential`. Until something feeds them the counters read 0, the loss NaN and
the per-horizon gauges have no samples.

Thread safety: scrapes run on the HTTP server's threads while the engine mutates its stats
on its own thread. Reading an int, `len()` of a list, slicing a list and `dict(Counter)` are
each atomic under the GIL, so a scrape sees a slightly stale but never a torn value. Nothing
here calls into kafka-python from the scrape thread (its consumer is not thread-safe): the
lag is read from `engine.consumer_lag` when the engine keeps one, else refreshed on the
engine's own thread through the `on_step` hook.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PREFIX = "streamer"

# Bucket upper bounds, in base units.
STEP_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CHECKPOINT_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CHECKPOINT_SIZE_BUCKETS_B = tuple(float(4**k * 1024) for k in range(10))  # 1 KiB .. 256 MiB
UPDATE_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

DEFAULT_LAG_REFRESH_S = 1.0
BASELINE_PERSISTENCE = "persistence"
BASELINE_ZERO = "zero_change"
# The best naive forecast of each horizon (prequential.py picks it from the pooled MSEs).
BASELINE_BEST = "best_naive"
# `Prequential.summary()`'s baseline names -> the `baseline` label's values.
NAIVE_LABELS = {
    "zero": BASELINE_ZERO,
    "persistence": BASELINE_PERSISTENCE,
    "seasonal": "seasonal",
    "rolling_mean": "rolling_mean",
}


class _FoldedHistogram:
    """Cumulative histogram of an append-only list, folded in on each scrape."""

    def __init__(self, bounds: Sequence[float], scale: float) -> None:
        self.bounds = np.asarray(bounds, dtype=np.float64)
        self._scale = scale  # list unit -> base unit (ms -> s: 1e-3)
        self._counts = np.zeros(len(bounds) + 1, dtype=np.int64)  # last: above every bound
        self._sum = 0.0
        self._seen = 0
        self._source: int | None = None

    def fold(self, values: Any) -> None:
        since = getattr(values, "since", None)
        if since is not None:  # engine.Samples: bounded, with a running total
            if id(values) != self._source:
                self._source, self._seen = id(values), 0
            self._add(np.asarray(since(self._seen), dtype=np.float64) * self._scale)
            self._seen = values.total
            return
        if id(values) != self._source or len(values) < self._seen:
            self._source, self._seen = id(values), 0
        end = len(values)
        if end == self._seen:
            return
        new = np.asarray(values[self._seen : end], dtype=np.float64) * self._scale
        self._seen = end
        self._add(new)

    def _add(self, new: np.ndarray) -> None:
        new = new[np.isfinite(new)]
        idx = np.searchsorted(self.bounds, new, side="left")  # first bound >= value: le
        self._counts += np.bincount(idx, minlength=len(self._counts))
        self._sum += float(new.sum())

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative = np.cumsum(self._counts)
        buckets = [(_bound(b), int(c)) for b, c in zip(self.bounds, cumulative[:-1], strict=True)]
        buckets.append(("+Inf", int(cumulative[-1])))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self._sum)


def _bound(value: float) -> str:
    return repr(float(value))


def _name(suffix: str) -> str:
    return f"{PREFIX}_{suffix}"


class EngineCollector(Collector):
    """Reads a running `Engine`'s public state at each scrape (see the module docstring).

    Engine attributes read: `stats` (EngineStats), `core.registry` (len, capacity,
    max_entities), `weights_version`, `io.lag()`; optional, when the engine provides them:
    `ready` (bool), `consumer_lag` ({partition: messages}), `assigned_partitions`.
    """

    def __init__(
        self,
        engine: Any,
        *,
        clock: Callable[[], float] = time.monotonic,
        lag_refresh_s: float = DEFAULT_LAG_REFRESH_S,
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._lock = threading.Lock()  # scrapes may run concurrently
        self._step = _FoldedHistogram(STEP_BUCKETS_S, 1e-3)
        self._latency = _FoldedHistogram(LATENCY_BUCKETS_S, 1e-3)
        self._cp_time = _FoldedHistogram(CHECKPOINT_BUCKETS_S, 1e-3)
        self._cp_size = _FoldedHistogram(CHECKPOINT_SIZE_BUCKETS_B, 1.0)
        self._lag: Mapping[int, int] | int | None = None
        self._lag_at = -math.inf
        self._lag_refresh_s = lag_refresh_s
        if not hasattr(engine, "consumer_lag") and hasattr(engine, "on_step"):
            self._hook_lag_refresh(engine)

    # ------------------------------------------------------------------ lag

    def _hook_lag_refresh(self, engine: Any) -> None:
        """Refresh the lag on the engine's thread after a step (at most every lag_refresh_s)."""
        previous = engine.on_step

        def on_step(result: Any) -> None:
            if previous is not None:
                previous(result)
            now = self._clock()
            if now - self._lag_at >= self._lag_refresh_s:
                self._lag_at = now
                try:
                    by_partition = getattr(engine.io, "lag_by_partition", None)
                    self._lag = by_partition() if by_partition is not None else engine.io.lag()
                except Exception as exc:  # never let metrics break the engine loop
                    log.debug("consumer lag unavailable: %s", exc)
                    self._lag = None

        engine.on_step = on_step

    def _current_lag(self) -> Mapping[int, int] | int | None:
        lag = getattr(self._engine, "consumer_lag", None)
        return lag if lag is not None else self._lag

    # ------------------------------------------------------------------ scrape

    def describe(self) -> Iterable[Metric]:
        return []  # registering must not read an engine that may not run yet

    def collect(self) -> list[Metric]:
        with self._lock:  # the folded histograms are updated in place
            return list(self._collect())

    def _collect(self) -> Iterator[Metric]:
        engine = self._engine
        stats = engine.stats

        def counter(suffix: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(_name(suffix), doc, value=value)

        def gauge(suffix: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(_name(suffix), doc, value=value)

        yield counter("events_consumed_total", "Input records read from Kafka.", stats.consumed)
        yield counter(
            "events_applied_total",
            "Events accepted into a step (replacements of a duplicate included).",
            stats.applied,
        )
        yield counter(
            "events_duplicate_total",
            "Second events for an (entity, step) already buffered.",
            stats.duplicates,
        )
        yield counter(
            "events_replayed_total",
            "Events at or before their entity's last applied step, skipped (idempotent replay).",
            stats.replayed,
        )
        yield counter("events_late_total", "Events for a step that had already closed.", stats.late)
        dead = CounterMetricFamily(
            _name("events_dead_lettered_total"),
            "Records sent to the dead-letter topic, by reason.",
            labels=["reason"],
        )
        for reason, n in sorted(dict(stats.dead_lettered).items()):
            dead.add_metric([str(reason)], n)
        yield dead
        yield counter("steps_total", "Steps closed and run through the model.", stats.steps)
        yield counter("forecasts_total", "Forecast messages published.", stats.forecasts)
        yield counter("checkpoints_total", "Successful checkpoints.", stats.checkpoints)
        yield counter(
            "checkpoint_failures_total",
            "Checkpoints that failed (store error or fenced by a newer owner).",
            stats.checkpoint_failures,
        )
        yield gauge(
            "store_up",
            "1 while the state store answers, 0 while checkpoints fail and are retried.",
            float(getattr(engine, "store_up", True)),
        )
        yield counter(
            "rows_quarantined_total",
            "Stored entity rows that could not be used (corrupt, non-finite): reset instead.",
            getattr(stats, "quarantined", 0),
        )
        yield counter(
            "store_resets_total",
            "Times the store had lost this engine's checkpoints and was re-seeded from memory.",
            getattr(stats, "store_resets", 0),
        )
        yield counter(
            "rebalances_total",
            "Partition assignments received from the consumer group.",
            stats.rebalances,
        )

        self._step.fold(stats.step_ms)
        yield self._step.family(
            _name("step_duration_seconds"), "Model step time of one closed step, all entities."
        )
        self._latency.fold(stats.forecast_latency_ms)
        yield self._latency.family(
            _name("forecast_latency_seconds"),
            "From a step closing to its last forecast acknowledged by the broker.",
        )
        self._cp_time.fold(stats.checkpoint_ms)
        yield self._cp_time.family(
            _name("checkpoint_duration_seconds"),
            "Checkpoint time: producer flush plus the atomic store write.",
        )
        self._cp_size.fold(stats.checkpoint_bytes)
        yield self._cp_size.family(
            _name("checkpoint_size_bytes"), "Bytes written to the store by one checkpoint."
        )
        age = max(0.0, self._clock() - stats.last_checkpoint_at) if stats.last_checkpoint_at else 0
        yield gauge(
            "last_checkpoint_age_seconds",
            "Seconds since the last successful checkpoint (since the start before the first).",
            age,
        )

        registry = engine.core.registry
        yield gauge("entities", "Entities holding a batch row.", len(registry))
        yield gauge(
            "entity_slots", "Batch rows allocated (grows up to the limit).", registry.capacity
        )
        yield gauge(
            "entity_slots_limit",
            "Most batch rows the engine may hold (capacity.max_entities).",
            registry.max_entities,
        )
        yield gauge(
            "model_weights_version",
            "Version of the weights the forecasts are computed with.",
            engine.weights_version,
        )
        yield gauge(
            "assigned_partitions",
            "Input partitions this engine owns.",
            len(assigned_partitions(engine)),
        )
        yield gauge(
            "ready",
            "1 when the engine is ready (see /readyz), else 0.",
            float(readiness(engine)[0]),
        )

        lag = self._current_lag()
        if lag is not None:
            if isinstance(lag, Mapping):
                total = sum(lag.values())
                per = GaugeMetricFamily(
                    _name("partition_lag_messages"),
                    "Records in an owned input partition not yet read.",
                    labels=["partition"],
                )
                for p, n in sorted(lag.items()):
                    per.add_metric([str(p)], n)
                yield per
            else:
                total = lag
            yield gauge(
                "consumer_lag_messages",
                "Records in the owned input partitions not yet read.",
                total,
            )


class LearningMetrics:
    """Online-learning and prequential-quality instruments, fed by the learner.

    Nothing in the engine feeds these yet. Until the learner calls `record_learning`,
    `record_rollback` and `record_prequential`, the counters read 0, the loss NaN and the
    per-horizon gauges have no samples.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.update_duration = Histogram(
            _name("learning_update_duration_seconds"),
            "Time of one online update (truncated BPTT plus the state refresh).",
            buckets=UPDATE_BUCKETS_S,
            registry=r,
        )
        self.loss = Gauge(
            _name("learning_loss"), "Training loss of the last applied update.", registry=r
        )
        self.loss.set(math.nan)  # no update yet: not a loss of 0
        self.updates = Counter(
            _name("learning_updates_total"), "Online updates applied.", registry=r
        )
        self.discarded = Counter(
            _name("learning_discarded_updates_total"),
            "Updates discarded before use (non-finite loss or gradients, or a failed call).",
            registry=r,
        )
        self.rollbacks = Counter(
            _name("learning_rollbacks_total"),
            "Applied updates rolled back because the next steps' error got clearly worse.",
            registry=r,
        )
        self.mae = Gauge(
            _name("prequential_mae"),
            "Prequential mean absolute error of the model, per horizon (target units).",
            ["horizon"],
            registry=r,
        )
        self.rmse = Gauge(
            _name("prequential_rmse"),
            "Prequential root mean squared error of the model, per horizon (target units).",
            ["horizon"],
            registry=r,
        )
        self.mase = Gauge(
            _name("prequential_mase"),
            "Prequential MAE scaled by the one-step persistence MAE, per horizon.",
            ["horizon"],
            registry=r,
        )
        self.skill = Gauge(
            _name("prequential_skill"),
            "Pooled skill 1 - MSE/MSE_baseline of the published forecast, per horizon "
            '(> 0: it beats the baseline; baseline="best_naive" is the headline).',
            ["horizon", "baseline"],
            registry=r,
        )
        self.model_skill = Gauge(
            _name("prequential_model_skill"),
            "Pooled skill 1 - MSE/MSE_best_naive of the model's own forecast, per horizon.",
            ["horizon", "baseline"],
            registry=r,
        )
        self.best_naive = Gauge(
            _name("prequential_best_naive"),
            "1 for the naive baseline with the lowest pooled MSE at this horizon, 0 for others.",
            ["horizon", "baseline"],
            registry=r,
        )
        self.dm_stat = Gauge(
            _name("prequential_dm_statistic"),
            "Diebold-Mariano statistic of the published forecast vs the best naive, per horizon "
            "(< 0: the forecast is better).",
            ["horizon", "baseline"],
            registry=r,
        )
        self.dm_p_value = Gauge(
            _name("prequential_dm_p_value"),
            "Two-sided p-value of the Diebold-Mariano test vs the best naive, per horizon.",
            ["horizon", "baseline"],
            registry=r,
        )
        self.median_entity_skill = Gauge(
            _name("prequential_entity_skill_median"),
            "Median over entities of the per-entity skill, per horizon.",
            ["horizon", "baseline"],
            registry=r,
        )
        self.beating_share = Gauge(
            _name("prequential_entities_beating_baseline_ratio"),
            "Share of scored entities whose MSE is below the baseline's, per horizon.",
            ["horizon", "baseline"],
            registry=r,
        )

    def record_learning(self, *, duration_s: float, loss: float, discarded: bool = False) -> None:
        """One update attempt: its time, its loss, and whether it was discarded."""
        self.update_duration.observe(duration_s)
        if discarded or not math.isfinite(loss):
            self.discarded.inc()
            return
        self.updates.inc()
        self.loss.set(loss)

    def record_rollback(self) -> None:
        """An applied update was rolled back to the previous weights."""
        self.rollbacks.inc()

    def record_prequential(self, summary: Iterable[Mapping[str, Any]]) -> None:
        """Per-horizon scores, as `Prequential.summary()` returns them.

        Keys read per item: horizon, mae, rmse, mase; vs the best naive (label
        baseline="best_naive"): skill, model_skill, median_entity_skill,
        share_entities_beating_baseline, dm_stat, dm_p_value, best_naive (which baseline that
        is); vs the fixed baselines: skill_vs_persistence, skill_vs_zero,
        median_entity_skill_vs_persistence, share_entities_beating_persistence. A missing or
        None value exports NaN, so a horizon without scores does not keep an old figure.
        """
        best = BASELINE_BEST
        for item in summary:
            h = str(int(item["horizon"]))
            self.mae.labels(h).set(_num(item.get("mae")))
            self.rmse.labels(h).set(_num(item.get("rmse")))
            self.mase.labels(h).set(_num(item.get("mase")))
            self.skill.labels(h, best).set(_num(item.get("skill")))
            self.skill.labels(h, BASELINE_PERSISTENCE).set(_num(item.get("skill_vs_persistence")))
            self.skill.labels(h, BASELINE_ZERO).set(_num(item.get("skill_vs_zero")))
            self.model_skill.labels(h, best).set(_num(item.get("model_skill")))
            self.dm_stat.labels(h, best).set(_num(item.get("dm_stat")))
            self.dm_p_value.labels(h, best).set(_num(item.get("dm_p_value")))
            self.median_entity_skill.labels(h, best).set(_num(item.get("median_entity_skill")))
            self.median_entity_skill.labels(h, BASELINE_PERSISTENCE).set(
                _num(item.get("median_entity_skill_vs_persistence"))
            )
            self.beating_share.labels(h, best).set(
                _num(item.get("share_entities_beating_baseline"))
            )
            self.beating_share.labels(h, BASELINE_PERSISTENCE).set(
                _num(item.get("share_entities_beating_persistence"))
            )
            chosen = item.get("best_naive")
            for name, label in NAIVE_LABELS.items():
                flag = math.nan if chosen is None else float(chosen == name)
                self.best_naive.labels(h, label).set(flag)


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


class Metrics:
    """The registry served on /metrics: engine state, learning, process and runtime."""

    def __init__(self, engine: Any, *, process: bool = True) -> None:
        self.registry = CollectorRegistry()
        self.engine = EngineCollector(engine)
        self.registry.register(self.engine)
        self.learning = LearningMetrics(self.registry)
        if process:
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                self.registry.register(collector)

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """(body, content type) in the format the scraper's Accept header prefers."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


def assigned_partitions(engine: Any) -> list[int]:
    """Partitions the engine owns (`engine.assigned_partitions` when it has one)."""
    parts = getattr(engine, "assigned_partitions", None)
    if parts is None:
        parts = getattr(engine, "_tokens", {})  # until the engine exposes its assignment
    return sorted(parts)


def readiness(engine: Any) -> tuple[bool, str]:
    """(ready, why): partitions assigned, their states restored, the loop consuming.

    Uses `engine.ready` and `engine.stopping` when the engine provides them. Until then it
    falls back on what the engine holds: it is ready once it owns a partition (ownership and
    the state restore happen in the same rebalance callback) and no stop was requested.
    """
    stopping = getattr(engine, "stopping", None)
    if stopping is None:
        stop_event = getattr(engine, "_stop", None)
        stopping = stop_event is not None and stop_event.is_set()
    if stopping:
        return False, "stopping"
    if not assigned_partitions(engine):
        return False, "no partitions assigned (joining the group, or every partition is owned)"
    reason = getattr(engine, "not_ready_reason", None)
    if reason is not None:
        return False, str(reason)
    ready = getattr(engine, "ready", None)
    if ready is not None and not ready:
        return False, "restoring states or not consuming yet"
    return True, "partitions assigned, states restored, consuming"
