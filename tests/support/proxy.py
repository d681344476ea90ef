"""A tiny threaded HTTP CONNECT proxy, like a hospital's egress proxy, for tests.

It answers only CONNECT, to the hosts and ports it is told to allow, and counts tunnels,
so a test can prove that traffic went through it.
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType


class ConnectProxy:
    """Listens on 127.0.0.1:<free port>; tunnels CONNECT requests to allowed targets."""

    def __init__(self, allowed: set[tuple[str, int]]) -> None:
        self.allowed = allowed
        self.tunnels = 0
        self.refused = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        # close() does not wake a blocked accept() on Linux; a short timeout lets it notice.
        self._server.settimeout(0.1)
        self.port = int(self._server.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)

    def __enter__(self) -> ConnectProxy:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._server.close()
        self._thread.join(5)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        with client:
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 8192:
                data = client.recv(1024)
                if not data:
                    return
                request += data
            head, _, early = request.partition(b"\r\n\r\n")
            parts = head.split(b"\r\n")[0].split()
            if len(parts) != 3 or parts[0] != b"CONNECT":
                self.refused += 1
                client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                return
            host, _, port = parts[1].decode().rpartition(":")
            if (host, int(port)) not in self.allowed:
                self.refused += 1
                client.sendall(b"HTTP/1.1 403 Forbidden\r\n\r\n")
                return
            upstream = socket.create_connection((host, int(port)))
            self.tunnels += 1
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if early:
                upstream.sendall(early)
            with upstream:
                pump = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
                pump.start()
                _pipe(client, upstream)
                pump.join(5)


def _pipe(source: socket.socket, target: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            target.sendall(data)
    except OSError:
        pass
    finally:
        try:
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass
