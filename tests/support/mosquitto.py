"""A real Mosquitto process for integration tests (broker.local_mosquitto), the small test
federation the broker tests share, and raw MQTT clients that act as a hostile member would."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from broker.local_mosquitto import MosquittoProcess, free_port
from broker.provisioning.bundle import load_bundle
from broker.session import Session
from broker.session_config import TlsFiles, tls_context

__all__ = [
    "TEST_FEDERATION",
    "Inbox",
    "MosquittoProcess",
    "SessionFactory",
    "free_port",
    "mqtt_connects",
    "raw_client",
]

# connect(member_id, broker, start=True, **config overrides) -> Session (see tests/broker).
SessionFactory = Callable[..., Session]

# A small federation for integration tests: two sites, two aggregators, agg-1 leads. The
# broker's ACL grants study topics for the listed study ids only: a broker test uses one
# of them (or adds its own here).
TEST_FEDERATION: dict[str, Any] = {
    "federation": {
        "id": "fed-test",
        "leader": "agg-1",
        "studies": [
            "study-1",
            "study-limits",
            "study-offline",
            "study-ws",
            "study-outbox",
            "study-retained",
            "chest-xray",
        ],
    },
    "broker": {"max_packet_bytes": 2 << 20, "websockets_port": 443},
    "sites": [{"id": "site-a", "name": "Hospital A"}, {"id": "site-b", "name": "Hospital B"}],
    "aggregators": [{"id": "agg-1", "name": "Aggregator One"}, {"id": "agg-2", "name": "Two"}],
}


class Inbox:
    """Collects (topic, payload) from a handler and lets the test wait for a count."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self._changed = threading.Condition()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self._changed:
            self.items.append((topic, payload))
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[tuple[str, bytes]]:
        with self._changed:
            self._changed.wait_for(lambda: len(self.items) >= count, timeout)
        return list(self.items)


def raw_client(
    bundle_dir: Path,
    client_id: str,
    broker: MosquittoProcess,
    *,
    transport: Literal["tcp", "websockets"] = "tcp",
    clean_start: bool = True,
) -> mqtt.Client:
    """A paho client with `bundle_dir`'s certificate that asks for any client id it likes,
    connected (CONNACK success) with its network loop running; stop it with
    ``loop_stop()`` after ``disconnect()``."""
    bundle = load_bundle(bundle_dir)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id, protocol=mqtt.MQTTv5, transport=transport
    )
    client.tls_set_context(tls_context(bundle.tls_files))
    if transport == "websockets":
        client.ws_set_options(path="/mqtt")
    connected = threading.Event()
    outcome: list[Any] = []

    def on_connect(_c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        outcome.append(reason)
        connected.set()

    client.on_connect = on_connect
    assert broker.websockets_port is not None or transport == "tcp"
    port = broker.mqtt_port if transport == "tcp" else broker.websockets_port
    client.connect(broker.host, port, clean_start=clean_start)
    client.loop_start()
    if not connected.wait(10) or outcome[0].is_failure:
        client.loop_stop()
        raise ConnectionError(f"raw client {client_id!r} was refused: {outcome}")
    return client


def mqtt_connects(bundle_dir: Path, broker: MosquittoProcess, timeout: float = 20.0) -> bool:
    """Whether the certificate in `bundle_dir` (client.pem, client.key, ca.pem) gets a
    successful CONNACK from the broker's MQTT listener, rather than a refusal."""
    files = TlsFiles(bundle_dir / "ca.pem", bundle_dir / "client.pem", bundle_dir / "client.key")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, "probe", protocol=mqtt.MQTTv5)
    client.tls_set_context(tls_context(files))
    outcome: list[bool] = []
    done = threading.Event()

    def finish(accepted: bool) -> None:
        outcome.append(accepted)
        done.set()

    client.on_connect = lambda _c, _u, _f, reason, _p: finish(not reason.is_failure)
    client.on_disconnect = lambda *_: finish(False)
    client.on_connect_fail = lambda *_: finish(False)
    try:
        client.connect(broker.host, broker.mqtt_port)
    except OSError:  # the TLS handshake itself failed (TLS 1.2: the server checks first)
        return False
    client.loop_start()
    try:
        if not done.wait(timeout):
            raise TimeoutError(f"no answer from the broker within {timeout} s")
        return outcome[0]
    finally:
        client.disconnect()
        client.loop_stop()
