"""Metrics collector, learning metrics and the HTTP endpoints, on a fake engine."""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from fake_engine import FakeEngine, FakeStore
from prometheus_client.parser import text_string_to_metric_families

from streamer.config import Config
from streamer.errors import ConfigError
from streamer.http_api import HttpApi, serve
from streamer.observability import Metrics


def scrape(metrics: Metrics) -> dict[str, float]:
    """{'name{label="v",...}': value} of one scrape in the text format."""
    body, _ = metrics.exposition()
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


# ---------------------------------------------------------------------- collector


def test_engine_state_becomes_metrics_in_base_units():
    engine = FakeEngine()
    st = engine.stats
    st.consumed, st.applied, st.steps, st.forecasts, st.checkpoint_failures = 10, 9, 3, 27, 1
    st.dead_lettered["non_finite"] += 2
    st.step_ms += [0.3, 1.2, 7.0]
    m = Metrics(engine, process=False)
    s = scrape(m)
    assert s["streamer_events_consumed_total"] == 10
    assert s["streamer_events_applied_total"] == 9
    assert s["streamer_steps_total"] == 3
    assert s["streamer_forecasts_total"] == 27
    assert s["streamer_checkpoint_failures_total"] == 1
    assert s['streamer_events_dead_lettered_total{reason="non_finite"}'] == 2
    assert s["streamer_step_duration_seconds_count"] == 3
    assert s["streamer_step_duration_seconds_sum"] == pytest.approx(0.0085)
    assert s['streamer_step_duration_seconds_bucket{le="0.001"}'] == 1  # 0.3 ms
    assert s['streamer_step_duration_seconds_bucket{le="0.0025"}'] == 2  # + 1.2 ms
    assert s['streamer_step_duration_seconds_bucket{le="+Inf"}'] == 3
    assert s["streamer_entities"] == 5
    assert s["streamer_entity_slots"] == 64
    assert s["streamer_entity_slots_limit"] == 1000
    assert s["streamer_model_weights_version"] == 3
    assert s["streamer_assigned_partitions"] == 2
    assert s["streamer_ready"] == 1


def test_histograms_fold_only_what_was_appended_since_the_last_scrape():
    engine = FakeEngine()
    m = Metrics(engine, process=False)
    engine.stats.checkpoint_ms += [2.0, 3.0]
    assert scrape(m)["streamer_checkpoint_duration_seconds_count"] == 2
    assert scrape(m)["streamer_checkpoint_duration_seconds_count"] == 2  # nothing new
    engine.stats.checkpoint_ms.append(4000.0)
    s = scrape(m)
    assert s["streamer_checkpoint_duration_seconds_count"] == 3
    assert s["streamer_checkpoint_duration_seconds_sum"] == pytest.approx(4.005)
    assert s['streamer_checkpoint_duration_seconds_bucket{le="2.5"}'] == 2
    engine.stats.checkpoint_ms = [1.0]  # a new list is read from its start
    assert scrape(m)["streamer_checkpoint_duration_seconds_count"] == 4


def test_lag_is_refreshed_on_the_engine_thread_through_on_step():
    engine = FakeEngine()
    seen = []
    engine.on_step = seen.append  # a hook already installed keeps running
    m = Metrics(engine, process=False)
    assert "streamer_consumer_lag_messages" not in scrape(m)  # no step yet: unknown
    assert engine.io.calls == 0  # never from the scrape thread
    assert engine.on_step is not None
    engine.on_step("result")
    assert seen == ["result"]
    assert scrape(m)["streamer_consumer_lag_messages"] == 7


def test_per_partition_lag_when_the_engine_keeps_it():
    engine = FakeEngine()
    engine.consumer_lag = {0: 5, 1: 0}  # type: ignore[attr-defined]
    s = scrape(Metrics(engine, process=False))
    assert s['streamer_partition_lag_messages{partition="0"}'] == 5
    assert s["streamer_consumer_lag_messages"] == 5


def test_learning_metrics_are_exported_as_fed():
    m = Metrics(FakeEngine(), process=False)
    unfed = scrape(m)
    assert (
        math.isnan(unfed["streamer_learning_loss"])
        and unfed["streamer_learning_updates_total"] == 0
    )
    assert not any(k.startswith("streamer_prequential") for k in unfed)
    m.learning.record_learning(duration_s=0.3, loss=0.25)
    m.learning.record_learning(duration_s=0.2, loss=math.nan)
    m.learning.record_learning(duration_s=0.2, loss=1.0, discarded=True)
    m.learning.record_rollback()
    m.learning.record_prequential(
        [
            {
                "horizon": 1,
                "mae": 0.1,
                "rmse": 0.2,
                "mase": 0.9,
                "skill_vs_persistence": 0.05,
                "skill_vs_zero": None,
                "median_entity_skill": 0.01,
                "share_entities_beating_persistence": 0.6,
            },
            {"horizon": 2, "count": 0},
        ]
    )
    s = scrape(m)
    assert s["streamer_learning_updates_total"] == 1
    assert s["streamer_learning_discarded_updates_total"] == 2
    assert s["streamer_learning_rollbacks_total"] == 1
    assert s["streamer_learning_loss"] == 0.25
    assert s["streamer_learning_update_duration_seconds_count"] == 3
    assert s['streamer_prequential_mae{horizon="1"}'] == 0.1
    assert s['streamer_prequential_skill{baseline="persistence",horizon="1"}'] == 0.05
    assert math.isnan(s['streamer_prequential_skill{baseline="zero_change",horizon="1"}'])
    assert (
        s[
            'streamer_prequential_entities_beating_baseline_ratio{baseline="persistence",horizon="1"}'
        ]
        == 0.6
    )
    assert math.isnan(s['streamer_prequential_rmse{horizon="2"}'])


def test_promtool_check_metrics_finds_nothing_to_report():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not on PATH: run ./dev test (installs the Debian package)")
    engine = FakeEngine()
    engine.stats.dead_lettered["late"] += 1
    engine.stats.step_ms.append(1.0)
    m = Metrics(engine)
    m.learning.record_learning(duration_s=0.1, loss=0.5)
    m.learning.record_prequential([{"horizon": 1, "mae": 0.1, "skill_vs_persistence": 0.1}])
    body, _ = m.exposition()
    res = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True)
    assert (res.returncode, res.stdout + res.stderr) == (0, b"")


# ---------------------------------------------------------------------- HTTP


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(store=FakeStore({"SYN1": b'{"entity":"SYN1","step":7}', "a/b": b"{}"}))


@pytest.fixture
def api(engine: FakeEngine) -> Iterator[HttpApi]:
    api = HttpApi(
        engine,
        Metrics(engine, process=False),
        host="127.0.0.1",
        port=0,
        entity_pattern=Config().stream.entity_pattern,
    ).start()
    yield api
    api.close()


def get(api: HttpApi, path: str, accept: str = "") -> tuple[int, str, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{api.port}{path}", headers={"Accept": accept})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def test_healthz_answers_while_the_process_serves(api):
    assert get(api, "/healthz")[0] == 200


def test_readyz_is_200_only_with_partitions_and_not_stopping(api, engine):
    status, ctype, body = get(api, "/readyz")
    assert (status, ctype, json.loads(body)["ready"]) == (200, "application/json", True)
    engine._tokens.clear()  # revoked everything / still joining
    status, _, body = get(api, "/readyz")
    assert status == 503 and "no partitions assigned" in json.loads(body)["reason"]
    engine._tokens[0] = 1
    engine.ready = False  # the engine's own flag, once it has one: restoring
    status, _, body = get(api, "/readyz")
    assert status == 503 and "restoring" in json.loads(body)["reason"]
    engine.ready = True
    assert get(api, "/readyz")[0] == 200
    engine._stop.set()
    status, _, body = get(api, "/readyz")
    assert (status, json.loads(body)) == (503, {"ready": False, "reason": "stopping"})


def test_forecast_returns_the_stored_message_or_404(api):
    assert get(api, "/forecast/SYN1") == (200, "application/json", b'{"entity":"SYN1","step":7}')
    assert get(api, "/forecast/a%2Fb")[0] == 200  # ids may hold "/"
    assert get(api, "/forecast/a/b")[0] == 200
    status, _, body = get(api, "/forecast/NOPE")
    assert status == 404 and "NOPE" in json.loads(body)["error"]
    assert get(api, "/forecast/%20bad%20id")[0] == 400
    assert get(api, "/forecast/")[0] == 400


def test_forecast_is_503_when_the_store_is_down(api, engine):
    engine.store = FakeStore(broken=True)
    status, _, body = get(api, "/forecast/SYN1")
    assert status == 503 and "unreachable" in json.loads(body)["error"]


def test_metrics_speaks_text_and_openmetrics(api):
    status, ctype, body = get(api, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    assert b"streamer_events_consumed_total 0.0" in body
    status, ctype, body = get(api, "/metrics", accept="application/openmetrics-text")
    assert ctype.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")


def test_unknown_path_is_404(api):
    assert get(api, "/nope")[0] == 404


# ---------------------------------------------------------------------- config and startup


def test_http_config_section():
    assert Config().http.port == 8000
    assert Config.load(env={"STREAMER_HTTP_PORT": "0"}).http.port == 0
    for bad in ("-1", "65536", "eighty"):
        with pytest.raises(ConfigError, match=r"http\.port"):
            Config.load(env={"STREAMER_HTTP_PORT": bad})


def test_serve_is_off_at_port_0_and_survives_a_taken_port(caplog):
    assert serve(FakeEngine(), Config.load(env={"STREAMER_HTTP_PORT": "0"})) is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"STREAMER_HTTP_PORT": str(port), "STREAMER_HTTP_HOST": "127.0.0.1"}
        assert serve(FakeEngine(), Config.load(env=env)) is None
    assert "cannot listen" in caplog.text
