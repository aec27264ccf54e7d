"""A hostile corpus end to end: every malformed message costs one dead letter, nothing more.

Five entities report for 30 steps (E04 only in steps 0, 1 and 15..29). Into that stream go
the messages of `hostile_cases` (encodings, sizes, nesting, number edge cases, structure,
entity and timestamp edge cases, the key contract), each written with kafka-python's
KafkaProducer to the partition of the entity it is keyed by (the key's own partition under
Kafka's default partitioner, or the partition of the value's entity when the key names
none), right after that entity's clean event of the same step, so that a message accepted by
mistake would change a live state. A late event of E04 for step 2 follows once the engine
has visibly closed step 10 (E04 was silent since step 1, so the event is not a replay).

The engine must run until its --idle-exit and exit 0 without a traceback; every hostile
message must appear in the dead-letter topic exactly once, with the expected reason and its
source topic, partition and offset; the clean entities' forecasts and final Redis rows must
equal, bit for bit, those of a second engine (own group, namespace and topics) that read
only the clean events.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable
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
from kafka import KafkaProducer
from kafka.partitioner.default import murmur2

from streamer.codec import encode_event
from streamer.config import DEFAULT_MAX_MESSAGE_BYTES
from streamer.forecaster import Forecaster
from streamer.kafka_io import DLQ_OFFSET, DLQ_PARTITION, DLQ_REASON, DLQ_TOPIC, ensure_topics
from streamer.state.redis_store import RedisStore
from streamer.synthetic import DEFAULT_START_TS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENTITIES = [f"E{i:02d}" for i in range(5)]
HOMES = ENTITIES[:4]  # hostile messages share partitions with these (E04 is mostly silent)
SILENT = "E04"
SILENT_STEPS = range(2, 15)
STEPS = 30
PHASE_ONE = 15  # steps 0..14 before the engine starts, 15..29 once step 10 has closed
HOSTILE_STEPS = range(3, 15)
LATE_STEP = 2
T0 = DEFAULT_START_TS
LIMIT = DEFAULT_MAX_MESSAGE_BYTES
# Phase one closes its steps within a second or two; the engine must still be running when
# the output topic shows it (reading that topic takes a few seconds on a busy machine).
IDLE_EXIT_S = 15.0

Case = tuple[str, bytes | None, str, bytes | None, str]  # name, key, home, value, reason
Clean = tuple[str, int, bytes]  # entity, step, value


def clean_events() -> list[Clean]:
    rng = np.random.default_rng(23)
    price = rng.uniform(20, 200, len(ENTITIES))
    out = []
    for t in range(STEPS):
        price = price * np.exp(rng.normal(0, 0.01, len(ENTITIES)))
        signal = rng.normal(0, 1, len(ENTITIES))
        for i in rng.permutation(len(ENTITIES)):
            if ENTITIES[i] == SILENT and t in SILENT_STEPS:
                continue
            ts = T0 + t + 0.05 + 0.1 * i
            value = encode_event(ENTITIES[i], ts, [float(price[i]), float(signal[i])])
            out.append((ENTITIES[i], t, value))
    return out


def _raw(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def hostile_cases(home: str, step: int, clean: bytes, now: float) -> list[Case]:
    """Every hostile message, built for one home entity and step (`clean`: its clean event
    of that step). Events that would be valid but for one detail carry other values than the
    clean one, so that accepting one by mistake would change the home entity's state."""
    key = home.encode()
    ts = T0 + step + 0.5
    ok = [999.0, 9.0]

    def ev(**fields: Any) -> bytes:
        base: dict[str, Any] = {"entity": home, "ts": ts, "values": ok}
        base.update(fields)
        return _raw({k: v for k, v in base.items() if v is not ...})

    def lit(values: str = "[999.0,9.0]", ts_text: str | None = None) -> bytes:
        """An event written by hand: JSON literals json.dumps cannot produce."""
        return b'{"entity":"%s","ts":%s,"values":%s}' % (
            home.encode(),
            (ts_text or repr(ts)).encode(),
            values.encode(),
        )

    text = ev().decode()
    raw = text.encode()
    big_pad = "x" * (LIMIT + 1 - len(ev(pad="")))
    just_over = ev(pad=big_pad)
    assert len(just_over) == LIMIT + 1
    deep_arrays = b"[" * 30_000 + b"]" * 30_000
    deep_objects = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
    assert len(deep_arrays) <= LIMIT and len(deep_objects) <= LIMIT
    other = next(e for e in HOMES if e != home)
    cases: list[tuple[str, bytes | None, bytes | None, str]] = [
        # --- encodings
        ("invalid UTF-8", key, b"\xff\xfe\xfa binary", "undecodable"),
        ("UTF-16 with BOM", key, text.encode("utf-16"), "undecodable"),
        ("UTF-16-LE without BOM", key, text.encode("utf-16-le"), "undecodable"),
        ("UTF-16-BE without BOM", key, text.encode("utf-16-be"), "undecodable"),
        ("UTF-32", key, text.encode("utf-32"), "undecodable"),
        ("UTF-8 BOM", key, b"\xef\xbb\xbf" + text.encode(), "undecodable"),
        ("latin-1 bytes", key, text.replace(home, "Zürich").encode("latin-1"), "undecodable"),
        ("NUL byte in a string", key, text.replace(home, home + "\x00").encode(), "undecodable"),
        ("NUL byte after the object", key, text.encode() + b"\x00", "undecodable"),
        ("escaped NUL in the entity", key, ev(entity=home + "\x00"), "bad_entity"),
        # "y" as C1 B9, "s" as E0 81 B3: overlong forms a strict UTF-8 decoder refuses
        (
            "overlong UTF-8, 2 bytes",
            key,
            raw.replace(b'"entity"', b'"entit\xc1\xb9"'),
            "undecodable",
        ),
        ("overlong UTF-8, 3 bytes", key, raw.replace(b'"ts"', b'"t\xe0\x81\xb3"'), "undecodable"),
        ("UTF-8-encoded surrogate", key, raw.replace(b'"ts"', b'"ts\xed\xa0\x80"'), "undecodable"),
        (
            "escaped lone surrogate",
            key,
            b'{"entity":"\\ud800","ts":1,"values":[1,2]}',
            "bad_entity",
        ),
        # --- sizes
        ("empty value", key, b"", "undecodable"),
        ("tombstone", key, None, "undecodable"),
        ("1 byte, a brace", key, b"{", "undecodable"),
        ("1 byte, a digit", key, b"7", "not_an_object"),
        ("whitespace only", key, b"   \n", "undecodable"),
        ("just over max_message_bytes", key, just_over, "too_large"),
        ("100,000 nested arrays", key, b"[" * 100_000 + b"]" * 100_000, "too_large"),
        # --- nesting
        ("30,000 nested arrays", key, deep_arrays, "undecodable"),
        ("10,000 nested objects", key, deep_objects, "undecodable"),
        (
            "deep object as a value",
            key,
            ev(values={"price": {"a": {"b": [1]}}, "signal": 9.0}),
            "wrong_type",
        ),
        # --- numbers
        ("NaN literal", key, lit("[NaN,9.0]"), "non_finite"),
        ("Infinity literal", key, lit("[999.0,Infinity]"), "non_finite"),
        ("-Infinity literal", key, lit("[999.0,-Infinity]"), "non_finite"),
        ("1e309", key, lit("[1e309,9.0]"), "non_finite"),
        ("-1e309", key, lit("[999.0,-1e309]"), "non_finite"),
        ("10**400 integer literal", key, lit(f"[999.0,{10**400}]"), "non_finite"),
        ("5000-digit integer literal", key, lit(f"[999.0,{'9' * 5000}]"), "undecodable"),
        ("float32 overflow 3.5e38", key, ev(values=[999.0, 3.5e38]), "non_finite"),
        ("1e16, over max_abs_value", key, ev(values=[999.0, 1e16]), "out_of_range"),
        ("-1e16 target", key, ev(values=[-1e16, 9.0]), "out_of_range"),
        ("1e16 target", key, ev(values=[1e16, 9.0]), "out_of_range"),
        ("subnormal 5e-324 target", key, lit("[5e-324,9.0]"), "out_of_range"),
        ("float32 subnormal 1e-40 target", key, ev(values=[1e-40, 9.0]), "out_of_range"),
        ("-0.0 target", key, lit("[-0.0,9.0]"), "non_positive_target"),
        ("0 target", key, ev(values=[0, 9.0]), "non_positive_target"),
        ("true as a value", key, lit("[999.0,true]"), "wrong_type"),
        ("false as a value", key, lit("[false,9.0]"), "wrong_type"),
        ("null as a value", key, lit("[999.0,null]"), "wrong_type"),
        ("number as a string", key, ev(values=["999.0", 9.0]), "wrong_type"),
        ("object value as a string", key, ev(values={"price": 999.0, "signal": "9"}), "wrong_type"),
        # --- structure
        ("array top level", key, b"[1,2,3]", "not_an_object"),
        ("string top level", key, b'"E00"', "not_an_object"),
        ("number top level", key, b"3.5", "not_an_object"),
        ("null top level", key, b"null", "not_an_object"),
        ("empty object", key, b"{}", "missing_field"),
        ("missing entity", key, ev(entity=...), "missing_field"),
        ("missing ts", key, ev(ts=...), "missing_field"),
        ("missing values", key, ev(values=...), "missing_field"),
        ("unknown field", key, ev(source="test"), "unknown_field"),
        ("field name in another case", key, ev(Entity=home), "unknown_field"),
        ("too few features", key, ev(values=[999.0]), "feature_count"),
        ("too many features", key, ev(values=[999.0, 9.0, 1.0]), "feature_count"),
        ("no features", key, ev(values=[]), "feature_count"),
        ("missing feature (object)", key, ev(values={"price": 999.0}), "feature_count"),
        (
            "unknown feature",
            key,
            ev(values={"price": 999.0, "signal": 9.0, "volume": 1}),
            "unknown_feature",
        ),
        ("values a string", key, ev(values="999,9"), "wrong_type"),
        ("values null", key, ev(values=None), "wrong_type"),
        ("trailing garbage", key, text.encode() + b"x", "undecodable"),
        ("two objects", key, text.encode() * 2, "undecodable"),
        ("a comment", key, b"/* hi */" + text.encode(), "undecodable"),
        (
            "duplicate entity",
            key,
            text.replace('"entity"', f'"entity":"{other}","entity"', 1).encode(),
            "duplicate_field",
        ),
        (
            "duplicate ts",
            key,
            text.replace('"ts"', f'"ts":{T0 + step + 0.6!r},"ts"', 1).encode(),
            "duplicate_field",
        ),
        (
            "duplicate feature",
            key,
            lit('{"price":999.0,"signal":9.0,"price":998.0}'),
            "duplicate_field",
        ),
        # --- entities
        ("empty entity", key, ev(entity=""), "bad_entity"),
        ("entity of 129 characters", key, ev(entity="E" * 129), "bad_entity"),
        ("entity of 10,000 characters", key, ev(entity="E" * 10_000), "bad_entity"),
        ("entity with a space", key, ev(entity=home[:1] + " " + home[1:]), "bad_entity"),
        ("entity with a newline", key, ev(entity=home + "\n"), "bad_entity"),
        ("entity not ASCII", key, ev(entity="Zürich"), "bad_entity"),
        ("entity with a leading dash", key, ev(entity="-" + home), "bad_entity"),
        ("entity a number", key, ev(entity=42), "wrong_type"),
        ("entity null", key, ev(entity=None), "wrong_type"),
        ("entity a list", key, ev(entity=[home]), "wrong_type"),
        ("entity true", key, ev(entity=True), "wrong_type"),
        # --- timestamps
        ("ts too old", key, ev(ts=1000.0), "ts_too_old"),
        ("ts zero", key, ev(ts=0), "ts_too_old"),
        ("ts negative", key, ev(ts=-1.5), "ts_too_old"),
        ("ts far in the future", key, ev(ts=now + 30 * 86_400), "ts_in_future"),
        ("ts in milliseconds", key, ev(ts=ts * 1000), "ts_in_future"),
        ("ts too far ahead in steps", key, ev(ts=T0 + 50_000.5), "ts_too_far_ahead"),
        ("NaN ts", key, lit(ts_text="NaN"), "non_finite"),
        ("Infinity ts", key, lit(ts_text="Infinity"), "non_finite"),
        ("ts a string", key, ev(ts=str(ts)), "wrong_type"),
        ("ts null", key, ev(ts=None), "wrong_type"),
        ("ts true", key, ev(ts=True), "wrong_type"),
        # --- the key contract; values are copies of the clean event (same partition)
        ("no key", None, clean, "key_mismatch"),
        ("key differs from the entity", b"X99", clean, "key_mismatch"),
        ("key not UTF-8", b"\xff\xfe" + key, clean, "key_mismatch"),
        ("key in another case", key.lower(), clean, "key_mismatch"),
        ("key of another existing entity", other.encode(), clean, "key_mismatch"),
    ]
    return [(name, k, home, value, reason) for name, k, value, reason in cases]


def partition_of(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner (murmur2 of the key), which the engine's producers use."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def build_stream(now: float) -> tuple[list[tuple[bool, int]], list[Case]]:
    """Phase one: (hostile, index into clean_events() or the cases) in sending order, and
    the cases. Case i goes right after the clean event of its home entity and step."""
    clean = clean_events()
    n = len(hostile_cases(HOMES[0], HOSTILE_STEPS[0], b"{}", now))
    tables: dict[tuple[str, int], list[Case]] = {}
    cases: list[Case] = []
    after: dict[tuple[str, int], list[int]] = {}
    for i in range(n):
        home = HOMES[i % len(HOMES)]
        step = HOSTILE_STEPS[(i // len(HOMES)) % len(HOSTILE_STEPS)]
        if (home, step) not in tables:
            value = next(v for e, s, v in clean if e == home and s == step)
            tables[home, step] = hostile_cases(home, step, value, now)
        cases.append(tables[home, step][i])
        after.setdefault((home, step), []).append(i)
    stream: list[tuple[bool, int]] = []
    for j, (entity, step, _value) in enumerate(clean):
        if step >= PHASE_ONE:
            break
        stream.append((False, j))
        stream.extend((True, i) for i in after.pop((entity, step), []))
    assert not after
    return stream, cases


class Writer:
    """kafka-python's KafkaProducer, writing to explicit partitions; keeps the metadata."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        ensure_topics(bootstrap, [topic], partitions)
        self.topic = topic
        self.partitions = partitions
        self.producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            acks=1,
            linger_ms=20,
            max_in_flight_requests_per_connection=1,
            max_request_size=4 * 1024 * 1024,
        )
        self.futures: list[Any] = []

    def send(self, key: bytes | None, value: bytes | None, home: str) -> int:
        """Send; the index of its future. The partition is `home`'s."""
        partition = partition_of(home.encode(), self.partitions)
        self.futures.append(
            self.producer.send(self.topic, key=key, value=value, partition=partition)
        )
        return len(self.futures) - 1

    def positions(self, indices: Iterable[int]) -> list[tuple[int, int]]:
        self.producer.flush(timeout=60)
        out = []
        for i in indices:
            md = self.futures[i].get(timeout=60)
            out.append((md.partition, md.offset))
        return out

    def close(self) -> None:
        self.producer.flush(timeout=60)
        self.producer.close(timeout=10)


def _headers(m: Message) -> dict[str, str]:
    return {k: v.decode() for k, v in m.headers.items()}


def test_a_hostile_corpus_costs_dead_letters_only(
    kafka_bootstrap: str, redis_url: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    bad_env = engine_env(
        bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        group=unique("group-hostile"),
        input_topic=unique("hostile"),
        output_topic=unique("out-hostile"),
        dlq_topic=unique("dlq-hostile"),
        every_steps=5,
    )
    ref_env = engine_env(
        bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        group=unique("group-clean"),
        input_topic=unique("clean"),
        output_topic=unique("out-clean"),
        dlq_topic=unique("dlq-clean"),
        every_steps=5,
    )
    bad_cfg, ref_cfg = config_of(bad_env), config_of(ref_env)
    parts = bad_cfg.kafka.partitions
    layout = Forecaster(bad_cfg).layout
    now = time.time()
    clean = clean_events()
    stream, cases = build_stream(now)
    assert len(cases) >= 80
    late_value = encode_event(SILENT, T0 + LATE_STEP + 0.5, [50.0, 0.1])
    late: Case = ("late, existing entity", SILENT.encode(), SILENT, late_value, "late")

    # The reference: the clean events only, to the same partitions.
    ref_out = Writer(kafka_bootstrap, ref_cfg.kafka.input_topic, parts)
    for entity, _step, value in clean:
        ref_out.send(entity.encode(), value, entity)
    ref_out.close()
    reference = EngineProcess(ref_env, tmp_path, "reference", idle_exit_s=3.0).start()

    # Phase one: clean steps 0..14 with the hostile messages.
    out = Writer(kafka_bootstrap, bad_cfg.kafka.input_topic, parts)
    hostile_futures: dict[int, int] = {}
    for hostile, i in stream:
        if hostile:
            _name, key, home, value, _reason = cases[i]
            hostile_futures[i] = out.send(key, value, home)
        else:
            entity, _step, value = clean[i]
            out.send(entity.encode(), value, entity)
    out.producer.flush(timeout=60)
    engine = EngineProcess(bad_env, tmp_path, "hostile", idle_exit_s=IDLE_EXIT_S).start()
    counter = TopicCounter(kafka_bootstrap, bad_env["STREAMER_KAFKA_OUTPUT_TOPIC"], forecasts=True)
    try:
        deadline = time.monotonic() + 120
        while counter.max_step is None or counter.max_step < int(T0) + 10:
            counter.count()
            assert engine.poll() is None, f"engine exited\n{engine.log_tail()}"
            assert time.monotonic() < deadline, f"step 10 never closed\n{engine.log_tail()}"
            time.sleep(0.05)
        assert engine.poll() is None, "the engine stopped on hostile input"
        # Phase two: the late event, then clean steps 15..29.
        late_future = out.send(late[1], late[3], late[2])
        for entity, step, value in clean:
            if step >= PHASE_ONE:
                out.send(entity.encode(), value, entity)
        positions = dict(zip(hostile_futures, out.positions(hostile_futures.values()), strict=True))
        late_position = out.positions([late_future])[0]
        out.close()
        rc = engine.wait()
        ref_rc = reference.wait()
    finally:
        counter.close()
        engine.stop()
        reference.stop()

    # ---- the processes
    stderr, ref_stderr = engine.stderr(), reference.stderr()
    stats, ref_stats = engine.summary(), reference.summary()
    exits = {"hostile": rc, "reference": ref_rc}

    # ---- the dead-letter topic, case by case
    expected: dict[tuple[int, int], Case] = {positions[i]: cases[i] for i in positions}
    expected[late_position] = late
    assert len(expected) == len(cases) + 1, "two hostile messages share a position"
    source = {
        (m.partition, m.offset): m for m in read_topic(kafka_bootstrap, bad_cfg.kafka.input_topic)
    }
    dlq = read_topic(kafka_bootstrap, bad_cfg.kafka.dlq)
    problems: list[str] = []
    seen: dict[tuple[int, int], str] = {}
    for pos, case in expected.items():
        original = source.get(pos)
        if original is None or original.value != case[3] or original.key != case[1]:
            problems.append(f"{case[0]}: not found at {pos} of the input topic")
    for m in dlq:
        h = _headers(m)
        pos = (int(h[DLQ_PARTITION]), int(h[DLQ_OFFSET]))
        name = expected[pos][0] if pos in expected else f"clean message at {pos}"
        if h[DLQ_TOPIC] != bad_cfg.kafka.input_topic:
            problems.append(f"{name}: source topic header {h[DLQ_TOPIC]!r}")
        if pos in seen:
            problems.append(f"{name}: dead-lettered twice ({seen[pos]}, {h[DLQ_REASON]})")
        seen[pos] = h[DLQ_REASON]
        original = source.get(pos)
        if original is None:
            problems.append(f"DLQ names a source {pos} that does not exist")
            continue
        if m.key != original.key:
            problems.append(f"{name}: DLQ key {m.key!r}, source key {original.key!r}")
        want_value = original.value
        if want_value is not None and len(want_value) > bad_cfg.kafka.max_message_bytes:
            want_value = want_value[: bad_cfg.kafka.max_message_bytes]
        if m.value != want_value:
            problems.append(f"{name}: DLQ value differs from the source")
        if pos not in expected:
            problems.append(f"{name} dead-lettered as {h[DLQ_REASON]}")
        elif h[DLQ_REASON] != expected[pos][4]:
            problems.append(f"{name}: reason {h[DLQ_REASON]}, expected {expected[pos][4]}")
    for pos, case in expected.items():
        if pos not in seen:
            problems.append(f"{case[0]}: not dead-lettered (expected {case[4]})")
    want_counts = Counter(case[4] for case in expected.values())

    # ---- the clean entities' forecasts and final states against the reference
    got = forecasts_by_key(read_topic(kafka_bootstrap, bad_cfg.kafka.output_topic))
    want = forecasts_by_key(read_topic(kafka_bootstrap, ref_cfg.kafka.output_topic))
    keys = sorted(set(got) & set(want))
    forecast_diff = max(
        (
            float(np.max(np.abs(np.subtract(got[k][0]["forecast"], want[k][0]["forecast"]))))
            for k in keys
        ),
        default=0.0,
    )
    state = RedisStore(redis_url, bad_cfg.namespace).load(
        bad_cfg.kafka.input_topic, range(parts), layout
    )
    ref_state = RedisStore(redis_url, ref_cfg.namespace).load(
        ref_cfg.kafka.input_topic, range(parts), layout
    )
    rows = {e.entity: e for e in state.entities}
    ref_rows = {e.entity: e for e in ref_state.entities}
    state_diff = max(
        (
            float(np.max(np.abs(rows[n].row.astype(np.float64) - ref_rows[n].row)))
            for n in set(rows) & set(ref_rows)
        ),
        default=0.0,
    )
    print(
        f"\nhostile messages: {len(expected)} ({len(cases)} in phase one, 1 late)"
        f"\nexits: {exits}"
        f"\ndead letters by reason: {dict(sorted(Counter(seen.values()).items()))}"
        f"\nengine summary dead_lettered: {dict(sorted(stats['dead_lettered'].items()))}"
        f"\nforecasts: {len(got)} vs reference {len(want)}; max |diff| {forecast_diff:g}"
        f"\nstate rows: {len(rows)} vs reference {len(ref_rows)}; max |diff| {state_diff:g}"
        f"\nproblems ({len(problems)}):" + "".join(f"\n  - {p}" for p in problems)
    )

    assert rc == 0, f"engine with hostile input exited {rc}\n{engine.log_tail()}"
    assert ref_rc == 0, f"reference engine exited {ref_rc}\n{reference.log_tail()}"
    assert "Traceback" not in stderr, engine.log_tail(200)
    assert "Traceback" not in ref_stderr, reference.log_tail(200)
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems)
    assert dict(stats["dead_lettered"]) == dict(want_counts)
    assert ref_stats["dead_lettered"] == {}
    assert stats["consumed"] == len(source)
    assert stats["steps"] == ref_stats["steps"] == STEPS

    assert all(len(v) == 1 for v in got.values())
    assert_same_forecasts(got, want, atol=0)
    assert {e for e, _ in got} == set(ENTITIES)
    assert sorted(rows) == sorted(ref_rows) == ENTITIES
    for name, e in rows.items():
        assert e.last_step == ref_rows[name].last_step == int(T0) + STEPS - 1
        assert np.isfinite(e.row).all()
        assert np.array_equal(e.row, ref_rows[name].row), name
    assert sum(state.positions.values()) == len(source)
