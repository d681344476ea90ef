"""MQTT over secure WebSockets through an HTTP CONNECT proxy, as from a hospital network."""

from __future__ import annotations

import threading
from pathlib import Path

from support.mosquitto import MosquittoProcess, SessionFactory
from support.proxy import ConnectProxy

from broker import topics
from broker.errors import NotAuthorizedError, NotConnectedError
from broker.provisioning.bundle import load_bundle
from broker.session import HttpProxy, Session

FED, STUDY = "fed-test", "study-ws"


def test_site_reaches_the_aggregator_over_wss_through_the_proxy(
    mosquitto: MosquittoProcess, connect: SessionFactory, provisioned: Path
) -> None:
    arrived = threading.Event()
    got: list[tuple[str, bytes]] = []

    def on_share(topic: str, payload: bytes) -> None:
        got.append((topic, payload))
        arrived.set()

    aggregator = connect("agg-1", mosquitto)
    aggregator.subscribe(topics.shares_for_aggregator(FED, STUDY, "agg-1"), on_share)
    bundle = load_bundle(provisioned / "bundles" / "site-a")
    with ConnectProxy({(mosquitto.host, mosquitto.websockets_port)}) as proxy:
        config = bundle.session_config(
            mosquitto.host,
            port=mosquitto.websockets_port,
            transport="websockets",
            proxy=HttpProxy("127.0.0.1", proxy.port),
        )
        with Session(config) as site:
            site.wait_connected(10)
            topic = topics.share_topic(FED, STUDY, "agg-1", "site-a")
            site.publish(topic, b"over websockets").wait(10)
            assert arrived.wait(10)
            # The same ACL applies on the WebSockets listener.
            forged = topics.share_topic(FED, STUDY, "agg-1", "site-b")
            try:
                site.publish(forged, b"forged").wait(10)
                raise AssertionError("forged publish over WebSockets was accepted")
            except NotAuthorizedError:
                pass
        assert proxy.tunnels == 1
    assert got == [(topic, b"over websockets")]


def test_proxy_refusing_the_tunnel_means_no_connection(
    mosquitto: MosquittoProcess, provisioned: Path
) -> None:
    bundle = load_bundle(provisioned / "bundles" / "site-a")
    with ConnectProxy(allowed=set()) as proxy:
        config = bundle.session_config(
            mosquitto.host,
            port=mosquitto.websockets_port,
            transport="websockets",
            proxy=HttpProxy("127.0.0.1", proxy.port),
            reconnect_min_s=0.1,
            reconnect_max_s=0.2,
        )
        with Session(config) as site:
            try:
                site.wait_connected(1.5)
                raise AssertionError("connected although the proxy refused the tunnel")
            except NotConnectedError as error:
                assert "connection attempt failed" in str(error)
        assert proxy.refused >= 1 and proxy.tunnels == 0
