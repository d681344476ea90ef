"""Per-sender admission of incoming MQTT messages, before anything parses them: pure, no
paho; the clock is injected.

The ACL confines a member to its own topics but not to a rate, and Mosquitto 2.0 has no
per-client message-rate limit. A member flooding its own share topic fills the broker's
queue towards the aggregator, and once that queue is full the broker drops whatever comes
next for the aggregator, honest shares included (issue 19, point 8). So the aggregator reads
as fast as the flood arrives: its session asks an `IntakeGate`, on the network thread, about
every message on a member's topic, and a sender over its budget has the message acknowledged
and dropped at once, without a copy, a parse or a log line. Each sender has its own token
bucket, so a flood costs only the flooder's own messages, never another member's.

The budget is generous for an honest member: `IntakeBudget.for_payloads` lets a sender send
two of the largest payloads the receiver takes (a share, then its retry after a restart) at
once, and that much again every minute. What was dropped is counted per sender and handed
out by `drain`, which the service calls once per interval to log and audit the refusal in
aggregate, one line per sender.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

REFILL_WINDOW_S = 60.0  # a whole burst's worth of messages refills over this long
SPARE_MESSAGES = 64  # on top of the payloads' frames: presence, audit reports, redeliveries


@dataclass(frozen=True)
class IntakeBudget:
    """One sender's token bucket: `burst` messages at once, `per_second` after that."""

    burst: int
    per_second: float

    def __post_init__(self) -> None:
        if self.burst < 1 or not self.per_second > 0:
            raise ValueError(
                f"an intake budget needs burst >= 1 and per_second > 0, got {self.burst} and "
                f"{self.per_second}"
            )

    @classmethod
    def for_payloads(cls, max_payload_bytes: int, chunk_bytes: int) -> IntakeBudget:
        """Room for two payloads of `max_payload_bytes` in frames of `chunk_bytes`, plus
        SPARE_MESSAGES, at once; the same again every REFILL_WINDOW_S."""
        frames = math.ceil(max_payload_bytes / max(1, chunk_bytes))
        burst = 2 * frames + SPARE_MESSAGES
        return cls(burst, burst / REFILL_WINDOW_S)


class IntakeGate:
    """Admits or drops each incoming message by its sender's budget; thread-safe.

    `sender_of(topic)` names the member that alone may write `topic` (the ACL makes the
    topic a proof of the sender), or None for topics that are not gated (those the
    aggregators write).
    """

    def __init__(
        self,
        budget: IntakeBudget,
        sender_of: Callable[[str], str | None],
        clock: Callable[[], float],
    ) -> None:
        self.budget = budget
        self._sender_of = sender_of
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[float, float]] = {}  # sender -> (tokens, at)
        self._dropped: dict[str, int] = {}
        self.dropped_total = 0

    def admit(self, topic: str) -> bool:
        """Whether to hand this message on; False: acknowledge it and drop it, counted."""
        sender = self._sender_of(topic)
        if sender is None:
            return True
        now = self._clock()
        with self._lock:
            tokens, at = self._tokens.get(sender, (float(self.budget.burst), now))
            tokens = min(float(self.budget.burst), tokens + (now - at) * self.budget.per_second)
            if tokens >= 1.0:
                self._tokens[sender] = (tokens - 1.0, now)
                return True
            self._tokens[sender] = (tokens, now)
            self._dropped[sender] = self._dropped.get(sender, 0) + 1
            self.dropped_total += 1
            return False

    def drain(self) -> dict[str, int]:
        """Messages dropped per sender since the last call (senders with none are absent)."""
        with self._lock:
            dropped, self._dropped = self._dropped, {}
        return dropped
