"""Invariant 5 end to end: bad input never crashes the engine and never reaches a state.

Eight entities report for 34 steps (one of them, E07, is silent from step 5 to step 16). Into
that stream, keyed by real entities so that they share partitions with good events, go the
messages of the matrix below. Each refused one must land in the dead-letter topic exactly
once, with the reason and the source topic, partition and offset in its headers; a duplicate
(entity, step) is counted, not refused. The engine must keep running and its forecasts and
final states must equal those of a second engine that read only the good events.

Late events need a step that has closed: they are sent in a second phase, once the output
topic shows that step 10 has closed. A third phase restarts the engine and feeds it, as its
very first event, one whose time lies 10^7 steps ahead of the stream (a clock in the wrong
unit, a stray "now"): it must be refused like the same event in the middle of the stream.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from engine_harness import (
    EngineProcess,
    Message,
    TopicCounter,
    assert_same_forecasts,
    config_of,
    engine_env,
    forecasts_by_key,
    read_topic,
)

from streamer.codec import encode_event
from streamer.config import DEFAULT_MAX_MESSAGE_BYTES
from streamer.forecaster import Forecaster
from streamer.kafka_io import DLQ_OFFSET, DLQ_PARTITION, DLQ_REASON, DLQ_TOPIC
from streamer.produce import EventProducer
from streamer.state.redis_store import RedisStore
from streamer.synthetic import DEFAULT_START_TS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENTITIES = [f"E{i:02d}" for i in range(8)]
STEPS = 34
PHASE_ONE = 15  # steps 0..14 come before the engine starts, 15..29 after step 10 closed
RESTART_AT = 30  # steps 30..33 come after a restart
GAP = range(5, 17)  # E07 is silent in these steps (past phase one)
T0 = DEFAULT_START_TS


def _good_events() -> list[tuple[str, float, list[float]]]:
    rng = np.random.default_rng(11)
    price = rng.uniform(20, 200, len(ENTITIES))
    out = []
    for t in range(STEPS):
        price = price * np.exp(rng.normal(0, 0.01, len(ENTITIES)))
        signal = rng.normal(0, 1, len(ENTITIES))
        for i in rng.permutation(len(ENTITIES)):
            if ENTITIES[i] == "E07" and t in GAP:
                continue
            ts = T0 + t + 0.05 + 0.1 * i
            out.append((ENTITIES[i], ts, [float(price[i]), float(signal[i])]))
    return out


def _raw(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _bad_matrix(now: float) -> list[tuple[str, str, bytes | None, str]]:
    """(case, key, value, expected reason) of every refused message of phase one."""
    ts = T0 + 3.5  # inside an open step: accepted by mistake, it would change a state
    ok = [101.0, 0.5]
    huge = _raw(
        {"entity": "E01", "ts": ts, "values": ok, "pad": "x" * (DEFAULT_MAX_MESSAGE_BYTES + 1)}
    )
    assert len(huge) > DEFAULT_MAX_MESSAGE_BYTES
    return [
        ("not JSON", "E00", b'{"entity": "E00", "ts": ', "undecodable"),
        ("not UTF-8", "E01", b"\xff\xfe\xfa binary", "undecodable"),
        ("tombstone", "E02", None, "undecodable"),
        ("JSON array", "E03", b"[1, 2, 3]", "not_an_object"),
        ("entity not a string", "E04", _raw({"entity": 4, "ts": ts, "values": ok}), "wrong_type"),
        ("ts a string", "E05", _raw({"entity": "E05", "ts": "noon", "values": ok}), "wrong_type"),
        (
            "value a string",
            "E06",
            _raw({"entity": "E06", "ts": ts, "values": [101.0, "high"]}),
            "wrong_type",
        ),
        ("values a number", "E00", _raw({"entity": "E00", "ts": ts, "values": 3.0}), "wrong_type"),
        ("missing ts", "E01", _raw({"entity": "E01", "values": ok}), "missing_field"),
        ("missing values", "E02", _raw({"entity": "E02", "ts": ts}), "missing_field"),
        (
            "extra feature (list)",
            "E03",
            _raw({"entity": "E03", "ts": ts, "values": [101.0, 0.5, 7.0]}),
            "feature_count",
        ),
        (
            "extra feature (object)",
            "E04",
            _raw(
                {"entity": "E04", "ts": ts, "values": {"price": 101.0, "signal": 0.5, "volume": 9}}
            ),
            "unknown_feature",
        ),
        (
            "missing feature (object)",
            "E05",
            _raw({"entity": "E05", "ts": ts, "values": {"price": 101.0}}),
            "feature_count",
        ),
        (
            "unknown field",
            "E06",
            _raw({"entity": "E06", "ts": ts, "values": ok, "source": "test"}),
            "unknown_field",
        ),
        ("NaN value", "E00", b'{"entity":"E00","ts":%r,"values":[NaN,0.5]}' % ts, "non_finite"),
        (
            "inf value",
            "E01",
            b'{"entity":"E01","ts":%r,"values":[101.0,Infinity]}' % ts,
            "non_finite",
        ),
        (
            "-inf value",
            "E02",
            b'{"entity":"E02","ts":%r,"values":[101.0,-Infinity]}' % ts,
            "non_finite",
        ),
        ("NaN ts", "E03", b'{"entity":"E03","ts":NaN,"values":[101.0,0.5]}', "non_finite"),
        (
            "beyond float32",
            "E04",
            _raw({"entity": "E04", "ts": ts, "values": [1e39, 0.5]}),
            "non_finite",
        ),
        ("huge payload", "E05", huge, "too_large"),
        (
            "entity with a space",
            "E06",
            _raw({"entity": "E 06", "ts": ts, "values": ok}),
            "bad_entity",
        ),
        ("empty entity", "E00", _raw({"entity": "", "ts": ts, "values": ok}), "bad_entity"),
        (
            "entity too long",
            "E01",
            _raw({"entity": "E" * 200, "ts": ts, "values": ok}),
            "bad_entity",
        ),
        (
            "ts far in the future",
            "E02",
            _raw({"entity": "E02", "ts": now + 30 * 86_400, "values": ok}),
            "ts_in_future",
        ),
        (
            "ts far in the past",
            "E03",
            _raw({"entity": "E03", "ts": 1000.0, "values": ok}),
            "ts_too_old",
        ),
        (
            "ts 10^7 steps ahead of the stream",
            "E04",
            _raw({"entity": "E04", "ts": now - 3600.0, "values": ok}),
            "ts_too_far_ahead",
        ),
        (
            "zero price",
            "E05",
            _raw({"entity": "E05", "ts": ts, "values": [0.0, 0.5]}),
            "non_positive_target",
        ),
        (
            "negative price",
            "E06",
            _raw({"entity": "E06", "ts": ts, "values": [-3.5, 0.5]}),
            "non_positive_target",
        ),
    ]


def _late_matrix() -> list[tuple[str, str, bytes | None, str]]:
    """Phase two (step 10 has closed): events for closed steps."""
    return [
        # E07 was silent in step 6 (its state is still at step 4): the step closed without it.
        ("late, known entity", "E07", encode_event("E07", T0 + 6.5, [50.0, 0.1]), "late"),
        ("late, new entity", "NEW01", encode_event("NEW01", T0 + 2.5, [50.0, 0.1]), "late"),
    ]


# Phase two: a late correction of an event that was applied (E01, step 3). The engine cannot
# tell it from a replay after a restart (its step is at or before the entity's last applied
# step), so it may skip it as `replayed` or refuse it as `late`; it must never apply it.
LATE_CORRECTION = encode_event("E01", T0 + 3.07, [999.0, 9.0])


def _send(out: EventProducer, cases: list[tuple[str, str, bytes | None, str]]) -> None:
    for _case, key, value, _reason in cases:
        out.send_raw(key, value)  # type: ignore[arg-type]  # None: a tombstone


def _headers(m: Message) -> dict[str, str]:
    return {k: v.decode() for k, v in m.headers.items()}


def test_bad_input_goes_to_the_dead_letter_topic_and_never_reaches_a_state(
    kafka_bootstrap: str, redis_url: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    bad_env = engine_env(
        bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        group=unique("group-bad"),
        input_topic=unique("dirty"),
        output_topic=unique("out-bad"),
        dlq_topic=unique("dlq-bad"),
        every_steps=5,
    )
    ref_env = engine_env(
        bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        group=unique("group-ref"),
        input_topic=unique("clean"),
        output_topic=unique("out-ref"),
        dlq_topic=unique("dlq-ref"),
        every_steps=5,
    )
    bad_cfg, ref_cfg = config_of(bad_env), config_of(ref_env)
    layout = Forecaster(bad_cfg).layout
    now = time.time()
    good = _good_events()
    bad = _bad_matrix(now)
    late = _late_matrix()
    jump = (
        "ts 10^7 steps ahead, first after a restart",
        "E03",
        _raw({"entity": "E03", "ts": now - 1800.0, "values": [101.0, 0.5]}),
        "ts_too_far_ahead",
    )
    expected_reason: dict[bytes | None, str] = {
        value: reason for _c, _k, value, reason in [*bad, *late, jump]
    }
    assert len(expected_reason) == len(bad) + len(late) + 1, "every bad message must be unique"

    # The reference stream: the good events only.
    with EventProducer(ref_cfg) as out:
        for entity, ts, values in good:
            out.send(entity, ts, values)
    reference = EngineProcess(ref_env, tmp_path, "reference", idle_exit_s=3.0).start()

    # Phase one: steps 0..14 with the matrix spread into steps 3..14, and one duplicate.
    phase_one = [g for g in good if g[1] < T0 + PHASE_ONE]
    phase_two = [g for g in good if T0 + PHASE_ONE <= g[1] < T0 + RESTART_AT]
    phase_three = [g for g in good if g[1] >= T0 + RESTART_AT]
    first_bad_at = next(i for i, g in enumerate(phase_one) if g[1] >= T0 + 3)
    spread = np.linspace(first_bad_at, len(phase_one) - 1, len(bad)).astype(int).tolist()
    duplicate = next(g for g in phase_one if g[0] == "E01" and int(g[1] - T0) == 3)
    with EventProducer(bad_cfg) as out:
        pending = list(bad)
        for i, (entity, ts, values) in enumerate(phase_one):
            out.send(entity, ts, values)
            if (entity, ts) == duplicate[:2]:
                out.send(entity, ts, values)  # the same (entity, step) again: counted, kept
            while pending and spread[len(bad) - len(pending)] == i:
                _send(out, [pending.pop(0)])
        assert not pending
    engine = EngineProcess(bad_env, tmp_path, "dirty", idle_exit_s=6.0).start()
    restarted = EngineProcess(bad_env, tmp_path, "dirty-restarted", idle_exit_s=6.0)
    counter = TopicCounter(kafka_bootstrap, bad_env["STREAMER_KAFKA_OUTPUT_TOPIC"])
    try:
        # Phase two. Step 0 only warms up (no forecast) and no step holds more than 8
        # forecasts, so 80 forecasts mean that steps 1..10 at least have closed.
        deadline = time.monotonic() + 90
        while counter.count() < 80:
            assert engine.poll() is None, f"engine exited\n{engine.log_tail()}"
            assert time.monotonic() < deadline, f"no forecasts\n{engine.log_tail()}"
            time.sleep(0.02)
        assert engine.poll() is None, "the engine stopped on bad input"
        with EventProducer(bad_cfg) as out:
            _send(out, late)
            out.send_raw("E01", LATE_CORRECTION)
            for entity, ts, values in phase_two:
                out.send(entity, ts, values)
        rc = engine.wait()
        assert rc == 0, f"engine with bad input exited {rc}\n{engine.log_tail()}"

        # Phase three: a restart whose first event is 10^7 steps ahead of the stream (the
        # restarted aligner has seen no event yet, only the checkpoint's step), then the
        # remaining good steps once the engine had time to read it.
        with EventProducer(bad_cfg) as out:
            _send(out, [jump])
        restarted.start()
        deadline = time.monotonic() + 90
        while not restarted.assigned_logged():
            assert restarted.poll() is None, f"restart exited\n{restarted.log_tail()}"
            assert time.monotonic() < deadline, f"restart not assigned\n{restarted.log_tail()}"
            time.sleep(0.05)
        time.sleep(2.0)
        with EventProducer(bad_cfg) as out:
            for entity, ts, values in phase_three:
                out.send(entity, ts, values)
        rc = restarted.wait()
        assert rc == 0, f"restarted engine exited {rc}\n{restarted.log_tail()}"
        ref_rc = reference.wait()
    finally:
        counter.close()
        engine.stop()
        restarted.stop()
        reference.stop()
    assert ref_rc == 0, f"reference engine exited {ref_rc}\n{reference.log_tail()}"

    # ---- counts
    stats, again, ref_stats = engine.summary(), restarted.summary(), reference.summary()
    want_counts = Counter(reason for _c, _k, _v, reason in bad + late)
    correction_refused = stats["replayed"] == 0  # else it was skipped as a replay
    if correction_refused:
        want_counts["late"] += 1
        expected_reason[LATE_CORRECTION] = "late"
    assert stats["replayed"] == 1 - correction_refused
    assert stats["dead_lettered"] == dict(want_counts)
    assert stats["late"] == want_counts["late"]
    assert stats["duplicates"] == 1
    assert stats["consumed"] == len(phase_one) + len(phase_two) + 1 + len(bad) + len(late) + 1
    assert (
        stats["applied"] == len(phase_one) + len(phase_two) + 1
    )  # the duplicate replaced its twin
    assert stats["steps"] == RESTART_AT
    assert again["dead_lettered"] == {"ts_too_far_ahead": 1}, again
    assert again["consumed"] == len(phase_three) + 1 and again["replayed"] == 0
    assert again["steps"] == STEPS - RESTART_AT
    assert ref_stats["steps"] == STEPS
    assert ref_stats["dead_lettered"] == {} and ref_stats["duplicates"] == 0

    # ---- the dead-letter topic: each refused message once, headers naming its source
    source = {
        (m.partition, m.offset): m for m in read_topic(kafka_bootstrap, bad_cfg.kafka.input_topic)
    }
    refused_at = {pos for pos, m in source.items() if m.value in expected_reason}
    assert len(refused_at) == len(expected_reason)
    dlq = read_topic(kafka_bootstrap, bad_cfg.kafka.dlq)
    seen: dict[tuple[int, int], str] = {}
    limit = bad_cfg.kafka.max_message_bytes
    for m in dlq:
        h = _headers(m)
        assert h[DLQ_TOPIC] == bad_cfg.kafka.input_topic
        pos = (int(h[DLQ_PARTITION]), int(h[DLQ_OFFSET]))
        assert pos not in seen, f"source {pos} dead-lettered twice"
        assert pos in source, f"DLQ names a source {pos} that does not exist"
        original = source[pos]
        assert m.key == original.key
        if original.value is None or len(original.value) <= limit:
            assert m.value == original.value
        else:  # too large to pass on whole: a prefix of it
            assert m.value == original.value[:limit]
        assert h[DLQ_REASON] == expected_reason.get(original.value), (h, original.value[:80])
        seen[pos] = h[DLQ_REASON]
    missing = {source[pos].value[:80] for pos in refused_at - set(seen)}  # type: ignore[index]
    assert not missing, f"refused messages missing from the dead-letter topic: {missing}"

    # ---- the good events' forecasts and final states equal the reference's
    got = forecasts_by_key(read_topic(kafka_bootstrap, bad_cfg.kafka.output_topic))
    want = forecasts_by_key(read_topic(kafka_bootstrap, ref_cfg.kafka.output_topic))
    assert all(len(v) == 1 for v in got.values())
    assert_same_forecasts(got, want, atol=1e-6)
    assert not any(e == "NEW01" or not e.startswith("E") or len(e) != 3 for e, _ in got)
    parts = range(bad_cfg.kafka.partitions)
    state = RedisStore(redis_url, bad_cfg.namespace).load(bad_cfg.kafka.input_topic, parts, layout)
    ref_state = RedisStore(redis_url, ref_cfg.namespace).load(
        ref_cfg.kafka.input_topic, parts, layout
    )
    rows = {e.entity: e for e in state.entities}
    ref_rows = {e.entity: e for e in ref_state.entities}
    assert sorted(rows) == sorted(ref_rows) == ENTITIES
    for name, e in rows.items():
        assert e.last_step == ref_rows[name].last_step == int(T0) + STEPS - 1
        assert np.isfinite(e.row).all()
        np.testing.assert_allclose(e.row, ref_rows[name].row, rtol=0, atol=1e-6, err_msg=name)
    # Positions: everything was applied or refused, nothing is left buffered.
    assert sum(state.positions.values()) == stats["consumed"] + again["consumed"]
    print(
        f"\nengine with bad input: {stats}\nafter the restart: {again}\nreference: {ref_stats}"
        f"\nlate correction of an applied event: "
        f"{'dead-lettered as late' if correction_refused else 'skipped as replayed'}"
    )
