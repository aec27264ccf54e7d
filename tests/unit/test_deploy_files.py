"""The deployable stack's files, checked without Docker or Kubernetes (neither runs here).

docker-compose.yml and deploy/k8s are validated structurally with PyYAML; the Prometheus
config and alert rules with promtool (check config, check rules, and the rule unit tests in
deploy/streamer.rules.test.yml); the dashboard and rules only name metrics streamer exports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from fake_engine import FakeEngine
from prometheus_client.parser import text_string_to_metric_families

from streamer.config import Config
from streamer.observability import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "streamer.json"
RULES = DEPLOY / "streamer.rules.yml"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def pinned(image: str) -> bool:
    """name:tag with a tag that names a version (a digit in it), never "latest"."""
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and bool(re.search(r"\d", tag))


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not on PATH: run ./dev test (installs the Debian package)")
    return path


# ---------------------------------------------------------------------- docker compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def test_compose_has_the_whole_stack_with_pinned_images(compose):
    services = compose["services"]
    assert set(services) == {"kafka", "redis", "engine", "producer", "prometheus", "grafana"}
    for name, svc in services.items():
        assert pinned(svc["image"]), f"{name}: image {svc['image']!r} is not pinned"
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["redis"]["image"].startswith("redis:")
    assert services["prometheus"]["image"].startswith("prom/prometheus:v")
    assert services["grafana"]["image"].startswith("grafana/grafana:")


def test_kafka_runs_kraft_single_node(compose):
    env = compose["services"]["kafka"]["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093"
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 1


def test_redis_persists_with_aof_on_a_volume(compose):
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert "redis-data:/data" in redis["volumes"]


def test_engine_and_producer_share_the_image_built_from_deploy(compose):
    engine, producer = compose["services"]["engine"], compose["services"]["producer"]
    for svc in (engine, producer):
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        assert svc["environment"]["STREAMER_KAFKA_BOOTSTRAP"] == "kafka:9092"
        assert svc["environment"]["STREAMER_REDIS_URL"].startswith("redis://redis:6379")
    assert engine["image"] == producer["image"]
    assert engine["command"] == ["run"]
    assert producer["command"][:2] == ["produce", "synthetic"] and "--rate" in producer["command"]
    assert "8000:8000" in engine["ports"]
    assert "/healthz" in " ".join(engine["healthcheck"]["test"])


def test_depends_on_waits_for_healthchecks(compose):
    services = compose["services"]
    expected = {
        "engine": {"kafka", "redis"},
        "producer": {"kafka", "engine"},
        "prometheus": {"engine"},
        "grafana": {"prometheus"},
    }
    for name, deps in expected.items():
        depends = services[name]["depends_on"]
        assert set(depends) == deps
        for dep, spec in depends.items():
            assert spec["condition"] == "service_healthy"
            assert "healthcheck" in services[dep], f"{name} waits on {dep}, which has none"


def test_ports_volumes_and_mounted_files(compose):
    services = compose["services"]
    assert "9090:9090" in services["prometheus"]["ports"]
    assert "3000:3000" in services["grafana"]["ports"]
    assert "9094:9094" in services["kafka"]["ports"]
    named = set(compose["volumes"])
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in named, f"{name} uses undeclared volume {source}"


# ---------------------------------------------------------------------- Prometheus


def test_prometheus_scrapes_the_engine_service(compose):
    config = load_yaml(DEPLOY / "prometheus.yml")
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "streamer")
    assert job["static_configs"][0]["targets"] == ["engine:8000"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    mounts = " ".join(compose["services"]["prometheus"]["volumes"])
    for rule_file in config["rule_files"]:
        assert (DEPLOY / rule_file).is_file()
        assert f"/etc/prometheus/{rule_file}" in mounts


@pytest.mark.parametrize(
    "args",
    [
        ["check", "config", "deploy/prometheus.yml"],
        ["check", "rules", "deploy/streamer.rules.yml"],
        ["test", "rules", "deploy/streamer.rules.test.yml"],
    ],
    ids=["check-config", "check-rules", "test-rules"],
)
def test_promtool_accepts_config_and_rules(args):
    res = subprocess.run([promtool(), *args], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_alert_rules_cover_the_failure_modes():
    rules = {r["alert"]: r for g in load_yaml(RULES)["groups"] for r in g["rules"]}
    for alert in (
        "StreamerConsumerLagGrowing",
        "StreamerCheckpointsFailing",
        "StreamerCheckpointStale",
        "StreamerForecastsWorseThanNaive",
        "StreamerDeadLetterRateHigh",
    ):
        assert alert in rules
        assert rules[alert]["labels"]["severity"] in {"warning", "critical"}


def exported_names() -> set[str]:
    """Sample names of a scrape with every metric family populated."""
    engine = FakeEngine()
    engine.consumer_lag = {0: 1}  # type: ignore[attr-defined]
    engine.stats.dead_lettered["late"] += 1
    m = Metrics(engine)
    m.learning.record_learning(duration_s=0.1, loss=0.5)
    m.learning.record_prequential([{"horizon": 1}])
    body, _ = m.exposition()
    return {s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples}


def test_rules_and_dashboard_name_only_exported_metrics():
    exported = exported_names()
    for path in (RULES, DASHBOARD):
        used = set(re.findall(r"\bstreamer_[a-z_]+", path.read_text()))
        assert used, path
        assert used <= exported, f"{path.name} names unknown metrics {sorted(used - exported)}"


# ---------------------------------------------------------------------- Grafana


def test_grafana_provisioning_matches_the_dashboard(compose):
    ds = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"][0]
    assert (ds["type"], ds["url"]) == ("prometheus", "http://prometheus:9090")
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/streamer.yml")["providers"][0]
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["entity"]["type"] == "textbox"
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("lag", "latency", "checkpoint", "version", "persistence", "${entity}"):
        assert topic in titles
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == ds["uid"]
            assert target["expr"].count("(") == target["expr"].count(")")


# ---------------------------------------------------------------------- Kubernetes


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    docs = [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), "one object per kind expected"
    return by_kind


def test_kustomization_lists_every_manifest(k8s):
    listed = set(k8s["Kustomization"]["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_deployment_runs_replicas_with_probes_and_resources(k8s):
    dep = k8s["Deployment"]
    spec = dep["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["rollingUpdate"]["maxSurge"] == 0
    pod = spec["template"]
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # Service links would inject STREAMER_SERVICE_HOST, STREAMER_PORT, ... into the config's
    # environment namespace.
    assert pod["spec"]["enableServiceLinks"] is False
    (container,) = pod["spec"]["containers"]
    assert pinned(container["image"])
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    assert container["args"][-1] == "run"
    config_path = container["args"][container["args"].index("--config") + 1]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert config_path == f"{mount['mountPath']}/streamer.toml"
    config = Config.from_dict(tomllib.loads(k8s["ConfigMap"]["data"]["streamer.toml"]))
    assert config.http.port == port
    assert config.kafka.partitions >= spec["replicas"]  # else replicas idle unready
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)


def test_service_routes_to_the_http_port(k8s):
    svc = k8s["Service"]
    pod_labels = k8s["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http"


# ---------------------------------------------------------------------- the image


def test_dockerfile_is_pinned_non_root_with_a_gpu_variant():
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base.group(1))
    user = re.search(r"^USER (\S+)$", text, re.M)
    assert user and user.group(1).split(":")[0] not in {"0", "root"}
    assert re.search(r"^ARG EXTRAS=", text, re.M) and "pip install" in text
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any("tensorflow[and-cuda]" in d for d in extras["optional-dependencies"]["gpu"])
