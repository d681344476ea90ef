"""A real Mosquitto process for integration tests (broker.local_mosquitto), and the small
test federation the broker tests share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from broker.local_mosquitto import MosquittoProcess, free_port
from broker.session import Session

__all__ = ["TEST_FEDERATION", "MosquittoProcess", "SessionFactory", "free_port"]

# connect(member_id, broker, start=True, **config overrides) -> Session (see tests/broker).
SessionFactory = Callable[..., Session]

# A small federation for integration tests: two sites, two aggregators, agg-1 leads.
TEST_FEDERATION: dict[str, Any] = {
    "federation": {"id": "fed-test", "leader": "agg-1"},
    "broker": {"max_packet_bytes": 2 << 20},
    "sites": [{"id": "site-a", "name": "Hospital A"}, {"id": "site-b", "name": "Hospital B"}],
    "aggregators": [{"id": "agg-1", "name": "Aggregator One"}, {"id": "agg-2", "name": "Two"}],
}
