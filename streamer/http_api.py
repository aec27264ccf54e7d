"""The engine's one HTTP port: metrics, probes and the latest forecast of an entity.

    GET /metrics            Prometheus exposition (text or OpenMetrics, by Accept header)
    GET /healthz            200 while the process serves requests (liveness)
    GET /readyz             200 when partitions are assigned, states restored and the loop
                            consumes; 503 otherwise. JSON body: {"ready": bool, "reason": str}
    GET /forecast/<entity>  the entity's latest forecast message (JSON, as published), 404
                            when the store has none. Percent-encode ids holding "/" or "%".

The latest forecasts come from the state store (`store.get_latest`), which the engine writes
at each checkpoint: an answer may lag the output topic by up to one checkpoint interval.

A stdlib `ThreadingHTTPServer` runs in a daemon thread; requests never touch the engine
loop's objects except through reads that are safe from another thread (see
`streamer.observability`) and the store's own thread-safe client.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from .config import Config
from .errors import ServiceError, StreamerError
from .observability import Metrics, readiness

log = logging.getLogger(__name__)

FORECAST_PREFIX = "/forecast/"
JSON = "application/json"
_SHUTDOWN_POLL_S = 0.1  # how often the server loop checks for close()


class HttpApi:
    """Serves one engine on `host:port` (port 0: a free port, read back from `.port`)."""

    def __init__(
        self,
        engine: Any,
        metrics: Metrics | None = None,
        *,
        host: str = "0.0.0.0",
        port: int = 0,
        entity_pattern: str | None = None,
    ) -> None:
        self.engine = engine
        self.metrics = metrics if metrics is not None else Metrics(engine)
        self._entity_re = re.compile(entity_pattern) if entity_pattern else None
        try:
            self._server = ThreadingHTTPServer((host, port), _Handler)
        except OSError as exc:
            raise ServiceError("http", f"cannot listen on {host}:{port}: {exc}") from exc
        self._server.daemon_threads = True
        self._server.api = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> HttpApi:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": _SHUTDOWN_POLL_S},
            name="streamer-http",
            daemon=True,
        )
        self._thread.start()
        log.info("HTTP on port %d: /metrics /healthz /readyz /forecast/<entity>", self.port)
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    # ------------------------------------------------------------------ routes

    def route(self, path: str, accept: str) -> tuple[int, bytes, str]:
        """(status, body, content type) for a GET of `path`."""
        path = urlsplit(path).path
        if path == "/metrics":
            body, content_type = self.metrics.exposition(accept)
            return HTTPStatus.OK, body, content_type
        if path == "/healthz":
            return HTTPStatus.OK, b'{"alive":true}', JSON
        if path == "/readyz":
            ready, reason = readiness(self.engine)
            status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
            return status, _json({"ready": ready, "reason": reason}), JSON
        if path.startswith(FORECAST_PREFIX):
            return self._forecast(unquote(path[len(FORECAST_PREFIX) :]))
        return HTTPStatus.NOT_FOUND, _json({"error": f"no route {path!r}"}), JSON

    def _forecast(self, entity: str) -> tuple[int, bytes, str]:
        if not entity or (self._entity_re is not None and not self._entity_re.fullmatch(entity)):
            return HTTPStatus.BAD_REQUEST, _json({"error": f"{entity!r} is no entity id"}), JSON
        try:
            value = self.engine.store.get_latest(entity)
        except StreamerError as exc:
            return HTTPStatus.SERVICE_UNAVAILABLE, _json({"error": str(exc)}), JSON
        if value is None:
            return HTTPStatus.NOT_FOUND, _json({"error": f'no forecast for "{entity}"'}), JSON
        return HTTPStatus.OK, bytes(value), JSON


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


class _Handler(BaseHTTPRequestHandler):
    server_version = "streamer"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        api: HttpApi = self.server.api  # type: ignore[attr-defined]
        try:
            status, body, content_type = api.route(self.path, self.headers.get("Accept", ""))
        except Exception:
            log.exception("HTTP %s failed", self.path)
            status, body, content_type = HTTPStatus.INTERNAL_SERVER_ERROR, b"{}", JSON
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s: " + format, self.address_string(), *args)


def serve(engine: Any, config: Config) -> HttpApi | None:
    """Start the HTTP server `config.http` asks for; None when disabled or the port is taken.

    A port that cannot be bound is logged as an error, not raised: observability must not
    stop the data path (two local engines on the default port; in Kubernetes the failing
    probes surface it).
    """
    if config.http.port == 0:
        return None
    try:
        api = HttpApi(
            engine,
            host=config.http.host,
            port=config.http.port,
            entity_pattern=config.stream.entity_pattern,
        )
    except ServiceError as exc:
        log.error("%s: running without /metrics, /healthz, /readyz, /forecast", exc)
        return None
    return api.start()
