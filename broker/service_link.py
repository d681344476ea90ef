"""What a long-running service (node or aggregator daemon) needs from MQTT, in one object.

`ServiceLink` owns one `Session`, one `PayloadReceiver` and one `Outbox`: every message in
and out is a chunked payload (`broker.transfer`), so a 40 MB partial sum and a 300-byte
RoundOpen take the same path. Handlers run on the session's dispatch thread, one at a time,
and a message is acknowledged only after its handler returns: a crash mid-handler means
redelivery.

`publish(topic, payload, retain)` queues the payload in the outbox and returns at once; the
outbox sends payloads in the order posted, and a payload the broker cannot take now (it is
away) waits, however long the outage, and goes out when the session reconnects
(`broker.outbox`). `flush` waits until everything posted is acknowledged. It retains only
what fits one frame (MQTT retains one message per topic); a larger "retained" payload is
sent unretained with a warning, and reaches members that were away through their persistent
sessions instead.

The link logs the broker's going away once per outage (`broker-disconnected`) and its
return once (`broker-connected`, with how long it was away and how much was waiting), not a
line per message; `connected` is what `/readyz` reports.

`endpoint_config` turns a startup bundle plus the service's broker settings into the
SessionConfig: mutual TLS from the bundle by default, or, only where the settings say
`tls = false`, the plaintext development broker (MQTT 3.1.1).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from broker.chunking import DEFAULT_CHUNK_SIZE, DEFAULT_TRANSFER_TIMEOUT_S, ReassemblyLimits
from broker.intake import IntakeBudget, IntakeGate
from broker.outbox import Outbox
from broker.provisioning.bundle import Bundle
from broker.quotas import Origin
from broker.session import ConnectionChange, Session, SessionConfig
from broker.topics import member_writer, presence_topic, writer_key
from broker.transfer import PayloadReceiver, chunk_room, max_chunk_size
from tessera.limits import MAX_TRANSFER_BYTES, MQTT_PACKET_OVERHEAD_BYTES
from tessera.observability.events import Event

log = logging.getLogger(__name__)

PayloadHandler = Callable[[str, bytes], None]
WireCounter = Callable[[str, int], None]
CLOSE_DRAIN_S = 10.0  # how long `close` lets queued payloads go out while connected


@dataclass(frozen=True)
class Endpoint:
    """Where the broker is, as a service's configuration names it (None: the bundle's)."""

    host: str | None = None
    port: int | None = None
    tls: bool = True
    publish_timeout_s: float = 300.0  # a publish unacknowledged this long is reported stalled
    reconnect_max_s: float = 30.0  # the longest wait between two reconnection attempts


def endpoint_config(bundle: Bundle, endpoint: Endpoint) -> SessionConfig:
    """The session for `bundle`'s member: TLS from the bundle, or the development broker."""
    if endpoint.tls:
        return bundle.session_config(
            endpoint.host,
            port=endpoint.port,
            publish_timeout_s=endpoint.publish_timeout_s,
            reconnect_max_s=endpoint.reconnect_max_s,
        )
    log.warning(
        Event.INSECURE_BROKER,
        extra={"fields": {}},
    )
    return SessionConfig(
        client_id=bundle.member_id,
        host=endpoint.host or "127.0.0.1",
        port=endpoint.port or 1883,
        tls=None,
        insecure_plaintext=True,
        protocol="mqttv311",
        presence_topic=presence_topic(bundle.federation_id, bundle.member_id),
        max_packet_bytes=bundle.max_packet_bytes + MQTT_PACKET_OVERHEAD_BYTES,
        publish_timeout_s=endpoint.publish_timeout_s,
        reconnect_max_s=endpoint.reconnect_max_s,
    )


def transfer_origin(topic: str) -> Origin:
    """Whom a transfer on `topic` is charged to: members' topics (shares, audit reports,
    release requests) draw from the "members" pool, everything the aggregators write from
    "aggregators", so no member can crowd out the leader's or the aggregators' messages."""
    pool = "members" if member_writer(topic) is not None else "aggregators"
    return Origin(writer_key(topic), pool)


def member_intake(config: SessionConfig, max_payload_bytes: int) -> IntakeGate:
    """The intake gate of a service that members write to (an aggregator): each member's
    messages within `IntakeBudget.for_payloads`, counted from the session's chunk size."""
    chunk = min(DEFAULT_CHUNK_SIZE, chunk_room(config.max_packet_bytes))
    budget = IntakeBudget.for_payloads(max_payload_bytes, chunk)
    return IntakeGate(budget, member_writer, time.monotonic)


class ServiceLink:
    """One service's MQTT session: chunked payloads in and out, wire bytes counted."""

    def __init__(
        self,
        config: SessionConfig,
        *,
        spool_dir: Path | None = None,
        max_payload_bytes: int = MAX_TRANSFER_BYTES,
        on_wire: WireCounter | None = None,
        intake: IntakeGate | None = None,
        transfer_timeout_s: float = DEFAULT_TRANSFER_TIMEOUT_S,
    ) -> None:
        self.session = Session(config, intake)
        self.intake = intake
        limits = ReassemblyLimits(
            max_payload_bytes=max_payload_bytes,
            max_total_bytes=2 * max_payload_bytes,
            timeout_s=transfer_timeout_s,
            spool_dir=spool_dir,
        )
        self.receiver = PayloadReceiver(self.session, limits, origin_of=transfer_origin)
        self._on_wire = on_wire or (lambda _direction, _count: None)
        self.outbox = Outbox(self.session, on_sent=lambda count: self._on_wire("sent", count))
        self.session.on_connection = self._on_connection
        self._down_since: float | None = None  # paho's thread only

    def subscribe(self, topic_filter: str, handler: PayloadHandler) -> None:
        """Route each verified payload on `topic_filter` to `handler(topic, payload)`.

        Call before `start()`: the subscription then goes out on every (re)connect.
        """

        def counted(topic: str, payload: bytes) -> None:
            self._on_wire("received", len(payload))
            handler(topic, payload)

        self.receiver.subscribe(topic_filter, counted)

    def start(self, connect_timeout_s: float | None = None) -> ServiceLink:
        """Start the session; with a timeout, wait for the first connection (or raise)."""
        self.outbox.start()
        self.session.start()
        if connect_timeout_s is not None:
            self.session.wait_connected(connect_timeout_s)
        return self

    @property
    def connected(self) -> bool:
        """Whether the MQTT session is connected now."""
        return self.session.connected

    @property
    def pending(self) -> int:
        """Payloads published and not yet acknowledged by the broker."""
        return self.outbox.pending

    @property
    def delivering_retained(self) -> bool:
        """Inside a handler: whether its message is a retained replay (`Session`)."""
        return self.session.delivering_retained

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Queue `payload` (chunked) for the broker and return; see the module docstring."""
        if retain and len(payload) > max_chunk_size(self.session):
            log.warning(
                Event.RETAIN_SKIPPED,
                extra={"fields": {"bytes": len(payload)}},
            )
            retain = False
        self.outbox.post(topic, payload, retain)

    def flush(self, timeout: float) -> None:
        """Wait until the broker acknowledged everything published so far (PublishTimeoutError
        after `timeout` s; it stays queued)."""
        self.outbox.flush(timeout)

    def close(self) -> None:
        """Let queued payloads go out (while connected, up to CLOSE_DRAIN_S), stop receiving,
        publish offline presence, disconnect."""
        left = self.outbox.close(CLOSE_DRAIN_S if self.connected else 0.0)
        if left:
            log.error(Event.OUTBOX_ABANDONED, extra={"fields": {"queued": left}})
        self.receiver.close()
        self.session.close()

    def _on_connection(self, change: ConnectionChange) -> None:
        """Log the broker's going away once and its return once (paho's thread)."""
        now = time.monotonic()
        if not change.connected:
            if self._down_since is None:
                self._down_since = now
                fields = {"reason": change.reason, "queued": self.outbox.pending}
                log.warning(Event.BROKER_DISCONNECTED, extra={"fields": fields})
            return
        down = None if self._down_since is None else round(now - self._down_since, 1)
        self._down_since = None
        fields = {
            "session_present": change.session_present,
            "down_s": down,
            "queued": self.outbox.pending,
        }
        log.info(Event.BROKER_CONNECTED, extra={"fields": fields})


class Service(Protocol):
    """A started daemon: runs until its stop event is set, then closes."""

    def run(self, stop: threading.Event) -> None: ...

    def close(self) -> None: ...


def run_until_signalled(service: Service, stopped_event: Event) -> int:
    """Run a started service until SIGTERM or SIGINT, close it, log `stopped_event`; 0."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    try:
        service.run(stop)
    finally:
        service.close()
        log.info(stopped_event, extra={"fields": {}})
    return 0
