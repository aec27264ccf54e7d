"""Online learning: truncated BPTT on the most recent window, burn-in, guard rails.

Every `update_every` batches the learner trains on the last `window` batches of every entity
at once, starting from the (h, c) each row had at the window's start (stored when that batch
closed, not zeros). The loss covers only realised targets: the forecast made at batch j for
horizon k counts only if batch j+k is in the window and the entity reported in both j and
j+k (delayed labels). Targets are normalised with the statistics the forecast used. An
update takes `epochs` Adam steps over its window (one weights version). With `early_updates`
the first updates come before the window has filled: it starts at the first batch, from the
zero initial states.

Rows train in a canonical order: only the rows that advanced in the window, sorted by their
entity (`_rows`). Which slot an entity occupies depends on arrival order, which a restart, a
rebalance or another poll timing changes; float sums over rows in slot order then differ in
the last bits, and learning amplifies that (weights 3e-6 apart after 300 steps at the
default settings, measured). In entity order the sums, and so the weights, are the same.

After an accepted update the window is replayed with the new weights from the stored start
states and the live (h, c) are replaced by the result ("burn-in", as R2D2 found stale
recurrent state hurts after updates); `refresh_states = false` keeps the old states instead.

Guard rails: an update with a non-finite loss or gradient, or whose training call fails in
TensorFlow (out of device memory, say), is discarded (weights untouched);
gradients are clipped by norm; and for `shadow_steps` batches after an update the previous
weights keep running in a shadow copy on the same inputs: if the new weights' one-step error
is more than `rollback_threshold` worse, the weights, optimizer and live states roll back to
the shadow's (which are exactly what the old weights would have produced).

The learner works in batches (closed steps): horizons and windows count batches.

Drift detection (`learn.drift_detection`, off by default): a Page-Hinkley test watches
x = log(SE_model / SE_naive), the pooled one-step squared error of each batch over the naive
forecast's (scale-free, so volatility clusters move it little; a regime shift raises it).
On an alarm the next `drift_updates` updates run at `drift_boost` x the learning rate and,
with `drift_reset_moments`, Adam's moments restart; the test then starts afresh.

The window lives where the model runs (`model.WindowRing`, written by the step itself), as do
the stored window-start states; an update reads, trains, applies and replays there, so the
host only sees three scalars per update and the window crosses only in checkpoints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from .config import Config, LearnConfig
from .errors import ModelError, StateError
from .model import StatefulLSTM, StepOutput, WindowRing, window_kernel
from .state.format import pack_arrays, unpack_arrays

log = logging.getLogger(__name__)


@dataclass
class LearnStats:
    updates: int = 0
    discarded: int = 0  # non-finite loss or gradients
    rollbacks: int = 0
    last_loss: float = float("nan")
    update_ms: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    drift_alarms: list[int] = field(default_factory=list)  # batch counts of the alarms


@dataclass
class _Shadow:
    model: StatefulLSTM
    old_weights: list[np.ndarray]
    old_optimizer: list[np.ndarray]
    old_version: int
    remaining: int
    se_new: float = 0.0
    se_old: float = 0.0
    n: int = 0
    prev_new: np.ndarray | None = None
    prev_old: np.ndarray | None = None
    prev_valid: np.ndarray | None = None


@dataclass
class _Drift:
    """Page-Hinkley state on x = log(SE_model / SE_naive), one x per batch."""

    n: int = 0  # batches since the start or the last alarm
    mean: float = 0.0
    cum: float = 0.0
    low: float = 0.0
    boost_left: int = 0  # updates still to run at the boosted learning rate
    prev_forecast: np.ndarray | None = None
    prev_target: np.ndarray | None = None
    prev_valid: np.ndarray | None = None

    def restart(self) -> None:
        self.n, self.mean, self.cum, self.low = 0, 0.0, 0.0, 0.0


def _fit_rows(a: np.ndarray, rows: int, axis: int = 0, fill: float = 0.0) -> np.ndarray:
    """`a` with exactly `rows` entries along `axis`: cut, or padded with `fill`."""
    n = a.shape[axis]
    if n >= rows:
        return np.take(a, np.arange(rows), axis=axis)
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, rows - n)
    return np.pad(a, pad, constant_values=fill)


class OnlineLearner:
    def __init__(self, model: StatefulLSTM, config: Config) -> None:
        self.model = model
        self.config = config
        self.cfg: LearnConfig = config.learn
        self.stats = LearnStats()
        self.version = 0
        self.batches = 0  # batches observed since the start (persisted with checkpoints)
        if model.window is None:
            raise ModelError("online learning needs a model built with its window")
        if model.window.window != self.cfg.window:
            raise ModelError(f"model window {model.window.window} != {self.cfg.window} steps")
        # Window-start states: batch count -> [(h, c)] per layer, taken after that batch; kept
        # where the model runs (device tensors), like the window itself.
        self._snapshots: dict[int, list[tuple[tf.Tensor, tf.Tensor]]] = {}
        self.optimizer = keras.optimizers.Adam(
            learning_rate=self.cfg.learning_rate, clipnorm=self.cfg.clipnorm
        )
        self.optimizer.build(model.weights)
        self._trace()
        self.window_kernel: str | None = None  # "cudnn" or "generic", known after one update
        self._shadow: _Shadow | None = None
        self._shadow_model: StatefulLSTM | None = None  # reused: building one compiles a step
        self.on_update: Any = None  # callback(version, weights) after an accepted update
        self._drift = _Drift()
        self._naive_is_last = config.stream.target_transform == "none"
        self._clip = float(config.model.clip)
        # (entity, slot) of the rows in use (the Forecaster's registry): the canonical order
        # of rows in training (`_rows`). None: slot order.
        self.row_keys: Callable[[], Iterable[tuple[str, int]]] | None = None

    # ------------------------------------------------------------------ bookkeeping

    @property
    def shadow_active(self) -> bool:
        return self._shadow is not None

    @property
    def window(self) -> WindowRing:
        assert self.model.window is not None  # checked in __init__
        return self.model.window

    def _trace(self) -> None:
        """(Re)build the graph functions: they capture the window's variables, which a growth
        replaces, so each capacity gets its own."""
        self._capacity = self.model.capacity
        self._update_fn = tf.function(self._update_graph, reduce_retracing=True)
        self._refresh_fn = tf.function(self._refresh_graph, reduce_retracing=True)
        self._window_fn = tf.function(self._window_graph)

    def grow(self, capacity: int) -> None:
        """After the model grew: pad the stored start states and retrace for the new size."""
        if capacity <= self._capacity:
            return
        pad = capacity - self._capacity
        for snap in self._snapshots.values():
            for i, (h, c) in enumerate(snap):
                snap[i] = (tf.pad(h, ((0, pad), (0, 0))), tf.pad(c, ((0, pad), (0, 0))))
        if self._shadow_model is not None:
            self._shadow_model.grow(capacity)
        d = self._drift
        if d.prev_valid is not None and d.prev_forecast is not None and d.prev_target is not None:
            d.prev_forecast = _fit_rows(d.prev_forecast, capacity)
            d.prev_target = _fit_rows(d.prev_target, capacity)
            d.prev_valid = _fit_rows(d.prev_valid, capacity).astype(bool)
        self._trace()

    def forget_rows(self, slots: list[int] | np.ndarray) -> None:
        """A slot changed hands: its window history and stored start states are void."""
        idx = np.asarray(slots, dtype=np.int64)
        self.window.forget(idx)
        keep_np = np.ones((self.model.capacity, 1), bool)
        keep_np[idx] = False
        keep = tf.constant(keep_np)
        for snap in self._snapshots.values():
            for i, (h, c) in enumerate(snap):
                snap[i] = (tf.where(keep, h, 0.0), tf.where(keep, c, 0.0))
        if self._shadow is not None:
            self._shadow.model.reset_rows(idx)
        if self._drift.prev_valid is not None:
            self._drift.prev_valid[idx] = False

    def export_weights(self) -> bytes:
        """This version's weights and optimizer state as one blob (state/format.py)."""
        arrays = {f"w{i}": w for i, w in enumerate(self.model.get_weights())}
        arrays |= {f"opt{i}": np.asarray(v.numpy()) for i, v in enumerate(self.optimizer.variables)}
        return pack_arrays(arrays)

    def import_weights(self, blob: bytes, version: int) -> None:
        arrays = unpack_arrays(blob)
        n_w = len(self.model.weights)
        n_o = len(self.optimizer.variables)
        if set(arrays) != {f"w{i}" for i in range(n_w)} | {f"opt{i}" for i in range(n_o)}:
            raise StateError(f"weights version {version} does not fit this model")
        self.model.set_weights([arrays[f"w{i}"] for i in range(n_w)])
        for i, var in enumerate(self.optimizer.variables):
            if tuple(var.shape) != arrays[f"opt{i}"].shape:
                raise StateError(f"weights version {version}: optimizer state does not fit")
            var.assign(arrays[f"opt{i}"])
        self.version = version

    def export_state(self) -> bytes:
        """Everything an exact resume needs besides weights: window, start states, shadow."""
        a: dict[str, np.ndarray] = {
            **self.window.numpy(),
            "counters": np.array(
                [
                    self.batches,
                    self.version,
                    self.stats.updates,
                    self.stats.discarded,
                    self.stats.rollbacks,
                ],
                np.int64,
            ),
            "snapshot_keys": np.array(sorted(self._snapshots), np.int64),
        }
        for key, snap in self._snapshots.items():
            for i, (h, c) in enumerate(snap):
                a[f"snap{key}_h{i}"], a[f"snap{key}_c{i}"] = np.asarray(h), np.asarray(c)
        sh = self._shadow
        if sh is not None:
            a["shadow_counters"] = np.array([sh.old_version, sh.remaining, sh.n], np.int64)
            a["shadow_se"] = np.array([sh.se_new, sh.se_old], np.float64).view(np.int64)
            for i, w in enumerate(sh.old_weights):
                a[f"shadow_w{i}"] = w
            for i, o in enumerate(sh.old_optimizer):
                a[f"shadow_opt{i}"] = o
            for name, v in sh.model.bank.numpy().items():
                a[f"shadow_bank_{name}"] = v
            if sh.prev_valid is not None and sh.prev_new is not None and sh.prev_old is not None:
                a["shadow_prev"] = np.stack([sh.prev_new, sh.prev_old]).view(np.int64)
                a["shadow_prev_valid"] = sh.prev_valid
        if self.cfg.drift_detection:
            d = self._drift
            a["drift_counters"] = np.array([d.n, d.boost_left], np.int64)
            a["drift_sums"] = np.array([d.mean, d.cum, d.low], np.float64).view(np.int64)
            if d.prev_valid is not None and d.prev_forecast is not None:
                assert d.prev_target is not None
                a["drift_prev"] = np.stack([d.prev_forecast, d.prev_target]).view(np.int64)
                a["drift_prev_valid"] = d.prev_valid
        return pack_arrays(a)

    def import_state(self, blob: bytes) -> None:
        """Resume from `export_state`. Rows are fitted to the model's capacity: rows beyond it
        hold no restored entity (restore_rows ran first), missing ones have no history."""
        a = unpack_arrays(blob)
        try:
            w, f = self.cfg.window, self.model.n_features
            if a["inputs"].shape[::2] != (w, f):
                raise StateError(
                    f"learner window {a['inputs'].shape} does not fit ({w}, rows, {f})"
                )
            cap = self.model.capacity
            if a["inputs"].shape[1] > cap and a["valid"][:, cap:].any():
                log.warning("learner window rows beyond capacity %d dropped", cap)
            c = a["counters"]
            self.batches, self.version = int(c[0]), int(c[1])
            self.window.load(
                {
                    name: _fit_rows(a[name], cap, axis=1, fill=1.0 if name == "std" else 0.0)
                    for name in WindowRing.FIELDS
                },
                self.batches,
            )
            self.stats.updates, self.stats.discarded, self.stats.rollbacks = map(int, c[2:5])
            layers = len(self.model.lstm_layers)
            self._snapshots = {
                int(k): [
                    (
                        tf.constant(_fit_rows(a[f"snap{k}_h{i}"], cap)),
                        tf.constant(_fit_rows(a[f"snap{k}_c{i}"], cap)),
                    )
                    for i in range(layers)
                ]
                for k in a["snapshot_keys"]
            }
            self._shadow = None
            if "shadow_counters" in a:
                sc = a["shadow_counters"]
                n_w = len(self.model.weights)
                n_o = len(self.optimizer.variables)
                old_w = [a[f"shadow_w{i}"].copy() for i in range(n_w)]
                old_o = [a[f"shadow_opt{i}"].copy() for i in range(n_o)]
                shadow = self._shadow_or_new()
                shadow.set_weights(old_w)
                for name, var in shadow.bank.vars.items():
                    var.assign(_fit_rows(a[f"shadow_bank_{name}"], cap))
                se = a["shadow_se"].view(np.float64)
                sh = _Shadow(
                    shadow,
                    old_w,
                    old_o,
                    int(sc[0]),
                    int(sc[1]),
                    float(se[0]),
                    float(se[1]),
                    int(sc[2]),
                )
                if "shadow_prev" in a:
                    prev = _fit_rows(a["shadow_prev"].view(np.float64), cap, axis=1)
                    sh.prev_new, sh.prev_old = prev[0].copy(), prev[1].copy()
                    sh.prev_valid = _fit_rows(a["shadow_prev_valid"], cap).astype(bool)
                self._shadow = sh
            self._drift = _Drift()
            if self.cfg.drift_detection and "drift_counters" in a:
                d = self._drift
                d.n, d.boost_left = map(int, a["drift_counters"])
                d.mean, d.cum, d.low = map(float, a["drift_sums"].view(np.float64))
                if "drift_prev" in a:
                    prev = _fit_rows(a["drift_prev"].view(np.float64), cap, axis=1)
                    d.prev_forecast, d.prev_target = prev[0].copy(), prev[1].copy()
                    d.prev_valid = _fit_rows(a["drift_prev_valid"], cap).astype(bool)
        except KeyError as exc:
            raise StateError(f"learner state lacks {exc}") from None

    # ------------------------------------------------------------------ per batch

    def shadow_step(self, x: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
        """Advance the shadow (previous weights) on the same batch; its one-step forecasts."""
        if self._shadow is None:
            return None
        return self._shadow.model.step(x, mask).forecasts[:, 0]

    def observe(self, out: StepOutput, shadow_forecast: np.ndarray | None = None) -> None:
        """Record one batch; train when due; judge a pending shadow comparison."""
        if self._shadow is not None and shadow_forecast is not None:
            self._judge(out, shadow_forecast)
        if self.cfg.drift_detection:
            self._watch_drift(out)
        w = self.cfg.window
        self.batches += 1  # the step itself recorded the batch in the window
        n = self.batches
        if (n + w) % self.cfg.update_every == 0:
            self._snapshots[n] = self._live_states()
        # With learn.early_updates, from the first `update_every` batches on: before the
        # window has filled, it starts at the first batch, from the zero initial states.
        filled = n >= w or self.cfg.early_updates
        if n % self.cfg.update_every == 0 and filled and self._shadow is None:
            self.update()
        for key in [k for k in self._snapshots if k < n - w]:
            del self._snapshots[key]

    # ------------------------------------------------------------------ drift

    def _watch_drift(self, out: StepOutput) -> None:
        """Score the previous batch's one-step forecasts; Page-Hinkley on their x."""
        d = self._drift
        target = out.target.astype(np.float64)
        if d.prev_valid is not None and d.prev_forecast is not None and d.prev_target is not None:
            ok = d.prev_valid & out.valid
            if ok.any():
                actual = target[ok]
                naive = d.prev_target[ok] if self._naive_is_last else 0.0
                se_model = float(np.sum((d.prev_forecast[ok] - actual) ** 2))
                se_naive = float(np.sum((naive - actual) ** 2))
                tiny = 1e-300
                self._page_hinkley(float(np.log((se_model + tiny) / (se_naive + tiny))))
        d.prev_forecast = out.forecasts[:, 0].astype(np.float64)
        d.prev_target = target
        d.prev_valid = out.valid.copy()

    def _page_hinkley(self, x: float) -> None:
        d, cfg = self._drift, self.cfg
        d.n += 1
        d.mean += (x - d.mean) / d.n
        d.cum += x - d.mean - cfg.drift_delta
        d.low = min(d.low, d.cum)
        if d.n < cfg.drift_min_batches or d.cum - d.low <= cfg.drift_threshold:
            return
        log.info(
            "drift detected at batch %d (Page-Hinkley %.3g): %d updates at %.3g x the "
            "learning rate%s",
            self.batches + 1,
            d.cum - d.low,
            cfg.drift_updates,
            cfg.drift_boost,
            ", Adam's moments reset" if cfg.drift_reset_moments else "",
        )
        self.stats.drift_alarms.append(self.batches + 1)
        d.boost_left = cfg.drift_updates
        d.restart()
        if cfg.drift_reset_moments:
            for var in self.optimizer.variables:
                if not var.path.endswith("learning_rate"):
                    var.assign(np.zeros(var.shape, var.dtype))

    # ------------------------------------------------------------------ training

    def _live_states(self) -> list[tuple[tf.Tensor, tf.Tensor]]:
        """A copy of the live (h, c) of every layer, where the model runs."""
        v = self.model.bank.vars
        return [
            (tf.identity(v[f"h{i}"]), tf.identity(v[f"c{i}"]))
            for i in range(len(self.model.lstm_layers))
        ]

    def _window_graph(
        self, rank: tf.Tensor | None = None
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """(inputs [S,W,F], mask [S,W], targets [S,W,H], target mask [S,W,H]), oldest first.

        Forecast j's horizon-k target is step j+k's target, normalised with step j's
        statistics; it counts only if the row advanced in both steps. With `rank` (see
        `_rows`) only the rows that advanced in the window, in the canonical order.
        """
        w, h = self.cfg.window, self.model.horizon
        ring = self.window.ordered()
        if rank is not None:
            rows = self._rows(ring["valid"], rank)
            ring = {name: tf.gather(x, rows) for name, x in ring.items()}
        mask = ring["valid"] > 0.5
        target, mean, std = ring["target"], ring["mean"], ring["std"]
        targets, tmask = [], []
        for k in range(1, h + 1):
            if k >= w:  # beyond the window: never realised inside it
                targets.append(tf.zeros_like(target))
                tmask.append(tf.zeros_like(target))
                continue
            pad = tf.zeros_like(target[:, :k])
            realised = (target[:, k:] - mean[:, : w - k]) / std[:, : w - k]
            # Clipped like the inputs (model.clip): an entity's first observations give a
            # tiny std, and one such target must not dominate the window's loss.
            realised = tf.clip_by_value(realised, -self._clip, self._clip)
            both = tf.cast(tf.logical_and(mask[:, : w - k], mask[:, k:]), tf.float32)
            targets.append(tf.concat([realised, pad], axis=1))
            tmask.append(tf.concat([both, pad], axis=1))
        return ring["inputs"], mask, tf.stack(targets, axis=2), tf.stack(tmask, axis=2)

    @staticmethod
    def _rows(valid: tf.Tensor, rank: tf.Tensor) -> tf.Tensor:
        """The rows that advanced in the window, ordered by `rank` (the row's entity's place
        in sorted order). Which rows train and in which order depends on the data alone, not
        on which slot an entity happened to get or on rows admitted ahead of their first
        closed step: float sums over rows then run in the same order in every run of a
        stream (a restart, a rebalance or a different poll timing), so learning cannot
        amplify their round-off into different weights."""
        active = tf.reduce_any(valid > 0.5, axis=1)
        big = tf.int32.max
        order = tf.argsort(tf.where(active, rank, big), stable=True)
        return order[: tf.reduce_sum(tf.cast(active, tf.int32))]

    def _rank(self) -> tf.Tensor:
        """Each slot's place in the sorted order of its entity (`row_keys`); slot order when
        no keys are known (a learner used on its own)."""
        cap = self.model.capacity
        keys = self.row_keys() if self.row_keys is not None else None
        rank = np.full(cap, np.iinfo(np.int32).max, np.int32)
        if keys is None:
            rank[:] = np.arange(cap, dtype=np.int32)
        else:
            ordered = sorted(keys)
            slots = np.fromiter((slot for _, slot in ordered), np.int64, len(ordered))
            rank[slots] = np.arange(len(ordered), dtype=np.int32)
        return tf.constant(rank)

    def window_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The training window on the host (inspection and tests; updates never copy it)."""
        inputs, mask, targets, tmask = self._window_fn()
        return inputs.numpy(), mask.numpy(), targets.numpy(), tmask.numpy()

    def _update_graph(
        self, start: list[tuple[tf.Tensor, tf.Tensor]], rank: tf.Tensor
    ) -> tuple[tf.Tensor, list[tf.Tensor], tf.Tensor, tf.Tensor]:
        """Loss, gradients, number of realised targets, and whether all of it is finite."""
        inputs, mask, targets, tmask = self._window_graph(rank)
        rows = self._rows(self.window.ordered()["valid"], rank)
        start = [(tf.gather(h, rows), tf.gather(c, rows)) for h, c in start]
        loss, grads = self._train_graph(inputs, mask, targets, tmask, start)
        finite = tf.reduce_all(
            [tf.math.is_finite(loss)] + [tf.reduce_all(tf.math.is_finite(g)) for g in grads]
        )
        return loss, grads, tf.reduce_sum(tmask), finite

    def _refresh_graph(
        self, start: list[tuple[tf.Tensor, tf.Tensor]], rank: tf.Tensor
    ) -> tf.Tensor:
        """Burn-in: replay the window with the current weights from `start` into the live
        (h, c) of the rows that advanced in it (the others did not move since its start)."""
        inputs, mask, _, _ = self._window_graph(rank)
        rows = self._rows(self.window.ordered()["valid"], rank)
        start = [(tf.gather(h, rows), tf.gather(c, rows)) for h, c in start]
        _, finals = self.model.window_forward(inputs, mask, start)
        bank = self.model.bank.vars
        index = rows[:, None]
        for i, (h, c) in enumerate(finals):
            bank[f"h{i}"].scatter_nd_update(index, h)
            bank[f"c{i}"].scatter_nd_update(index, c)
        return tf.constant(True)

    def _start_states(self) -> list[tuple[tf.Tensor, tf.Tensor]] | None:
        """The (h, c) per layer before the window's first batch: stored, or the zero initial
        states while the window has not filled since the start."""
        key = self.batches - self.cfg.window
        if key > 0 or not self.cfg.early_updates:
            return self._snapshots.get(key)
        v = self.model.bank.vars
        return [
            (tf.zeros_like(v[f"h{i}"]), tf.zeros_like(v[f"c{i}"]))
            for i in range(len(self.model.lstm_layers))
        ]

    def update(self) -> bool:
        """One truncated-BPTT update over the window; True if accepted."""
        start = self._start_states()
        if start is None:
            log.debug("no window-start state for batch %d: update skipped", self.batches)
            return False
        t0 = time.perf_counter()
        rank = self._rank()
        try:
            loss, grads, realised, finite = self._update_fn(start, rank)
        except tf.errors.OpError as exc:
            return self._discard_failed(exc)
        if self.window_kernel is None:
            # The traced graph says which LSTM kernel the windows really run on.
            self.window_kernel = window_kernel(self._update_fn.get_concrete_function(start, rank))
            log.info("training windows run on the %s LSTM kernel", self.window_kernel)
        if float(realised) == 0:
            return False
        loss_value = float(loss)
        if not bool(finite):
            self.stats.discarded += 1
            log.warning("update discarded: non-finite loss or gradient (loss %s)", loss_value)
            return False
        old_weights = self.model.get_weights()
        old_opt = [np.array(v.numpy()) for v in self.optimizer.variables]
        old_states = self._live_states()
        if self.cfg.drift_detection:
            boosted = self._drift.boost_left > 0
            rate = self.cfg.learning_rate * (self.cfg.drift_boost if boosted else 1.0)
            self.optimizer.learning_rate.assign(rate)
            self._drift.boost_left -= int(boosted)
        self.optimizer.apply(grads, self.model.weights)
        # Further passes over the same window (learn.epochs): one update, one version. A
        # pass whose loss or gradient is not finite undoes the whole update.
        for _ in range(self.cfg.epochs - 1):
            try:
                _, grads, _, finite = self._update_fn(start, rank)
            except tf.errors.OpError as exc:
                self._restore(old_weights, old_opt)
                return self._discard_failed(exc)
            if not bool(finite):
                self._restore(old_weights, old_opt)
                self.stats.discarded += 1
                log.warning("update discarded: non-finite gradient in a later epoch")
                return False
            self.optimizer.apply(grads, self.model.weights)
        if self.cfg.refresh_states:
            self._refresh_fn(start, rank)
        old_version = self.version
        self.version += 1
        self.stats.updates += 1
        self.stats.last_loss = loss_value
        self.stats.losses.append(loss_value)
        self.stats.update_ms.append((time.perf_counter() - t0) * 1e3)
        if self.cfg.shadow_steps > 0 and self.cfg.rollback_threshold > 0:
            self._start_shadow(old_weights, old_opt, old_states, old_version)
        if self.on_update is not None:
            self.on_update(self.version)
        return True

    def _discard_failed(self, exc: tf.errors.OpError) -> bool:
        # Learning is auxiliary: a failing kernel (out of device memory, a dtype the device's
        # kernel lacks) must not stop the forecasts. Counted and logged as a discarded update.
        self.stats.discarded += 1
        log.error(
            "update discarded: training failed (%s: %s); forecasting goes on with "
            "weights version %d",
            type(exc).__name__,
            str(exc).splitlines()[0][:300] if str(exc) else "",
            self.version,
        )
        return False

    def _restore(self, weights: list[np.ndarray], optimizer: list[np.ndarray]) -> None:
        self.model.set_weights(weights)
        for var, value in zip(self.optimizer.variables, optimizer, strict=True):
            var.assign(value)

    def _train_graph(
        self,
        inputs: tf.Tensor,
        mask: tf.Tensor,
        targets: tf.Tensor,
        tmask: tf.Tensor,
        start: list[tuple[tf.Tensor, tf.Tensor]],
    ) -> tuple[tf.Tensor, list[tf.Tensor]]:
        variables = [w.value for w in self.model.weights]
        with tf.GradientTape() as tape:
            y, _ = self.model.window_forward(inputs, mask, start)
            err = (y - targets) * tmask
            if self.cfg.loss == "huber":
                a = tf.abs(err)
                per = tf.where(a <= 1.0, 0.5 * err * err, a - 0.5)
            else:
                per = err * err
            loss = tf.reduce_sum(per * tmask) / tf.maximum(tf.reduce_sum(tmask), 1.0)
        grads = tape.gradient(loss, variables)
        return loss, grads

    # ------------------------------------------------------------------ shadow / rollback

    def _start_shadow(
        self,
        old_weights: list[np.ndarray],
        old_opt: list[np.ndarray],
        old_states: list[tuple[tf.Tensor, tf.Tensor]],
        old_version: int,
    ) -> None:
        shadow = self._shadow_or_new()
        shadow.set_weights(old_weights)
        # The shadow starts from the live rows as they were before the update (device to
        # device): its (h, c) are the pre-refresh ones, the rest is shared.
        old = {f"h{i}": h for i, (h, _) in enumerate(old_states)}
        old |= {f"c{i}": c for i, (_, c) in enumerate(old_states)}
        for name, var in shadow.bank.vars.items():
            var.assign(old.get(name, self.model.bank.vars[name]))
        self._shadow = _Shadow(
            shadow, old_weights, old_opt, old_version, remaining=self.cfg.shadow_steps
        )

    def _shadow_or_new(self) -> StatefulLSTM:
        """The shadow model (no window of its own), built once: building compiles a step."""
        shadow = self._shadow_model
        if shadow is None:
            shadow = StatefulLSTM(self.config, self.model.capacity, window=False)
            self._shadow_model = shadow
        shadow.grow(self.model.capacity)
        return shadow

    def _judge(self, out: StepOutput, shadow_forecast: np.ndarray) -> None:
        sh = self._shadow
        assert sh is not None
        if sh.prev_valid is not None and sh.prev_new is not None and sh.prev_old is not None:
            ok = sh.prev_valid & out.valid
            if ok.any():
                actual = out.target[ok].astype(np.float64)
                sh.se_new += float(np.sum((sh.prev_new[ok] - actual) ** 2))
                sh.se_old += float(np.sum((sh.prev_old[ok] - actual) ** 2))
                sh.n += int(ok.sum())
            sh.remaining -= 1
        sh.prev_new = out.forecasts[:, 0].astype(np.float64)
        sh.prev_old = shadow_forecast.astype(np.float64)
        sh.prev_valid = out.valid.copy()
        if sh.remaining > 0:
            return
        self._shadow = None
        if sh.n and sh.se_new > sh.se_old * (1.0 + self.cfg.rollback_threshold):
            self._rollback(sh)

    def _rollback(self, sh: _Shadow) -> None:
        log.warning(
            "rolling back update %d: one-step MSE %.3g vs %.3g with the previous weights",
            self.version,
            sh.se_new / sh.n,
            sh.se_old / sh.n,
        )
        self.model.set_weights(sh.old_weights)
        for var, value in zip(self.optimizer.variables, sh.old_optimizer, strict=True):
            var.assign(value)
        for name, var in self.model.bank.vars.items():
            var.assign(sh.model.bank.vars[name])
        self.version = sh.old_version
        self.stats.rollbacks += 1
        if self.on_update is not None:
            self.on_update(self.version)
