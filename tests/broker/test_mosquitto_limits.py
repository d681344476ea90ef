"""Size limits on receipt and stalled transfers, against a real Mosquitto."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from support.mosquitto import MosquittoProcess, SessionFactory

from broker import topics
from broker.chunking import ReassemblyLimits, encode_frames
from broker.intake import IntakeBudget, IntakeGate
from broker.provisioning.bundle import load_bundle
from broker.session import Session
from broker.session_config import tls_context
from broker.transfer import PayloadReceiver

FED, STUDY = "fed-test", "study-limits"


def test_broker_never_delivers_more_than_the_clients_maximum_packet_size(
    mosquitto: MosquittoProcess, connect: SessionFactory
) -> None:
    got: list[bytes] = []
    small_arrived = threading.Event()

    def on_round(_topic: str, payload: bytes) -> None:
        got.append(payload)
        if payload == b"small":
            small_arrived.set()

    site = connect("site-a", mosquitto, start=False, max_packet_bytes=100_000)
    site.subscribe(topics.round_topic(FED, STUDY), on_round)
    site.start().wait_connected(10)
    aggregator = connect("agg-1", mosquitto)
    aggregator.publish(topics.round_topic(FED, STUDY), bytes(500_000)).wait(10)
    aggregator.publish(topics.round_topic(FED, STUDY), b"small").wait(10)
    assert small_arrived.wait(10)
    assert got == [b"small"]  # the oversized one never reached the client, let alone a handler


def test_broker_refuses_a_packet_over_its_max_packet_size(
    mosquitto: MosquittoProcess, provisioned: Path
) -> None:
    bundle = load_bundle(provisioned / "bundles" / "agg-1")
    disconnected = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, "agg-1-raw", protocol=mqtt.MQTTv5)
    client.tls_set_context(tls_context(bundle.tls_files))
    client.on_disconnect = lambda *_: disconnected.set()
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.connect(mosquitto.host, mosquitto.mqtt_port)
    client.loop_start()
    try:
        assert connected.wait(10)
        # Raw paho has no local limit; Mosquitto's max_packet_size (2 MiB + 64 KiB) applies.
        info = client.publish(topics.round_topic(FED, STUDY), bytes(3 << 20), qos=1)
        assert disconnected.wait(10)
        assert not info.is_published()
    finally:
        client.loop_stop()


def test_stalled_transfer_is_dropped_by_the_receiver_and_recorded(
    mosquitto: MosquittoProcess, connect: SessionFactory
) -> None:
    now = [0.0]
    session = connect("agg-1", mosquitto, start=False)
    receiver = PayloadReceiver(session, ReassemblyLimits(timeout_s=0.2), clock=lambda: now[0])
    delivered: list[bytes] = []
    receiver.subscribe(
        topics.shares_for_aggregator(FED, STUDY, "agg-1"), lambda _t, p: delivered.append(p)
    )
    session.start().wait_connected(10)
    first, _second = list(encode_frames(bytes(2000), 1000))
    site = connect("site-a", mosquitto)
    site.publish(topics.share_topic(FED, STUDY, "agg-1", "site-a"), first).wait(10)
    deadline = time.monotonic() + 10
    while receiver.reassembler.open_transfers == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert receiver.reassembler.open_transfers == 1
    now[0] = 1.0  # the transfer has been idle for longer than its timeout
    while not receiver.reassembler.expired and time.monotonic() < deadline:
        time.sleep(0.02)
    (record,) = receiver.reassembler.expired
    assert (record.received, record.count, record.total_size) == (1, 2, 2000)
    assert record.key == topics.share_topic(FED, STUDY, "agg-1", "site-a")
    assert receiver.reassembler.open_transfers == 0 and delivered == []
    receiver.close()


def test_time_disconnected_is_not_idle_time(
    mosquitto: MosquittoProcess, connect: SessionFactory
) -> None:
    # A broker outage longer than the transfer timeout must not drop the transfers it
    # interrupted: their remaining frames are queued for the receiver's persistent session.
    now = [0.0]
    session = connect("agg-2", mosquitto, start=False, reconnect_max_s=0.5)
    receiver = PayloadReceiver(session, ReassemblyLimits(timeout_s=0.2), clock=lambda: now[0])
    delivered: list[bytes] = []
    receiver.subscribe(
        topics.shares_for_aggregator(FED, STUDY, "agg-2"), lambda _t, p: delivered.append(p)
    )
    session.start().wait_connected(10)
    payload = os.urandom(2000)
    first, second = list(encode_frames(payload, 1000))
    topic = topics.share_topic(FED, STUDY, "agg-2", "site-b")
    site = connect("site-b", mosquitto, reconnect_max_s=0.5)
    site.publish(topic, first).wait(10)
    deadline = time.monotonic() + 10
    while receiver.reassembler.open_transfers == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    mosquitto.stop()
    while session.connected and time.monotonic() < deadline:
        time.sleep(0.02)
    now[0] = 100.0  # the outage, once the receiver sees it, lasts far longer than the timeout
    mosquitto.start()
    session.wait_connected(30)
    site.wait_connected(30)
    site.publish(topic, second).wait(30)
    while not delivered and time.monotonic() < deadline + 30:
        time.sleep(0.02)
    assert not receiver.reassembler.expired, (receiver.reassembler.expired, receiver.rejected)
    assert delivered == [payload], (receiver.reassembler.open_transfers, receiver.rejected)
    receiver.close()


def test_the_intake_gate_drops_a_flooders_excess_before_any_handler(
    mosquitto: MosquittoProcess, provisioned: Path, connect: SessionFactory
) -> None:
    # issue 19, point 8: the aggregator's session acknowledges and drops a member's
    # messages beyond its budget on the network thread; another member's still arrive.
    intake = IntakeGate(IntakeBudget(5, 1e-6), topics.member_writer, time.monotonic)
    config = load_bundle(provisioned / "bundles" / "agg-1").session_config(
        mosquitto.host, port=mosquitto.mqtt_port
    )
    aggregator = Session(config, intake)
    got: list[str] = []
    honest = threading.Event()

    def on_share(topic: str, _payload: bytes) -> None:
        got.append(topics.parse(topic).node or "")
        if topic.endswith("/site-a"):
            honest.set()

    aggregator.subscribe(topics.shares_for_aggregator(FED, STUDY, "agg-1"), on_share)
    aggregator.start().wait_connected(10)
    try:
        flooder = connect("site-b", mosquitto)
        flood = [
            flooder.publish(topics.share_topic(FED, STUDY, "agg-1", "site-b"), b"junk")
            for _ in range(50)
        ]
        for handle in flood:
            handle.wait(10)  # the broker acknowledged every one
        connect("site-a", mosquitto).publish(
            topics.share_topic(FED, STUDY, "agg-1", "site-a"), b"share"
        ).wait(10)
        assert honest.wait(10)
        assert got.count("site-b") == 5 and got.count("site-a") == 1
        assert intake.drain() == {"site-b": 45}
    finally:
        aggregator.close()
