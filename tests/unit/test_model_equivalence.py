"""streamer's explicit-state step must reproduce a Keras `stateful=True` LSTM exactly.

The reference is the seed's setup: a Keras model with `stateful=True` and
`batch_size == entities`, fed the same aligned batches one step per call. Masked rows are
expressed with a Masking layer (Keras masking semantics: state carried over unchanged).
"""

from __future__ import annotations

import numpy as np
import pytest

from streamer.config import CapacityConfig, Config, ModelConfig, StreamConfig
from streamer.model import MASK_VALUE, StatefulLSTM

ATOL = 1e-5
ENTITIES = 12
FEATURES = ("a", "b", "c")


def make_config(units=(8,), horizon=2, normalize=False, transform="none", seed=3) -> Config:
    return Config(
        stream=StreamConfig(features=FEATURES, target="a", target_transform=transform),
        model=ModelConfig(units=units, horizon=horizon, normalize=normalize, seed=seed),
        capacity=CapacityConfig(initial=ENTITIES, max_entities=ENTITIES * 4),
    )


def keras_states(ref) -> list[tuple[np.ndarray, np.ndarray]]:
    lstms = [layer for layer in ref.layers if layer.name.startswith("ref_lstm_")]
    return [(layer.states[0].numpy(), layer.states[1].numpy()) for layer in lstms]


def reset_keras_row(ref, row: int) -> None:
    for layer in ref.layers:
        if layer.name.startswith("ref_lstm_"):
            for var in layer.states:
                value = var.numpy()
                value[row] = 0.0
                var.assign(value)


def random_masks(rng, steps: int) -> np.ndarray:
    masks = rng.random((steps, ENTITIES)) > 0.25
    masks[:, 0] = True  # one row always present
    masks[10:15, 1] = False  # one row absent for a stretch
    return masks


@pytest.mark.parametrize("units", [(8,), (8, 5)])
def test_step_matches_keras_stateful_reference(units):
    rng = np.random.default_rng(0)
    model = StatefulLSTM(make_config(units=units), ENTITIES)
    ref = model.reference_model(batch_size=ENTITIES)
    steps = 60
    xs = rng.normal(size=(steps, ENTITIES, len(FEATURES))).astype(np.float32)
    masks = random_masks(rng, steps)
    reset_at = {20: 3, 41: 7}
    for t in range(steps):
        if t in reset_at:
            model.reset_rows([reset_at[t]])
            reset_keras_row(ref, reset_at[t])
        out = model.step(xs[t], masks[t])
        ref_in = np.where(masks[t][:, None], xs[t], MASK_VALUE)[:, None, :]
        ref_out = ref.predict_on_batch(ref_in)
        np.testing.assert_allclose(out.forecasts[masks[t]], ref_out[masks[t]], atol=ATOL)
        assert np.array_equal(out.valid, masks[t])
        for (h, c), (rh, rc) in zip(model.states(), keras_states(ref), strict=True):
            np.testing.assert_allclose(h, rh, atol=ATOL)
            np.testing.assert_allclose(c, rc, atol=ATOL)


def test_masked_rows_keep_state_bit_for_bit():
    rng = np.random.default_rng(1)
    model = StatefulLSTM(make_config(normalize=True, transform="log_return"), ENTITIES)
    for _ in range(5):
        x = rng.uniform(1, 2, size=(ENTITIES, 3)).astype(np.float32)
        model.step(x, np.ones(ENTITIES, bool))
    before = model.bank.numpy()
    mask = np.ones(ENTITIES, bool)
    mask[[2, 5]] = False
    model.step(rng.uniform(1, 2, size=(ENTITIES, 3)).astype(np.float32), mask)
    after = model.bank.numpy()
    for name in before:
        assert np.array_equal(before[name][[2, 5]], after[name][[2, 5]]), name
        if name != "has_prev":  # stays 1 once set; everything else moves
            assert not np.array_equal(before[name][mask], after[name][mask]), name


def test_reset_one_row_leaves_other_rows_untouched():
    rng = np.random.default_rng(2)
    model = StatefulLSTM(make_config(normalize=True), ENTITIES)
    for _ in range(4):
        model.step(rng.normal(size=(ENTITIES, 3)).astype(np.float32), np.ones(ENTITIES, bool))
    before = model.bank.numpy()
    model.reset_rows([4])
    after = model.bank.numpy()
    for name in before:
        assert np.all(after[name][4] == 0), name
        others = np.arange(ENTITIES) != 4
        assert np.array_equal(before[name][others], after[name][others]), name


def test_normalised_step_matches_reference_on_welford_inputs():
    """With normalisation on, streamer equals Keras fed the numpy Welford z-scores."""
    rng = np.random.default_rng(4)
    cfg = make_config(normalize=True)
    model = StatefulLSTM(cfg, ENTITIES)
    ref = model.reference_model(batch_size=ENTITIES)
    # float32 like the engine, so the comparison stays tight.
    count = np.zeros((ENTITIES, 1), np.float32)
    mean = np.zeros((ENTITIES, 3), np.float32)
    m2 = np.zeros((ENTITIES, 3), np.float32)
    scale = np.array([100.0, 0.01, 1.0])
    for t in range(40):
        x = (rng.normal(size=(ENTITIES, 3)) * scale + 5.0).astype(np.float32)
        mask = rng.random(ENTITIES) > 0.2
        v = mask[:, None]
        one = np.float32(1)
        new_count = np.where(v, count + one, count)
        delta = x - mean
        new_mean = np.where(v, mean + delta / np.maximum(new_count, one), mean)
        m2 = np.where(v, m2 + delta * (x - new_mean), m2)
        count, mean = new_count, new_mean
        std = np.sqrt(m2 / np.maximum(count, one) + np.float32(1e-12))
        z = np.clip((x - mean) / std, -cfg.model.clip, cfg.model.clip)
        out = model.step(x, mask)
        ref_in = np.where(v, z, MASK_VALUE).astype(np.float32)[:, None, :]
        ref_out = ref.predict_on_batch(ref_in) * std[:, :1] + mean[:, :1]
        np.testing.assert_allclose(
            out.forecasts[mask], ref_out[mask], atol=ATOL, rtol=1e-4, err_msg=f"step {t}"
        )


def test_growth_keeps_existing_rows_and_outputs():
    """Growing the batch appends rows; existing rows evolve exactly as without growth."""
    rng = np.random.default_rng(5)
    small = StatefulLSTM(make_config(normalize=True), ENTITIES)
    big = StatefulLSTM(make_config(normalize=True), ENTITIES * 2)
    for t in range(20):
        x = rng.normal(size=(ENTITIES * 2, 3)).astype(np.float32)
        mask = np.zeros(ENTITIES * 2, bool)
        mask[:ENTITIES] = rng.random(ENTITIES) > 0.1
        if t == 8:
            before = small.bank.numpy()
            small.grow(ENTITIES * 2)
            for name, value in small.bank.numpy().items():
                assert np.array_equal(value[:ENTITIES], before[name])
                assert np.all(value[ENTITIES:] == 0)
        if small.capacity == ENTITIES:
            a = small.step(x[:ENTITIES], mask[:ENTITIES]).forecasts
        else:
            a = small.step(x, mask).forecasts[:ENTITIES]
        b = big.step(x, mask).forecasts[:ENTITIES]
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_same_seed_same_weights_and_outputs():
    a = StatefulLSTM(make_config(seed=11), ENTITIES)
    b = StatefulLSTM(make_config(seed=11), ENTITIES)
    c = StatefulLSTM(make_config(seed=12), ENTITIES)
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        assert np.array_equal(wa, wb)
    assert not all(
        np.array_equal(wa, wc) for wa, wc in zip(a.get_weights(), c.get_weights(), strict=True)
    )
    x = np.ones((ENTITIES, 3), np.float32)
    m = np.ones(ENTITIES, bool)
    assert np.array_equal(a.step(x, m).forecasts, b.step(x, m).forecasts)
