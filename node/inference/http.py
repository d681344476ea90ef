"""The inference HTTP endpoint: `POST /v1/infer` with DICOM bytes, JSON back.

- 200: the same JSON object `tessera node infer` prints per file.
- 400: the body is not a usable DICOM image; `{"error": reason, "detail": ...}` where reason
  is the intake's quarantine reason code (e.g. "not-dicom", "truncated", "no-pixel-data").
- 404 unknown path, 405 wrong method, 411 no Content-Length, 413 body over the limit,
  503 no model loaded yet.
- `GET /v1/model`: the version, hash and labels being served.
- 401 (`WWW-Authenticate: Bearer`) for either, before anything is read, unless the request
  carries `Authorization: Bearer <token>` with the token whose SHA-256 the site configured.

Who may ask (`ServeConfig`): the server listens on loopback unless configured otherwise, and
refuses to start on any other address without TLS (its certificate and key; with a client
CA, mutual TLS) and a token: patient images never cross a network in clear or from a caller
who does not hold the site's credential. At most `max_workers` connections are served at
once (`tessera.observability.http_server.BoundedHTTPServer`).

Each request is logged as one JSON line (`inference request`): method, path, status and,
for an answered inference, the model version that answered it, so the log records which
model answered when. Nothing else: no client-supplied header, no instance identifier.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from node.errors import NodeError, UnusableImageError
from node.inference import INFERENCE_PORT, OFF_LOOPBACK_FIX
from node.inference.runtime import ModelSlot, infer_dicom_bytes
from node.intake.screen import IntakeLimits
from tessera.errors import ConfigError
from tessera.limits import INFERENCE_MAX_WORKERS, MAX_INFERENCE_BODY_BYTES, MAX_INFERENCE_WORKERS
from tessera.observability.events import Event
from tessera.observability.http_server import (
    BoundedHTTPServer,
    is_loopback,
    server_tls_context,
    token_matches,
)
from tessera.observability.metrics import ServiceMetrics

log = logging.getLogger("tessera.node.inference")
_ROUTES = "use POST /v1/infer or GET /v1/model"


@dataclass(frozen=True)
class ServerTLS:
    """The inference server's certificate and key (PEM); with `client_ca_file`, every client
    must present a certificate that CA signed (mutual TLS)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


@dataclass(frozen=True)
class ServeConfig:
    """Where to listen, how much to accept, and who may ask (module docstring)."""

    host: str = "127.0.0.1"
    port: int = INFERENCE_PORT
    max_body_bytes: int = MAX_INFERENCE_BODY_BYTES
    tls: ServerTLS | None = None
    token_sha256: bytes | None = None  # SHA-256 of the bearer token clients present
    max_workers: int = INFERENCE_MAX_WORKERS

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if not 1 <= self.max_workers <= MAX_INFERENCE_WORKERS:
            limit = MAX_INFERENCE_WORKERS
            raise ValueError(f"max_workers must be 1..{limit}, got {self.max_workers}")
        if self.token_sha256 is not None and len(self.token_sha256) != 32:
            raise ValueError("token_sha256 must be a SHA-256 digest (32 bytes)")
        if not is_loopback(self.host) and (self.tls is None or self.token_sha256 is None):
            raise ConfigError(f"inference on {self.host!r}: {OFF_LOOPBACK_FIX}")


class InferenceServer:
    """The inference endpoint around a ModelSlot; `start()` serves on a daemon thread. With
    `metrics`, each inference is timed into `tessera_inference_latency_seconds`."""

    def __init__(
        self,
        slot: ModelSlot,
        secret: bytes,
        cfg: ServeConfig,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.slot, self.secret, self.cfg, self.metrics = slot, secret, cfg, metrics
        self.limits = IntakeLimits(max_file_bytes=cfg.max_body_bytes)
        context = None
        if cfg.tls is not None:
            tls = cfg.tls
            context = server_tls_context(tls.cert_file, tls.key_file, tls.client_ca_file,
                                         what="the inference server's TLS")  # fmt: skip
        self.httpd = BoundedHTTPServer((cfg.host, cfg.port), _make_handler(self),
                                       max_workers=cfg.max_workers, tls=context)  # fmt: skip
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when the config asked for 0)."""
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        """Serve in the background until `shutdown`."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop serving (if started) and close the socket."""
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self.httpd.server_close()

    def handle_infer(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """Status and JSON for one request body (the handler's pure part), timed."""
        if self.metrics is None:
            return infer_request(self.slot, self.secret, self.limits, body)
        with self.metrics.time_inference() as timer:
            status, payload = infer_request(self.slot, self.secret, self.limits, body)
            timer.outcome = "ok" if status == 200 else "rejected" if status == 400 else "error"
        return status, payload

    def authorized(self, authorization: str | None) -> bool:
        """Whether a request's Authorization header satisfies the configured token."""
        expected = self.cfg.token_sha256
        return expected is None or token_matches(authorization, expected)


def infer_request(
    slot: ModelSlot, secret: bytes, limits: IntakeLimits, body: bytes
) -> tuple[int, dict[str, Any]]:
    """Status and JSON for one POST /v1/infer body: 503 before the first model, 400 for an
    unusable image (reason code, no patient data), else the result with the model version."""
    try:
        model = slot.current()
    except NodeError as error:
        return HTTPStatus.SERVICE_UNAVAILABLE, {"error": "no-model", "detail": str(error)}
    try:
        return HTTPStatus.OK, infer_dicom_bytes(model, body, secret, limits)
    except UnusableImageError as error:
        return HTTPStatus.BAD_REQUEST, {"error": error.reason, "detail": error.detail}


def _make_handler(server: InferenceServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 60  # seconds a slow or idle client may hold a handler thread
        server_version = "tessera-node"
        sys_version = ""
        answered_by: str | None = None

        def do_POST(self) -> None:
            if not self._authorized():
                return
            if self.path != "/v1/infer":
                self._error(HTTPStatus.NOT_FOUND, "not-found", _ROUTES)
                return
            length_text = self.headers.get("Content-Length")
            if length_text is None or not length_text.isdigit():
                self._error(HTTPStatus.LENGTH_REQUIRED, "length-required", "send Content-Length")
                return
            length, limit = int(length_text), server.cfg.max_body_bytes
            if length > limit:
                self.close_connection = True  # the unread body must not be parsed as a request
                detail = f"{length} bytes; the limit is {limit}"
                self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "too-large", detail)
                return
            body = self.rfile.read(length)
            status, payload = server.handle_infer(body)
            self.answered_by = payload.get("model_version")  # None unless a model answered
            self._reply(status, payload)

        def do_GET(self) -> None:
            if not self._authorized():
                return
            if self.path == "/v1/infer":
                self._error(HTTPStatus.METHOD_NOT_ALLOWED, "method", "POST the DICOM bytes")
            elif self.path == "/v1/model":
                try:
                    meta = server.slot.current().metadata
                except NodeError as error:
                    self._error(HTTPStatus.SERVICE_UNAVAILABLE, "no-model", str(error))
                    return
                self._reply(HTTPStatus.OK, {"model_version": meta.model_version,
                            "model_hash": meta.model_hash, "model_id": meta.model_id,
                            "labels": list(meta.labels)})  # fmt: skip
            else:
                self._error(HTTPStatus.NOT_FOUND, "not-found", _ROUTES)

        def _authorized(self) -> bool:
            """401 and close, before any body is read, unless the token is right."""
            if server.authorized(self.headers.get("Authorization")):
                return True
            self.close_connection = True
            detail = "send the site's inference token: Authorization: Bearer <token>"
            self._reply(HTTPStatus.UNAUTHORIZED, {"error": "unauthorized", "detail": detail},
                        ("WWW-Authenticate", 'Bearer realm="tessera-inference"'))  # fmt: skip
            return False

        def _error(self, status: int, reason: str, detail: str) -> None:
            self._reply(status, {"error": reason, "detail": detail})

        def _reply(
            self, status: int, payload: dict[str, Any], *header: tuple[str, str]
        ) -> None:
            blob = json.dumps(payload).encode()
            self.send_response(status)
            for name, value in header:
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(blob)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(blob)

        def log_message(self, format: str, *args: Any) -> None:
            # http.server would log the client address and raw request line; keep it minimal.
            del format, args

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            del size
            fields = {"method": self.command, "path": self.path.split("?")[0], "status": int(code),
                      "model_version": self.answered_by}  # fmt: skip
            self.answered_by = None  # a kept-alive connection's next request starts afresh
            log.info(Event.INFERENCE_REQUEST, extra={"fields": fields})

    return Handler
