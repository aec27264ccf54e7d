"""The main job: Kafka in, forecasts out, states and positions checkpointed together.

The loop (one thread; kafka-python calls the rebalance hooks from inside `poll`)::

    poll -> decode -> validate -> skip replays -> align ──▶ step ──▶ publish forecasts
                 └──── refused / late ──▶ dead-letter topic (reason + source in headers)
    every N steps or T seconds, on revoke and on stop:
        flush the producer, then write the changed rows, the positions and the step in one
        fenced, atomic store operation; then commit offsets to Kafka (lag monitoring only)

Positions. The position written for a partition is the offset of its oldest event still
buffered in an open step (or the next offset to read when none is buffered): everything
before it has been applied to a state or refused. A restart seeks there; events at or before
an entity's last applied step are skipped (`AddStatus.REPLAYED`), so nothing applies twice.
Forecasts of steps closed after the last checkpoint are published again after a crash:
output is at-least-once, keyed by entity, and (entity, step) identifies a forecast.

Recovery policy. A partition without a checkpoint in the store is read from its earliest
retained offset (Kafka's committed offsets are ignored: the store is the source of truth). If
a stored position fell out of Kafka's retention, the consumer resets to the earliest retained
offset and the gap is logged; the states stay as checkpointed and move on from there.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import numpy as np

from .aligner import AddStatus
from .codec import decode_event, encode_forecast
from .config import Config
from .errors import EventError, FencedError, KafkaError, Reason, StateError
from .events import step_of
from .forecaster import Forecaster, StepResult
from .kafka_io import KafkaIO, Record
from .state.store import Checkpoint, EntityState, StateStore

log = logging.getLogger(__name__)


class Samples:
    """The newest `maxlen` observations and how many there were in all: bounded memory.

    Iterating gives the retained ones (benchmarks take percentiles of them); `since(n)`
    gives those observed after the n-th (the metrics collector folds them into histograms).
    """

    def __init__(self, maxlen: int = 10_000) -> None:
        self._items: deque[float] = deque(maxlen=maxlen)
        self.total = 0

    def append(self, value: float) -> None:
        self._items.append(value)
        self.total += 1

    def extend(self, values: Iterable[float]) -> None:
        for v in values:
            self.append(v)

    def __iadd__(self, values: Iterable[float]) -> Samples:
        self.extend(values)
        return self

    def since(self, seen: int) -> list[float]:
        new = min(self.total - seen, len(self._items))
        return list(self._items)[len(self._items) - new :] if new > 0 else []

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[float]:
        return iter(list(self._items))

    def __bool__(self) -> bool:
        return bool(self._items)


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such numbers become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _tune_gc() -> None:
    """Keep the cyclic GC off the latency path.

    TensorFlow and Keras leave hundreds of thousands of long-lived objects behind at start-up;
    every full collection walks them all and stalled a step's publishing by up to ~100 ms
    (the p99 of step-close -> forecast-ack). Freezing them moves them out of the collector's
    reach, and a larger first-generation threshold makes collections rarer. The loop itself
    creates few cycles.
    """
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, 50_000), gen1, gen2)


@dataclass
class EngineStats:
    consumed: int = 0
    applied: int = 0  # accepted into a step (incl. replacements)
    duplicates: int = 0
    replayed: int = 0
    late: int = 0
    dead_lettered: Counter[str] = field(default_factory=Counter)
    steps: int = 0
    forecasts: int = 0
    checkpoints: int = 0
    checkpoint_failures: int = 0
    checkpoint_ms: Samples = field(default_factory=Samples)
    checkpoint_bytes: Samples = field(default_factory=Samples)
    last_checkpoint_at: float = 0.0
    rebalances: int = 0
    evicted: int = 0
    restored_after_eviction: int = 0
    step_ms: Samples = field(default_factory=Samples)
    # Step closed -> its last forecast acknowledged by the broker (appended on the I/O thread).
    forecast_latency_ms: Samples = field(default_factory=Samples)

    def summary(self) -> dict[str, Any]:
        return {
            "consumed": self.consumed,
            "applied": self.applied,
            "duplicates": self.duplicates,
            "replayed": self.replayed,
            "late": self.late,
            "dead_lettered": dict(self.dead_lettered),
            "steps": self.steps,
            "forecasts": self.forecasts,
            "checkpoints": self.checkpoints,
            "checkpoint_failures": self.checkpoint_failures,
            "rebalances": self.rebalances,
            "evicted": self.evicted,
            "restored_after_eviction": self.restored_after_eviction,
        }


class Engine:
    def __init__(
        self,
        config: Config,
        store: StateStore,
        io: KafkaIO,
        *,
        clock: Callable[[], float] = time.time,
        progress_every_s: float = 5.0,
    ) -> None:
        self.config = config
        self.core = Forecaster(config, clock)
        self.store = store
        self.io = io
        self.stats = EngineStats()
        if self.core.learner is not None:
            self.core.learner.on_update = self._save_weights
        self._topic = config.kafka.input_topic
        self._interval = config.stream.interval
        self._layout = self.core.layout
        self._tokens: dict[int, int] = {}  # owned partition -> fencing token
        self._partition_of: dict[str, int] = {}  # entity -> partition it arrives on
        self._next_offset: dict[int, int] = {}  # partition -> next offset to read
        self._buffered: dict[int, dict[int, int]] = {}  # open step -> partition -> min offset
        self._steps_since_checkpoint = 0
        self._progress_every = progress_every_s
        self._stop = threading.Event()
        self._closing = False
        self._assigned_at = time.monotonic()
        self._latest: dict[str, bytes] = {}  # newest forecast per entity, stored at checkpoints
        # partition -> monotonic time of its last record (idle partitions, see below)
        self._last_record_at: dict[int, float] = {}
        # Entities evicted while idle: their state is in the store (entity -> partition).
        self._evicted: dict[str, int] = {}
        self._last_poll_at = 0.0
        self._live = False
        # The newest step applied and published. The aligner's last closed step can be ahead
        # of it in the middle of a burst; a checkpoint must name what was applied.
        self._last_applied_step: int | None = None
        # observability.LearningMetrics when /metrics is served (fed from this thread).
        self.learning_metrics: Any = None
        self._fed: dict[str, int] = {}
        self._fed_at = 0.0
        self.on_step: Callable[[StepResult], None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def request_stop(self) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s: stopping after the current poll", signal.Signals(signum).name)
            self._stop.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self, *, max_steps: int | None = None, idle_exit_s: float | None = None) -> EngineStats:
        """Consume until stopped (signal, `max_steps` closed steps, or `idle_exit_s` of silence)."""
        _tune_gc()
        self.io.subscribe(self._on_assigned, self._on_revoked)
        started = last_progress = last_data = time.monotonic()
        consumed_at_progress = 0
        self.stats.last_checkpoint_at = started
        try:
            while not self._stop.is_set():
                records = self.io.poll()
                now = self._last_poll_at = time.monotonic()
                # A poll that did not fill up means the engine is keeping pace with the stream.
                self._live = len(records) < self.config.kafka.max_poll_records
                if records:
                    last_data = now
                    self._ingest(records)
                self.core.aligner.set_watermark_partitions(self._watermark_partitions(now))
                self._close_steps(checkpoints=True)
                if self.learning_metrics is not None and now - self._fed_at >= 1.0:
                    self._feed_learning_metrics()
                    self._fed_at = now
                if self._checkpoint_due(now):
                    self._checkpoint_in_loop()
                if now - last_progress >= self._progress_every:
                    rate = (self.stats.consumed - consumed_at_progress) / (now - last_progress)
                    self._log_progress(rate)
                    last_progress, consumed_at_progress = now, self.stats.consumed
                if max_steps is not None and self.stats.steps >= max_steps:
                    log.info("reached %d steps: stopping", max_steps)
                    break
                if not self._tokens:
                    last_data = now  # silence only counts once partitions are assigned
                elif idle_exit_s is not None and now - last_data >= idle_exit_s:
                    log.info("no input for %.1f s: stopping", idle_exit_s)
                    break
        finally:
            self._shutdown(time.monotonic() - started)
        return self.stats

    def _shutdown(self, elapsed: float) -> None:
        """Graceful stop: close what can close, checkpoint, commit, leave the group."""
        try:
            self._close_steps()
            if self._tokens:
                self.checkpoint()
        except (StateError, KafkaError) as exc:
            log.error("final checkpoint failed: %s", exc)
        finally:
            self._closing = True  # leaving the group revokes everything; nothing left to save
            self.io.close()
            log.info("stopped after %.1f s: %s", elapsed, self.stats.summary())

    # ------------------------------------------------------------------ rebalancing

    def _on_assigned(self, partitions: list[int]) -> dict[int, int | None]:
        """Take ownership, load states, return where to seek (None: earliest retained)."""
        self.stats.rebalances += 1
        self._assigned_at = time.monotonic()
        new = [p for p in partitions if p not in self._tokens]
        if not new:
            return {}
        self._tokens.update(self.store.acquire(self._topic, new))
        loaded = self.store.load(self._topic, new, self._layout)
        if loaded.weights_version and loaded.weights_version != self.weights_version:
            self._load_weights(loaded.weights_version)
        if loaded.entities:
            names = [e.entity for e in loaded.entities]
            rows = np.stack([e.row for e in loaded.entities])
            steps = np.array([e.last_step for e in loaded.entities], dtype=np.int64)
            self.core.restore_rows(names, rows, steps, [e.slot for e in loaded.entities])
            for e in loaded.entities:
                self._partition_of[e.entity] = e.partition
        if loaded.extra is not None and self.core.learner is not None:
            # The learner's window is indexed by row: entities went back to their rows above.
            self.core.learner.import_state(loaded.extra)
        if (
            loaded.steps
            and self.core.aligner.last_closed_step is None
            and set(loaded.steps) >= set(new)
        ):
            self.core.aligner.resume_after(min(loaded.steps.values()))
        log.info(
            "assigned partitions %s: %d entities restored, positions %s",
            new,
            len(loaded.entities),
            {p: loaded.positions.get(p) for p in new},
        )
        for p in new:
            if p in loaded.positions:
                self._next_offset[p] = loaded.positions[p]
        return {p: loaded.positions.get(p) for p in new}

    @property
    def assigned_partitions(self) -> list[int]:
        return sorted(self._tokens)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set() or self._closing

    @property
    def ready(self) -> bool:
        """Partitions assigned and restored (both happen in the assignment callback), and the
        loop polled within the last few seconds."""
        return bool(self._tokens) and time.monotonic() - self._last_poll_at < 5.0

    @property
    def weights_version(self) -> int:
        """The weights version forecasts and states are computed with (0: initial weights)."""
        return self.core.weights_version

    def _save_weights(self, version: int) -> None:
        """Store a new weights version before any checkpoint can name it."""
        learner = self.core.learner
        if learner is None:
            return
        self.store.put_weights(version, learner.export_weights(), self.config.learn.keep_versions)
        log.info("weights version %d stored", version)

    def _load_weights(self, version: int) -> None:
        """Resume with the weights version the checkpoint's states were computed with."""
        blob = self.store.get_weights(version)
        if blob is None or self.core.learner is None:
            raise StateError(
                f"the checkpoint names weights version {version}, which "
                + ("is not in the store" if blob is None else "needs learn.enabled = true")
            )
        self.core.learner.import_weights(blob, version)
        log.info("resumed with weights version %d", version)

    def _release(self, partitions: list[int]) -> set[str]:
        """Forget everything of these partitions: entities, buffered events, positions."""
        gone = {e for e, p in self._partition_of.items() if p in partitions}
        self._evicted = {e: p for e, p in self._evicted.items() if p not in partitions}
        self.core.remove_entities(gone)
        for e in gone:
            del self._partition_of[e]
        for p in partitions:
            self._tokens.pop(p, None)
            self._next_offset.pop(p, None)
        for offsets in self._buffered.values():
            for p in partitions:
                offsets.pop(p, None)
        return gone

    def _on_revoked(self, partitions: list[int]) -> None:
        mine = [p for p in partitions if p in self._tokens]
        if not mine or self._closing:
            return
        try:
            self.checkpoint()
        except FencedError as exc:
            log.warning("revoked partitions were already taken over: %s", exc)
        except StateError as exc:
            log.error("checkpoint on revoke failed, the new owner replays more: %s", exc)
        gone = self._release(mine)
        log.info("revoked partitions %s: %d entities released", mine, len(gone))

    # ------------------------------------------------------------------ the hot path

    def _ingest(self, records: list[Record]) -> None:
        core = self.core
        decode = decode_event
        enc = self.config.kafka.encoding
        limit = self.config.kafka.max_message_bytes
        now = time.monotonic()
        for rec in records:
            self._last_record_at[rec.partition] = now
            self.stats.consumed += 1
            self._next_offset[rec.partition] = rec.offset + 1
            if rec.partition not in self._tokens:
                continue  # fetched before a revoke; the new owner reads it
            try:
                event = core.parser.parse(decode(rec.value, enc, limit))
                if event.entity in self._evicted:
                    self._bring_back(event.entity)
                try:
                    status = core.ingest(event, rec.partition)
                except EventError as exc:
                    if exc.reason is not Reason.CAPACITY or not self._make_room():
                        raise
                    status = core.ingest(event, rec.partition)
            except EventError as exc:
                self._dead_letter(rec, exc.reason, str(exc))
                continue
            if status is AddStatus.LATE:
                self.stats.late += 1
                self._dead_letter(rec, Reason.LATE, f'entity "{event.entity}": its step closed')
                continue
            if status is AddStatus.REPLAYED:
                self.stats.replayed += 1
                continue
            if status is AddStatus.DUPLICATE:
                self.stats.duplicates += 1
                continue
            if status is AddStatus.REPLACED:
                self.stats.duplicates += 1
            self.stats.applied += 1
            self._partition_of[event.entity] = rec.partition
            offsets = self._buffered.setdefault(step_of(event.ts, self._interval), {})
            if rec.partition not in offsets:
                offsets[rec.partition] = rec.offset

    def quality_report(self) -> bytes:
        """Prequential scores (recent and cumulative) and learner counters, as JSON."""
        report: dict[str, Any] = {
            "weights_version": self.weights_version,
            "step": self._last_applied_step,
            "recent": self.core.prequential.summary("recent"),
            "total": self.core.prequential.summary("total"),
        }
        learner = self.core.learner
        if learner is not None:
            report["learning"] = {
                "updates": learner.stats.updates,
                "discarded": learner.stats.discarded,
                "rollbacks": learner.stats.rollbacks,
                "last_loss": learner.stats.last_loss if learner.stats.updates else None,
            }
        return json.dumps(_finite(report), allow_nan=False).encode()

    def _feed_learning_metrics(self) -> None:
        """Hand what the learner did since the last call to the /metrics instruments."""
        m = self.learning_metrics
        m.record_prequential(self.core.prequential.summary("recent"))
        learner = self.core.learner
        if learner is None:
            return
        st = learner.stats
        for duration in st.update_ms[self._fed.get("updates", 0) :]:
            m.record_learning(duration_s=duration / 1e3, loss=st.last_loss)
        self._fed["updates"] = len(st.update_ms)
        for _ in range(st.discarded - self._fed.get("discarded", 0)):
            m.record_learning(duration_s=0.0, loss=float("nan"), discarded=True)
        self._fed["discarded"] = st.discarded
        for _ in range(st.rollbacks - self._fed.get("rollbacks", 0)):
            m.record_rollback()
        self._fed["rollbacks"] = st.rollbacks

    def _bring_back(self, entity: str) -> None:
        """An evicted entity reported again: restore its stored state before its event."""
        partition = self._evicted.pop(entity)
        stored = self.store.load_entity(self._topic, partition, entity, self._layout)
        if stored is not None:
            if len(self.core.registry) >= self.core.registry.max_entities and not self._make_room():
                self._evicted[entity] = partition
                raise EventError(
                    Reason.CAPACITY,
                    f'entity "{entity}" cannot come back: all rows are taken',
                    entity,
                )
            self.core.restore_rows(
                [entity], stored.row[None, :], np.array([stored.last_step], dtype=np.int64)
            )
            self._partition_of[entity] = partition
            self.stats.restored_after_eviction += 1

    def _make_room(self) -> bool:
        """Every row is taken: close what can close, checkpoint, evict idle entities.

        Returns True if a row was freed. Costs a checkpoint, so it only runs when a new
        entity would otherwise be refused.
        """
        if self.config.capacity.evict_idle_steps <= 0:
            return False
        self._close_steps()
        before = len(self.core.registry)
        try:
            self.checkpoint()
        except StateError as exc:
            log.error("cannot make room: checkpoint failed: %s", exc)
            return False
        return len(self.core.registry) < before

    def _evict_idle(self) -> None:
        """Free the rows of idle entities; only right after a checkpoint stored their state."""
        idle_steps = self.config.capacity.evict_idle_steps
        if idle_steps <= 0:
            return
        idle = {e for e in self.core.idle_entities(idle_steps) if e in self._partition_of}
        if not idle:
            return
        for entity in idle:
            self._evicted[entity] = self._partition_of.pop(entity)
        self.core.remove_entities(idle)
        self.stats.evicted += len(idle)
        log.debug("evicted %d idle entities", len(idle))

    def _watermark_partitions(self, now: float) -> set[int]:
        """Partitions that hold the watermark back: all assigned ones except idle partitions.

        A partition is idle when it is caught up and delivered nothing for
        `stream.idle_partition_timeout` seconds (Flink's idleness): without this rule one
        silent partition would stop every step from closing by watermark; with it, a partition
        that is merely quiet for a moment still holds the watermark, so events of one step
        spread over several partitions are not made late by the fastest partition.
        """
        idle_after = self.config.stream.idle_partition_timeout
        active = set()
        for p in self.io.assigned():
            last = self._last_record_at.get(p, self._assigned_at)
            if now - last < idle_after or not self.io.caught_up(p):
                active.add(p)
        return active

    def _close_steps(self, checkpoints: bool = False) -> None:
        every = self.config.checkpoint.every_steps
        for batch in self.core.aligner.close_ready():
            closed_at = time.perf_counter()
            result = self.core.apply(batch)
            self.stats.step_ms.append((time.perf_counter() - closed_at) * 1e3)
            self._buffered.pop(result.step, None)
            self._last_applied_step = result.step
            self._publish(result, closed_at)
            if self._live:
                # Keeping pace with a live stream: wait for this step's acknowledgements now.
                # Left to kafka-python's I/O thread, they queue behind the engine thread for
                # the GIL while it publishes the next step or ingests (live p99 step-close ->
                # ack 70 ms; flushed per step: ~35 ms). A backlog is drained without waiting.
                self.io.flush()
            # A backlog can close hundreds of steps in one burst: checkpoint inside it, so
            # that every_steps also bounds what a crash makes the engine replay.
            if checkpoints and self._tokens and self._steps_since_checkpoint >= every:
                self._checkpoint_in_loop()

    def _checkpoint_in_loop(self) -> None:
        """A periodic checkpoint: failures are logged and counted, the stream goes on."""
        try:
            self.checkpoint()
        except FencedError as exc:
            # Another engine owns the partition now (our session lapsed): stop touching it.
            log.warning("%s; releasing partition %d", exc, exc.partition)
            self._release([exc.partition])
        except StateError as exc:
            log.error("checkpoint failed, retried at the next one: %s", exc)

    def _publish(self, result: StepResult, closed_at: float) -> None:
        self.stats.steps += 1
        self._steps_since_checkpoint += 1
        latest = {}
        version = self.weights_version
        future = None
        for j, entity in enumerate(result.entities):
            if not result.valid[j]:
                continue
            value = encode_forecast(
                entity,
                result.step,
                float(result.ts[j]),
                result.forecasts[j].tolist(),
                result.levels[j].tolist(),
                version,
            )
            future = self.io.send_forecast(entity, value)
            latest[entity] = value
        if future is not None:
            sink = self.stats.forecast_latency_ms
            future.add_callback(lambda _md: sink.append((time.perf_counter() - closed_at) * 1e3))
        self.stats.forecasts += len(latest)
        self._latest.update(latest)
        if self.on_step is not None:
            self.on_step(result)

    def _dead_letter(self, rec: Record, reason: Reason, message: str) -> None:
        self.stats.dead_lettered[reason.value] += 1
        self.io.send_dead_letter(rec, reason.value, message)

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_due(self, now: float) -> bool:
        cfg = self.config.checkpoint
        return bool(self._tokens) and (
            self._steps_since_checkpoint >= cfg.every_steps
            or (
                self._steps_since_checkpoint > 0
                and now - self.stats.last_checkpoint_at >= cfg.every_seconds
            )
        )

    def position(self, partition: int) -> int | None:
        """Where a restart must resume reading this partition (see the module docstring)."""
        candidates = [o[partition] for o in self._buffered.values() if partition in o]
        nxt = self._next_offset.get(partition)
        if nxt is not None:
            candidates.append(nxt)
        return min(candidates) if candidates else None

    def checkpoint(self) -> None:
        """Flush outputs, then write changed rows + positions atomically (fenced)."""
        t0 = time.perf_counter()
        self.io.flush()  # forecasts of every applied step are acknowledged first
        slots = self.core.take_dirty()
        names, rows, steps = self.core.export_rows(slots)
        entities = [
            EntityState(name, self._partition_of[name], int(steps[i]), rows[i], slots[i])
            for i, name in enumerate(names)
            if name in self._partition_of
        ]
        positions = {p: pos for p in self._tokens if (pos := self.position(p)) is not None}
        cp = Checkpoint(
            topic=self._topic,
            positions=positions,
            entities=entities,
            step=self._last_applied_step
            if self._last_applied_step is not None
            else self.core.aligner.last_closed_step,
            weights_version=self.weights_version,
            extra=self.core.learner.export_state() if self.core.learner is not None else None,
        )
        try:
            nbytes = self.store.commit(cp, self._tokens, self._layout)
        except FencedError:
            self.stats.checkpoint_failures += 1
            raise
        except StateError:
            self.stats.checkpoint_failures += 1
            self.core.mark_dirty(slots)  # retried with the next checkpoint
            raise
        ms = (time.perf_counter() - t0) * 1e3
        self.stats.checkpoints += 1
        self.stats.checkpoint_ms.append(ms)
        self.stats.checkpoint_bytes.append(nbytes)
        self.stats.last_checkpoint_at = time.monotonic()
        self._steps_since_checkpoint = 0
        try:
            self.store.put_latest(self._latest)
            self._latest = {}
            self.store.put_quality(self.quality_report())
        except StateError as exc:
            log.warning("latest forecasts not stored (retried at the next checkpoint): %s", exc)
        self.io.commit_offsets(positions)
        self._evict_idle()
        log.debug("checkpoint: %d entities, %d bytes, %.1f ms", len(entities), nbytes, ms)

    def _log_progress(self, rate: float) -> None:
        lag = self.io.lag()
        log.info(
            "%.0f events/s | steps %d | entities %d | forecasts %d | lag %s | dead-lettered %d",
            rate,
            self.stats.steps,
            len(self.core.registry),
            self.stats.forecasts,
            lag if lag is not None else "?",
            sum(self.stats.dead_lettered.values()),
        )
