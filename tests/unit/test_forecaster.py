"""The pure core end to end: raw events in, per-entity forecasts out."""

from __future__ import annotations

import numpy as np
import pytest

from streamer import Config, Forecaster
from streamer.aligner import AddStatus
from streamer.config import CapacityConfig, ModelConfig, StreamConfig
from streamer.errors import EventError, Reason
from streamer.synthetic import SyntheticMarket


def config(precision="float32", **capacity) -> Config:
    return Config(
        model=ModelConfig(units=(16,), horizon=3, seed=1, precision=precision),
        capacity=CapacityConfig(**({"initial": 4, "max_entities": 64} | capacity)),
    )


def drive(core: Forecaster, events) -> list:
    results = []
    for raw in events:
        core.ingest(raw)
        results += core.advance()
    return results + core.flush()


def test_synthetic_stream_gives_one_forecast_per_entity_and_step():
    market = SyntheticMarket(entities=10, steps=12, seed=3)
    core = Forecaster(config(), clock=lambda: market.start_ts)
    results = drive(core, market.events())
    assert [r.step for r in results] == list(range(results[0].step, results[0].step + 12))
    sim = market.simulate()
    for t, r in enumerate(results):
        assert len(r.entities) == 10
        assert r.forecasts.shape == (10, 3) and np.isfinite(r.forecasts).all()
        # log_return: the first event of each entity only sets the previous price.
        assert r.valid.all() == (t > 0)
        # Levels are prices compounding the published returns from this step's price.
        idx = [int(e[3:]) for e in r.entities]
        np.testing.assert_allclose(
            r.levels[:, 0], sim["price"][t, idx] * np.exp(r.published[:, 0]), rtol=1e-5
        )
    assert core.registry.capacity == 16  # grew 4 -> 8 -> 16 without losing rows


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_growth_mid_stream_equals_a_run_with_room_from_the_start(precision):
    market = SyntheticMarket(entities=9, steps=8, seed=4)
    events = list(market.events())
    # Entities 5..8 join at step 4: they force a growth from 8 to 16 mid-stream.
    late_joiners = {market.entity_id(i) for i in range(5, 9)}
    first_steps = len(events) // 2
    events = [
        e for k, e in enumerate(events) if k >= first_steps or e["entity"] not in late_joiners
    ]
    small = drive(Forecaster(config(precision, initial=5), clock=lambda: 2e9), events)
    big = drive(Forecaster(config(precision, initial=32), clock=lambda: 2e9), events)
    assert len(small) == len(big)
    for a, b in zip(small, big, strict=True):
        assert a.entities == b.entities
        np.testing.assert_allclose(a.forecasts, b.forecasts, atol=1e-6)


def test_mixed_precision_resumes_exactly_from_exported_rows():
    """States stay float32 under mixed_bfloat16: export, restore elsewhere, same forecasts."""
    market = SyntheticMarket(entities=6, steps=20, seed=5)
    events = list(market.events())
    half = len(events) // 2
    straight = Forecaster(config("mixed_bfloat16", initial=8), clock=lambda: 2e9)
    first = drive(straight, events[:half])
    rest = drive(straight, events[half:])
    original = Forecaster(config("mixed_bfloat16", initial=8), clock=lambda: 2e9)
    assert [r.step for r in drive(original, events[:half])] == [r.step for r in first]
    slots = [original.registry.slot_of(market.entity_id(i)) for i in range(6)]
    entities, rows, last = original.export_rows(slots)
    assert rows.dtype == np.float32
    resumed = Forecaster(config("mixed_bfloat16", initial=8), clock=lambda: 2e9)
    resumed.restore_rows(entities, rows, last, slots_hint=slots)
    resumed.aligner.resume_after(original.aligner.last_closed_step)
    again = drive(resumed, events[half:])
    assert len(rest) >= 8 and [r.step for r in again] == [r.step for r in rest]
    for a, b in zip(rest, again, strict=True):
        assert a.entities == b.entities
        np.testing.assert_array_equal(a.forecasts, b.forecasts)


def test_refused_events_carry_reasons_and_do_not_touch_state():
    core = Forecaster(config(max_entities=2, initial=2), clock=lambda: 2e9)
    ok = {"entity": "A", "ts": 1.8e9, "values": {"price": 10.0, "signal": 0.1}}
    assert core.ingest(ok) is AddStatus.ACCEPTED
    before = core.model.bank.numpy()
    cases = {
        Reason.NON_FINITE: ok | {"values": {"price": float("nan"), "signal": 0.0}},
        Reason.NON_POSITIVE_TARGET: ok | {"values": {"price": -1.0, "signal": 0.0}},
        Reason.MISSING_FIELD: {"entity": "A", "values": [1.0, 2.0]},
        Reason.BAD_ENTITY: ok | {"entity": "not ok!"},
    }
    for reason, raw in cases.items():
        with pytest.raises(EventError) as err:
            core.ingest(raw)
        assert err.value.reason is reason
    core.ingest(ok | {"entity": "B"})
    with pytest.raises(EventError) as err:
        core.ingest(ok | {"entity": "C"})
    assert err.value.reason is Reason.CAPACITY
    after = core.model.bank.numpy()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_reset_entity_touches_only_its_row():
    market = SyntheticMarket(entities=4, steps=5, seed=5)
    core = Forecaster(config(), clock=lambda: 2e9)
    drive(core, market.events())
    before = core.model.bank.numpy()
    core.reset_entity(market.entity_id(2))
    after = core.model.bank.numpy()
    slot = core.registry.slot_of(market.entity_id(2))
    for name in before:
        assert np.all(after[name][slot] == 0)
        rest = np.arange(core.model.capacity) != slot
        assert np.array_equal(before[name][rest], after[name][rest])
    with pytest.raises(KeyError):
        core.reset_entity("nobody")


def test_stream_config_diff_transform_levels_add_up():
    cfg = Config(
        stream=StreamConfig(target_transform="diff"),
        model=ModelConfig(units=(8,), horizon=2),
    )
    core = Forecaster(cfg, clock=lambda: 2e9)
    for t in range(3):
        core.ingest({"entity": "A", "ts": 1.8e9 + t, "values": [100.0 + t, 0.0]})
    [*_, last] = core.advance() + core.flush()
    np.testing.assert_allclose(
        last.levels[0], 102.0 + np.cumsum(last.published[0].astype(np.float64)), rtol=1e-6
    )
