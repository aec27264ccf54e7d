"""The main job: Kafka in, forecasts out, states and positions checkpointed together.

The loop (one thread; kafka-python calls the rebalance hooks from inside `poll`)::

    poll -> decode -> validate -> key check -> skip replays -> align ──▶ step ──▶ publish
                 └──── refused / late ──▶ dead-letter topic (reason + source in headers)
    every N steps or T seconds, on revoke and on stop:
        flush the producer, store new weights versions, then write the changed rows, the
        evicted rows, the positions, read marks and watermarks in one fenced, atomic store
        operation; then commit offsets to Kafka (lag monitoring only)

The engine's rule: bad input and transient faults cost a dead letter or a delay, never the
process and never a state.

Positions. The position written for a partition is the offset of its oldest event still
buffered in an open step (or the next offset to read when none is buffered): everything
before it has been applied to a state or refused. A restart seeks there. Beside it the
checkpoint keeps the read mark (the next offset read when it was written) and the partition's
watermark as it stood before the position, so that a restart judges every record it reads
again exactly as the first reading did.

Replays and late events. An event whose step is at or before its entity's last applied step,
or whose step had closed (or that its partition's watermark had passed, see aligner.py), can
be two things. Below the restored read mark it is a replay: it was read before the
checkpoint and already applied or refused then, so it is skipped silently. At or above the
read mark it is new, so it is late: dead-lettered with reason `late`. An uninterrupted run,
a backlog replay and a replay after a crash therefore decide alike.

Store outages. A checkpoint that fails is retried with exponential backoff and jitter; the
stream goes on until `checkpoint.max_pending_steps` steps are applied without a checkpoint,
then the partitions are paused (the consumer still polls, so it keeps its group membership)
until the store answers again. New weights versions wait in memory for the next checkpoint;
nothing the step does touches the store. A store that lost what this engine wrote (restarted
empty, or an append-only file that lost its last writes) is detected by the checkpoint
sequence and re-seeded from the engine's memory: new fencing tokens, every resident row, the
current weights version, the positions; the states of entities evicted to the store before
the loss are gone and those entities start afresh when they report again. Both are logged
once and counted.

Recovery policy. A partition without a checkpoint in the store is read from its earliest
retained offset (Kafka's committed offsets are ignored: the store is the source of truth). If
a stored position fell out of Kafka's retention, the consumer resets to the earliest retained
offset and the gap is logged; the states stay as checkpointed and move on from there. A
stored row that cannot be used (corrupt, non-finite) is quarantined: that entity starts
afresh, the row is logged, counted and removed with the next checkpoint.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import random
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
from .errors import (
    EventError,
    FencedError,
    KafkaError,
    Reason,
    StateError,
    StoreLostError,
)
from .events import Event, step_of
from .forecaster import Forecaster, StepResult
from .kafka_io import KafkaIO, Record
from .state.format import pack_arrays, unpack_arrays
from .state.store import Checkpoint, EntityState, LoadedState, StateStore

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


class StoreHealth:
    """Whether the state store answers, and when to try it again.

    Exponential backoff with full jitter between `base_s` and `cap_s`; one log line per change
    of state (up -> down, down -> up), never one per attempt.
    """

    def __init__(
        self,
        base_s: float = 0.2,
        cap_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.up = True
        self.error = ""
        self.failures = 0  # consecutive
        self.down_since: float | None = None
        self._base, self._cap = base_s, cap_s
        self._clock = clock
        self._rng = rng or random.Random()
        self._next_try = 0.0

    def may_try(self) -> bool:
        return self.up or self._clock() >= self._next_try

    def succeeded(self) -> None:
        if not self.up:
            down = self._clock() - (self.down_since or self._clock())
            log.warning("state store answers again after %.1f s of failures", down)
        self.up, self.error, self.failures, self.down_since = True, "", 0, None

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        self.error = str(exc)
        if self.up:
            log.error("state store unreachable, retrying with backoff: %s", exc)
            self.up, self.down_since = False, self._clock()
        delay = min(self._cap, self._base * 2 ** min(self.failures - 1, 16))
        self._next_try = self._clock() + self._rng.uniform(0.5 * delay, delay)


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
    quarantined: int = 0  # stored rows that could not be used; those entities started afresh
    store_resets: int = 0  # the store lost this engine's writes and was re-seeded
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
            "quarantined": self.quarantined,
            "store_resets": self.store_resets,
        }


# What one record became after decoding: the event, or why it was refused.
_Parsed = tuple[Record, Event | None, EventError | None]


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
            self.core.learner.on_update = self._queue_weights
        self._topic = config.kafka.input_topic
        self._interval = config.stream.interval
        self._layout = self.core.layout
        self._tokens: dict[int, int] = {}  # owned and restored partition -> fencing token
        self._seqs: dict[int, int] = {}  # partition -> checkpoint sequence the store holds
        self._pending: set[int] = set()  # assigned, not restored yet (store down): paused
        self._deferred: set[int] = set()  # sought back: a record needed the store: paused
        self._partition_of: dict[str, int] = {}  # entity -> partition it arrives on
        self._next_offset: dict[int, int] = {}  # partition -> next offset to read
        self._buffered: dict[int, dict[int, int]] = {}  # open step -> partition -> min offset
        # The record of every buffered event, to dead-letter it if the step refuses it.
        self._records: dict[int, dict[str, Record]] = {}
        # Below this offset of a partition, old steps are replays (see the module docstring).
        self._replay_until: dict[int, int] = {}
        # (offset, partition watermark after it) of records since the partition's position,
        # and the watermark before them: what a checkpoint stores for an exact re-reading.
        self._wm_log: dict[int, deque[tuple[int, float]]] = {}
        self._wm_base: dict[int, float] = {}
        self._cold_parts: set[int] = set()  # partitions whose store holds evicted rows
        self._unsaved_weights: dict[int, bytes] = {}  # versions not in the store yet
        self._to_remove: list[tuple[int, str]] = []  # quarantined rows to delete
        # Stored resident rows that did not fit at assignment: moved to cold by a checkpoint.
        self._overflow: list[EntityState] = []
        self._room_tried_at: int | None = None  # last closed step when rows were last freed
        # Rows evicted since the current poll's cold lookup (their events may follow in it).
        self._just_evicted: dict[str, EntityState] = {}
        self._health = StoreHealth()
        self._hold = False  # every partition paused: too much work not checkpointed
        self._work_left = False  # steps that could close were left for after the next poll
        self._steps_since_checkpoint = 0
        self._progress_every = progress_every_s
        self._stop = threading.Event()
        self._closing = False
        self._assigned_at = time.monotonic()
        self._latest: dict[str, bytes] = {}  # newest forecast per entity, stored at checkpoints
        # partition -> monotonic time of its last record (idle partitions, see below)
        self._last_record_at: dict[int, float] = {}
        self._last_poll_at = 0.0
        self._live = False
        # The newest step applied and published. The aligner's last closed step can be ahead
        # of it in the middle of a burst; a checkpoint must name what was applied.
        self._last_applied_step: int | None = None
        # Work between two polls is bounded so that max_poll_interval is never exceeded.
        self._budget_s = min(1.0, config.kafka.max_poll_interval_ms / 1000.0 / 10.0)
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
        ended = False
        self.stats.last_checkpoint_at = started
        try:
            while not self._stop.is_set():
                behind = self._work_left  # steps were left for after this poll: a backlog
                records = self.io.poll(0 if behind else None)
                now = self._last_poll_at = time.monotonic()
                # A poll that did not fill up, with no steps left over from the last round,
                # means the engine is keeping pace with the stream. (A poll with timeout 0
                # returns whatever was fetched: short, but the engine is behind.)
                self._live = not behind and len(records) < self.config.kafka.max_poll_records
                if self._pending:
                    self._restore_pending()
                watermark_from = self._watermark_partitions(now)
                if records:
                    last_data = now
                    # Before ingesting too: a step closed while making room mid-poll must
                    # wait for the partitions not read yet.
                    self.core.aligner.set_watermark_partitions(watermark_from)
                    self._ingest(records)
                    watermark_from = self._watermark_partitions(time.monotonic())
                self.core.aligner.set_watermark_partitions(watermark_from)
                self._close_steps(deadline=time.monotonic() + self._budget_s)
                if self.learning_metrics is not None and now - self._fed_at >= 1.0:
                    self._feed_learning_metrics()
                    self._fed_at = now
                if self._checkpoint_due(time.monotonic()):
                    self._checkpoint_in_loop()
                self._sync_pause()
                if now - last_progress >= self._progress_every:
                    rate = (self.stats.consumed - consumed_at_progress) / (now - last_progress)
                    self._log_progress(rate)
                    last_progress, consumed_at_progress = now, self.stats.consumed
                if max_steps is not None and self.stats.steps >= max_steps:
                    log.info("reached %d steps: stopping", max_steps)
                    break
                if self._deferred and self._health.may_try():
                    self._deferred_resume()  # read again; deferred anew if the store is down
                busy = self._work_left or self._pending or self._deferred or self._hold
                if not self._tokens or busy or not self._health.up:
                    last_data = now  # silence only counts once there is nothing left to do
                elif idle_exit_s is not None and now - last_data >= idle_exit_s:
                    log.info("no input for %.1f s: stopping", idle_exit_s)
                    ended = True
                    break
        finally:
            self._shutdown(time.monotonic() - started, end_of_input=ended)
        return self.stats

    def _shutdown(self, elapsed: float, *, end_of_input: bool = False) -> None:
        """Graceful stop: close what can close, checkpoint, commit, leave the group.

        At the end of input (`--idle-exit`: nothing new came, every owned partition read to
        its end) the watermark moves past everything read: every open step closes and its
        forecasts go out. A stop while the stream goes on (SIGTERM, `--max-steps`) closes only
        what the usual rules close, so the restart completes the open step with the events
        still to come instead of finding it closed.
        """
        try:
            self._close_steps()
            if end_of_input and self._tokens and self._input_ended():
                for batch in self.core.aligner.flush():
                    self._apply_and_publish(batch)
            if self._tokens:
                self._final_checkpoint()
        except (StateError, KafkaError) as exc:
            log.error("final checkpoint failed: %s", exc)
        finally:
            self._closing = True  # leaving the group revokes everything; nothing left to save
            self.io.close()
            log.info("stopped after %.1f s: %s", elapsed, self.stats.summary())

    def _input_ended(self) -> bool:
        owned = set(self._tokens)
        if self._pending or self._deferred or not owned:
            return False
        return all(self.io.caught_up(p) for p in owned)

    def _final_checkpoint(self) -> None:
        """Retry a failing store for a while before giving up (the restart replays more)."""
        deadline = time.monotonic() + 30.0
        while True:
            try:
                self.checkpoint()
                return
            except StoreLostError:
                self._reseed()
                return
            except FencedError as exc:
                log.warning("final checkpoint refused: %s", exc)
                return
            except StateError as exc:
                self._health.failed(exc)
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    # ------------------------------------------------------------------ rebalancing

    def _on_assigned(self, partitions: list[int]) -> dict[int, int | None]:
        """Take ownership, load states, return where to seek (None: earliest retained).

        Never raises: a partition whose state cannot be loaded now (store down) stays paused
        and is restored by the loop once the store answers.
        """
        self.stats.rebalances += 1
        self._assigned_at = time.monotonic()
        new = [p for p in partitions if p not in self._tokens and p not in self._pending]
        if not new:
            return {}
        try:
            return self._restore(new)
        except Exception as exc:  # a listener must not raise
            self._health.failed(exc)
            log.error("cannot restore partitions %s now (%s); paused until it can", new, exc)
            self._pending.update(new)
            self.io.pause(new)
            return {}

    def _restore_pending(self) -> None:
        if not self._health.may_try():
            return
        parts = sorted(p for p in self._pending if p in self.io.assigned())
        self._pending.intersection_update(parts)
        if not parts:
            return
        try:
            seeks = self._restore(parts)
        except Exception as exc:  # keep consuming the partitions we have
            self._health.failed(exc)
            return
        self._health.succeeded()
        self._pending.difference_update(parts)
        for p, pos in seeks.items():
            self.io.seek(p, pos)
        self.io.resume(parts)

    def _restore(self, new: list[int]) -> dict[int, int | None]:
        tokens = self.store.acquire(self._topic, new)
        loaded = self.store.load(self._topic, new, self._layout)
        if loaded.weights_version and loaded.weights_version != self.weights_version:
            self._load_weights(loaded.weights_version)
        self._tokens.update(tokens)
        self._seqs.update({p: loaded.seqs.get(p, 0) for p in new})
        try:
            restored = self._restore_entities(loaded)
            self._restore_extra(loaded, restored)
        except Exception:
            self._release(new)  # all of it or nothing: retried from scratch
            raise
        self._quarantine(loaded.quarantined)
        if (
            loaded.steps
            and self.core.aligner.last_closed_step is None
            and set(loaded.steps) >= set(new)
        ):
            self.core.aligner.resume_after(min(loaded.steps.values()))
        for p in new:
            self._replay_until[p] = loaded.read_marks.get(p, 0)
            wm = loaded.watermarks.get(p)
            self._wm_base[p] = -math.inf if wm is None else wm
            self._wm_log[p] = deque()
            if wm is not None:
                self.core.aligner.observe_time(p, wm)
            if loaded.cold.get(p, 0) > 0:
                self._cold_parts.add(p)
            if p in loaded.positions:
                self._next_offset[p] = loaded.positions[p]
        log.info(
            "assigned partitions %s: %d entities restored, positions %s",
            new,
            len(loaded.entities),
            {p: loaded.positions.get(p) for p in new},
        )
        return {p: loaded.positions.get(p) for p in new}

    def _restore_entities(self, loaded: LoadedState) -> list[int]:
        if not loaded.entities:
            return []
        room = self.core.registry.max_entities - len(self.core.registry)
        entities = loaded.entities
        if len(entities) > room:
            # More resident rows than rows left (another engine held these partitions with a
            # larger cap): the least recently active ones become cold rows in the store.
            ranked = sorted(entities, key=lambda e: e.last_step, reverse=True)
            entities, rest = ranked[:room], ranked[room:]
            self._overflow += rest
            self._cold_parts.update(e.partition for e in rest)
            log.warning(
                "%d stored entities exceed capacity.max_entities; %d restored, the rest on "
                "their next event",
                len(loaded.entities),
                len(entities),
            )
        names = [e.entity for e in entities]
        rows = np.stack([e.row for e in entities])
        steps = np.array([e.last_step for e in entities], dtype=np.int64)
        hints = [e.slot for e in entities]
        slots = self.core.restore_rows(names, rows, steps, hints)
        for e in entities:
            self._partition_of[e.entity] = e.partition
        return [s for s, h in zip(slots, hints, strict=True) if s == h]

    def _restore_extra(self, loaded: LoadedState, same_slots: list[int]) -> None:
        """The learner's window and the prequential scores (engine-wide, by batch row)."""
        if loaded.extra is None:
            return
        learner_blob, preq = _split_extra(loaded.extra)
        if learner_blob is not None and self.core.learner is not None:
            # The learner's window is indexed by row: entities went back to their rows above.
            self.core.learner.import_state(learner_blob)
        if preq:
            slots = np.asarray(same_slots, np.int64)
            self.core.prequential.import_rows(preq, slots)
            self.core.combiner.import_rows(preq, slots)

    def _quarantine(self, rows: list[tuple[int, str, str]]) -> None:
        for partition, entity, why in rows:
            log.error(
                'stored state of entity "%s" (partition %d) is unusable and was quarantined: '
                "the entity starts afresh (%s)",
                entity,
                partition,
                why,
            )
            self._to_remove.append((partition, entity))
        self.stats.quarantined += len(rows)

    @property
    def assigned_partitions(self) -> list[int]:
        return sorted(self._tokens)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set() or self._closing

    @property
    def store_up(self) -> bool:
        return self._health.up

    @property
    def not_ready_reason(self) -> str | None:
        """Why the engine is not ready (None when it is)."""
        if not self._tokens and not self._pending:
            return "no partitions assigned (joining the group, or every partition is owned)"
        if not self._health.up:
            return f"state store unreachable: {self._health.error}"
        if self._pending:
            return f"restoring partitions {sorted(self._pending)}"
        if time.monotonic() - self._last_poll_at >= 5.0:
            return "the loop has not polled for 5 s"
        return None

    @property
    def ready(self) -> bool:
        """Partitions assigned and restored, the store answering, and the loop polled within
        the last few seconds."""
        return self.not_ready_reason is None

    @property
    def weights_version(self) -> int:
        """The weights version forecasts and states are computed with (0: initial weights)."""
        return self.core.weights_version

    def _queue_weights(self, version: int) -> None:
        """A new weights version: kept in memory, stored before a checkpoint can name it.

        Runs inside the step, so it must not touch the store: a store outage there would
        leave the model advanced and the checkpoint behind it.
        """
        learner = self.core.learner
        if learner is not None:
            self._unsaved_weights[version] = learner.export_weights()

    def _store_weights(self) -> None:
        keep = self.config.learn.keep_versions
        for version in sorted(self._unsaved_weights):
            self.store.put_weights(version, self._unsaved_weights[version], keep)
            del self._unsaved_weights[version]
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
        self.core.remove_entities(gone)
        for e in gone:
            del self._partition_of[e]
        for p in partitions:
            self._tokens.pop(p, None)
            self._seqs.pop(p, None)
            self._next_offset.pop(p, None)
            self._replay_until.pop(p, None)
            self._wm_log.pop(p, None)
            self._wm_base.pop(p, None)
            self._cold_parts.discard(p)
            self._deferred.discard(p)
            self.core.aligner.forget_partition(p)
        self._to_remove = [(p, e) for p, e in self._to_remove if p not in partitions]
        self._overflow = [e for e in self._overflow if e.partition not in partitions]
        for step, offsets in list(self._buffered.items()):
            for p in partitions:
                offsets.pop(p, None)
            if not offsets:
                del self._buffered[step]
        for step, recs in list(self._records.items()):
            for e in gone & recs.keys():
                del recs[e]
            if not recs:
                del self._records[step]
        return gone

    def _on_revoked(self, partitions: list[int]) -> None:
        self._pending.difference_update(partitions)
        mine = [p for p in partitions if p in self._tokens]
        if not mine or self._closing:
            return
        try:
            self.checkpoint()
        except FencedError as exc:
            log.warning("revoked partitions were already taken over: %s", exc)
        except (StateError, KafkaError) as exc:
            log.error("checkpoint on revoke failed, the new owner replays more: %s", exc)
        except Exception:  # a listener must not raise
            log.exception("checkpoint on revoke failed")
        gone = self._release(mine)
        log.info("revoked partitions %s: %d entities released", mine, len(gone))

    # ------------------------------------------------------------------ the hot path

    def _parse(self, records: list[Record]) -> list[_Parsed]:
        parse = self.core.parser.parse
        decode = decode_event
        enc = self.config.kafka.encoding
        limit = self.config.kafka.max_message_bytes
        out: list[_Parsed] = []
        for rec in records:
            try:
                event = parse(decode(rec.value, enc, limit))
                if rec.key is None or rec.key != _utf8(event.entity):
                    shown = "no key" if rec.key is None else f"key {rec.key[:80]!r}"
                    raise EventError(
                        Reason.KEY_MISMATCH,
                        f'entity "{event.entity}" arrived with {shown}: the key must be the '
                        "UTF-8 entity id",
                        event.entity,
                    )
            except EventError as exc:
                out.append((rec, None, exc))
                continue
            out.append((rec, event, None))
        return out

    def _fetch_cold(self, parsed: list[_Parsed]) -> dict[str, EntityState]:
        """Stored rows of evicted entities reporting in this poll (one call per partition).

        A partition whose lookup fails (store down) is sought back to its first record here
        and paused: its records wait for the store rather than start from a blank state.
        """
        registry = self.core.registry
        wanted: dict[int, dict[str, int]] = {}
        for rec, event, _ in parsed:
            p = rec.partition
            if event is None or p not in self._cold_parts or event.entity in registry:
                continue
            wanted.setdefault(p, {}).setdefault(event.entity, rec.offset)
        found: dict[str, EntityState] = {}
        for p, names in wanted.items():
            try:
                rows, bad = self.store.load_cold(self._topic, p, list(names), self._layout)
            except StateError as exc:
                self._health.failed(exc)
                first = min(r.offset for r, _, _ in parsed if r.partition == p)
                self._defer(p, first)
                continue
            self._health.succeeded()
            found.update(rows)
            self._quarantine(bad)
        return found

    def _defer(self, partition: int, offset: int) -> None:
        self.io.seek(partition, offset)
        self._next_offset[partition] = offset
        self._deferred.add(partition)
        self.io.pause([partition])

    def _ingest(self, records: list[Record]) -> None:
        core = self.core
        aligner = core.aligner
        stats = self.stats
        now = time.monotonic()
        parsed = self._parse(records)
        self._just_evicted.clear()  # the lookup below sees everything evicted before now
        cold = self._fetch_cold(parsed) if self._cold_parts else {}
        deferred = self._deferred
        for rec, event, error in parsed:
            p = rec.partition
            if p in deferred:
                continue  # sought back; read again once the store answers
            self._last_record_at[p] = now
            stats.consumed += 1
            self._next_offset[p] = rec.offset + 1
            if p not in self._tokens:
                continue  # fetched before a revoke; the new owner reads it
            if event is None:
                assert error is not None
                self._dead_letter(rec, error.reason, str(error))
                continue
            entity = event.entity
            try:
                try:
                    if entity in self._just_evicted:  # evicted by a checkpoint in this batch
                        cold[entity] = self._just_evicted.pop(entity)
                    if entity in cold:
                        self._bring_back(cold[entity])
                        del cold[entity]
                    status = core.ingest(event, p)
                except EventError as exc:
                    if exc.reason is not Reason.CAPACITY or not self._make_room(rec):
                        raise
                    if entity in self._just_evicted:
                        cold[entity] = self._just_evicted.pop(entity)
                    if entity in cold:
                        self._bring_back(cold.pop(entity))
                    status = core.ingest(event, p)
            except EventError as exc:
                self._log_watermark(p, rec.offset)  # a refused event's time still counts
                self._dead_letter(rec, exc.reason, str(exc))
                continue
            if status is AddStatus.LATE or status is AddStatus.REPLAYED:
                if rec.offset < self._replay_until.get(p, 0):
                    stats.replayed += 1  # read before the checkpoint we resumed from
                    if status is AddStatus.REPLAYED:
                        aligner.observe_time(p, event.ts)
                        self._log_watermark(p, rec.offset)
                    continue
                stats.late += 1
                why = "its step closed" if status is AddStatus.LATE else "its step was applied"
                self._dead_letter(rec, Reason.LATE, f'entity "{entity}": {why}')
                continue
            self._log_watermark(p, rec.offset)
            if status is AddStatus.DUPLICATE:
                stats.duplicates += 1
                continue
            if status is AddStatus.REPLACED:
                stats.duplicates += 1
            stats.applied += 1
            self._partition_of[entity] = p
            step = step_of(event.ts, self._interval)
            self._records.setdefault(step, {})[entity] = rec
            offsets = self._buffered.setdefault(step, {})
            if p not in offsets:
                offsets[p] = rec.offset

    def _make_room(self, rec: Record) -> bool:
        """Every row is taken: bring the next checkpoint forward if it can evict someone.

        At most once per closed step (entities only become idle as steps close), so a flood of
        new ids costs dead letters, not a checkpoint each. Returns True if a row was freed.
        """
        if self.config.capacity.evict_idle_steps <= 0 or not self._health.up:
            return False
        # Close what can close first (more entities may be idle after it). Which events a
        # step takes depends on the partitions' order alone, so when steps close does not.
        self._close_steps()
        step = self.core.aligner.last_closed_step
        if step is None or step == self._room_tried_at:
            return False
        self._room_tried_at = step
        if not self._idle_entities():
            return False
        p = rec.partition
        self._next_offset[p] = rec.offset  # this record is not handled yet
        try:
            self.checkpoint()
        except (StateError, KafkaError) as exc:
            self._health.failed(exc)
            return False
        finally:
            self._next_offset[p] = rec.offset + 1
        return len(self.core.registry) < self.core.registry.max_entities

    def _log_watermark(self, partition: int, offset: int) -> None:
        wm = self.core.aligner.partition_max_ts(partition)
        log_ = self._wm_log.get(partition)
        if log_ is None:
            return
        if not log_ or log_[-1][1] != wm:
            log_.append((offset, wm))

    def _watermark_before(self, partition: int, position: int) -> float | None:
        """The partition's watermark from the records before `position` (drops older log)."""
        log_ = self._wm_log.get(partition)
        if log_ is None:
            return None
        base = self._wm_base.get(partition, -math.inf)
        while log_ and log_[0][0] < position:
            base = log_.popleft()[1]
        self._wm_base[partition] = base
        return base if base > -math.inf else None

    def _bring_back(self, stored: EntityState) -> None:
        """An evicted entity reported again: restore its stored state before its event."""
        entity = stored.entity
        if len(self.core.registry) >= self.core.registry.max_entities:
            raise EventError(
                Reason.CAPACITY,
                f'entity "{entity}" cannot come back: all '
                f"{self.core.registry.max_entities} rows are taken",
                entity,
            )
        self.core.restore_rows(
            [entity], stored.row[None, :], np.array([stored.last_step], dtype=np.int64)
        )
        self._partition_of[entity] = stored.partition
        self.stats.restored_after_eviction += 1

    def quality_report(self) -> bytes:
        """Prequential scores (recent and cumulative) and learner counters, as JSON."""
        report: dict[str, Any] = {
            "weights_version": self.weights_version,
            "step": self._last_applied_step,
            "recent": self.core.prequential.summary("recent"),
            "total": self.core.prequential.summary("total"),
            # The published combination: the model's mean weight, interval coverage.
            "combination": self.core.combiner.summary(),
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

    def _watermark_partitions(self, now: float) -> set[int]:
        """Partitions that hold the watermark back: all assigned ones except idle partitions.

        A partition is idle when it is caught up and delivered nothing for
        `stream.idle_partition_timeout` seconds (Flink's idleness): without this rule one
        silent partition would stop every step from closing by watermark; with it, a partition
        that is merely quiet for a moment still holds the watermark, so events of one step
        spread over several partitions are not made late by the fastest partition. A paused
        partition (waiting for the store) always holds it.
        """
        idle_after = self.config.stream.idle_partition_timeout
        waiting = self._pending | self._deferred
        active = set()
        for p in self.io.assigned():
            last = self._last_record_at.get(p, self._assigned_at)
            if p in waiting or now - last < idle_after or not self.io.caught_up(p):
                active.add(p)
        return active

    def _close_steps(self, deadline: float | None = None) -> None:
        """Close what can close; stop at `deadline` (the rest waits for the next poll)."""
        every = self.config.checkpoint.every_steps
        aligner = self.core.aligner
        self._work_left = False
        while not self._hold:  # held: the store is down and enough is not checkpointed
            batches = aligner.close_ready(limit=1)
            if not batches:
                return
            self._apply_and_publish(batches[0])
            # A backlog can close hundreds of steps in one burst: checkpoint inside it, so
            # that every_steps also bounds what a crash makes the engine replay.
            if self._tokens and self._steps_since_checkpoint >= every and deadline is not None:
                self._checkpoint_in_loop()
            if deadline is not None and time.monotonic() >= deadline:
                self._work_left = True
                return

    def _apply_and_publish(self, batch: Any) -> None:
        closed_at = time.perf_counter()
        result = self.core.apply(batch)
        self.stats.step_ms.append((time.perf_counter() - closed_at) * 1e3)
        self._buffered.pop(result.step, None)
        records = self._records.pop(result.step, {})
        self._last_applied_step = result.step
        rejected = result.rejected
        if rejected.any():
            for j in np.flatnonzero(rejected):
                entity = result.entities[j]
                rec = records.get(entity)
                if rec is not None:
                    self._dead_letter(
                        rec,
                        Reason.NON_FINITE_STATE,
                        f'entity "{entity}": step {result.step} would make its state or '
                        "forecast non-finite; its state was kept",
                    )
        self._publish(result, closed_at)
        if self._live:
            # Keeping pace with a live stream: wait for this step's acknowledgements now.
            # Left to kafka-python's I/O thread, they queue behind the engine thread for
            # the GIL while it publishes the next step or ingests (live p99 step-close ->
            # ack 70 ms; flushed per step: ~35 ms). A backlog is drained without waiting.
            self.io.flush()

    def _checkpoint_in_loop(self) -> None:
        """A periodic checkpoint: failures are counted and retried with backoff, the stream
        goes on (up to checkpoint.max_pending_steps, then it pauses until the store is back)."""
        if not self._health.may_try():
            return
        try:
            self.checkpoint()
        except FencedError as exc:
            # Another engine owns the partition now (our session lapsed): stop touching it.
            log.warning("%s; releasing partition %d", exc, exc.partition)
            self._release([exc.partition])
        except StoreLostError as exc:
            log.error("%s", exc)
            self._reseed()
        except StateError as exc:
            self._health.failed(exc)
        except KafkaError as exc:
            log.warning("checkpoint postponed: %s", exc)
        else:
            self._health.succeeded()
            self._deferred_resume()

    def _deferred_resume(self) -> None:
        if self._deferred:
            parts = sorted(self._deferred)
            self._deferred.clear()
            self.io.resume(parts)

    def _reseed(self) -> None:
        """The store lost this engine's writes: write everything it holds, with new tokens.

        The one documented policy for a store that came back empty or behind: the engine's
        memory is a consistent snapshot (rows, positions, weights of one moment), so it is
        written whole; what lived only in the store (evicted entities' rows) is gone.
        """
        self.stats.store_resets += 1
        owned = sorted(self._tokens)
        try:
            self._tokens.update(self.store.acquire(self._topic, owned))
            self._seqs.update(self.store.sequences(self._topic, owned))
            learner = self.core.learner
            if learner is not None and learner.version > 0:
                self._unsaved_weights[learner.version] = learner.export_weights()
            self.core.mark_dirty([s for _, s in self.core.registry.items()])
            self.checkpoint()
        except StateError as exc:
            self._health.failed(exc)
            log.error("re-seeding the store failed, retried at the next checkpoint: %s", exc)
            return
        self._health.succeeded()
        self._deferred_resume()
        log.error(
            "the store had lost this engine's checkpoints (restarted empty or behind): "
            "re-seeded from memory with %d entities; states evicted to the store before the "
            "loss are gone and those entities start afresh",
            len(self.core.registry),
        )

    def _sync_pause(self) -> None:
        """Pause what must wait: partitions not restored or sought back, and everything while
        the store is down and `checkpoint.max_pending_steps` steps are not checkpointed."""
        limit = self.config.checkpoint.max_pending_steps
        hold = not self._health.up and self._steps_since_checkpoint >= limit
        if hold != self._hold:
            self._hold = hold
            if hold:
                log.error(
                    "%d steps not checkpointed while the store is down: partitions paused "
                    "until it answers",
                    self._steps_since_checkpoint,
                )
            else:
                log.warning("checkpoint written: partitions resumed")
        owned = set(self.io.assigned())
        want = owned if self._hold else (self._pending | self._deferred) & owned
        paused = self.io.paused()
        if want - paused:
            self.io.pause(want - paused)
        if paused - want:
            self.io.resume(paused - want)

    def _publish(self, result: StepResult, closed_at: float) -> None:
        self.stats.steps += 1
        self._steps_since_checkpoint += 1
        latest = {}
        version = self.weights_version
        future = None
        levels = result.intervals
        for j, entity in enumerate(result.entities):
            if not result.valid[j]:
                continue
            lower, upper = result.lower[j], result.upper[j]  # [H, L]
            value = encode_forecast(
                entity,
                result.step,
                float(result.ts[j]),
                result.published[j].tolist(),
                result.levels[j].tolist(),
                version,
                model_forecast=result.forecasts[j].tolist(),
                model_weight=result.weights[j].tolist(),
                intervals=[
                    (c, lower[:, i].tolist(), upper[:, i].tolist()) for i, c in enumerate(levels)
                ],
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
                (self._steps_since_checkpoint > 0 or bool(self._to_remove))
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

    def _extra(self) -> bytes:
        arrays = self.core.prequential.export_arrays() | self.core.combiner.export_arrays()
        if self.core.learner is not None:
            arrays["learner"] = np.frombuffer(self.core.learner.export_state(), np.uint8)
        return pack_arrays(arrays)

    def checkpoint(self) -> None:
        """Flush outputs, store new weights, then write rows + positions atomically (fenced).

        Idle entities are evicted by the same write (their rows move to the store's cold
        rows) and leave memory only once it succeeded.
        """
        t0 = time.perf_counter()
        self.io.flush()  # forecasts of every applied step are acknowledged first
        try:
            self._store_weights()  # before any checkpoint can name them
        except StateError:
            self.stats.checkpoint_failures += 1
            raise
        slots = self.core.take_dirty()
        idle = self._idle_entities()
        idle_slots = [s for e in idle if (s := self.core.registry.slot_of(e)) is not None]
        evict_set = set(idle_slots)
        names, rows, steps = self.core.export_rows(slots)
        entities = [
            EntityState(name, self._partition_of[name], int(steps[i]), rows[i], slots[i])
            for i, name in enumerate(names)
            if name in self._partition_of and slots[i] not in evict_set
        ]
        evicted: list[EntityState] = []
        if idle_slots:
            e_names, e_rows, e_steps = self.core.export_rows(idle_slots)
            evicted = [
                EntityState(n, self._partition_of[n], int(e_steps[i]), e_rows[i], idle_slots[i])
                for i, n in enumerate(e_names)
            ]
        positions = {p: pos for p in self._tokens if (pos := self.position(p)) is not None}
        watermarks = {}
        for p, pos in positions.items():
            wm = self._watermark_before(p, pos)
            if wm is not None:
                watermarks[p] = wm
        # A quarantined entity that reported again is written afresh, not deleted.
        to_remove = list(self._to_remove)
        written = {e.entity for e in entities}
        removed = [(p, e) for p, e in to_remove if e not in written]
        evicted += self._overflow
        overflow = len(self._overflow)
        cp = Checkpoint(
            topic=self._topic,
            positions=positions,
            entities=entities,
            removed=removed,
            step=self._last_applied_step
            if self._last_applied_step is not None
            else self.core.aligner.last_closed_step,
            weights_version=self.weights_version,
            extra=self._extra(),
            read_marks={p: self._next_offset[p] for p in positions if p in self._next_offset},
            watermarks=watermarks,
            evicted=evicted,
            seqs={p: self._seqs.get(p, 0) for p in self._tokens},
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
        for p in cp.partitions:
            self._seqs[p] = self._seqs.get(p, 0) + 1
        del self._to_remove[: len(to_remove)]
        del self._overflow[:overflow]
        evicted = evicted[: len(evicted) - overflow]
        ms = (time.perf_counter() - t0) * 1e3
        self.stats.checkpoints += 1
        self.stats.checkpoint_ms.append(ms)
        self.stats.checkpoint_bytes.append(nbytes)
        self.stats.last_checkpoint_at = time.monotonic()
        self._steps_since_checkpoint = 0
        if evicted:
            self._evict([e.entity for e in evicted])
            self._just_evicted.update((e.entity, e) for e in evicted)
        try:
            self.store.put_latest(self._latest)
            self._latest = {}
            self.store.put_quality(self.quality_report())
        except StateError as exc:
            log.warning("latest forecasts not stored (retried at the next checkpoint): %s", exc)
        self.io.commit_offsets(positions)
        log.debug("checkpoint: %d entities, %d bytes, %.1f ms", len(entities), nbytes, ms)

    def _idle_entities(self) -> set[str]:
        idle_steps = self.config.capacity.evict_idle_steps
        if idle_steps <= 0:
            return set()
        idle = self.core.idle_entities(idle_steps, include_dirty=True)
        return {e for e in idle if e in self._partition_of}

    def _evict(self, entities: list[str]) -> None:
        """Free the rows of idle entities; their state is in the store's cold rows now."""
        for entity in entities:
            self._cold_parts.add(self._partition_of.pop(entity))
        self.core.remove_entities(set(entities))
        self.stats.evicted += len(entities)
        log.debug("evicted %d idle entities", len(entities))

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


def _utf8(text: str) -> bytes | None:
    """`text` in UTF-8; None for a string that has none (a lone surrogate)."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        return None


def _split_extra(blob: bytes) -> tuple[bytes | None, dict[str, np.ndarray]]:
    """(learner state, prequential arrays) of a checkpoint's engine-wide state.

    Checkpoints written before the prequential scores were kept hold the learner's state
    directly; they are read as such.
    """
    try:
        arrays = unpack_arrays(blob)
    except StateError:
        return blob, {}
    if "preq_batches" not in arrays and "learner" not in arrays:
        return blob, {}  # an older checkpoint: the learner's state alone
    learner = arrays.pop("learner", None)
    return (learner.tobytes() if learner is not None else None), arrays
