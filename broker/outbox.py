"""A service's outbox: payloads on their way to the broker, sent in order by one thread.

A daemon posts what a protocol step returned (`Outbox.post`) and goes on at once, so no
lock of the daemon is ever held while the broker is away. The sender thread publishes one
payload at a time, in the order posted, as chunk frames (`broker.transfer.send_payload`).

Nothing is given up while the process lives. When the broker goes away, paho keeps every
frame already published queued in the session and sends it again, under the same packet id,
once the connection is back (the session is persistent); so the sender never starts a
payload over, it waits for the frames it has handed over, for as long as it takes. A payload
that the broker has not acknowledged after `publish_timeout_s` (SessionConfig) is logged
once as stalled, and once more when it went through. Receivers drop a payload they already
had by its id (broker.chunking), so a frame sent twice across a reconnect is delivered once.

A payload the broker refuses (the ACL: "not authorized") can never be delivered: it is logged
with the reason and dropped, and the next one goes out. `close` sends what is queued while
the broker is there, up to a limit, and says how many payloads it had to leave.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from broker import topics
from broker.errors import BrokerError, NotConnectedError, PublishTimeoutError
from broker.session import PublishHandle, Session
from broker.transfer import send_payload
from tessera.observability.events import Event

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often a wait for an acknowledgement checks whether the outbox is closing


@dataclass(frozen=True)
class Posted:
    """One payload waiting to be published."""

    topic: str
    payload: bytes
    retain: bool


class _Closing(Exception):
    """The outbox closed while its sender waited for the broker."""


def topic_kind(topic: str) -> str:
    """The topic's kind for a log line (ids stay out of it)."""
    try:
        return topics.parse(topic).kind.name
    except ValueError:
        return "UNKNOWN"


class Outbox:
    """Payloads posted for the broker, sent in order by one thread (module docstring)."""

    def __init__(self, session: Session, on_sent: Callable[[int], None] | None = None) -> None:
        self.session = session
        self._on_sent = on_sent or (lambda _count: None)
        self._queue: deque[Posted] = deque()  # the head is being sent until it is done
        self._changed = threading.Condition()
        self._closing = False
        self.refused = 0
        self._thread = threading.Thread(
            target=self._send_loop, name=f"outbox-{session.config.client_id}", daemon=True
        )

    def start(self) -> Outbox:
        """Start the sender thread (before or after the session connects)."""
        self._thread.start()
        return self

    def post(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Queue `payload` for `topic`; return at once (the sender publishes it in turn)."""
        with self._changed:
            if self._closing:
                raise NotConnectedError(
                    f"the outbox of {self.session.config.client_id} is closed; nothing more "
                    "can be sent by this link"
                )
            self._queue.append(Posted(topic, payload, retain))
            self._changed.notify_all()

    @property
    def pending(self) -> int:
        """Payloads posted and not yet acknowledged by the broker (or refused)."""
        with self._changed:
            return len(self._queue)

    def flush(self, timeout: float) -> None:
        """Wait until the broker acknowledged (or refused) every payload posted so far;
        PublishTimeoutError after `timeout` s (they stay queued)."""
        with self._changed:
            if not self._changed.wait_for(lambda: not self._queue, timeout):
                raise PublishTimeoutError(
                    f"{len(self._queue)} payloads of {self.session.config.client_id} not "
                    f"acknowledged within {timeout} s; they stay queued until the broker is back"
                )

    def close(self, drain_s: float) -> int:
        """Send what is queued for up to `drain_s` s, stop the sender; the payloads left."""
        try:
            self.flush(drain_s)
        except PublishTimeoutError:
            pass
        with self._changed:
            self._closing = True
            left = len(self._queue)
            self._changed.notify_all()
        if self._thread.is_alive():
            self._thread.join(POLL_S * 10)
        return left

    # --- the sender thread -----------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._queue or self._closing)
                if self._closing:
                    return
                posted = self._queue[0]
            try:
                self._send(posted)
            except _Closing:
                return
            with self._changed:
                self._queue.popleft()
                self._changed.notify_all()

    def _send(self, posted: Posted) -> None:
        waiting = _PatientWait(self, topic_kind(posted.topic))
        try:
            send_payload(
                self.session, posted.topic, posted.payload, retain=posted.retain, wait=waiting
            )
        except _Closing:
            raise
        except Exception as error:  # the sender must outlive one bad payload
            # A BrokerError is the broker's refusal (or a payload it can never take); anything
            # else is a bug, logged with its traceback's type.
            self.refused += 1
            fields = {"kind": waiting.kind, "error": type(error).__name__, "reason": str(error)}
            log.error(
                Event.PUBLISH_REFUSED,
                extra={"fields": fields},
                exc_info=not isinstance(error, BrokerError),
            )
            return
        waiting.done()
        self._on_sent(len(posted.payload))

    @property
    def closing(self) -> bool:
        """Whether `close` has begun (the sender stops waiting then)."""
        with self._changed:
            return self._closing


class _PatientWait:
    """Waits for each frame's acknowledgement of one payload for as long as the broker is
    away; logs the payload as stalled once after `publish_timeout_s`, and its resumption."""

    def __init__(self, outbox: Outbox, kind: str) -> None:
        self.outbox, self.kind = outbox, kind
        self.timeout_s = outbox.session.config.publish_timeout_s
        self.started = time.monotonic()
        self.stalled = False

    def __call__(self, handle: PublishHandle) -> None:
        since = time.monotonic()
        while not handle.answered(POLL_S):
            if self.outbox.closing:
                raise _Closing
            waited = time.monotonic() - since
            if not self.stalled and waited >= self.timeout_s:
                self.stalled = True
                fields = {
                    "kind": self.kind,
                    "waited_s": round(waited, 1),
                    "queued": self.outbox.pending,
                }
                log.warning(Event.PUBLISH_STALLED, extra={"fields": fields})
        handle.wait(0)  # raises if the broker refused it

    def done(self) -> None:
        """The payload went through: say so if it had been reported stalled."""
        if self.stalled:
            fields = {"kind": self.kind, "waited_s": round(time.monotonic() - self.started, 1)}
            log.info(Event.PUBLISH_RESUMED, extra={"fields": fields})
