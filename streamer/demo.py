"""The in-process demo: a synthetic market streamed through the pure core.

No broker, no Redis: events are generated in this process, fed to `Forecaster` in arrival
order, and the forecasts it returns are printed. It shows the moving parts and their speed;
the Kafka/Redis engine (`streamer run`) wraps the same core.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import TextIO

import numpy as np

from .config import Config
from .errors import EventError
from .forecaster import Forecaster, StepResult
from .prequential import headline
from .synthetic import SyntheticMarket


def run_demo(
    config: Config,
    *,
    entities: int,
    steps: int,
    seed: int,
    show: int = 3,
    out: TextIO = sys.stdout,
) -> dict[str, float]:
    market = SyntheticMarket(
        entities=entities, steps=steps, seed=seed, interval=config.stream.interval
    )
    sim = market.simulate()
    # Like the stack demo, the whole product: the core learns online from the stream.
    config = dataclasses.replace(config, learn=dataclasses.replace(config.learn, enabled=True))
    core = Forecaster(config)
    shown = [market.entity_id(i) for i in range(min(show, entities))]
    n_events = refused = closed = 0
    sq_err = sq_err_persist = 0.0
    scored = 0
    pending: dict[int, np.ndarray] = {}  # step -> one-step forecasts by entity index
    t0 = last_report = time.perf_counter()
    print(
        f"streamer demo: {entities} synthetic entities x {steps} steps, features "
        f"{list(config.stream.features)}, target {config.stream.target} "
        f"({config.stream.target_transform}), LSTM {list(config.model.units)}, "
        f"horizon {config.model.horizon}",
        file=out,
    )

    def on_step(result: StepResult) -> None:
        nonlocal closed, sq_err, sq_err_persist, scored
        closed += 1
        idx = np.fromiter((int(e[3:]) for e in result.entities), dtype=np.int64)
        # Score last step's one-step forecasts against this step's realised log-returns.
        if result.step - 1 in pending:
            prev = pending.pop(result.step - 1)
            t = result.step - base_step
            realised = sim["ret"][t, idx]
            before = sim["ret"][t - 1, idx] if t >= 1 else np.zeros(len(idx))
            ok = ~np.isnan(prev[idx]) & result.valid
            sq_err += float(np.sum((prev[idx][ok] - realised[ok]) ** 2))
            sq_err_persist += float(np.sum((before[ok] - realised[ok]) ** 2))
            scored += int(ok.sum())
        row = np.full(entities, np.nan)
        row[idx[result.valid]] = result.forecasts[result.valid, 0]
        pending[result.step] = row
        if closed % max(1, steps // 10) == 0 or closed == steps:
            parts = []
            for entity in shown:
                if entity in result.entities:
                    j = result.entities.index(entity)
                    parts.append(
                        f"{entity} next={result.levels[j, 0]:.4f} "
                        f"(ret {result.forecasts[j, 0]:+.5f})"
                    )
            print(f"  step {result.step}: " + "; ".join(parts), file=out)

    base_step = int(market.start_ts // config.stream.interval)
    for raw in market.events():
        n_events += 1
        try:
            core.ingest(raw)
        except EventError as exc:
            refused += 1
            print(f"  refused ({exc.reason}): {exc}", file=out)
            continue
        for result in core.advance():
            on_step(result)
        now = time.perf_counter()
        if now - last_report >= 1.0:
            last_report = now
            print(
                f"  .. {n_events} events, {closed} steps closed, "
                f"{n_events / (now - t0):,.0f} events/s",
                file=out,
            )
    for result in core.flush():
        on_step(result)
    elapsed = time.perf_counter() - t0
    # The engine's own prequential scores: one step ahead, judged against the best naive.
    h1 = core.prequential.summary("total")[0]
    summary = {
        "events": n_events,
        "refused": refused,
        "steps_closed": closed,
        "duplicates": core.aligner.duplicates,
        "late": core.aligner.late,
        "events_per_s": round(n_events / elapsed, 1),
        "mse_model_one_step": sq_err / max(scored, 1),
        "mse_persistence_one_step": sq_err_persist / max(scored, 1),
        "mse_oracle": float(np.mean(market.params()["sigma"] ** 2)),
        "skill_one_step": _float(h1.get("skill")),
        "share_entities_beating_baseline_one_step": _float(
            h1.get("share_entities_beating_baseline")
        ),
        "dm_p_value_one_step": _float(h1.get("dm_p_value")),
    }
    print(
        f"done: {n_events} events, {closed} steps in {elapsed:.1f} s "
        f"({summary['events_per_s']:,.0f} events/s); one-step MSE model "
        f"{summary['mse_model_one_step']:.3g} vs oracle {summary['mse_oracle']:.3g}; "
        f"one step ahead: {headline(h1)}",
        file=out,
    )
    return summary


def _float(value: float | None) -> float:
    return float("nan") if value is None else float(value)
