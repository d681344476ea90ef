"""Acknowledgements: the broker's answer to one QoS 1 publish, as something to wait on."""

from __future__ import annotations

import threading

from broker.errors import NotAuthorizedError, PublishError, PublishTimeoutError

NOT_AUTHORIZED = 135  # MQTT v5 reason code "Not authorized" (0x87), on PUBACK and SUBACK


class PublishHandle:
    """The broker's answer to one QoS 1 publish; ``wait`` raises unless it was accepted."""

    def __init__(self, topic: str, mid: int) -> None:
        self.topic = topic
        self.mid = mid
        self._done = threading.Event()
        self._reason: int | None = None

    def _complete(self, reason: int) -> None:
        self._reason = reason
        self._done.set()

    def answered(self, timeout: float) -> bool:
        """Whether the broker answered within `timeout` s (`wait` says whether it accepted)."""
        return self._done.wait(timeout)

    def wait(self, timeout: float) -> None:
        """Block until PUBACK; raise NotAuthorizedError (135), PublishError, or
        PublishTimeoutError on timeout (the publish stays queued in the session)."""
        if not self._done.wait(timeout):
            raise PublishTimeoutError(
                f"no PUBACK for {self.topic} within {timeout} s; the session keeps retrying "
                "(it is queued), wait longer or check the broker"
            )
        assert self._reason is not None
        if self._reason == NOT_AUTHORIZED:
            raise NotAuthorizedError(f"broker refused publish to {self.topic}: not authorized")
        if self._reason >= 0x80:
            raise PublishError(f"broker refused publish to {self.topic}: reason {self._reason}")
