"""The inference HTTP endpoint: `POST /v1/infer` with DICOM bytes, JSON back.

- 200: the same JSON object `tessera node infer` prints per file.
- 400: the body is not a usable DICOM image; `{"error": reason, "detail": ...}` where reason
  is the intake's quarantine reason code (e.g. "not-dicom", "truncated", "no-pixel-data").
- 404 unknown path, 405 wrong method, 411 no Content-Length, 413 body over the limit,
  503 no model loaded yet.
- `GET /v1/model`: the version, hash and labels being served.

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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from node.errors import NodeError, UnusableImageError
from node.inference.runtime import ModelSlot, infer_dicom_bytes
from node.intake.screen import IntakeLimits
from tessera.limits import MAX_INFERENCE_BODY_BYTES
from tessera.observability.events import Event

log = logging.getLogger("tessera.node.inference")
_ROUTES = "use POST /v1/infer or GET /v1/model"


@dataclass(frozen=True)
class ServeConfig:
    """Where to listen and how much to accept."""

    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = MAX_INFERENCE_BODY_BYTES

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")


class InferenceServer:
    """A ThreadingHTTPServer around a ModelSlot; `start()` serves on a daemon thread."""

    def __init__(self, slot: ModelSlot, secret: bytes, cfg: ServeConfig) -> None:
        self.slot, self.secret, self.cfg = slot, secret, cfg
        self.limits = IntakeLimits(max_file_bytes=cfg.max_body_bytes)
        handler = _make_handler(self)
        self.httpd = ThreadingHTTPServer((cfg.host, cfg.port), handler)
        self.httpd.daemon_threads = True
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
        """Stop serving and close the socket."""
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def handle_infer(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """Status and JSON for one request body (the handler's pure part)."""
        return infer_request(self.slot, self.secret, self.limits, body)


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

        def _error(self, status: int, reason: str, detail: str) -> None:
            self._reply(status, {"error": reason, "detail": detail})

        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            blob = json.dumps(payload).encode()
            self.send_response(status)
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
