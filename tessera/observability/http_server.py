"""An HTTP server with a ceiling on threads, TLS handshakes off the accept loop, and the
helpers that decide who may use it (a TLS context, a bearer token's hash, loopback).

`BoundedHTTPServer` is a `ThreadingHTTPServer` that serves at most `max_workers` connections
at once: a connection beyond them is closed as soon as it is accepted (and the first of a
run of refusals logged as `http busy`), so a flood of connections that never speak costs at
most `max_workers` threads, never one each. With a TLS context, the handshake runs in the
connection's worker under a total deadline (`TLS_HANDSHAKE_TIMEOUT_S`), so a peer that
never completes it, or completes it a byte at a time, holds one worker for that long and
never the accept loop. What a bound does not stop: `max_workers` clients that each send a
byte before every request timeout keep the server busy; the bound keeps the process alive
and the rest of the node working meanwhile.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import select
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tessera.errors import ConfigError
from tessera.observability.events import Event

__all__ = [
    "TLS_HANDSHAKE_TIMEOUT_S",
    "BoundedHTTPServer",
    "is_loopback",
    "read_token_hash",
    "server_tls_context",
    "token_matches",
]

_log = logging.getLogger("tessera.observability.http")
TLS_HANDSHAKE_TIMEOUT_S = 10.0  # the whole handshake, however the peer paces it
_SocketAddress = Any  # what socketserver hands over: (host, port) for TCP


class BoundedHTTPServer(ThreadingHTTPServer):
    """A threaded HTTP server with at most `max_workers` connections in service at once and,
    with `tls`, TLS on every connection (see the module docstring)."""

    daemon_threads = True
    block_on_close = False  # closing never waits for a slow client's worker

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        max_workers: int,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.max_workers = max_workers
        self._slots = threading.BoundedSemaphore(max_workers)
        self._tls = tls
        self._refused = 0  # connections refused since a worker last came free
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: _SocketAddress) -> None:
        """Hand the connection to a worker thread, or close it when none is free."""
        if not self._slots.acquire(blocking=False):
            if self._refused == 0:
                fields = {"max_workers": self.max_workers, "port": self.server_address[1]}
                _log.warning(Event.HTTP_BUSY, extra={"fields": fields})
            self._refused += 1
            self.shutdown_request(request)
            return
        self._refused = 0
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            self.shutdown_request(request)
            raise

    def process_request_thread(self, request: Any, client_address: _SocketAddress) -> None:
        """In the worker: the TLS handshake (if any), then the requests; frees the slot."""
        try:
            if self._tls is not None:
                request = _handshake(self._tls, request)
                if request is None:
                    return
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def _handshake(context: ssl.SSLContext, connection: socket.socket) -> ssl.SSLSocket | None:
    """The server side of a TLS handshake within TLS_HANDSHAKE_TIMEOUT_S in all; None (the
    connection closed, logged at DEBUG by error type) when it fails or runs out of time."""
    timeout = connection.gettimeout()
    deadline = time.monotonic() + TLS_HANDSHAKE_TIMEOUT_S
    try:
        secured = context.wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
    except (OSError, ValueError) as error:
        _handshake_failed(connection, error)
        return None
    secured.setblocking(False)
    try:
        while True:
            try:
                secured.do_handshake()
                break
            except ssl.SSLWantReadError:
                ready = select.select([secured], [], [], max(0.0, deadline - time.monotonic()))[0]
            except ssl.SSLWantWriteError:
                ready = select.select([], [secured], [], max(0.0, deadline - time.monotonic()))[1]
            if not ready:
                raise TimeoutError("TLS handshake not completed in time")
    except (OSError, ValueError) as error:
        _handshake_failed(secured, error)
        return None
    secured.settimeout(timeout)
    return secured


def _handshake_failed(connection: socket.socket, error: BaseException) -> None:
    _log.debug(Event.HTTP_TLS_FAILED, extra={"fields": {"error_type": type(error).__name__}})
    connection.close()


def server_tls_context(
    cert_file: Path, key_file: Path, client_ca_file: Path | None = None, *, what: str = "TLS"
) -> ssl.SSLContext:
    """A server context: TLS 1.2 or later, forward-secret AEAD suites only; with
    `client_ca_file`, a client certificate that CA signed is required (mutual TLS).
    ConfigError naming the files (as `what`) when they do not load."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")  # TLS 1.2; 1.3's suites are all AEAD
    try:
        context.load_cert_chain(cert_file, key_file)
        if client_ca_file is not None:
            context.load_verify_locations(client_ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(
            f"{what} files do not load ({error}): the certificate {cert_file}, its key "
            f"{key_file} and the client CA {client_ca_file} must be PEM files this user reads"
        ) from None
    return context


def read_token_hash(path: Path) -> bytes:
    """The SHA-256 a bearer token must hash to, from a file holding its 64 hex digits."""
    try:
        text = path.read_text(encoding="ascii").strip()
        digest = bytes.fromhex(text)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConfigError(
            f"token hash file {path} is unreadable or not hex ({type(error).__name__}); write "
            'the token\'s SHA-256 there: printf %s "$TOKEN" | sha256sum | cut -c1-64 > FILE'
        ) from None
    if len(digest) != hashlib.sha256().digest_size:
        raise ConfigError(
            f"token hash file {path} holds {len(digest)} bytes, not a SHA-256 (32); write "
            'printf %s "$TOKEN" | sha256sum | cut -c1-64 > FILE'
        )
    return digest


def token_matches(authorization: str | None, expected: bytes) -> bool:
    """Whether an `Authorization: Bearer <token>` header carries the token whose SHA-256 is
    `expected`; the comparison takes the same time whatever the header holds."""
    scheme, _, token = (authorization or "").partition(" ")
    presented = hashlib.sha256(token.strip().encode("utf-8", "replace")).digest()
    return hmac.compare_digest(presented, expected) and scheme.lower() == "bearer"


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (or "localhost"): reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
