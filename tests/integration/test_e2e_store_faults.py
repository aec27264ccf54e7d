"""Store outages end to end: the engine never exits for one, and nothing changes.

One input stream (the synthetic market, 100 entities x 250 steps, online learning on) is read
by an engine that is never disturbed (the reference, on the session's Redis), and then, in
other consumer groups and namespaces, by engines whose own Redis fails while they consume:

- stalled: SIGSTOP for 15 s, then SIGCONT (every call in between times out);
- restarted with its append-only file: stopped, down for 3 s, started again on its data;
- restarted empty: killed and started again without persistence (everything lost).

Each faulted engine must keep running and exit 0 at the end of input, and publish exactly the
reference's forecasts (every (entity, step), the same weights version on each, atol 1e-6);
the states and the weights it leaves in its Redis must equal the reference's. While Redis is
stalled, /readyz answers 503 with the reason and `streamer_store_up` is 0. For the empty
restart the documented policy must happen: the store is re-seeded from the engine's memory
(counted in `store_resets`), so the end state is complete again.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from engine_harness import (
    EngineProcess,
    TopicCounter,
    assert_same_forecasts,
    config_of,
    engine_env,
    forecasts_by_key,
    read_topic,
)

from streamer.config import Config
from streamer.forecaster import Forecaster
from streamer.produce import produce_synthetic
from streamer.services import EmbeddedRedis, free_port
from streamer.state.format import unpack_arrays
from streamer.state.redis_store import RedisStore
from streamer.synthetic import DEFAULT_START_TS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENTITIES = 100
STEPS = 250
FIRST_STEP = int(DEFAULT_START_TS)
FAULT_AT_STEP = FIRST_STEP + 40  # the fault comes once forecasts of this step are out
LEARN = {
    "STREAMER_LEARN_ENABLED": "true",
    "STREAMER_LEARN_WINDOW": "32",
    "STREAMER_LEARN_UPDATE_EVERY": "8",
}


def _name(kind: str) -> str:
    return f"test-{kind}-{uuid.uuid4().hex[:10]}"


def _env(bootstrap: str, redis_url: str, topic: str, **extra: str) -> dict[str, str]:
    group = _name("g")
    return engine_env(
        bootstrap=bootstrap,
        redis_url=redis_url,
        group=group,
        input_topic=topic,
        output_topic=f"{group}.out",
        dlq_topic=f"{group}.dlq",
        every_steps=20,
        extra={**LEARN, **extra},
    )


@pytest.fixture(scope="module")
def stream(kafka_bootstrap: str) -> str:
    """The input topic, produced once for every run of this module."""
    topic = _name("faults")
    env = _env(kafka_bootstrap, "redis://127.0.0.1:1/0", topic)
    produce_synthetic(config_of(env), entities=ENTITIES, steps=STEPS, seed=17)
    return topic


@pytest.fixture(scope="module")
def reference(
    kafka_bootstrap: str, redis_url: str, stream: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    env = _env(kafka_bootstrap, redis_url, stream)
    engine = EngineProcess(env, tmp_path_factory.mktemp("ref"), "reference", idle_exit_s=3.0)
    engine.start()
    try:
        rc = engine.wait(timeout=240)
    finally:
        engine.stop()
    assert rc == 0, engine.log_tail()
    out = forecasts_by_key(read_topic(kafka_bootstrap, env["STREAMER_KAFKA_OUTPUT_TOPIC"]))
    assert len(out) == ENTITIES * (STEPS - 1)
    return {"env": env, "forecasts": out, "state": _state(env), "summary": engine.summary()}


def _state(env: dict[str, str]) -> dict[str, Any]:
    """Rows, last steps, weights version and weights a run left in its store."""
    config: Config = config_of(env)
    layout = Forecaster(config).layout
    store = RedisStore(config.redis.url, config.namespace)
    try:
        loaded = store.load(config.kafka.input_topic, range(config.kafka.partitions), layout)
        version = loaded.weights_version or 0
        blob = store.get_weights(version)
    finally:
        store.close()
    assert not loaded.quarantined
    return {
        "rows": {e.entity: (e.last_step, e.row) for e in loaded.entities},
        "version": version,
        "weights": unpack_arrays(blob) if blob is not None else None,
    }


def _assert_same_state(got: dict[str, Any], want: dict[str, Any]) -> float:
    assert got["version"] == want["version"] and want["version"] > 0
    assert got["rows"].keys() == want["rows"].keys()
    worst = 0.0
    for entity, (step, row) in want["rows"].items():
        got_step, got_row = got["rows"][entity]
        assert got_step == step, entity
        worst = max(worst, float(np.abs(got_row - row).max()))
    assert worst <= 1e-6, f"state rows differ by {worst}"
    assert got["weights"] is not None and want["weights"] is not None
    for name, value in want["weights"].items():
        if name.startswith("w"):
            np.testing.assert_allclose(got["weights"][name], value, atol=1e-6, err_msg=name)
    return worst


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A Redis of the test's own (so it can be stalled, stopped and restarted)."""
    servers: list[EmbeddedRedis] = []

    def start(port: int | None = None, persist: bool = False) -> EmbeddedRedis:
        server = EmbeddedRedis(port, workdir=tmp_path / "redis", persist=persist)
        server.start(timeout=60)
        servers.append(server)
        return server

    try:
        yield {"start": start, "servers": servers}
    finally:
        for server in servers:
            if server.pid is not None:
                os.kill(server.pid, signal.SIGCONT)
            server.stop()


def _run_with_fault(
    kafka_bootstrap: str,
    stream: str,
    server: EmbeddedRedis,
    logdir: Path,
    fault: Callable[[dict[str, str]], None],
    **extra: str,
) -> tuple[EngineProcess, dict[str, str]]:
    env = _env(kafka_bootstrap, server.url, stream, **extra)
    engine = EngineProcess(env, logdir, "faulted", idle_exit_s=3.0).start()
    counter = TopicCounter(kafka_bootstrap, env["STREAMER_KAFKA_OUTPUT_TOPIC"], forecasts=True)
    try:
        deadline = time.monotonic() + 120
        while (counter.max_step or 0) < FAULT_AT_STEP:
            counter.count()
            assert engine.poll() is None, f"engine exited early\n{engine.log_tail()}"
            assert time.monotonic() < deadline, "no forecasts of the fault step in 120 s"
            time.sleep(0.05)
        fault(env)
        rc = engine.wait(timeout=240)
    finally:
        engine.stop()
        counter.close()
    assert rc == 0, f"the engine exited with {rc}\n{engine.log_tail()}"
    assert "Traceback" not in engine.stderr(), engine.log_tail(80)
    return engine, env


def _check_against_reference(
    kafka_bootstrap: str, env: dict[str, str], reference: dict[str, Any]
) -> float:
    got = forecasts_by_key(read_topic(kafka_bootstrap, env["STREAMER_KAFKA_OUTPUT_TOPIC"]))
    assert_same_forecasts(got, reference["forecasts"], atol=1e-6)
    return _assert_same_state(_state(env), reference["state"])


def test_redis_stalled_for_15_s_changes_nothing(
    kafka_bootstrap, stream, reference, own_redis, tmp_path
):
    server = own_redis["start"]()
    port = free_port()
    seen: dict[str, Any] = {}

    def stall(_env: dict[str, str]) -> None:
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                status, body = _get(f"http://127.0.0.1:{port}/readyz")
                if status == 503 and "store" in body:
                    seen["readyz"] = body
                    _, metrics = _get(f"http://127.0.0.1:{port}/metrics")
                    seen["store_up"] = [
                        line
                        for line in metrics.splitlines()
                        if line.startswith("streamer_store_up")
                    ]
                time.sleep(0.5)
        finally:
            os.kill(server.pid, signal.SIGCONT)

    engine, env = _run_with_fault(
        kafka_bootstrap,
        stream,
        server,
        tmp_path,
        stall,
        STREAMER_HTTP_PORT=str(port),
        STREAMER_HTTP_HOST="127.0.0.1",
    )
    assert "readyz" in seen, "/readyz never reported the stalled store"
    assert seen["store_up"] == ["streamer_store_up 0.0"], seen
    summary = engine.summary()
    assert summary["checkpoint_failures"] >= 1, summary
    stderr = engine.stderr()
    assert stderr.count("state store unreachable") == 1, "one log line per change of state"
    assert "answers again" in stderr
    worst = _check_against_reference(kafka_bootstrap, env, reference)
    print(
        f"\nstalled 15 s: exit 0, {summary['checkpoint_failures']} failed checkpoints, "
        f"max |row diff| {worst:.2e}, readyz: {seen['readyz']!r}"
    )


def test_redis_restarted_with_its_append_only_file_changes_nothing(
    kafka_bootstrap, stream, reference, own_redis, tmp_path
):
    server = own_redis["start"](persist=True)

    def restart(_env: dict[str, str]) -> None:
        server.stop()
        time.sleep(3.0)
        own_redis["start"](server.port, persist=True)

    engine, env = _run_with_fault(kafka_bootstrap, stream, server, tmp_path, restart)
    summary = engine.summary()
    assert summary["store_resets"] == 0, "the append-only file kept every checkpoint"
    worst = _check_against_reference(kafka_bootstrap, env, reference)
    print(
        f"\nrestarted with AOF: exit 0, {summary['checkpoint_failures']} failed checkpoints, "
        f"max |row diff| {worst:.2e}"
    )


def test_redis_restarted_empty_is_reseeded_from_memory(
    kafka_bootstrap, stream, reference, own_redis, tmp_path
):
    server = own_redis["start"]()

    def wipe(_env: dict[str, str]) -> None:
        assert server.pid is not None
        os.kill(server.pid, signal.SIGKILL)
        server.stop()
        time.sleep(1.0)
        own_redis["start"](server.port)

    engine, env = _run_with_fault(kafka_bootstrap, stream, server, tmp_path, wipe)
    summary = engine.summary()
    assert summary["store_resets"] == 1, summary
    assert "re-seeded from memory" in engine.stderr()
    worst = _check_against_reference(kafka_bootstrap, env, reference)
    print(
        f"\nrestarted empty: exit 0, re-seeded {summary['store_resets']}x, "
        f"max |row diff| {worst:.2e}"
    )
