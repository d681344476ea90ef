"""DEVELOPMENT ONLY: an in-process MQTT broker (amqtt) for the demo and local tests.

Never use it for a real federation. It listens on plain TCP on loopback, lets anyone in
(no TLS, no client certificates, no ACL), speaks only MQTT 3.1.1 (no reason codes, no
flow control), and keeps sessions in memory only. Production is Mosquitto with the
configuration and ACL that `tessera provision` generates.

    with DevBroker() as dev:
        session = Session(dev_session_config("site-a", dev)).start()
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from types import TracebackType
from typing import Any

from amqtt.broker import Broker

from broker.errors import BrokerError
from broker.session_config import SessionConfig

log = logging.getLogger(__name__)


class DevBroker:
    """An amqtt broker on its own thread and event loop; loopback only."""

    def __init__(self, port: int = 0) -> None:
        self.host = "127.0.0.1"
        self.port = port or _free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._broker: Broker | None = None
        self._thread = threading.Thread(target=self._run, name="tessera-devbroker", daemon=True)

    def start(self, timeout: float = 10.0) -> DevBroker:
        """Start the broker; raise BrokerError if it is not listening within ``timeout``."""
        log.warning(
            "starting the DEVELOPMENT broker on %s:%d: no TLS, no authentication, no ACL",
            self.host,
            self.port,
        )
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise BrokerError(
                f"development broker did not start on port {self.port}: {self._error}"
            )
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the broker down and stop its thread."""
        if self._broker is not None and self._loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
            try:
                future.result(timeout)
            except Exception:  # shutting down a dev tool: report, keep going
                log.exception("development broker shutdown failed")
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        config: dict[str, Any] = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        try:
            self._broker = Broker(config, loop=self._loop)
            self._loop.run_until_complete(self._broker.start())
        except Exception as error:  # surfaced to start() as a BrokerError
            log.exception("development broker failed to start")
            self._error = error
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    def __enter__(self) -> DevBroker:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def dev_session_config(client_id: str, broker: DevBroker, **overrides: Any) -> SessionConfig:
    """A SessionConfig for the development broker: plaintext, MQTT 3.1.1."""
    return SessionConfig(
        client_id=client_id,
        host=broker.host,
        port=broker.port,
        tls=None,
        insecure_plaintext=True,
        protocol="mqttv311",
        **overrides,
    )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
