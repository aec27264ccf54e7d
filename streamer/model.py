"""The stateful LSTM with explicit per-slot states, advanced one step at a time.

Keras 3 layers own the weights (`keras.layers.LSTM` + `keras.layers.Dense`), so the same
weights serve a whole-window Keras call (training, cuDNN on a GPU) and this module's
hand-written single-step kernel (inference). The recurrent state does not live inside a
`stateful=True` layer: it is a bank of `tf.Variable`s of shape [capacity, ...], one row per
slot, because streamer must checkpoint, restore, reset and grow single rows, which a Keras
stateful layer cannot do (its `reset_state()` zeroes every row, and every call moves it).

One step does, for every row at once and in one XLA-compiled call:

1. target transform (none / diff / log_return) against the row's previous raw target;
2. per-row online normalisation (Welford running mean/variance) of the transformed inputs;
3. the LSTM layers (Keras gate order i, f, c, o) and a Dense head giving the next `horizon`
   target values in normalised units, turned back into the target's transformed units.

A row is *valid* in a step when its entity reported and, for diff/log_return, a previous
value exists. Rows that are not valid keep every state tensor and statistic bit for bit.
A row that reported but whose new state or forecast would not be all finite is *rejected*:
it keeps every old value bit for bit (previous target included), is not valid, and the
step reports it so that its event is dead-lettered (reason non_finite_state).
Forecasts come from a direct multi-output head, so a multi-step horizon never iterates the
recurrence and cannot disturb the live state.

Training windows (`window_forward`) reorder each row's steps so that the steps the row was
valid in come first, in order: the mask becomes right-padded with at least one step per row,
the only form the cuDNN LSTM kernel accepts (Keras 3 asserts rather than falling back when a
mask has holes). A row's state only moves on its valid steps, so the result is the same as
masking in place; the outputs are put back in their original order.

`model.precision = "mixed_bfloat16"` runs the matrix products in bfloat16 and keeps the
states, statistics, gate arithmetic and master weights in float32.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from .config import Config
from .errors import ModelError

log = logging.getLogger(__name__)

# Added to the running variance before the square root; small enough for log-returns
# (variance ~1e-8), large enough to keep a constant feature finite.
VARIANCE_EPSILON = 1e-12


def describe_device(jit: bool = True, precision: str = "float32") -> str:
    """One line for the start-up log: where the step runs and which kernels it uses."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        where = f"GPU {details.get('device_name', gpus[0].name)}"
        windows = "Keras LSTM on the cuDNN kernel (windows packed right-padded)"
    else:
        where = "CPU (no GPU visible to TensorFlow)"
        windows = "Keras LSTM, generic kernel"
    step = "hand-written fused LSTM step" + (", XLA-compiled" if jit else "")
    return (
        f"device: {where}; inference: {step}; training windows: {windows}; precision: {precision}"
    )


def configure_devices() -> None:
    """Let TensorFlow take GPU memory as it needs it rather than all of it at start-up, so
    that a second engine or another process can share the device. Call before any tensor."""
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except (RuntimeError, ValueError) as exc:  # already initialised: keep the default
            log.warning("GPU memory growth not set: %s", exc)


def right_pad(mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Pack each row's valid steps to the front of the window, keeping their order.

    mask [S, W] bool. Returns (order, inverse, packed, empty): `tf.gather(x, order,
    batch_dims=1)` packs a [S, W, ...] tensor, `inverse` undoes it; `packed` is the
    right-padded mask, with one (dummy) step for rows that have none, since cuDNN rejects
    empty sequences; `empty` [S] marks those rows, whose outputs and final states must be
    ignored.
    """
    m = tf.cast(mask, tf.bool)
    valid = tf.cast(m, tf.int32)
    lengths = tf.reduce_sum(valid, axis=1)
    # Where each step goes: valid steps to 0.., the others after them, both in order.
    inverse = tf.where(
        m,
        tf.cumsum(valid, axis=1) - 1,
        lengths[:, None] + tf.cumsum(1 - valid, axis=1) - 1,
    )
    # Its inverse permutation; float keys, which every device's sort kernel takes.
    order = tf.argsort(tf.cast(inverse, tf.float32), axis=1)
    packed = tf.sequence_mask(tf.maximum(lengths, 1), tf.shape(m)[1])
    return order, inverse, packed, tf.equal(lengths, 0)


CUDNN_OPS = frozenset({"CudnnRNN", "CudnnRNNV2", "CudnnRNNV3"})


def graph_ops(fn: Any) -> set[str]:
    """Op types in a traced (concrete) function, nested functions included."""
    graph_def = fn.graph.as_graph_def()
    ops = {node.op for node in graph_def.node}
    for f in graph_def.library.function:
        ops.update(node.op for node in f.node_def)
    return ops


def window_kernel(fn: Any) -> str:
    """ "cudnn" if a traced training function runs its LSTM on cuDNN, else "generic"."""
    return "cudnn" if graph_ops(fn) & CUDNN_OPS else "generic"


class StateBank:
    """Named per-slot float32 tensors of shape [capacity, *row_shape], one row per slot."""

    def __init__(self, row_shapes: Mapping[str, tuple[int, ...]], capacity: int) -> None:
        self._row_shapes = dict(row_shapes)
        self._capacity = 0
        self.vars: dict[str, tf.Variable] = {}
        self.grow(capacity)

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def row_shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._row_shapes)

    def grow(self, capacity: int) -> None:
        """Append zero rows up to `capacity`; existing rows are copied unchanged."""
        if capacity < self._capacity:
            raise ModelError(f"cannot shrink the state bank from {self._capacity} to {capacity}")
        if capacity == self._capacity:
            return
        new_vars = {}
        for name, shape in self._row_shapes.items():
            fresh = tf.zeros((capacity - self._capacity, *shape), dtype=tf.float32)
            if name in self.vars:
                fresh = tf.concat([self.vars[name].read_value(), fresh], axis=0)
            new_vars[name] = tf.Variable(fresh, trainable=False, name=name)
        self.vars = new_vars
        self._capacity = capacity

    def read_rows(self, slots: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        idx = tf.constant(np.asarray(slots, dtype=np.int64))
        return {name: tf.gather(v, idx).numpy() for name, v in self.vars.items()}

    def write_rows(self, slots: Sequence[int] | np.ndarray, rows: Mapping[str, np.ndarray]) -> None:
        slots = np.asarray(slots, dtype=np.int64)
        if set(rows) != set(self.vars):
            raise ModelError(f"state rows name {sorted(rows)}, expected {sorted(self.vars)}")
        idx = tf.constant(slots[:, None])
        for name, v in self.vars.items():
            value = np.asarray(rows[name], dtype=np.float32)
            expected = (len(slots), *self._row_shapes[name])
            if value.shape != expected:
                raise ModelError(f'state "{name}" has shape {value.shape}, expected {expected}')
            v.scatter_nd_update(idx, value)

    def reset_rows(self, slots: Sequence[int] | np.ndarray) -> None:
        slots = np.asarray(slots, dtype=np.int64)
        self.write_rows(
            slots,
            {n: np.zeros((len(slots), *s), np.float32) for n, s in self._row_shapes.items()},
        )

    def numpy(self) -> dict[str, np.ndarray]:
        return {name: v.numpy() for name, v in self.vars.items()}


@dataclass(frozen=True)
class StepOutput:
    """Host-side result of one model step (all rows)."""

    forecasts: np.ndarray  # float32 [capacity, horizon], target's transformed units
    valid: np.ndarray  # bool [capacity]: row advanced in this step
    target: np.ndarray  # float32 [capacity]: this step's target in transformed units
    # bool [capacity]: present, but the step would have made the row's state or forecast
    # non-finite; the row kept its old state bit for bit, is not valid, forecast and target 0.
    rejected: np.ndarray


# Floor of the stored target std, so that a constant target cannot divide by zero in a loss.
MIN_TARGET_STD = 1e-12


class WindowRing:
    """The last `window` steps of what online learning needs, kept where the model runs.

    Slot `t % window` holds step t: the normalised inputs the LSTM saw [W, capacity, F],
    whether each row advanced, the row's target in transformed units and the target's
    normalisation at that step (all [W, capacity]). The step writes its slot itself, so
    neither a step nor an update copies the window between host and device; it crosses only
    when a checkpoint exports it. `pos` is the slot the next step writes.
    """

    FIELDS = ("inputs", "valid", "target", "mean", "std")

    def __init__(self, window: int, n_features: int, capacity: int) -> None:
        self.window = window
        self.n_features = n_features
        self.capacity = 0
        self.pos = tf.Variable(0, dtype=tf.int32, trainable=False, name="window_pos")
        self.vars: dict[str, tf.Variable] = {}
        self.grow(capacity)

    def _shape(self, name: str, rows: int) -> tuple[int, ...]:
        return (self.window, rows, self.n_features) if name == "inputs" else (self.window, rows)

    def grow(self, capacity: int) -> None:
        """Append rows (nothing recorded: not valid, std 1); existing rows are kept."""
        if capacity <= self.capacity:
            return
        new_vars = {}
        for name in self.FIELDS:
            fill = 1.0 if name == "std" else 0.0
            fresh = tf.fill(self._shape(name, capacity - self.capacity), fill)
            if name in self.vars:
                fresh = tf.concat([self.vars[name].read_value(), fresh], axis=1)
            new_vars[name] = tf.Variable(fresh, trainable=False, name=f"window_{name}")
        self.vars = new_vars
        self.capacity = capacity

    def record(self, values: Mapping[str, tf.Tensor]) -> None:
        """Graph side: write this step's [capacity, ...] values into slot `pos`, advance it."""
        pos = self.pos.read_value()
        index = tf.reshape(pos, (1, 1))
        for name in self.FIELDS:
            self.vars[name].scatter_nd_update(index, values[name][None])
        self.pos.assign((pos + 1) % self.window)

    def ordered(self) -> dict[str, tf.Tensor]:
        """Graph side: every field row-major and oldest step first ([capacity, W, ...])."""
        idx = (self.pos.read_value() + tf.range(self.window)) % self.window
        out = {}
        for name in self.FIELDS:
            x = tf.gather(self.vars[name].read_value(), idx, axis=0)
            out[name] = tf.transpose(x, (1, 0, 2)) if name == "inputs" else tf.transpose(x)
        return out

    def forget(self, slots: np.ndarray) -> None:
        """These rows changed hands: nothing in the window is theirs any more."""
        keep = np.ones(self.capacity, np.float32)
        keep[slots] = 0.0
        self.vars["valid"].assign(self.vars["valid"] * tf.constant(keep)[None, :])

    def numpy(self) -> dict[str, np.ndarray]:
        """Host copy in slot order, for checkpoints ("valid" as bool)."""
        out = {name: v.numpy() for name, v in self.vars.items()}
        out["valid"] = out["valid"] > 0.5
        return out

    def load(self, arrays: Mapping[str, np.ndarray], steps_seen: int) -> None:
        """Restore a `numpy()` copy; `steps_seen` (the learner's batch count) sets `pos`."""
        for name, var in self.vars.items():
            value = np.asarray(arrays[name], np.float32)
            if value.shape != tuple(var.shape):
                raise ModelError(f'window "{name}" has shape {value.shape}, expected {var.shape}')
            var.assign(value)
        self.pos.assign(steps_seen % self.window)


class StatefulLSTM:
    """Keras-owned weights + explicit per-slot states + one compiled step per capacity."""

    def __init__(self, config: Config, capacity: int, *, window: bool | None = None) -> None:
        """`window`: keep a WindowRing for online learning (default: when learning is on)."""
        self._stream = config.stream
        self._cfg = config.model
        self.n_features = len(self._stream.features)
        self.horizon = self._cfg.horizon
        self._target = self._stream.target_index
        self._transform = self._stream.target_transform
        seed = self._cfg.seed
        self.precision = self._cfg.precision
        # Products in bfloat16, everything that accumulates over time in float32.
        self._compute = tf.bfloat16 if self.precision == "mixed_bfloat16" else tf.float32
        policy = keras.DTypePolicy(self.precision)
        self.lstm_layers: list[keras.layers.LSTM] = []
        in_dim = self.n_features
        for i, units in enumerate(self._cfg.units):
            # These arguments keep Keras on the cuDNN kernel when a GPU is present.
            layer = keras.layers.LSTM(
                units,
                activation="tanh",
                recurrent_activation="sigmoid",
                use_bias=True,
                unit_forget_bias=True,
                dropout=0.0,
                recurrent_dropout=0.0,
                unroll=False,
                return_sequences=True,
                return_state=True,
                kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 101 * i),
                recurrent_initializer=keras.initializers.Orthogonal(seed=seed + 101 * i + 1),
                dtype=policy,
                name=f"lstm_{i}",
            )
            layer.build((None, None, in_dim))
            self.lstm_layers.append(layer)
            in_dim = units
        self.head = keras.layers.Dense(
            self.horizon,
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 7919),
            dtype=policy,
            name="head",
        )
        self.head.build((None, in_dim))
        self.bank = StateBank(self._row_shapes(), capacity)
        # Online learning reads its window where the model runs; the host gets forecasts,
        # validity and the realised target (for scoring) and nothing else.
        keep_window = config.learn.enabled if window is None else window
        self.window: WindowRing | None = (
            WindowRing(config.learn.window, self.n_features, capacity) if keep_window else None
        )
        self._step_fn = self._compile()

    # ---------------------------------------------------------------- public API

    @property
    def capacity(self) -> int:
        return self.bank.capacity

    @property
    def weights(self) -> list[keras.Variable]:
        out: list[keras.Variable] = []
        for layer in self.lstm_layers:
            out.extend(layer.weights)
        out.extend(self.head.weights)
        return out

    def get_weights(self) -> list[np.ndarray]:
        return [np.asarray(w.numpy()) for w in self.weights]

    def set_weights(self, values: Sequence[np.ndarray]) -> None:
        ws = self.weights
        if len(values) != len(ws):
            raise ModelError(f"got {len(values)} weight arrays, expected {len(ws)}")
        for w, v in zip(ws, values, strict=True):
            if tuple(v.shape) != tuple(w.shape):
                raise ModelError(f'weight "{w.path}" has shape {v.shape}, expected {w.shape}')
            w.assign(np.asarray(v, dtype=np.float32))

    def step(self, x: np.ndarray, mask: np.ndarray) -> StepOutput:
        """Advance every row by one step; rows with mask False keep their state bit for bit,
        and so do rows the step would make non-finite (`StepOutput.rejected`)."""
        cap = self.capacity
        if x.shape != (cap, self.n_features):
            raise ModelError(f"step input has shape {x.shape}, expected {(cap, self.n_features)}")
        if mask.shape != (cap,):
            raise ModelError(f"step mask has shape {mask.shape}, expected {(cap,)}")
        packed = np.empty((cap, self.n_features + 1), dtype=np.float32)
        packed[:, : self.n_features] = x
        packed[:, self.n_features] = mask
        out = self._step_fn(tf.constant(packed)).numpy()
        h = self.horizon
        return StepOutput(
            forecasts=out[:, :h],
            valid=out[:, h] > 0.5,
            target=out[:, h + 1],
            rejected=out[:, h + 2] > 0.5,
        )

    def grow(self, capacity: int) -> None:
        """Add rows (zero state) up to `capacity`; existing rows are untouched."""
        if capacity != self.capacity:
            self.bank.grow(capacity)
            if self.window is not None:
                self.window.grow(capacity)
            self._step_fn = self._compile()

    def reset_rows(self, slots: Sequence[int] | np.ndarray) -> None:
        """Forget everything about these rows (state, statistics, previous value)."""
        self.bank.reset_rows(slots)

    def states(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(h, c) of every layer, [capacity, units] each."""
        v = self.bank.vars
        return [(v[f"h{i}"].numpy(), v[f"c{i}"].numpy()) for i in range(len(self.lstm_layers))]

    def window_forward(
        self, inputs: tf.Tensor, mask: tf.Tensor, start: Sequence[tuple[Any, Any]]
    ) -> tuple[tf.Tensor, list[tuple[tf.Tensor, tf.Tensor]]]:
        """Whole-window pass with the Keras layers (cuDNN on a GPU when the mask allows).

        inputs [S, W, F] are already normalised; rows with mask False at a step keep their
        state (Keras masking semantics, the same as the single step). Returns the head's
        normalised outputs [S, W, H] (float32; only the valid steps' outputs are defined) and
        the final (h, c) of every layer.
        """
        order, inverse, packed, empty = right_pad(mask)
        x = tf.gather(inputs, order, batch_dims=1)
        keep = empty[:, None]
        finals = []
        for layer, (h0, c0) in zip(self.lstm_layers, start, strict=True):
            x, h, c = layer(x, initial_state=[h0, c0], mask=packed)
            h = tf.where(keep, h0, tf.cast(h, tf.float32))
            c = tf.where(keep, c0, tf.cast(c, tf.float32))
            finals.append((h, c))
        y = tf.cast(self.head(x), tf.float32)
        return tf.gather(y, inverse, batch_dims=1), finals

    def reference_model(self, batch_size: int, masking: bool = True) -> keras.Model:
        """A Keras `stateful=True` model with these weights (the seed's setup), for checks.

        It takes the normalised, transformed inputs [batch, 1, features]; with `masking` it
        masks rows whose features all equal `MASK_VALUE`.
        """
        inp = keras.Input(batch_shape=(batch_size, 1, self.n_features))
        h = keras.layers.Masking(mask_value=MASK_VALUE)(inp) if masking else inp
        n = len(self.lstm_layers)
        for i, layer in enumerate(self.lstm_layers):
            h = keras.layers.LSTM(
                layer.units, stateful=True, return_sequences=i < n - 1, name=f"ref_lstm_{i}"
            )(h)
        out = keras.layers.Dense(self.horizon, name="ref_head")(h)
        model = keras.Model(inp, out)
        model.set_weights(self.get_weights())
        return model

    # ---------------------------------------------------------------- internals

    def _row_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for i, units in enumerate(self._cfg.units):
            shapes[f"h{i}"] = (units,)
            shapes[f"c{i}"] = (units,)
        if self._cfg.normalize:
            shapes["norm_count"] = (1,)
            shapes["norm_mean"] = (self.n_features,)
            shapes["norm_m2"] = (self.n_features,)
        if self._transform != "none":
            shapes["prev_target"] = (1,)
            shapes["has_prev"] = (1,)
        return shapes

    def _compile(self) -> tf.types.experimental.ConcreteFunction:
        spec = tf.TensorSpec((self.capacity, self.n_features + 1), tf.float32)
        fn = tf.function(self._step_graph, jit_compile=self._cfg.jit, reduce_retracing=True)
        # Calling the concrete function directly skips tf.function's argument dispatch,
        # which costs more than the whole step at a few hundred rows.
        return fn.get_concrete_function(spec)

    def _matmul(self, a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
        """a @ b in the compute precision, returned in float32."""
        if self._compute == tf.float32:
            return tf.matmul(a, b)
        product = tf.matmul(tf.cast(a, self._compute), tf.cast(b, self._compute))
        return tf.cast(product, tf.float32)

    def _step_graph(self, packed: tf.Tensor) -> tf.Tensor:
        """[capacity, F + 1] (inputs, mask) -> [capacity, horizon + 3] (forecasts, valid,
        target, rejected).

        Every new value of every row is computed first and written last: a present row whose
        new values are not all finite (`ok` False) keeps every old value bit for bit, as a
        masked row does, is not valid, and is reported as rejected with forecast and target 0.
        """
        v = self.bank.vars
        f = self.n_features
        x = packed[:, :f]
        present = packed[:, f : f + 1] > 0.5  # [cap, 1]
        valid = present
        old: dict[str, tf.Tensor] = {name: var.read_value() for name, var in v.items()}
        new: dict[str, tf.Tensor] = {}
        if self._transform != "none":
            t = self._target
            raw = x[:, t : t + 1]
            prev = old["prev_target"]
            has_prev = old["has_prev"] > 0.5
            if self._transform == "diff":
                changed = raw - prev
            else:  # log_return; the parser guarantees raw > 0, prev is a past raw value
                safe_prev = tf.where(has_prev, prev, tf.ones_like(prev))
                changed = tf.math.log(raw) - tf.math.log(safe_prev)
            valid = tf.logical_and(present, has_prev)
            changed = tf.where(valid, changed, tf.zeros_like(changed))
            x = tf.concat([x[:, :t], changed, x[:, t + 1 :]], axis=1)
            new["prev_target"] = tf.where(present, raw, prev)
            new["has_prev"] = tf.where(present, tf.ones_like(prev), old["has_prev"])
        if self._cfg.normalize:
            count, mean, m2 = old["norm_count"], old["norm_mean"], old["norm_m2"]
            new_count = tf.where(valid, count + 1.0, count)
            delta = x - mean
            new_mean = tf.where(valid, mean + delta / tf.maximum(new_count, 1.0), mean)
            new_m2 = tf.where(valid, m2 + delta * (x - new_mean), m2)
            std = tf.sqrt(new_m2 / tf.maximum(new_count, 1.0) + VARIANCE_EPSILON)
            clip = self._cfg.clip
            h_in = tf.clip_by_value((x - new_mean) / std, -clip, clip)
            new["norm_count"] = new_count
            new["norm_mean"] = new_mean
            new["norm_m2"] = new_m2
            t = self._target
            t_mean, t_std = new_mean[:, t : t + 1], std[:, t : t + 1]
        else:
            h_in = x
            t_mean, t_std = tf.zeros_like(x[:, :1]), tf.ones_like(x[:, :1])
        inputs = h_in
        target = x[:, self._target : self._target + 1]
        for i, layer in enumerate(self.lstm_layers):
            cell = layer.cell
            h, c = old[f"h{i}"], old[f"c{i}"]
            kernel = tf.concat([cell.kernel.value, cell.recurrent_kernel.value], axis=0)
            z = self._matmul(tf.concat([h_in, h], axis=1), kernel) + cell.bias.value
            zi, zf, zc, zo = tf.split(z, 4, axis=1)
            new_c = tf.sigmoid(zf) * c + tf.sigmoid(zi) * tf.tanh(zc)
            new_h = tf.sigmoid(zo) * tf.tanh(new_c)
            new[f"h{i}"] = tf.where(valid, new_h, h)
            new[f"c{i}"] = tf.where(valid, new_c, c)
            h_in = new[f"h{i}"]
        y = self._matmul(h_in, self.head.kernel.value) + self.head.bias.value
        y = y * t_std + t_mean
        # The guard: one bool per row over everything this step would write or report.
        checked = [new[name] for name in v] + [y]
        ok = tf.reduce_all(tf.math.is_finite(tf.concat(checked, axis=1)), axis=1, keepdims=True)
        for name, var in v.items():
            var.assign(tf.where(ok, new[name], old[name]))
        rejected = tf.logical_and(present, tf.logical_not(ok))
        valid = tf.logical_and(valid, ok)
        y = tf.where(rejected, tf.zeros_like(y), y)
        target = tf.where(rejected, tf.zeros_like(target), target)
        valid_f = tf.cast(valid, tf.float32)
        if self.window is not None:
            # A rejected row records nothing usable (not valid) and only finite numbers: the
            # training window multiplies by its mask, and inf * 0 would be NaN.
            self.window.record(
                {
                    "inputs": tf.where(rejected, tf.zeros_like(inputs), inputs),
                    "valid": valid_f[:, 0],
                    "target": target[:, 0],
                    "mean": tf.where(rejected, tf.zeros_like(t_mean), t_mean)[:, 0],
                    "std": tf.where(
                        rejected, tf.ones_like(t_std), tf.maximum(t_std, MIN_TARGET_STD)
                    )[:, 0],
                }
            )
        return tf.concat([y, valid_f, target, tf.cast(rejected, tf.float32)], axis=1)


# Feature value that marks a masked row for `StatefulLSTM.reference_model`.
MASK_VALUE = -1.0e9
