"""The accelerator path, checked on the CPU: cuDNN-ready training windows, kernel detection,
mixed precision.

cuDNN needs a right-padded mask with at least one step per row; `window_forward` packs every
row's valid steps to the front. These tests hold the packing to Keras's own in-place masking
(outputs, final states and gradients), and check from the traced graph that the training
window takes the cuDNN kernel once TensorFlow reports a GPU.
"""

from __future__ import annotations

import importlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from streamer.config import (
    CapacityConfig,
    Config,
    ConfigError,
    LearnConfig,
    ModelConfig,
    StreamConfig,
)
from streamer.learner import OnlineLearner
from streamer.model import StatefulLSTM, graph_ops, right_pad, window_kernel

S, W, F = 7, 9, 3
FEATURES = ("a", "b", "c")


def make_config(units=(6, 4), precision="float32", learn=False) -> Config:
    return Config(
        stream=StreamConfig(features=FEATURES, target="a", target_transform="none"),
        model=ModelConfig(units=units, horizon=2, seed=11, precision=precision),
        capacity=CapacityConfig(initial=S, max_entities=S),
        learn=LearnConfig(enabled=learn, window=W, update_every=W, shadow_steps=0),
    )


def window_mask(rng) -> np.ndarray:
    mask = rng.random((S, W)) > 0.4
    mask[0] = True  # complete
    mask[1] = False  # never reported: cuDNN's empty-sequence case
    mask[2] = [False, True, True, False, True, False, False, True, False]  # holes
    return mask


def start_states(model: StatefulLSTM, rng) -> list[tuple[tf.Tensor, tf.Tensor]]:
    return [
        (
            tf.constant(rng.normal(size=(S, u)).astype(np.float32)),
            tf.constant(rng.normal(size=(S, u)).astype(np.float32)),
        )
        for u in model._cfg.units
    ]


def keras_rnn_module():
    # The package re-exports a function named `rnn`, which hides the module of that name.
    return importlib.import_module("keras.src.backend.tensorflow.rnn")


def keras_in_place(model: StatefulLSTM, inputs, mask, start):
    """Keras masking with the holes left where they are (what cuDNN cannot take)."""
    x = inputs
    finals = []
    for layer, (h0, c0) in zip(model.lstm_layers, start, strict=True):
        x, h, c = layer(x, initial_state=[h0, c0], mask=mask)
        finals.append((h, c))
    return model.head(x), finals


# ------------------------------------------------------------------ packing


@settings(max_examples=60, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 6), st.integers(1, 12))))
def test_right_pad_packs_valid_steps_in_order(mask):
    order, inverse, packed, empty = (np.asarray(t) for t in right_pad(tf.constant(mask)))
    lengths = mask.sum(axis=1)
    for row in range(mask.shape[0]):
        n = lengths[row]
        # right-padded, never empty
        assert packed[row].tolist() == [True] * max(n, 1) + [False] * (mask.shape[1] - max(n, 1))
        assert empty[row] == (n == 0)
        # the valid steps come first, in their original order
        assert order[row, :n].tolist() == np.flatnonzero(mask[row]).tolist()
        assert (order[row][inverse[row]] == np.arange(mask.shape[1])).all()


def test_keras_cudnn_mask_check_accepts_the_packed_mask_only():
    """The assertion Keras runs before cuDNN: raw windows fail it, packed ones pass."""
    mask = tf.constant(window_mask(np.random.default_rng(0)))
    check = keras_rnn_module()._assert_valid_mask
    with pytest.raises(tf.errors.InvalidArgumentError, match="right-padded"):
        check(mask)
    check(right_pad(mask)[2])


def test_packed_window_equals_keras_in_place_masking():
    rng = np.random.default_rng(0)
    model = StatefulLSTM(make_config(), S)
    mask = window_mask(rng)
    inputs = tf.constant(rng.normal(size=(S, W, F)).astype(np.float32))
    start = start_states(model, rng)
    y, finals = model.window_forward(inputs, tf.constant(mask), start)
    y_ref, finals_ref = keras_in_place(model, inputs, tf.constant(mask), start)
    valid = mask[:, :, None].repeat(2, axis=2)
    np.testing.assert_allclose(np.asarray(y)[valid], np.asarray(y_ref)[valid], atol=1e-6)
    for (h, c), (h_ref, c_ref) in zip(finals, finals_ref, strict=True):
        np.testing.assert_allclose(np.asarray(h), np.asarray(h_ref), atol=1e-6)
        np.testing.assert_allclose(np.asarray(c), np.asarray(c_ref), atol=1e-6)
    # the row that never reported keeps its start state exactly
    for (h, c), (h0, c0) in zip(finals, start, strict=True):
        assert np.array_equal(np.asarray(h)[1], np.asarray(h0)[1])
        assert np.array_equal(np.asarray(c)[1], np.asarray(c0)[1])


def test_packed_window_gradients_equal_keras_in_place_masking():
    rng = np.random.default_rng(1)
    model = StatefulLSTM(make_config(), S)
    mask = tf.constant(window_mask(rng))
    inputs = tf.constant(rng.normal(size=(S, W, F)).astype(np.float32))
    targets = tf.constant(rng.normal(size=(S, W, 2)).astype(np.float32))
    weight = tf.cast(mask, tf.float32)[:, :, None]
    start = start_states(model, rng)
    variables = [w.value for w in model.weights]

    def grads(forward):
        with tf.GradientTape() as tape:
            y, finals = forward(model, inputs, mask, start)
            loss = tf.reduce_sum(((y - targets) * weight) ** 2)
            loss += tf.reduce_sum(finals[-1][0] ** 2)  # through the final state too
        return [np.asarray(g) for g in tape.gradient(loss, variables)]

    ours = grads(lambda m, *a: m.window_forward(*a))
    ref = grads(keras_in_place)
    for g, g_ref in zip(ours, ref, strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ which kernel runs


def _traced_update(cfg: Config):
    """The update graph the engine runs (window read where the model runs), traced."""
    model = StatefulLSTM(cfg, S)
    learner = OnlineLearner(model, cfg)
    f32 = tf.float32
    return learner._update_fn.get_concrete_function(
        [(tf.TensorSpec((S, u), f32), tf.TensorSpec((S, u), f32)) for u in cfg.model.units],
        tf.TensorSpec((S,), tf.int32),  # the rows' canonical ranks (OnlineLearner._rank)
    )


def test_training_window_takes_the_generic_kernel_without_a_gpu():
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("this machine has a GPU; the next test covers it")  # pragma: no cover
    assert window_kernel(_traced_update(make_config(learn=True))) == "generic"


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_training_window_takes_cudnn_when_a_gpu_is_visible(monkeypatch, precision):
    """Trace (not run) the update as Keras would on a GPU: the graph must hold CudnnRNNV3.

    Keras decides at trace time from `_is_gpu_available`; nothing in our layers' arguments,
    masks or dtypes may push it off the cuDNN path.
    """
    monkeypatch.setattr(keras_rnn_module(), "_is_gpu_available", lambda: True)
    fn = _traced_update(make_config(precision=precision, learn=True))
    assert window_kernel(fn) == "cudnn"
    assert "CudnnRNNV3" in graph_ops(fn)


def test_update_records_the_kernel_it_ran_on():
    cfg = make_config(units=(4,), learn=True)
    model = StatefulLSTM(cfg, S)
    learner = OnlineLearner(model, cfg)
    rng = np.random.default_rng(2)
    assert learner.window_kernel is None
    for _ in range(2 * W):
        learner.observe(model.step(rng.normal(size=(S, F)).astype(np.float32), np.ones(S, bool)))
    assert learner.stats.updates >= 1
    expected = "cudnn" if tf.config.list_logical_devices("GPU") else "generic"
    assert learner.window_kernel == expected


# ------------------------------------------------------------------ mixed precision


def test_precision_is_validated_and_read_from_the_environment():
    with pytest.raises(ConfigError, match=r"model\.precision"):
        ModelConfig(precision="float16")  # type: ignore[arg-type]
    cfg = Config.load(None, env={"STREAMER_MODEL_PRECISION": "mixed_bfloat16"})
    assert cfg.model.precision == "mixed_bfloat16"


def test_mixed_step_keeps_float32_states_and_weights_and_stays_close():
    rng = np.random.default_rng(3)
    full = StatefulLSTM(make_config(), S)
    mixed = StatefulLSTM(make_config(precision="mixed_bfloat16"), S)
    mixed.set_weights(full.get_weights())
    assert all(w.dtype == "float32" for w in mixed.weights)
    assert all(v.dtype == tf.float32 for v in mixed.bank.vars.values())
    worst = 0.0
    for t in range(40):
        x = rng.normal(size=(S, F)).astype(np.float32)
        mask = rng.random(S) > 0.3
        mask[1] = t < 5  # then absent: its state must not move at all
        frozen = {k: v[1].copy() for k, v in mixed.bank.numpy().items()} if t == 5 else None
        a, b = full.step(x, mask), mixed.step(x, mask)
        assert np.array_equal(a.valid, b.valid)
        worst = max(worst, float(np.max(np.abs(a.forecasts - b.forecasts)[a.valid])))
        if frozen is not None:
            frozen_row = frozen
    assert worst < 0.05  # bfloat16 keeps ~3 significant digits; states do not drift apart
    assert worst > 0.0  # the products really ran in bfloat16
    for name, value in mixed.bank.numpy().items():
        assert np.array_equal(value[1], frozen_row[name]), name


def test_mixed_update_trains_float32_master_weights():
    cfg = make_config(units=(4,), precision="mixed_bfloat16", learn=True)
    model = StatefulLSTM(cfg, S)
    learner = OnlineLearner(model, cfg)
    before = model.get_weights()
    rng = np.random.default_rng(4)
    for _ in range(2 * W):
        learner.observe(model.step(rng.normal(size=(S, F)).astype(np.float32), np.ones(S, bool)))
    assert learner.stats.updates >= 1 and learner.stats.discarded == 0
    after = model.get_weights()
    assert all(w.dtype == np.float32 for w in after)
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert np.isfinite(learner.stats.last_loss)


def test_mixed_window_close_to_float32():
    rng = np.random.default_rng(5)
    full = StatefulLSTM(make_config(), S)
    mixed = StatefulLSTM(make_config(precision="mixed_bfloat16"), S)
    mixed.set_weights(full.get_weights())
    mask = tf.constant(window_mask(rng))
    inputs = tf.constant(rng.normal(size=(S, W, F)).astype(np.float32))
    start = start_states(full, rng)
    y, _ = full.window_forward(inputs, mask, start)
    y_mixed, finals_mixed = mixed.window_forward(inputs, mask, start)
    assert y_mixed.dtype == tf.float32 and finals_mixed[0][0].dtype == tf.float32
    valid = np.asarray(mask)[:, :, None].repeat(2, axis=2)
    np.testing.assert_allclose(np.asarray(y_mixed)[valid], np.asarray(y)[valid], atol=0.05)
    assert keras.backend.floatx() == "float32"  # the global policy is left alone
