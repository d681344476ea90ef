"""The development broker: publish and subscribe through the session wrapper, plain TCP."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from broker.devbroker import DevBroker, dev_session_config
from broker.errors import NotConnectedError
from broker.session import Session, SessionConfig, TlsFiles
from broker.transfer import PayloadReceiver, send_payload
from tessera.errors import ConfigError


def test_publish_subscribe_and_a_chunked_payload_through_the_session() -> None:
    payload = os.urandom(1 << 20)
    arrived = threading.Event()
    got: list[tuple[str, bytes]] = []

    def on_payload(topic: str, data: bytes) -> None:
        got.append((topic, data))
        arrived.set()

    with DevBroker() as dev:
        receiver_session = Session(dev_session_config("agg-1", dev))
        receiver = PayloadReceiver(receiver_session)
        receiver.subscribe("tessera/f/s/share/agg-1/+", on_payload)
        receiver_session.start().wait_connected(10)
        sender = Session(dev_session_config("site-a", dev)).start()
        sender.wait_connected(10)
        send_payload(sender, "tessera/f/s/share/agg-1/site-a", payload, chunk_size=256 << 10)
        assert arrived.wait(20)
        sender.close()
        receiver_session.close()
        receiver.close()
    assert got == [("tessera/f/s/share/agg-1/site-a", payload)]


def test_plaintext_and_mqtt_311_need_the_explicit_development_flag() -> None:
    with pytest.raises(ConfigError, match="insecure_plaintext=True only for the dev broker"):
        SessionConfig(client_id="x", host="127.0.0.1", port=1883, tls=None)
    with pytest.raises(ConfigError, match="development broker"):
        SessionConfig(
            client_id="x",
            host="h",
            port=8883,
            tls=TlsFiles(Path("ca.pem"), Path("c.pem"), Path("c.key")),
            protocol="mqttv311",
        )


def test_a_failing_handler_is_counted_and_delivery_goes_on() -> None:
    seen: list[bytes] = []
    second = threading.Event()

    def handler(_topic: str, payload: bytes) -> None:
        seen.append(payload)
        if payload == b"bad":
            raise ValueError("handler bug")
        second.set()

    with DevBroker() as dev:
        receiver = Session(dev_session_config("agg-1", dev))
        receiver.subscribe("t/x", handler)
        receiver.start().wait_connected(10)
        sender = Session(dev_session_config("site-a", dev)).start()
        sender.wait_connected(10)
        sender.publish("t/x", b"bad").wait(10)
        sender.publish("t/x", b"good").wait(10)
        assert second.wait(10)
        assert seen == [b"bad", b"good"] and receiver.handler_failures == 1
        sender.close()
        receiver.close()
        with pytest.raises(NotConnectedError, match="is closed"):
            sender.publish("t/x", b"late")
