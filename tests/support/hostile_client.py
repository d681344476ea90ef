"""A hostile member as a real MQTT client: its own certificate, its own ACL grants, nothing
of Tessera's client code beyond the frame encoder (issue 19 point 8, issue 20 point 5).

    client = HostileClient(bundle_dir, host, port)        # TLS, the member's certificate
    client.stale_transfers(topic, 16)                     # first frames, never finished
    client.declare(topic, 256 << 20, 2)                   # frames declaring 256 MiB each
    client.online()                                       # retained presence "online"

As a process, it floods: every topic given, in turn, as fast as QoS 1 and the broker's
Receive Maximum let it (a bounded number of publishes awaiting their PUBACK), until SIGTERM;
then it prints one JSON line: how many it published and how many the broker acknowledged.

    python tests/support/hostile_client.py flood --bundle B --host H --port P TOPIC...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

if __name__ == "__main__":  # run as a script: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from broker.chunking import PAYLOAD_ID_SIZE, ChunkFrame, encode_frames
from broker.provisioning.bundle import load_bundle
from broker.session_config import tls_context
from broker.topics import presence_topic

OUTSTANDING = 2000  # publishes awaiting their PUBACK before the flood waits


class HostileClient:
    """A connected paho client (MQTT v5, TLS) under a member's certificate."""

    def __init__(self, bundle_dir: Path, host: str, port: int, client_id: str | None = None):
        bundle = load_bundle(bundle_dir)
        self.member_id, self.federation_id = bundle.member_id, bundle.federation_id
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id or bundle.member_id, protocol=mqtt.MQTTv5
        )
        self.client.tls_set_context(tls_context(bundle.tls_files))
        self.client.max_queued_messages_set(0)
        self.published = 0
        self.acked = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._connected = threading.Event()
        self.client.on_connect = lambda *_: self._connected.set()
        self.client.on_publish = self._on_publish
        self.client.connect(host, port)
        self.client.loop_start()
        if not self._connected.wait(30):
            raise RuntimeError(f"{self.member_id} could not connect to {host}:{port}")

    def _on_publish(self, _c: object, _u: object, _mid: int, reason: object, _p: object) -> None:
        with self._room:
            self.acked += 1
            if int(getattr(reason, "value", 0)) >= 0x80:
                self.refused += 1
            self._room.notify()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> mqtt.MQTTMessageInfo:
        """One QoS 1 publish, waiting first while OUTSTANDING publishes await a PUBACK."""
        with self._room:
            while self.published - self.acked >= OUTSTANDING:
                self._room.wait(1)
            self.published += 1
        return self.client.publish(topic, payload, qos=1, retain=retain)

    def stale_transfers(self, topic: str, count: int, data_bytes: int = 10) -> None:
        """`count` transfers of two chunks each, of which only the first is ever sent."""
        for _ in range(count):
            first, _second = encode_frames(os.urandom(2 * data_bytes), data_bytes)
            self.publish(topic, first).wait_for_publish(30)

    def declare(self, topic: str, total_bytes: int, count: int) -> None:
        """`count` first frames of 1 MiB chunks, each declaring a `total_bytes` payload."""
        chunk = 1 << 20
        data = os.urandom(chunk)
        for _ in range(count):
            frame = ChunkFrame(
                os.urandom(PAYLOAD_ID_SIZE), 0, -(-total_bytes // chunk), chunk, total_bytes,
                os.urandom(32), hashlib.sha256(data).digest(), data,
            )  # fmt: skip
            self.publish(topic, frame.to_bytes()).wait_for_publish(30)

    def online(self) -> None:
        """Publish retained "online" presence, as a member does on connect."""
        topic = presence_topic(self.federation_id, self.member_id)
        self.publish(topic, b"online", retain=True).wait_for_publish(30)

    def flood(self, topics: list[str], stop: threading.Event) -> None:
        """Publish junk on `topics` in turn until `stop`, each message new: undecodable
        bytes, whole one-frame payloads that are not envelopes, and first frames of
        transfers never finished."""
        kinds = [
            lambda: os.urandom(64),
            lambda: next(iter(encode_frames(os.urandom(48), 1 << 20))),
            lambda: next(iter(encode_frames(os.urandom(64), 32))),
        ]
        n = 0
        while not stop.is_set():
            self.publish(topics[n % len(topics)], kinds[n % len(kinds)]())
            n += 1

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


def main() -> int:
    """`flood` until SIGTERM, then one JSON line of counts on stdout."""
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["flood"])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("topics", nargs="+")
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    client = HostileClient(args.bundle, args.host, args.port)
    print(json.dumps({"connected": True}), flush=True)
    client.flood(args.topics, stop)
    counts = {"published": client.published, "acked": client.acked, "refused": client.refused}
    client.close()
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
