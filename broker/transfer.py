"""Chunked payload transfer over a Session: the glue between session.py and chunking.py.

Every payload goes out as chunk frames (one frame when it is small), with a sliding window
of unacknowledged publishes so a 100 MB release never sits in paho's queue all at once.
The receiver checks each frame, reassembles within ReassemblyLimits, and hands each
verified payload to the callback exactly once (repeats from QoS 1 redelivery are dropped).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from broker.chunking import (
    DEFAULT_CHUNK_SIZE,
    HEADER_SIZE,
    PAYLOAD_ID_SIZE,
    ChunkFrame,
    Reassembler,
    ReassemblyLimits,
    encode_frames,
)
from broker.errors import BrokerError, ChunkError, DeliveryDeferred, PayloadTooLargeError
from broker.quotas import Origin
from broker.session import PublishHandle, Session
from tessera.observability.events import Event

PayloadHandler = Callable[[str, bytes], None]
log = logging.getLogger(__name__)


def max_chunk_size(session: Session, topic_room: int = 256) -> int:
    """The largest chunk that fits the session's packet limit with header and topic."""
    return chunk_room(session.config.max_packet_bytes, topic_room)


def chunk_room(max_packet_bytes: int, topic_room: int = 256) -> int:
    """The largest chunk a packet of `max_packet_bytes` holds with header and topic."""
    return max_packet_bytes - HEADER_SIZE - topic_room - 64


def send_payload(
    session: Session,
    topic: str,
    payload: bytes,
    chunk_size: int | None = None,
    timeout_s: float = 300.0,
    retain: bool = False,
    wait: Callable[[PublishHandle], None] | None = None,
) -> bytes:
    """Publish ``payload`` on ``topic`` as chunk frames; return its payload id once all are acked.

    ``chunk_size`` defaults to 1 MiB, or less where the session's packet limit needs it.

    Raises NotAuthorizedError if the broker refuses, PublishTimeoutError if acknowledgements
    stop for ``timeout_s`` (each frame stays queued in the session and is resent on
    reconnect). ``wait``, where given, replaces that wait for each frame's acknowledgement
    (broker.outbox waits as long as the broker is away). ``retain`` is allowed only for a
    payload that fits one frame, since MQTT retains one message per topic.
    """
    if chunk_size is None:
        chunk_size = min(DEFAULT_CHUNK_SIZE, max_chunk_size(session))
    if chunk_size > max_chunk_size(session):
        raise PayloadTooLargeError(
            f"chunk_size {chunk_size} does not fit the session's max_packet_bytes "
            f"{session.config.max_packet_bytes}; use at most {max_chunk_size(session)}"
        )
    if retain and len(payload) > chunk_size:
        raise BrokerError(
            f"cannot retain a {len(payload)}-byte payload: it needs several chunks and MQTT "
            "retains one message per topic; publish it unretained (persistent sessions queue it)"
        )
    acknowledged = wait or (lambda handle: handle.wait(timeout_s))
    window: deque[PublishHandle] = deque()
    payload_id = b""
    for raw in encode_frames(payload, chunk_size):
        payload_id = payload_id or raw[5 : 5 + PAYLOAD_ID_SIZE]
        window.append(session.publish(topic, raw, retain=retain))
        while len(window) >= session.config.max_inflight:
            acknowledged(window.popleft())
    while window:
        acknowledged(window.popleft())
    return payload_id


class PayloadReceiver:
    """Subscribes to chunked payloads and delivers each verified payload once.

    ``rejected`` counts frames refused (malformed, conflicting, over a limit): each is
    logged as `chunk-rejected` naming the sender (``origin_of``) so that a flood of them is
    logged in aggregate (`tessera.observability.logs.RepeatLimiter`); expired and evicted
    transfers are in ``reassembler.expired`` and ``reassembler.evicted``. A background
    thread expires stalled transfers (at least every second) even when no frame arrives,
    never while disconnected, and the idle clocks restart once the session reconnects,
    before any frame of the new connection is taken: time spent disconnected is not
    idleness.

    A frame that cannot be spooled raises SpoolError, and a payload whose handler raises
    DeliveryDeferred is kept; either way the frame's handler raises DeliveryDeferred, so the
    session leaves that frame unacknowledged and offers it again (`broker.session`), and the
    kept payload is handed over again then.
    """

    def __init__(
        self,
        session: Session,
        limits: ReassemblyLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        origin_of: Callable[[str], Origin] = Origin,
    ) -> None:
        self.session = session
        self.reassembler = Reassembler(limits or ReassemblyLimits(), clock, origin_of)
        self._origin_of = origin_of
        self.rejected = 0
        self._connections = session.connections
        # Complete payloads whose handler deferred them, by (topic, payload id).
        self._deferred: dict[tuple[str, bytes], bytes] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="transfer-expiry", daemon=True)
        self._sweeper.start()

    def subscribe(
        self, topic_filter: str, on_payload: PayloadHandler, timeout: float = 10.0
    ) -> None:
        """Deliver each complete, verified payload on ``topic_filter`` to ``on_payload``."""

        def on_frame(topic: str, raw: bytes) -> None:
            try:
                frame = ChunkFrame.from_bytes(raw)
                with self._lock:
                    self._resume_after_reconnect()
                    ident = (topic, frame.payload_id)
                    payload = self._deferred.pop(ident, None)
                    if payload is None:
                        payload = self.reassembler.accept(topic, frame)
            except (ChunkError, PayloadTooLargeError) as error:
                self.rejected += 1
                fields = {
                    "sender": self._origin_of(topic).sender, "topic": topic, "reason": str(error)
                }  # fmt: skip
                log.warning(Event.CHUNK_REJECTED, extra={"fields": fields})
                return
            if payload is None:
                return
            try:
                on_payload(topic, payload)
            except DeliveryDeferred:
                with self._lock:
                    self._deferred[ident] = payload  # handed over again with this frame
                raise

        self.session.subscribe(topic_filter, on_frame, timeout)

    def close(self) -> None:
        """Stop the expiry thread and drop partial transfers (the session stays open)."""
        self._stop.set()
        self._sweeper.join(5)
        with self._lock:
            self.reassembler.close()
            self._deferred.clear()

    def _resume_after_reconnect(self) -> None:
        """Restart the idle clocks once per reconnection, before any frame of the new
        connection is taken (call under the lock)."""
        connections = self.session.connections
        if connections > self._connections > 0:
            self.reassembler.resume()
        self._connections = connections

    def _sweep(self) -> None:
        interval = min(1.0, max(0.05, self.reassembler.limits.timeout_s / 4))
        while not self._stop.wait(interval):
            # In this order: a session counts a connection before it reports connected.
            connected = self.session.connected
            with self._lock:
                self._resume_after_reconnect()
                if connected:
                    self.reassembler.expire()
