"""Transport benchmark: a 44 MB model release through broker/ over TLS vs raw paho.

Both paths use the same real Mosquitto (TLS, client certificates, the generated ACL), the
same provisioned certificates and the same bytes, in the same process. The wrapper path is
`broker.transfer.send_payload` (chunk frames, SHA-256 per chunk and per payload, windowed
QoS 1, reassembly and verification) from an aggregator to a site on the release topic. The
baselines are raw paho-mqtt 2.x clients (MQTT v5, QoS 1, loop_start): (a) the release as
one 44 MB message, (b) the release in unframed 1 MiB pieces. Times run from the first
publish to the last byte delivered to the subscriber's callback. The three paths run
interleaved, round after round, so load from other processes hits them alike; the ratio is
the median over rounds of (faster raw path's time / wrapper's time) in that round.

    .venv/bin/python bench/transport.py [--runs 5] [--size-mb 44]
"""

from __future__ import annotations

import argparse
import getpass
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.mosquitto import MosquittoProcess

from broker import topics
from broker.chunking import ReassemblyLimits
from broker.provisioning.bundle import load_bundle
from broker.provisioning.federation import parse_federation
from broker.provisioning.provision import provision
from broker.session import Session
from broker.session_config import tls_context
from broker.transfer import PayloadReceiver, send_payload

FEDERATION = {
    "federation": {"id": "bench", "leader": "agg-1", "studies": ["study", "raw"]},
    "broker": {"max_packet_bytes": 64 << 20},
    # The raw paho pair (site-b, agg-2) and the wrapper pair (site-a, agg-1) are different
    # members: the broker makes a certificate's name the client id, so one member's two
    # connections would disconnect each other.
    "sites": [{"id": "site-a", "name": "Bench Hospital"}, {"id": "site-b", "name": "Raw"}],
    "aggregators": [{"id": "agg-1", "name": "One"}, {"id": "agg-2", "name": "Two"}],
}
TOPIC = topics.release_topic("bench", "study")


class Arrivals:
    """Counts delivered bytes; ``wait(total)`` blocks until that many arrived."""

    def __init__(self) -> None:
        self.bytes = 0
        self._cond = threading.Condition()

    def add(self, count: int) -> None:
        with self._cond:
            self.bytes += count
            self._cond.notify_all()

    def wait(self, total: int, timeout: float = 300) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.bytes >= total, timeout):
                raise TimeoutError(f"only {self.bytes} of {total} bytes arrived")
            self.bytes -= total


def raw_client(bundle_dir: Path, client_id: str, broker: MosquittoProcess) -> mqtt.Client:
    bundle = load_bundle(bundle_dir)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id, protocol=mqtt.MQTTv5)
    client.tls_set_context(tls_context(bundle.tls_files))
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    client.connect(broker.host, broker.mqtt_port)
    client.loop_start()
    if not connected.wait(10):
        raise RuntimeError(f"raw client {client_id} did not connect")
    return client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size-mb", type=int, default=44)
    parser.add_argument("--chunk-kib", type=int, default=1024)
    args = parser.parse_args()
    payload = os.urandom(args.size_mb * 1_000_000)
    chunk = args.chunk_kib << 10

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "provisioned"
        provision(parse_federation(FEDERATION), out, run_as_user=getpass.getuser())
        with MosquittoProcess(parse_federation(FEDERATION), out, Path(tmp) / "broker") as broker:
            bundles = out / "bundles"
            raw_topic = topics.release_topic("bench", "raw")
            # Raw paho: aggregator publishes, site subscribes (own members, own topic).
            raw_arrivals = Arrivals()
            raw_sub = raw_client(bundles / "site-b", "site-b", broker)
            raw_sub.on_message = lambda _c, _u, m: raw_arrivals.add(len(m.payload))
            raw_sub.subscribe(raw_topic, qos=1)
            raw_pub = raw_client(bundles / "agg-2", "agg-2", broker)

            # The wrapper: same roles, chunked and verified.
            site = Session(
                load_bundle(bundles / "site-a").session_config(broker.host, port=broker.mqtt_port)
            )
            receiver = PayloadReceiver(site, ReassemblyLimits(spool_dir=Path(tmp)))
            wrapped_arrivals = Arrivals()
            receiver.subscribe(TOPIC, lambda _t, data: wrapped_arrivals.add(len(data)))
            site.start().wait_connected(10)
            aggregator = Session(
                load_bundle(bundles / "agg-1").session_config(broker.host, port=broker.mqtt_port)
            ).start()
            aggregator.wait_connected(10)
            time.sleep(0.5)

            def raw_whole() -> None:
                raw_pub.publish(raw_topic, payload, qos=1).wait_for_publish(300)
                raw_arrivals.wait(len(payload))

            def raw_pieces() -> None:
                view = memoryview(payload)
                infos = [
                    raw_pub.publish(raw_topic, bytes(view[i : i + chunk]), qos=1)
                    for i in range(0, len(payload), chunk)
                ]
                for info in infos:
                    info.wait_for_publish(300)
                raw_arrivals.wait(len(payload))

            def wrapped() -> None:
                send_payload(aggregator, TOPIC, payload, chunk_size=chunk)
                wrapped_arrivals.wait(len(payload))

            # Interleaved, so that load from other processes hits every path alike.
            runs: dict[str, list[float]] = {"one": [], "pieces": [], "wrapper": []}
            for step in range(args.runs + 1):
                for name, once in (
                    ("pieces", raw_pieces),
                    ("wrapper", wrapped),
                    ("one", raw_whole),
                ):
                    start = time.perf_counter()
                    once()
                    if step:  # the first round warms up and is not counted
                        runs[name].append(time.perf_counter() - start)
            aggregator.close()
            site.close()
            receiver.close()
            for client in (raw_pub, raw_sub):
                client.disconnect()
                client.loop_stop()
            raw_one, raw_chunked, wrapper = runs["one"], runs["pieces"], runs["wrapper"]

    size_mb = len(payload) / 1e6
    rows = [
        ("raw paho, one message", raw_one),
        (f"raw paho, {args.chunk_kib} KiB pieces", raw_chunked),
        (f"broker/ wrapper, {args.chunk_kib} KiB chunks", wrapper),
    ]
    print(f"payload {size_mb:.1f} MB, TLS, QoS 1, {args.runs} runs (median)")
    for name, times in rows:
        median = statistics.median(times)
        print(f"  {name:<34} {median * 1000:8.0f} ms  {size_mb / median:7.1f} MB/s")
    # Per-round ratios against the faster raw path of the same round, then their median.
    ratios = [min(a, b) / w for a, b, w in zip(raw_one, raw_chunked, wrapper, strict=True)]
    vs_one = [a / w for a, w in zip(raw_one, wrapper, strict=True)]
    print(f"wrapper / raw paho one message   = {statistics.median(vs_one):.2f} (throughput ratio)")
    print(f"wrapper / best raw paho per round = {statistics.median(ratios):.2f} (target >= 0.7)")


if __name__ == "__main__":
    main()
