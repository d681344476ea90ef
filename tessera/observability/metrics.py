"""The metric families a Tessera service exports, with label values from fixed sets only.

Free text never becomes a label: reason codes come from the service's own fixed tuples and
study ids must pass the id rule, so no patient data can reach `/metrics`.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from tessera.wire.ids import check_id

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
Direction = Literal["sent", "received"]
InferenceOutcome = Literal["ok", "rejected", "error"]


@dataclass
class InferenceTimer:
    """The outcome of one timed inference: "ok", "rejected" (bad input) or "error"."""

    outcome: InferenceOutcome = "error"


def _choice(kind: str, value: str, allowed: Collection[str]) -> str:
    if value not in allowed:
        raise ValueError(
            f"{kind} {value!r} is not one of {sorted(allowed)}; add it to the "
            "service's fixed set instead of passing free text"
        )
    return value


class ServiceMetrics:
    """The metric families a node or aggregator exports, on the given registry.

    `refusal_reasons` and `quarantine_reasons` are the service's fixed reason codes (e.g.
    `node.round.policy.REASONS`, `node.intake.screen.REASONS`); every code starts at zero, and
    any other value raises ValueError, so free text (and with it PHI) cannot become a label.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        refusal_reasons: Collection[str] = (),
        quarantine_reasons: Collection[str] = (),
    ) -> None:
        self._refusal_reasons = frozenset(refusal_reasons)
        self._quarantine_reasons = frozenset(quarantine_reasons)
        self.rounds_joined = Counter(
            "tessera_rounds_joined", "Rounds this service took part in.", registry=registry
        )
        self.rounds_refused = Counter(
            "tessera_rounds_refused",
            "Rounds refused, by reason code.",
            ["reason"],
            registry=registry,
        )
        self.samples = Counter(
            "tessera_samples_trained",
            "Training samples processed, summed over rounds.",
            registry=registry,
        )
        self.epsilon_spent = Gauge(
            "tessera_epsilon_spent",
            "Differential-privacy epsilon spent, per study.",
            ["study"],
            registry=registry,
        )
        self.model_version = Gauge(
            "tessera_model_version",
            "Version of the verified global model in use (0: none).",
            registry=registry,
        )
        self.model = Info("tessera_model", "The verified global model in use.", registry=registry)
        self.inference_latency = Histogram(
            "tessera_inference_latency_seconds",
            "Inference request latency.",
            ["outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.quarantined = Counter(
            "tessera_quarantined",
            "Input files quarantined, by reason code.",
            ["reason"],
            registry=registry,
        )
        self.wire_bytes = Counter(
            "tessera_wire_bytes",
            "Bytes of MQTT payload, by direction.",
            ["direction"],
            registry=registry,
        )
        self.broker_connected = Gauge(
            "tessera_broker_connected", "1 while the MQTT session is connected.", registry=registry
        )
        self.disk_full = Gauge(
            "tessera_disk_full",
            "1 while a write found the state folder's disk full (the service waits, not ready).",
            registry=registry,
        )
        for reason in self._refusal_reasons:
            self.rounds_refused.labels(reason=reason)
        for reason in self._quarantine_reasons:
            self.quarantined.labels(reason=reason)
        for direction in ("sent", "received"):
            self.wire_bytes.labels(direction=direction)

    def round_joined(self) -> None:
        """Count one round joined."""
        self.rounds_joined.inc()

    def round_refused(self, reason: str) -> None:
        """Count one refusal; `reason` must be one of the service's refusal codes."""
        self.rounds_refused.labels(
            reason=_choice("refusal reason", reason, self._refusal_reasons)
        ).inc()

    def add_samples(self, count: int) -> None:
        """Add `count` trained samples."""
        if count < 0:
            raise ValueError(f"sample count must be >= 0, got {count}")
        self.samples.inc(count)

    def set_epsilon_spent(self, study_id: str, epsilon: float) -> None:
        """Record the epsilon spent so far on `study_id` (an id, never free text)."""
        check_id("study id", study_id)
        self.epsilon_spent.labels(study=study_id).set(epsilon)

    def set_model(self, version: int, model_hash: bytes) -> None:
        """Record the verified model now served: its version and (a prefix of) its hash."""
        self.model_version.set(version)
        self.model.info({"version": str(version), "model_hash": model_hash.hex()[:16]})

    @contextmanager
    def time_inference(self) -> Iterator[InferenceTimer]:
        """Time a block as one inference; set `.outcome` on the yielded timer (default error)."""
        timer = InferenceTimer()
        start = time.perf_counter()
        try:
            yield timer
        finally:
            outcome = _choice("outcome", timer.outcome, ("ok", "rejected", "error"))
            self.inference_latency.labels(outcome=outcome).observe(time.perf_counter() - start)

    def quarantine(self, reason: str) -> None:
        """Count one quarantined file; `reason` must be one of the quarantine codes."""
        self.quarantined.labels(
            reason=_choice("quarantine reason", reason, self._quarantine_reasons)
        ).inc()

    def add_wire_bytes(self, direction: Direction, count: int) -> None:
        """Add `count` payload bytes sent or received."""
        _choice("direction", direction, ("sent", "received"))
        self.wire_bytes.labels(direction=direction).inc(count)

    def set_broker_connected(self, connected: bool) -> None:
        """Set the broker-connection gauge."""
        self.broker_connected.set(1 if connected else 0)

    def set_disk_full(self, full: bool) -> None:
        """Set the disk-full gauge."""
        self.disk_full.set(1 if full else 0)
