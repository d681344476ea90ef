"""The MQTT session: a thin wrapper over paho-mqtt 2.x that services use.

What it guarantees:
- MQTT v5 over TLS with a client certificate (the broker maps it to the username), server
  certificate and host name checked against the federation CA; plaintext only when the
  config says ``insecure_plaintext`` (the development broker).
- QoS 1 everywhere, a persistent session (clean start off, session expiry), so messages
  published while a client is away are queued for it by the broker.
- Reconnect with exponential backoff plus jitter; all socket I/O on paho's network thread.
- Presence: "online" retained on connect, "offline" as the last will and on close.
- Bounded: at most ``max_inflight`` unacknowledged publishes, ``max_queued`` queued ones,
  and ``receive_maximum`` unacknowledged deliveries. Messages are acknowledged only after
  their handler has run, so the broker's flow control bounds the receive queue, and a
  crash before handling means redelivery, not loss.
- Size limits before any work: the broker is told our Maximum Packet Size and drops larger
  messages; anything larger that still arrives is dropped before a handler sees it.
- A message its handler cannot take *now* (DeliveryDeferred: a full disk, a missing spool
  folder) is not acknowledged: the broker keeps it (it has already acknowledged it to the
  sender, which will not send it again), the session offers it to the handler again every
  ``deferred_retry_s``, and after a reconnect the broker redelivers it. Other messages keep
  flowing while fewer than the broker's in-flight window are held back.
- An optional intake gate (`broker.intake.IntakeGate`), asked on the network thread: a
  message from a sender over its budget is acknowledged and dropped there, so a flooding
  member is read off the socket at full speed instead of backing up the broker's queue.
- Errors are exceptions (BrokerError subclasses), never return codes.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
import socks
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from broker.acks import NOT_AUTHORIZED, PublishHandle
from broker.errors import (
    BrokerError,
    DeliveryDeferred,
    NotAuthorizedError,
    NotConnectedError,
    PayloadTooLargeError,
    PublishError,
)
from broker.intake import IntakeGate
from broker.session_config import HttpProxy, SessionConfig, TlsFiles, tls_context
from broker.topics import validate_filter, validate_publish_topic
from tessera.observability.events import Event

__all__ = [
    "ConnectionChange",
    "HttpProxy",
    "PublishHandle",
    "Session",
    "SessionConfig",
    "TlsFiles",
]

Handler = Callable[[str, bytes], None]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionChange:
    """The session connected (`session_present`: the broker kept our session) or lost the
    broker (`reason`)."""

    connected: bool
    session_present: bool = False
    reason: str = ""


@dataclass
class _Deferred:
    """A delivered message some handlers deferred: unacknowledged, offered again at `due`."""

    generation: int
    message: mqtt.MQTTMessage
    handlers: list[Handler]
    due: float
    tries: int


class Session:
    """One client connection. Use as a context manager, or ``start()`` and ``close()``."""

    def __init__(self, config: SessionConfig, intake: IntakeGate | None = None) -> None:
        self.config = config
        self._intake = intake
        self._v5 = config.protocol == "mqttv5"
        self._client = self._build_client(config)
        self._lock = threading.Lock()
        self._pending: dict[int, PublishHandle] = {}
        self._early: dict[int, int] = {}
        self._internal_mids: set[int] = set()
        self._early_subacks: dict[int, list[int]] = {}
        self._subscribed: dict[int, tuple[threading.Event, list[int]]] = {}
        self._handlers: dict[str, Handler] = {}
        self._inbox: queue.Queue[tuple[int, mqtt.MQTTMessage] | None] = queue.Queue(
            maxsize=2 * config.receive_maximum
        )
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._generation = 0
        self._attempt = 0
        self._last_error = "not attempted yet"
        self._rng = random.Random()  # jitter only; nothing secret comes from it
        self._threads: list[threading.Thread] = []
        self._deferred: list[_Deferred] = []  # touched by the dispatch thread only
        self._retained = False  # the message whose handlers run now was a retained replay
        self.dropped_oversized = 0
        self.handler_failures = 0
        # Called on paho's network thread at each connect and each loss of the connection
        # (not for every failed reconnection attempt); without one, the session logs them.
        self.on_connection: Callable[[ConnectionChange], None] | None = None
        self.deliveries_deferred = 0

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> Session:
        """Start paho's network thread and the dispatch thread; connecting is in the background.

        All socket I/O stays on paho's network thread (publish only queues and wakes it), so
        a TLS connection is never read and written from two threads at once.
        """
        if self._threads:
            raise BrokerError("session already started; create a new Session to reconnect")
        self._client.connect_async(
            self.config.host,
            self.config.port,
            keepalive=self.config.keepalive_s,
            clean_start=False if self._v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=self._connect_properties() if self._v5 else None,
        )
        dispatch = threading.Thread(
            target=self._dispatch_loop, name=f"mqtt-dispatch-{self.config.client_id}", daemon=True
        )
        dispatch.start()
        self._threads.append(dispatch)
        if self._client.loop_start() != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerError(
                f"could not start the MQTT network thread for {self.config.client_id}"
            )
        return self

    def wait_connected(self, timeout: float) -> None:
        """Block until connected; raise NotConnectedError with the last failure otherwise."""
        if not self._connected.wait(timeout):
            raise NotConnectedError(
                f"{self.config.client_id} not connected to {self.config.host}:{self.config.port} "
                f"after {timeout} s; last error: {self._last_error}"
            )

    @property
    def connected(self) -> bool:
        """Whether the session is connected right now."""
        return self._connected.is_set()

    @property
    def connections(self) -> int:
        """How many times the session has connected (0 before the first)."""
        return self._generation

    @property
    def delivering_retained(self) -> bool:
        """Inside a handler (on the dispatch thread): whether the message it handles is a
        retained one the broker replayed because the subscription is new. Such a message
        may be old: its age, not the sender's clock, is what a timestamp in it shows."""
        return self._retained

    def close(self, timeout: float = 5.0) -> None:
        """Publish "offline" presence, disconnect cleanly (no last will), stop the threads."""
        if self._stop.is_set():
            return
        if self._connected.is_set() and self.config.presence_topic:
            try:
                self.publish(self.config.presence_topic, b"offline", retain=True).wait(timeout)
            except BrokerError as error:
                log.warning("could not publish offline presence: %s", error)
        self._stop.set()
        self._client.disconnect()
        self._client.loop_stop()
        self._inbox.put(None)
        for thread in self._threads:
            thread.join(timeout)
        self._connected.clear()

    def __enter__(self) -> Session:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- publish / subscribe ------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> PublishHandle:
        """Queue one QoS 1 publish and return its handle (``handle.wait(t)`` for the PUBACK).

        Works while disconnected: paho keeps the message and sends it on reconnect.
        """
        validate_publish_topic(topic)
        if self._stop.is_set():
            raise NotConnectedError(f"session {self.config.client_id} is closed; start a new one")
        limit = self.config.max_packet_bytes - len(topic.encode()) - 64
        if len(payload) > limit:
            raise PayloadTooLargeError(
                f"payload of {len(payload)} bytes for {topic} is over the {limit}-byte limit; "
                "send it through broker.transfer (chunked) instead"
            )
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            raise PublishError(
                f"outgoing queue full ({self.config.max_queued} messages); wait for PUBACKs"
            )
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise PublishError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        handle = PublishHandle(topic, info.mid)
        with self._lock:
            early = self._early.pop(info.mid, None)
            if early is None:
                self._pending[info.mid] = handle
        if early is not None:
            handle._complete(early)
        return handle

    def subscribe(self, topic_filter: str, handler: Handler, timeout: float = 10.0) -> None:
        """Subscribe at QoS 1 and route matching messages to ``handler(topic, payload)``.

        Called before ``start()``, it only registers the handler, and the subscription goes
        out on connect; with a persistent session that is what makes messages queued while
        away reach a handler. Called while connected, it waits for the SUBACK and raises
        NotAuthorizedError when the broker refuses the filter. The handler runs on the
        session's dispatch thread; the message is acknowledged after it returns.
        """
        validate_filter(topic_filter)
        with self._lock:
            self._handlers[topic_filter] = handler
        if not self._threads:
            return
        if not self._connected.is_set():
            with self._lock:
                self._handlers.pop(topic_filter, None)
            raise NotConnectedError(
                f"subscribe to {topic_filter} while disconnected; subscribe before start() "
                "or after wait_connected()"
            )
        try:
            reasons = self._subscribe_and_wait([topic_filter], timeout)
        except BrokerError:
            with self._lock:
                self._handlers.pop(topic_filter, None)
            raise
        if reasons[0] >= 0x80:
            with self._lock:
                self._handlers.pop(topic_filter, None)
            if reasons[0] == NOT_AUTHORIZED:
                raise NotAuthorizedError(f"broker refused subscription to {topic_filter}")
            raise BrokerError(f"broker refused subscription to {topic_filter}: {reasons[0]}")

    def _subscribe_and_wait(self, filters: list[str], timeout: float) -> list[int]:
        done = threading.Event()
        reasons: list[int] = []
        rc, mid = self._client.subscribe(self._subscription_list(filters))
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise NotConnectedError(f"subscribe to {filters} failed: {mqtt.error_string(rc)}")
        with self._lock:
            early = self._early_subacks.pop(mid, None)
            if early is None:
                self._subscribed[mid] = (done, reasons)
        if early is not None:
            return early
        if not done.wait(timeout):
            raise BrokerError(f"no SUBACK for {filters} within {timeout} s")
        return reasons

    # -- paho plumbing ------------------------------------------------------------------

    def _build_client(self, config: SessionConfig) -> mqtt.Client:
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=config.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
            # MQTT 3.1.1 (development broker only) has no clean_start; its session persists.
            clean_session=None if self._v5 else False,
            transport=config.transport,
            manual_ack=True,
        )
        client.max_inflight_messages_set(config.max_inflight)
        client.max_queued_messages_set(config.max_queued)
        client.connect_timeout = config.connect_timeout_s
        if config.transport == "websockets":
            client.ws_set_options(path=config.websocket_path)
        if config.proxy is not None:
            client.proxy_set(
                proxy_type=socks.HTTP, proxy_addr=config.proxy.host, proxy_port=config.proxy.port
            )
        if config.tls is not None:
            client.tls_set_context(tls_context(config.tls))
        if config.presence_topic:
            client.will_set(config.presence_topic, b"offline", qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.reconnect_delay_set(config.reconnect_min_s, config.reconnect_max_s)  # type: ignore[arg-type]
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _subscription_list(self, filters: list[str]) -> list[tuple[str, Any]]:
        if not self._v5:
            return [(f, 1) for f in filters]
        options = SubscribeOptions(qos=1, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB)
        return [(f, options) for f in filters]

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.config.session_expiry_s
        props.ReceiveMaximum = self.config.receive_maximum
        props.MaximumPacketSize = self.config.max_packet_bytes
        return props

    def _jitter(self) -> None:
        # paho backs off exponentially (reconnect_min_s doubling up to reconnect_max_s); this
        # adds a random share of the current step on top, on paho's thread before it
        # retries, so a fleet of nodes does not reconnect in lockstep after a broker restart.
        step = min(self.config.reconnect_max_s, self.config.reconnect_min_s * 2**self._attempt)
        self._attempt = min(self._attempt + 1, 32)
        self._stop.wait(self._rng.uniform(0, step))

    def _on_connect_fail(self, _c: mqtt.Client, _u: Any) -> None:
        self._last_error = (
            "connection attempt failed (TCP, proxy or TLS handshake: check the broker address, "
            "the CA and the client certificate)"
        )
        if not self._stop.is_set():
            self._jitter()

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self._last_error = f"broker refused connection: {reason}"
            log.warning("%s: %s", self.config.client_id, self._last_error)
            return
        self._attempt = 0
        with self._lock:
            self._generation += 1
            filters = list(self._handlers)
        if filters:
            # Subscribe on every connect: covers handlers registered before start() and a
            # broker that lost our session. Repeating a subscription is harmless, and
            # retain handling 1 stops retained messages from being resent for it.
            _rc, mid = client.subscribe(self._subscription_list(filters))
            if mid is not None:
                self._internal_mids.add(mid)
        if self.config.presence_topic:
            info = client.publish(self.config.presence_topic, b"online", qos=1, retain=True)
            # Its PUBACK arrives later on this same thread, so registering now is race-free.
            self._internal_mids.add(info.mid)
        self._connected.set()
        if not self._tell(ConnectionChange(True, session_present=flags.session_present)):
            log.info(
                "%s connected (session present: %s)", self.config.client_id, flags.session_present
            )

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._connected.clear()
        if not self._stop.is_set():
            self._last_error = f"disconnected: {reason}"
            if not self._tell(ConnectionChange(False, reason=str(reason))):
                log.warning("%s %s", self.config.client_id, self._last_error)
            self._jitter()

    def _tell(self, change: ConnectionChange) -> bool:
        """Pass `change` to the listener; False when there is none. A listener that raises
        is logged: an exception must not reach paho's network thread."""
        listener = self.on_connection
        if listener is None:
            return False
        try:
            listener(change)
        except Exception:  # see the docstring
            log.exception("%s: connection listener raised", self.config.client_id)
        return True

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        value = int(reason.value) if hasattr(reason, "value") else int(reason)
        with self._lock:
            if mid in self._internal_mids:
                self._internal_mids.discard(mid)
                return
            handle = self._pending.pop(mid, None)
            if handle is None:
                self._early[mid] = value
        if handle is not None:
            handle._complete(value)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, reasons: Any, _p: Any) -> None:
        values = [int(r.value) for r in reasons]
        with self._lock:
            waiter = self._subscribed.pop(mid, None)
            internal = mid in self._internal_mids
            self._internal_mids.discard(mid)
            if waiter is None and not internal:
                self._early_subacks[mid] = values
        if internal and any(v >= 0x80 for v in values):
            log.warning("%s: broker refused a subscription (%s)", self.config.client_id, values)
        if waiter is not None:
            waiter[1].extend(values)
            waiter[0].set()

    def _on_message(self, client: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        if len(message.payload) > self.config.max_packet_bytes:
            # The broker should never send this (we told it our Maximum Packet Size);
            # if it does, drop it before any handler or parser touches it.
            self.dropped_oversized += 1
            log.warning("dropped oversized message (%d bytes)", len(message.payload))
            client.ack(message.mid, message.qos)
            return
        if self._intake is not None and not self._intake.admit(message.topic):
            client.ack(message.mid, message.qos)  # counted by the gate, logged in aggregate
            return
        self._inbox.put((self._generation, message))

    def _dispatch_loop(self) -> None:
        while True:
            wait = None
            if self._deferred:
                wait = max(0.0, min(d.due for d in self._deferred) - time.monotonic())
            try:
                item = self._inbox.get(timeout=wait)
            except queue.Empty:
                self._retry_deferred()
                continue
            if item is None:
                return
            generation, message = item
            with self._lock:
                handlers = [
                    h for f, h in self._handlers.items() if mqtt.topic_matches_sub(f, message.topic)
                ]
            if not handlers:
                log.warning(
                    "no handler for a message on %s; acknowledged and dropped", message.topic
                )
            self._deliver(_Deferred(generation, message, handlers, 0.0, 0))
            self._retry_deferred()

    def _deliver(self, delivery: _Deferred) -> None:
        """Run the delivery's handlers; acknowledge, or keep it for another try."""
        message = delivery.message
        payload = message.payload
        payload = payload if isinstance(payload, bytes) else bytes(payload)
        deferred: list[Handler] = []
        reason = ""
        self._retained = bool(message.retain)
        for handler in delivery.handlers:
            try:
                handler(message.topic, payload)
            except DeliveryDeferred as exc:
                deferred.append(handler)
                reason = str(exc)
            except Exception:  # a handler bug must not kill delivery to others
                self.handler_failures += 1
                log.exception("handler for %s raised", message.topic)
        self._retained = False
        if deferred:
            if delivery.tries == 0:
                self.deliveries_deferred += 1
                log.error(
                    Event.DELIVERY_DEFERRED,
                    extra={"fields": {"topic": message.topic, "reason": reason}},
                )
            due = time.monotonic() + self.config.deferred_retry_s
            self._deferred.append(
                _Deferred(delivery.generation, message, deferred, due, delivery.tries + 1)
            )
            return  # not acknowledged: the broker keeps it
        if delivery.tries:
            log.warning(
                Event.DELIVERY_RESUMED,
                extra={"fields": {"topic": message.topic, "tries": delivery.tries + 1}},
            )
        # After a reconnect the broker redelivers unacknowledged messages under new
        # packet ids, so an acknowledgement for the old connection is skipped.
        if delivery.generation == self._generation and not self._stop.is_set():
            self._client.ack(message.mid, message.qos)

    def _retry_deferred(self) -> None:
        """Offer every due deferred message again; forget those of an older connection,
        which the broker redelivers (unacknowledged) on reconnect."""
        now = time.monotonic()
        due = [d for d in self._deferred if d.due <= now or d.generation != self._generation]
        if not due:
            return
        self._deferred = [d for d in self._deferred if d not in due]
        for delivery in due:
            if delivery.generation == self._generation and not self._stop.is_set():
                self._deliver(delivery)
