"""Invariant 1 end to end: SIGKILL the engine at random moments; the results do not change.

One input stream (the synthetic market, 400 entities x 300 steps) is consumed twice. Its
events are sent slightly out of step order (each entity's own events stay in order): events of
step s+1 come before some of step s, in every partition. A checkpoint's position is then the
offset of the oldest event of an open step, and a restart reads again events of steps that had
closed, which must be skipped as replays (`AddStatus.REPLAYED`), not applied twice.

- run A: one engine, never interrupted, until idle;
- run B: another group, namespace and output topic; the engine is SIGKILLed at three random
  moments and restarted each time; the last run ends when idle. Kill k comes as soon as the
  run has published a forecast for a random step of band k (seeded; the bands cover steps 30
  to 250, the output topic is watched as it grows). Checkpoints are due every 20 steps and
  written between bursts of closed steps, so the kills land between two checkpoints, some
  inside the replay that follows a restart.

B's output is at-least-once. De-duplicated by (entity, step) it must hold exactly A's keys, and
every B message (duplicates included) must carry A's forecast; the states both runs leave in
Redis (rows, last steps, positions) must be equal.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from engine_harness import (
    EngineProcess,
    TopicCounter,
    assert_same_forecasts,
    checkpoint_step,
    config_of,
    engine_env,
    forecasts_by_key,
    read_topic,
)

from streamer.forecaster import Forecaster
from streamer.produce import EventProducer
from streamer.state.format import unpack_arrays
from streamer.state.redis_store import RedisStore
from streamer.synthetic import DEFAULT_START_TS, SyntheticMarket

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENTITIES = 400
STEPS = 300
EXPECTED = ENTITIES * (STEPS - 1)  # the first step of each entity only warms up (log_return)
SEED = 20260101
FIRST_STEP = int(DEFAULT_START_TS)  # interval 1 s
# Each kill comes when the run publishes a forecast for a random step of its band.
# The last band ends 50 steps before the stream does, so the kill comes before the run
# reaches its final checkpoint (the kills land 5 to 15 steps after their target step).
KILL_BANDS = ((30, 110), (110, 190), (190, 250))


def _overlapping_steps(market: SyntheticMarket, rng: random.Random) -> list[dict[str, Any]]:
    """The market's events, sent in the order of a random key in [step, step + 1.2).

    Steps overlap in the send order, but an event of step s never comes after one of step
    s + 2 (so none is late with the default 1 s of allowed lateness), and each entity's events
    keep their order (the key never goes down for one entity).
    """
    last_key: dict[str, float] = {}
    keyed = []
    for i, ev in enumerate(market.events()):
        step = ev["ts"] - DEFAULT_START_TS
        key = max(int(step) + rng.uniform(0.0, 1.2), last_key.get(ev["entity"], -1.0) + 1e-9)
        last_key[ev["entity"]] = key
        keyed.append((key, i, ev))
    keyed.sort(key=lambda k: (k[0], k[1]))
    return [ev for _key, _i, ev in keyed]


def _run_until_idle(env: dict[str, str], logdir: Path, name: str) -> EngineProcess:
    engine = EngineProcess(env, logdir, name, idle_exit_s=3.0).start()
    try:
        rc = engine.wait()
    finally:
        engine.stop()
    assert rc == 0, f"engine {name} exited with {rc}\n{engine.log_tail()}"
    return engine


@pytest.mark.parametrize("learn", [False, True], ids=["frozen", "learning"])
def test_sigkill_at_random_moments_changes_no_forecast_and_no_state(
    kafka_bootstrap: str,
    redis_url: str,
    unique: Callable[[str], str],
    tmp_path: Path,
    learn: bool,
) -> None:
    """With learning on, updates every 8 steps land between and around the kills: the
    weights, their versions and the learner's window must come back exactly too."""
    rng = random.Random(SEED + int(learn))
    extra = {"STREAMER_LEARN_ENABLED": "true"} if learn else {}
    topic = unique("market")
    env_a = engine_env(
        bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        group=unique("group-a"),
        input_topic=topic,
        output_topic=unique("out-a"),
        dlq_topic=unique("dlq-a"),
        every_steps=20,
        extra=extra,
    )
    env_b = engine_env(
        bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        group=unique("group-b"),
        input_topic=topic,
        output_topic=unique("out-b"),
        dlq_topic=unique("dlq-b"),
        every_steps=20,
        extra=extra,
    )
    config = config_of(env_a)
    layout = Forecaster(config).layout
    t0 = time.monotonic()
    market = SyntheticMarket(entities=ENTITIES, steps=STEPS, seed=7)
    with EventProducer(config) as out:
        for ev in _overlapping_steps(market, random.Random(SEED + 1)):
            out.send(ev["entity"], ev["ts"], [ev["values"]["price"], ev["values"]["signal"]])
    assert out.sent == ENTITIES * STEPS
    produced_s = time.monotonic() - t0

    # ---- run A: uninterrupted
    t0 = time.monotonic()
    run_a = _run_until_idle(env_a, tmp_path, "a")
    run_a_s = time.monotonic() - t0
    stats_a = run_a.summary()
    assert stats_a["consumed"] == ENTITIES * STEPS
    assert stats_a["steps"] == STEPS
    assert stats_a["forecasts"] == EXPECTED
    assert stats_a["dead_lettered"] == {} and stats_a["late"] == 0

    # ---- run B: SIGKILL at three random moments, restart each time
    ns_b = config_of(env_b).namespace
    watcher = TopicCounter(kafka_bootstrap, env_b["STREAMER_KAFKA_OUTPUT_TOPIC"], forecasts=True)
    kills: list[dict[str, object]] = []
    runs: list[EngineProcess] = []
    try:
        for k, (low, high) in enumerate(KILL_BANDS):
            # Kill k comes once this run has published a forecast for a random step of its
            # band: in the middle of closing steps, after a checkpoint or inside the replay
            # that follows a restart, wherever that step falls.
            target = FIRST_STEP + rng.randint(low, high)
            watcher.drain()
            watcher.mark()
            engine = EngineProcess(env_b, tmp_path, f"b{k}", idle_exit_s=3.0).start()
            runs.append(engine)
            try:
                deadline = time.monotonic() + 120
                while (watcher.max_step or 0) < target:
                    watcher.count()
                    if engine.poll() is not None:
                        raise AssertionError(
                            f"engine b{k} exited ({engine.poll()}) before its kill\n"
                            f"{engine.log_tail()}"
                        )
                    assert time.monotonic() < deadline, f"b{k}: no kill moment in 120 s"
                    time.sleep(0.005)
                rc = engine.kill()
            finally:
                engine.stop()
            assert rc == -signal.SIGKILL
            kills.append(
                {
                    "at_step": target - FIRST_STEP,
                    "output_at_kill": watcher.drain(),
                    "newest_step_published": (watcher.max_step or 0) - FIRST_STEP,
                    "checkpointed": (done := checkpoint_step(redis_url, ns_b)) is not None,
                    "checkpoint_step": (done or FIRST_STEP) - FIRST_STEP,
                    "join_s": engine.join_seconds(),
                    "lived_s": round((engine.ended_at or 0.0) - engine.started_at, 1),
                }
            )
        t0 = time.monotonic()
        final = _run_until_idle(env_b, tmp_path, "b-final")
        final_s = time.monotonic() - t0
        runs.append(final)
    finally:
        watcher.close()
    stats_b = final.summary()

    # ---- forecasts: B de-duplicated == A, and every B copy equals A's
    out_a = forecasts_by_key(read_topic(kafka_bootstrap, env_a["STREAMER_KAFKA_OUTPUT_TOPIC"]))
    msgs_b = read_topic(kafka_bootstrap, env_b["STREAMER_KAFKA_OUTPUT_TOPIC"])
    out_b = forecasts_by_key(msgs_b)
    assert len(out_a) == EXPECTED
    assert all(len(v) == 1 for v in out_a.values()), "an uninterrupted run published a duplicate"
    assert_same_forecasts(out_b, out_a, atol=1e-6)
    duplicates = len(msgs_b) - len(out_b)

    # ---- final states in Redis: equal for both namespaces
    partitions = range(config.kafka.partitions)
    state_a = RedisStore(redis_url, config_of(env_a).namespace).load(topic, partitions, layout)
    state_b = RedisStore(redis_url, config_of(env_b).namespace).load(topic, partitions, layout)
    assert state_a.positions == state_b.positions
    assert sum(state_a.positions.values()) == ENTITIES * STEPS
    assert state_a.steps == state_b.steps
    rows_a = {e.entity: e for e in state_a.entities}
    rows_b = {e.entity: e for e in state_b.entities}
    assert len(rows_a) == ENTITIES and rows_a.keys() == rows_b.keys()
    for name, ea in rows_a.items():
        eb = rows_b[name]
        assert (ea.partition, ea.last_step) == (eb.partition, eb.last_step), name
        np.testing.assert_allclose(eb.row, ea.row, rtol=0, atol=1e-6, err_msg=name)
    assert {e.last_step for e in state_a.entities} == {max(e.last_step for e in state_a.entities)}
    assert state_a.weights_version == state_b.weights_version
    if learn:
        version = state_a.weights_version
        assert version is not None and version >= 20, "300 steps should give many updates"
        assert {m["model_version"] for v in out_a.values() for m in v} >= {0, version}
        wa = unpack_arrays(
            RedisStore(redis_url, config_of(env_a).namespace).get_weights(version) or b""
        )
        wb = unpack_arrays(RedisStore(redis_url, ns_b).get_weights(version) or b"")
        assert wa.keys() == wb.keys()
        for key in wa:
            np.testing.assert_allclose(wb[key], wa[key], rtol=0, atol=1e-6, err_msg=key)

    # Each restart resumed from the checkpoint written before the kill (states and
    # positions), or from scratch when the kill came before the first checkpoint.
    restarts = [run.assignments() for run in runs[1:]]
    for k, assigned in enumerate(restarts, start=1):
        assert assigned, f"run {k} of B was never assigned partitions"
        restored, positions = assigned[0]
        if kills[k - 1]["checkpointed"]:
            assert restored == ENTITIES, f"restart {k} restored {restored} entities"
            assert all(pos is not None for pos in positions.values()), positions
        else:
            assert restored == 0 and set(positions.values()) == {None}
    assert kills[-1]["checkpointed"], "no checkpoint before the last kill"
    assert 0 < stats_b["consumed"] < ENTITIES * STEPS
    # The overlap of steps made the last restart read events of closed steps again.
    assert stats_b["replayed"] > 0
    print(
        f"\nrestarts resumed at {[sum(a[0][1].values()) for a in restarts]} of "
        f"{ENTITIES * STEPS} input offsets; "
        f"produce {produced_s:.1f} s, run A {run_a_s:.1f} s, final B run {final_s:.1f} s "
        f"(join {final.join_seconds()} s, stats {stats_b}); B published {len(msgs_b)} "
        f"messages for {len(out_b)} keys ({duplicates} duplicates); kills {kills}"
    )
    # The kills happened mid-stream: B needed restarts and replayed something.
    assert duplicates > 0
