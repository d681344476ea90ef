"""The HTTP endpoints every Tessera service serves.

Node and aggregator both run one `HealthServer` on port 8080 (the deployment constant):

- `/healthz`: 200 while the process can answer at all (the liveness probe);
- `/readyz`: 200 only if every registered readiness check passes, else 503 with the names
  of the failing checks, e.g. "broker connected", "keys loaded", "model verified"; a check
  that can say why it fails returns the sentence instead of False, and it is served under
  `reasons` ("disk full: ..."). Values a service reports beside readiness (the node's
  measured clock offset) are served under `info`, and `"warnings"` (sentences naming the
  fix) when the service's `warnings` callable has any, ready or not;
- `/metrics`: Prometheus exposition of the service's own `CollectorRegistry` (never the
  process-global default, so two services in one test process do not share counters).

A service mounts extra routes (the node's inference endpoint) as `(method, path) -> Handler`.

Nothing here may carry PHI: a failing readiness check or route handler is logged by name and
exception type only, and access lines go to DEBUG without the query string. The metric
families are in `tessera.observability.metrics`, the JSON logs in `tessera.observability.logs`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from tessera.limits import MAX_HTTP_BODY_BYTES
from tessera.observability.events import Event

__all__ = [
    "Handler",
    "HealthServer",
    "InfoSource",
    "ReadinessCheck",
    "Request",
    "Response",
    "Warnings",
    "failing_checks",
    "readiness_report",
]

_log = logging.getLogger("tessera.observability.http")


@dataclass(frozen=True)
class Request:
    """What a mounted route handler receives."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes


@dataclass(frozen=True)
class Response:
    """What a route handler returns."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = field(default=())

    @classmethod
    def json(cls, status: int, value: object) -> Response:
        """A JSON response."""
        return cls(status, json.dumps(value).encode() + b"\n")


Handler = Callable[[Request], Response]
# True: ready; False, or a sentence saying why (no PHI): not ready.
ReadinessCheck = Callable[[], bool | str]
# A value served under /readyz's `info` (JSON: numbers, strings, None, lists, tables).
InfoSource = Callable[[], object]
Warnings = Callable[[], list[str]]
_BUILTIN_PATHS = ("/healthz", "/readyz", "/metrics")


def failing_checks(readiness: Mapping[str, ReadinessCheck]) -> list[str]:
    """Names of the checks that do not return True (one that raises is not ready either)."""
    return list(readiness_report(readiness))


def readiness_report(readiness: Mapping[str, ReadinessCheck]) -> dict[str, str | None]:
    """Each failing check's name and the sentence it gave (None where it gave none)."""
    failing: dict[str, str | None] = {}
    for name, check in readiness.items():
        try:
            ok = check()
        except Exception as error:  # noqa: BLE001 - a broken check means "not ready"
            _log.warning(
                Event.READINESS_CHECK_RAISED,
                extra={"fields": {"check": name, "error_type": type(error).__name__}},
            )
            ok = False
        if ok is not True:
            failing[name] = ok if isinstance(ok, str) else None
    return failing


class HealthServer:
    """A threaded HTTP server on `host:port` in a daemon thread: health, readiness, metrics.

    `port=0` binds a free port (see `.port`). `host` defaults to all interfaces because the
    kubelet's probes and Prometheus reach the pod from outside its network namespace; a
    service that should stay local passes "127.0.0.1". Request bodies above `max_body_bytes`
    are refused with 413 before they are read.
    """

    def __init__(
        self,
        port: int,
        registry: CollectorRegistry,
        readiness: Mapping[str, ReadinessCheck] | None = None,
        routes: Mapping[tuple[str, str], Handler] | None = None,
        *,
        info: Mapping[str, InfoSource] | None = None,
        warnings: Warnings | None = None,
        host: str = "0.0.0.0",  # noqa: S104 - probes come from outside the pod; see docstring
        max_body_bytes: int = MAX_HTTP_BODY_BYTES,
        request_timeout_s: float = 30.0,
    ) -> None:
        routes = dict(routes or {})
        for method, path in routes:
            if path in _BUILTIN_PATHS:
                raise ValueError(f"route {method} {path} clashes with a built-in endpoint")
            if not path.startswith("/") or method != method.upper():
                raise ValueError(
                    f"route ({method!r}, {path!r}) is malformed: use an upper-case method "
                    "and a path starting with '/'"
                )
        self._registry = registry
        self._readiness = dict(readiness or {})
        self._info = dict(info or {})
        self._warnings = warnings
        self._routes = routes
        self._max_body = max_body_bytes
        handler_class = type(
            "_BoundHandler",
            (_RequestHandler,),
            {"server_state": self, "timeout": request_timeout_s},
        )
        self._httpd = ThreadingHTTPServer((host, port), handler_class)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port actually bound (useful with port=0)."""
        return int(self._httpd.server_address[1])

    def start(self) -> HealthServer:
        """Serve in a daemon thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, name="tessera-http", daemon=True
            )
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the port."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> HealthServer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def respond(self, request: Request) -> Response:
        """Route one request: built-ins first, then mounted routes; 404/405 otherwise."""
        if request.path in _BUILTIN_PATHS:
            if request.method not in ("GET", "HEAD"):
                return Response.json(405, {"error": "method not allowed"})
            if request.path == "/healthz":
                return Response.json(200, {"status": "alive"})
            if request.path == "/readyz":
                return self._readyz()
            encoder, content_type = choose_encoder(request.headers.get("accept", ""))
            return Response(200, encoder(self._registry), content_type)
        handler = self._routes.get((request.method, request.path))
        if handler is None:
            if any(path == request.path for _, path in self._routes):
                return Response.json(405, {"error": "method not allowed"})
            return Response.json(404, {"error": "not found"})
        try:
            return handler(request)
        except Exception as error:  # noqa: BLE001 - one bad request must not kill the server
            _log.error(
                Event.ROUTE_HANDLER_FAILED,
                extra={
                    "fields": {
                        "route": f"{request.method} {request.path}",
                        "error_type": type(error).__name__,
                    }
                },
            )
            return Response.json(500, {"error": "internal error"})

    def _read_warnings(self) -> list[str]:
        if self._warnings is None:
            return []
        try:
            return list(self._warnings())
        except Exception as error:  # noqa: BLE001 - a broken warning must not break /readyz
            _log.warning(
                Event.READINESS_CHECK_RAISED,
                extra={"fields": {"check": "warnings", "error_type": type(error).__name__}},
            )
            return []

    def _readyz(self) -> Response:
        report = readiness_report(self._readiness)
        body: dict[str, object] = {"ready": not report, "failing": list(report)}
        reasons = {name: why for name, why in report.items() if why is not None}
        if reasons:
            body["reasons"] = reasons
        if self._info:
            info: dict[str, object] = {}
            for name, source in self._info.items():
                try:
                    info[name] = source()
                except Exception as error:  # noqa: BLE001 - a broken source reads as null
                    _log.warning(
                        Event.READINESS_CHECK_RAISED,
                        extra={"fields": {"check": name, "error_type": type(error).__name__}},
                    )
                    info[name] = None
            body["info"] = info
        warnings = self._read_warnings()
        if warnings:
            body["warnings"] = warnings
        return Response.json(503 if report else 200, body)

    @property
    def max_body_bytes(self) -> int:
        """The largest request body accepted."""
        return self._max_body


class _RequestHandler(BaseHTTPRequestHandler):
    server_state: HealthServer
    server_version = "tessera"
    sys_version = ""

    def _dispatch(self) -> None:
        path, _, query = self.path.partition("?")
        length_text = self.headers.get("Content-Length", "0")
        try:
            length = int(length_text)
        except ValueError:
            length = -1
        if length < 0:
            self._send(Response.json(400, {"error": "bad Content-Length"}), head=False)
            return
        if length > self.server_state.max_body_bytes:
            self.close_connection = True
            self._send(Response.json(413, {"error": "request body too large"}), head=False)
            return
        body = self.rfile.read(length) if length else b""
        request = Request(
            method=self.command,
            path=path,
            query=query,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
        )
        self._send(self.server_state.respond(request), head=self.command == "HEAD")

    def _send(self, response: Response, head: bool) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(response.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

    def log_message(self, format: str, *args: Any) -> None:
        """Access lines go to DEBUG without the query string (it could carry anything)."""
        _log.debug(
            Event.HTTP_REQUEST,
            extra={"fields": {"method": self.command, "path": self.path.partition("?")[0]}},
        )
