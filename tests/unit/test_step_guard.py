"""The step's non-finite guard: no input can make a state or a forecast non-finite.

A present row whose new values (previous target, normalisation statistics, every layer's h
and c, the forecast) are not all finite is *rejected*: it keeps every old value bit for bit
(as a masked row does), is not valid, its forecast and target are 0, and every other row
evolves exactly as in a run where the bad row was masked. These tests call the model
directly, bypassing the parser that would have refused such inputs.
"""

from __future__ import annotations

import numpy as np
import pytest

from streamer import Config, Forecaster
from streamer.config import CapacityConfig, LearnConfig, ModelConfig, StreamConfig
from streamer.events import Event
from streamer.model import StatefulLSTM

ROWS = 6
BAD = 2
FEATURES = ("a", "b", "c")
F32_MAX = np.finfo(np.float32).max
TRANSFORMS = ["log_return", "diff", "none"]


def make_config(transform: str, jit: bool, learn: bool = False) -> Config:
    return Config(
        stream=StreamConfig(features=FEATURES, target="a", target_transform=transform),
        model=ModelConfig(units=(6, 4), horizon=2, seed=7, jit=jit),
        capacity=CapacityConfig(initial=ROWS, max_entities=ROWS),
        learn=LearnConfig(enabled=learn, window=6, update_every=6, shadow_steps=0),
    )


def clean(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(1.0, 2.0, size=(ROWS, len(FEATURES))).astype(np.float32)


def twin_models(transform: str, jit: bool, warm_steps: int = 5) -> tuple:
    """Two identical models (same weights) driven through the same clean history."""
    cfg = make_config(transform, jit)
    a = StatefulLSTM(cfg, ROWS, window=True)
    b = StatefulLSTM(cfg, ROWS, window=True)
    rng = np.random.default_rng(0)
    everyone = np.ones(ROWS, bool)
    for _ in range(warm_steps):
        x = clean(rng)
        a.step(x, everyone)
        b.step(x, everyone)
    return a, b, rng


def assert_banks_equal(a: StatefulLSTM, b: StatefulLSTM) -> None:
    for name, value in a.bank.numpy().items():
        assert np.array_equal(value, b.bank.numpy()[name]), name


def check_rejected_step(a: StatefulLSTM, b: StatefulLSTM, x: np.ndarray) -> None:
    """Step `a` with every row present and `b` with BAD masked; BAD must be rejected in `a`
    and everything else must be exactly as in `b`."""
    before = a.bank.numpy()
    everyone = np.ones(ROWS, bool)
    without_bad = everyone.copy()
    without_bad[BAD] = False
    out = a.step(x, everyone)
    ref = b.step(x, without_bad)
    others = np.arange(ROWS) != BAD

    assert out.rejected.tolist() == [i == BAD for i in range(ROWS)]
    assert not ref.rejected.any()
    assert not out.valid[BAD]
    assert np.array_equal(out.forecasts[BAD], np.zeros(a.horizon, np.float32))
    assert out.target[BAD] == 0
    assert np.isfinite(out.forecasts).all() and np.isfinite(out.target).all()
    after = a.bank.numpy()
    for name in before:  # every old value of the rejected row, bit for bit
        assert np.array_equal(before[name][BAD], after[name][BAD]), name
        assert np.isfinite(after[name]).all(), name
    assert np.array_equal(out.forecasts[others], ref.forecasts[others])
    assert np.array_equal(out.valid, ref.valid)
    assert np.array_equal(out.target[others], ref.target[others])
    assert_banks_equal(a, b)  # b's BAD row was masked: it kept its state too
    # The window saw the rejected row as not valid, and only finite numbers.
    ring_a, ring_b = a.window.numpy(), b.window.numpy()
    slot = (int(a.window.pos.numpy()) - 1) % a.window.window
    assert not ring_a["valid"][slot, BAD]
    for name, value in ring_a.items():
        assert np.isfinite(value).all(), name
        assert np.array_equal(value[:, others], ring_b[name][:, others]), name


def check_both_go_on(a: StatefulLSTM, b: StatefulLSTM, rng: np.random.Generator) -> None:
    """After a rejection the row is usable again and both runs stay identical."""
    everyone = np.ones(ROWS, bool)
    for _ in range(3):
        x = clean(rng)
        out, ref = a.step(x, everyone), b.step(x, everyone)
        assert not out.rejected.any()
        assert out.valid.all()
        assert np.array_equal(out.forecasts, ref.forecasts)
        assert np.array_equal(out.target, ref.target)
    assert_banks_equal(a, b)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager-graph"])
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize(
    "value", [3e38, -3e38, np.inf, np.nan], ids=["3e38", "-3e38", "inf", "nan"]
)
def test_a_row_fed_a_huge_feature_is_rejected_and_keeps_its_state(transform, jit, value):
    a, b, rng = twin_models(transform, jit)
    x = clean(rng)
    x[BAD, 1] = value  # a non-target feature: (x - mean) * (x - new_mean) overflows

    check_rejected_step(a, b, x)
    check_both_go_on(a, b, rng)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager-graph"])
@pytest.mark.parametrize("transform", ["diff", "none"])
def test_a_huge_target_is_rejected_and_keeps_its_state(transform, jit):
    a, b, rng = twin_models(transform, jit)
    x = clean(rng)
    x[BAD, 0] = 3e38

    check_rejected_step(a, b, x)
    check_both_go_on(a, b, rng)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager-graph"])
@pytest.mark.parametrize("value", [0.0, np.inf, np.nan], ids=["zero", "inf", "nan"])
def test_a_log_return_target_that_log_cannot_take_is_rejected(jit, value):
    a, b, rng = twin_models("log_return", jit)
    x = clean(rng)
    x[BAD, 0] = value  # log(0) = -inf

    check_rejected_step(a, b, x)
    check_both_go_on(a, b, rng)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager-graph"])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_a_row_whose_stored_m2_is_near_float32_max_is_rejected(transform, jit):
    a, b, rng = twin_models(transform, jit)
    for model in (a, b):
        row = model.bank.read_rows([BAD])
        row["norm_m2"][0, 1] = F32_MAX
        row["norm_mean"][0, 1] = -1e16  # delta ~ 1e16: m2 + delta * delta * n/(n+1) = inf
        model.bank.write_rows([BAD], row)

    check_rejected_step(a, b, clean(rng))


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager-graph"])
def test_a_present_row_with_nothing_wrong_is_never_rejected(jit):
    a, _, rng = twin_models("log_return", jit, warm_steps=0)
    first = a.step(clean(rng), np.ones(ROWS, bool))  # warm-up: not valid, not rejected
    assert not first.valid.any() and not first.rejected.any()
    mask = np.ones(ROWS, bool)
    mask[BAD] = False
    out = a.step(clean(rng), mask)  # masked: neither valid nor rejected
    assert not out.rejected.any()
    assert out.valid.tolist() == mask.tolist()


def test_the_compiled_step_reports_forecasts_valid_target_rejected():
    model = StatefulLSTM(make_config("none", jit=True), ROWS)
    assert tuple(model._step_fn.structured_outputs.shape) == (ROWS, model.horizon + 3)


# ------------------------------------------------------------------ the forecaster


def forecaster(transform: str = "log_return", learn: bool = False) -> Forecaster:
    return Forecaster(make_config(transform, jit=True, learn=learn), clock=lambda: 2e9)


def events(step: int, bad: float | None = None, column: int = 1) -> list[Event]:
    """One event for each of E0, E1, E2; E1's `column` is `bad` if given."""
    rng = np.random.default_rng(step)
    out = []
    for i in range(3):
        values = [float(v) for v in rng.uniform(1.0, 2.0, size=len(FEATURES))]
        if i == 1 and bad is not None:
            values[column] = bad
        out.append(Event(f"E{i}", 1_800_000_000.0 + step, tuple(values)))
    return out


def apply_step(core: Forecaster, step: int, bad: float | None = None, column: int = 1):
    for event in events(step, bad, column):
        core.ingest(event)
    (result,) = core.flush()
    return result


def test_a_rejected_row_does_not_move_last_step_nor_get_scored():
    core = forecaster()
    for t in range(4):
        result = apply_step(core, t)
        assert not result.rejected.any()
    slot = core.registry.slot_of("E1")
    last = core.last_step.copy()
    scored = core.prequential.total.n.copy()
    core.take_dirty()

    result = apply_step(core, 4, bad=3e38)

    assert result.entities == ("E0", "E1", "E2")
    assert result.rejected.tolist() == [False, True, False]
    assert result.valid.tolist() == [True, False, True]
    assert np.array_equal(result.forecasts[1], np.zeros(core.model.horizon))
    assert core.last_step[slot] == last[slot]
    others = [core.registry.slot_of(e) for e in ("E0", "E2")]
    assert (core.last_step[others] == result.step).all()
    assert slot not in core.take_dirty()
    assert np.array_equal(core.prequential.total.n[slot], scored[slot])
    # The next clean event of E1 is applied as usual.
    result = apply_step(core, 5)
    assert not result.rejected.any() and result.valid.all()
    assert core.last_step[slot] == result.step


@pytest.mark.parametrize("column", [0, 1], ids=["target", "feature"])
def test_a_rejected_row_leaves_the_training_window_finite(column):
    """The window multiplies recorded values by their mask; an inf recorded for a rejected
    row would make the loss NaN and every update would be discarded."""
    core = forecaster("diff", learn=True)
    for t in range(20):
        # Batch 9: inside the window of the update at batch 12 (window 6, every 6 batches).
        result = apply_step(core, t, bad=np.inf if t == 8 else None, column=column)
        assert result.rejected.any() == (t == 8)
    learner = core.learner
    assert learner is not None
    assert learner.stats.discarded == 0
    assert learner.stats.updates >= 2
    assert all(np.isfinite(w).all() for w in core.model.get_weights())
