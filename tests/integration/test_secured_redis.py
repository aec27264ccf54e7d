"""Secured Redis for real: `requirepass`, an ACL user, TLS, and the engine on a password.

Each server here is a real redis-server child process. The password-protected one is an
`EmbeddedRedis` given its password with CONFIG SET once it answers (its readiness probe
sends no AUTH). The TLS one is started here on a TLS-only port with a throwaway CA and
server certificate made with the `openssl` CLI; a redis-server built without TLS fails
the test (with the reason), it never skips.

No message, repr or engine output may contain a secret: every failure path asserts it.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
from engine_harness import EngineProcess, config_of, engine_env, read_topic

from streamer.config import Config, RedisConfig
from streamer.errors import ServiceError, StateError
from streamer.produce import produce_synthetic
from streamer.services import EmbeddedRedis, free_port, resolve_redis_server
from streamer.state import Checkpoint, EntityState, RowLayout
from streamer.state.redis_store import RedisStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PASSWORD = "S3cr@t:pw"
ACL_USER, ACL_PASSWORD = "alice", "pw#1"
LAYOUT = RowLayout.from_shapes({"h0": (3,), "c0": (3,)})
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Server:
    url: str  # no credentials
    port: int


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def secured_redis() -> Iterator[Server]:
    """A Redis with `requirepass PASSWORD` and the ACL user alice (password pw#1)."""
    server = EmbeddedRedis()
    try:
        server.start(timeout=START_TIMEOUT_S)
    except ServiceError as exc:
        pytest.fail(f"cannot start the embedded Redis: {exc}", pytrace=False)
    try:
        admin = redis.Redis.from_url(server.url, socket_timeout=5)
        admin.config_set("requirepass", PASSWORD)
        admin.close()
        admin = redis.Redis.from_url(server.url, password=PASSWORD, socket_timeout=5)
        admin.acl_setuser(
            ACL_USER,
            enabled=True,
            passwords=[f"+{ACL_PASSWORD}"],
            keys=["*"],
            channels=["*"],
            commands=["+@all"],
        )
        admin.close()
        yield Server(server.url, server.port)
    finally:
        server.stop()


def round_trip(store: RedisStore, topic: str) -> None:
    """ping, acquire, commit one checkpoint and read it back."""
    store.ping()
    tokens = store.acquire(topic, [0])
    row = np.arange(LAYOUT.size, dtype=np.float32)
    store.commit(
        Checkpoint(topic, {0: 42}, [EntityState("AAPL", 0, 7, row)], step=7), tokens, LAYOUT
    )
    loaded = store.load(topic, [0], LAYOUT)
    assert loaded.positions == {0: 42}
    (entity,) = loaded.entities
    assert entity.entity == "AAPL" and np.array_equal(entity.row, row)
    store.close()


def refused(cfg: RedisConfig, namespace: str) -> StateError:
    store = RedisStore.from_config(cfg, namespace)
    with pytest.raises(StateError) as info:
        store.ping()
    store.close()
    return info.value


def secret_file(tmp_path: Path, content: str, name: str = "redis-password") -> Path:
    path = tmp_path / name
    path.write_text(content + "\n")  # as `kubectl create secret --from-file` often has it
    return path


# ---------------------------------------------------------------------- requirepass


def test_password_from_the_config_pings_and_commits(secured_redis, unique):
    cfg = RedisConfig(url=secured_redis.url, password=PASSWORD)

    round_trip(RedisStore.from_config(cfg, unique("ns")), unique("t"))


def test_password_from_a_file_pings_and_commits(secured_redis, unique, tmp_path):
    cfg = RedisConfig(url=secured_redis.url, password_file=str(secret_file(tmp_path, PASSWORD)))

    round_trip(RedisStore.from_config(cfg, unique("ns")), unique("t"))


def test_password_from_the_environment_file_through_config_load(secured_redis, unique, tmp_path):
    env = {
        "STREAMER_REDIS_URL": secured_redis.url,
        "STREAMER_REDIS_PASSWORD_FILE": str(secret_file(tmp_path, PASSWORD)),
    }
    config = Config.load(None, env=env)

    round_trip(RedisStore.from_config(config.redis, config.namespace), unique("t"))
    assert PASSWORD not in repr(config) and PASSWORD not in str(config.to_dict())


def test_the_explicit_password_wins_over_the_urls(secured_redis, unique):
    port = secured_redis.port
    cfg = RedisConfig(url=f"redis://:wrong@127.0.0.1:{port}/0", password=PASSWORD)

    round_trip(RedisStore.from_config(cfg, unique("ns")), unique("t"))


def test_a_percent_encoded_password_in_the_url_works(secured_redis, unique):
    url = f"redis://:S3cr%40t%3Apw@127.0.0.1:{secured_redis.port}/0"

    round_trip(RedisStore.from_config(RedisConfig(url=url), unique("ns")), unique("t"))
    round_trip(RedisStore(url, unique("ns")), unique("t"))  # the plain constructor too


def test_without_a_password_it_fails_with_a_state_error_naming_no_secret(secured_redis, unique):
    err = refused(RedisConfig(url=secured_redis.url), unique("ns"))

    assert "AuthenticationError" in str(err) or "NOAUTH" in str(err)
    assert PASSWORD not in str(err)


def test_a_wrong_password_fails_without_quoting_either_password(secured_redis, unique):
    wrong = "Wr0ng@pass:word"
    url = f"redis://:{PASSWORD}@127.0.0.1:{secured_redis.port}/0"  # the right one, overridden

    err = refused(RedisConfig(url=url, password=wrong), unique("ns"))

    text = str(err)
    assert "127.0.0.1" in text and "***@" in text
    for part in (wrong, PASSWORD, "Wr0ng", "S3cr", "t:pw"):
        assert part not in text


# ---------------------------------------------------------------------- ACL user


def test_an_acl_user_with_username_and_password(secured_redis, unique, tmp_path):
    cfg = RedisConfig(url=secured_redis.url, username=ACL_USER, password=ACL_PASSWORD)
    from_file = RedisConfig(
        url=secured_redis.url,
        username=ACL_USER,
        password_file=str(secret_file(tmp_path, ACL_PASSWORD, "acl")),
    )
    in_url = RedisConfig(url=f"redis://{ACL_USER}:pw%231@127.0.0.1:{secured_redis.port}/0")

    for c in (cfg, from_file, in_url):
        store = RedisStore.from_config(c, unique("ns"))
        who = store._r.acl_whoami()
        assert who in (ACL_USER, ACL_USER.encode())
        round_trip(store, unique("t"))


def test_an_acl_user_with_a_wrong_password_is_refused_without_the_secret(secured_redis, unique):
    cfg = RedisConfig(url=secured_redis.url, username=ACL_USER, password=PASSWORD)

    err = refused(cfg, unique("ns"))

    assert "invalid username-password pair" in str(err)
    assert PASSWORD not in str(err) and "pw#1" not in str(err)


# ---------------------------------------------------------------------- TLS


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl CLI is not on PATH (apt-get install openssl)", pytrace=False)
    res = subprocess.run([openssl, *args], cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, f"openssl {' '.join(args)} failed:\n{res.stderr}"


def make_certificates(root: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost it signed."""
    root.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=streamer test CA", cwd=root)  # fmt: skip
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=root)  # fmt: skip
    (root / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.cnf",
             cwd=root)  # fmt: skip
    # A second CA that signed nothing: verification against it must fail.
    _openssl("req", "-x509", *ec, "-keyout", "other.key", "-out", "other.crt", "-days", "2",
             "-subj", "/CN=unrelated CA", cwd=root)  # fmt: skip
    return {name: root / f"{name}" for name in ("ca.crt", "server.crt", "server.key", "other.crt")}


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory) -> Iterator[tuple[Server, dict[str, Path]]]:
    """redis-server with only a TLS port (no plain port), server cert signed by our CA."""
    root = tmp_path_factory.mktemp("tls-redis")
    certs = make_certificates(root / "certs")
    binary = resolve_redis_server()
    port = free_port()
    log_path = root / "redis.log"
    command = [
        binary,
        "--port", "0",
        "--tls-port", str(port),
        "--bind", "127.0.0.1", "127.0.0.2",  # the second one for the hostname check
        "--tls-cert-file", str(certs["server.crt"]),
        "--tls-key-file", str(certs["server.key"]),
        "--tls-ca-cert-file", str(certs["ca.crt"]),
        "--tls-auth-clients", "no",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(root),
        "--daemonize", "no",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    try:
        _wait_for_tls(proc, port, certs["ca.crt"], binary, log_path)
        yield Server(f"redis://127.0.0.1:{port}/0", port), certs
    finally:
        _stop(proc)


def _wait_for_tls(
    proc: subprocess.Popen[bytes], port: int, ca: Path, binary: str, log_path: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = log_path.read_text(errors="replace")
            hint = ""
            if "tls" in log.lower() and "bad directive" in log.lower():
                hint = " (this redis-server is built without TLS support)"
            pytest.fail(
                f"{binary} exited with code {proc.returncode} on the TLS options{hint}; "
                f"a TLS-capable redis-server is required (Debian's redis-server 7 is):\n{log}",
                pytrace=False,
            )
        client = redis.Redis(
            host="127.0.0.1",
            port=port,
            ssl=True,
            ssl_ca_certs=str(ca),
            socket_timeout=1,
            socket_connect_timeout=1,
        )
        try:
            if client.ping():
                return
        except redis.RedisError as exc:
            last = f"{type(exc).__name__}: {exc}"
        finally:
            client.close()
        time.sleep(0.1)
    pytest.fail(
        f"TLS redis on 127.0.0.1:{port} did not answer in {START_TIMEOUT_S} s ({last}):\n"
        + log_path.read_text(errors="replace"),
        pytrace=False,
    )


def test_tls_with_our_ca_pings_and_commits(tls_redis, unique):
    server, certs = tls_redis
    cfg = RedisConfig(url=server.url, tls=True, tls_ca_file=str(certs["ca.crt"]))

    round_trip(RedisStore.from_config(cfg, unique("ns")), unique("t"))


def test_a_rediss_url_means_tls(tls_redis, unique):
    server, certs = tls_redis
    cfg = RedisConfig(url=f"rediss://127.0.0.1:{server.port}/0", tls_ca_file=str(certs["ca.crt"]))

    round_trip(RedisStore.from_config(cfg, unique("ns")), unique("t"))


def test_tls_checks_the_hostname(tls_redis, unique):
    server, certs = tls_redis
    # The certificate names 127.0.0.1 and localhost, not 127.0.0.2 (which also reaches us).
    other_name = f"redis://127.0.0.2:{server.port}/0"
    strict = RedisConfig(url=other_name, tls=True, tls_ca_file=str(certs["ca.crt"]))
    lenient = RedisConfig(
        url=other_name, tls=True, tls_ca_file=str(certs["ca.crt"]), tls_check_hostname=False
    )

    err = refused(strict, unique("ns"))
    assert "127.0.0.2" in str(err) and "mismatch" in str(err), err
    round_trip(RedisStore.from_config(lenient, unique("ns")), unique("t"))


def test_tls_refuses_a_server_our_ca_did_not_sign(tls_redis, unique):
    server, certs = tls_redis
    cfg = RedisConfig(url=server.url, tls=True, tls_ca_file=str(certs["other.crt"]))

    err = refused(cfg, unique("ns"))

    assert "certificate verify failed" in str(err)


def test_plain_tcp_to_the_tls_port_fails_cleanly(tls_redis, unique):
    server, _certs = tls_redis

    err = refused(RedisConfig(url=server.url, timeout_s=2.0), unique("ns"))

    assert f"127.0.0.1:{server.port}" in str(err)


# ---------------------------------------------------------------------- the engine


def test_the_engine_runs_on_a_password_given_as_a_file_and_never_prints_it(
    secured_redis, kafka_bootstrap: str, unique: Callable[[str], str], tmp_path: Path
) -> None:
    password_file = secret_file(tmp_path, PASSWORD)
    env = engine_env(
        bootstrap=kafka_bootstrap,
        redis_url=secured_redis.url,
        group=unique("group"),
        input_topic=unique("in"),
        output_topic=unique("out"),
        dlq_topic=unique("dlq"),
        units=8,
        extra={"STREAMER_REDIS_PASSWORD_FILE": str(password_file)},
    )
    config = config_of(env)
    produced = produce_synthetic(config, entities=10, steps=30, seed=3)
    assert produced == 300

    engine = EngineProcess(env, tmp_path / "logs", "secured", idle_exit_s=3.0).start()
    try:
        rc = engine.wait()
    finally:
        engine.stop()

    assert rc == 0, engine.log_tail()
    summary = engine.summary()
    assert summary["steps"] > 0 and summary["checkpoints"] >= 1, summary
    forecasts = read_topic(kafka_bootstrap, env["STREAMER_KAFKA_OUTPUT_TOPIC"])
    assert len(forecasts) > 0
    client = redis.Redis.from_url(secured_redis.url, password=PASSWORD)
    try:
        step = client.hget(f"streamer:{{{config.namespace}}}:meta", "step")
    finally:
        client.close()
    assert step is not None and int(step) > 0
    output = engine.stdout() + engine.stderr()
    for part in (PASSWORD, "S3cr", "t:pw"):
        assert part not in output
