"""A real Prometheus scrapes a running engine; the HTTP endpoints; `streamer plot`.

One `streamer run` subprocess (HTTP on a free port) consumes a short synthetic stream from
the session's broker and Redis. Prometheus (the Debian package's binary, own config, own
free port, 1 s scrape interval) scrapes its /metrics; PromQL over Prometheus's HTTP API must
return the expected series with the values the stream implies. The engine's /metrics must
pass `promtool check metrics`, every dashboard query must be valid PromQL, /readyz,
/healthz and /forecast must answer, and `streamer plot` must draw an entity from the topics.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from engine_harness import EngineProcess, config_of, engine_env

from streamer.cli import main as cli_main
from streamer.produce import produce_synthetic
from streamer.services import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENTITIES = 20
STEPS = 40
EVENTS = ENTITIES * STEPS
ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "streamer.json"
WAIT_S = 45.0


def http_get(url: str, accept: str = "") -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Accept": accept})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, urllib.error.URLError) as exc:  # not listening yet
            last = exc
        else:
            if last:
                return last
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH: run ./dev test (installs the Debian package)")
    return path


class Prometheus:
    """A throwaway Prometheus server scraping one target every second."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: streamer\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary("prometheus"),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log.read_text()[-2000:]}")
        return http_get(f"{self.url}/-/ready")[0] == 200

    def query(self, expr: str) -> list[dict[str, Any]]:
        status, body = http_get(
            f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        )
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", (expr, answer)
        return list(answer["data"]["result"])

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def running(
    kafka_bootstrap: str, redis_url: str, unique: Callable[[str], str], tmp_path: Path
) -> Iterator[tuple[EngineProcess, Prometheus, str, dict[str, str]]]:
    port = free_port()
    env = engine_env(
        bootstrap=kafka_bootstrap,
        redis_url=redis_url,
        group=unique("group"),
        input_topic=unique("events"),
        output_topic=unique("forecasts"),
        dlq_topic=unique("dlq"),
        every_steps=10,
        units=8,
        extra={"STREAMER_HTTP_PORT": str(port), "STREAMER_HTTP_HOST": "127.0.0.1"},
    )
    sent = produce_synthetic(
        config_of(env), entities=ENTITIES, steps=STEPS, seed=7, bootstrap=kafka_bootstrap
    )
    assert sent == EVENTS
    engine = EngineProcess(env, tmp_path, "engine", idle_exit_s=120.0).start()
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{port}")
    try:
        yield engine, prometheus, f"http://127.0.0.1:{port}", env
    finally:
        prometheus.stop()
        engine.stop()


def test_prometheus_scrapes_the_engine_and_the_endpoints_answer(running, tmp_path, monkeypatch):
    engine, prom, base, env = running
    assert wait_for("/healthz", lambda: http_get(f"{base}/healthz")[0] == 200)
    wait_for("/readyz 200", lambda: http_get(f"{base}/readyz")[0] == 200)
    wait_for("prometheus ready", prom.ready)

    # Every step closed (the last one may stay open) as Prometheus saw it (1 s interval).
    def closed() -> bool:
        return (prom.value('streamer_steps_total{job="streamer"}') or 0) >= STEPS - 1

    wait_for("the stream's steps closed, as Prometheus sees it", closed)
    # Ratios within one scrape, retried: a scrape may land between a step and its forecasts.
    # log_return: an entity's first event only records its previous value.
    wait_for(
        "forecasts and step timings of every closed step counted",
        lambda: (
            prom.value(
                f"(streamer_forecasts_total - {ENTITIES} * (streamer_steps_total - 1))"
                " + (streamer_step_duration_seconds_count - streamer_steps_total)"
            )
            == 0
        ),
    )
    steps = prom.value("streamer_steps_total")
    assert steps is not None and STEPS - 1 <= steps <= STEPS
    assert prom.value('up{job="streamer"}') == 1
    assert prom.value("streamer_events_consumed_total") == EVENTS
    assert prom.value("streamer_events_applied_total") == EVENTS
    assert prom.value("streamer_checkpoints_total") >= 1
    assert prom.value("streamer_checkpoint_failures_total") == 0
    assert prom.value("streamer_entities") == ENTITIES
    assert prom.value("streamer_assigned_partitions") == 4
    assert prom.value("streamer_ready") == 1
    assert prom.value("streamer_model_weights_version") == 0
    assert prom.value("sum(streamer_events_dead_lettered_total)") is None  # nothing refused
    lag = prom.value("streamer_consumer_lag_messages")
    assert lag is not None and lag >= 0
    mean_step = prom.value(
        "streamer_step_duration_seconds_sum / streamer_step_duration_seconds_count"
    )
    assert mean_step is not None and 0 < mean_step < 5
    assert 0 <= prom.value("streamer_last_checkpoint_age_seconds") < 60
    assert prom.value("process_resident_memory_bytes{job='streamer'}") > 0

    # Every dashboard query is valid PromQL on this server.
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            prom.query(target["expr"].replace("$instance", ".*"))

    # The exposition itself passes promtool's lint.
    status, body = http_get(f"{base}/metrics", accept="text/plain")
    assert status == 200
    lint = subprocess.run([binary("promtool"), "check", "metrics"], input=body, capture_output=True)
    assert (lint.returncode, lint.stdout + lint.stderr) == (0, b"")

    # The latest forecast of an entity (stored at checkpoints).
    status, body = http_get(f"{base}/forecast/SYN00003")
    forecast = json.loads(body)
    assert status == 200 and forecast["entity"] == "SYN00003" and forecast["step"] > 0
    assert http_get(f"{base}/forecast/NOT-AN-ENTITY")[0] == 404

    # `streamer plot` draws the entity from the topics, through the command line.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "syn3.svg"
    assert cli_main(["plot", "SYN00003", "--out", str(out), "--last", "30"]) == 0
    lines = {
        p.get("class") for p in ET.parse(out).getroot().iter("{http://www.w3.org/2000/svg}polyline")
    }
    assert lines == {"actual", "model", "persistence"}

    # Graceful stop: /readyz is not part of it, the exit code is.
    engine.signal(signal.SIGTERM)
    assert engine.wait() == 0, engine.log_tail()
