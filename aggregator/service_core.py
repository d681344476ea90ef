"""The plumbing under AggregatorService: keys, store, registry, the round in memory, and the
small steps every protocol step uses (sign and send, move the state machine and persist it,
load the base model, begin and abort a round, check a message belongs to the round)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np

from aggregator.accumulator import ShareAccumulator
from aggregator.admission import aggregator_index
from aggregator.config import AggregatorConfig
from aggregator.errors import AggregatorConfigError, MessageRejected
from aggregator.leader import round_record
from aggregator.privacy_gate import AuditSetup
from aggregator.registry import GENESIS_PARENT, Registry
from aggregator.rounds import Abort, Event, RoundState, StartCollecting, transition
from aggregator.service_state import Outgoing, RosterKeys, RoundMemory, ServiceKeys
from aggregator.store import Store
from broker import topics
from tessera.wire.envelopes import Message, require_fields, seal_envelope
from tessera.wire.messages import RoundAbort, RoundOpen

log = logging.getLogger("tessera.aggregator.service")


class ServiceCore:
    """State and helpers of one aggregator; the protocol lives in aggregator.service."""

    def __init__(
        self,
        config: AggregatorConfig,
        keys: ServiceKeys,
        roster: RosterKeys,
        store: Store,
        registry: Registry,
        clock: Callable[[], float],
        *,
        genesis: Mapping[str, np.ndarray],
        export_onnx: Callable[[Mapping[str, np.ndarray], int], bytes],
        audit: AuditSetup | None = None,
    ) -> None:
        self.config, self.keys, self.roster = config, keys, roster
        self.store, self.registry, self.clock = store, registry, clock
        self.genesis, self.export_onnx = genesis, export_onnx
        # Set only when the study requires a privacy audit before every release.
        self.audit = audit if audit is not None and audit.required(config.study_id) else None
        self.current: RoundMemory | None = None
        shared = set(roster.aggregator_signing) & set(roster.node_signing)
        if shared:
            raise AggregatorConfigError(
                f"ids {sorted(shared)} name both an aggregator and a node; every member of "
                "the federation needs its own id (fix the manifest)"
            )
        self._keys_all = {**roster.aggregator_signing, **roster.node_signing}

    # --- helpers ---------------------------------------------------------------------------

    @property
    def me(self) -> str:
        """This aggregator's id."""
        return self.config.aggregator_id

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    @staticmethod
    def _ms(seconds: float) -> int:
        return int(seconds * 1000)

    def _send(self, topic: str, message: Message, retain: bool = False) -> Outgoing:
        return Outgoing(topic, seal_envelope(message, self.me, self.keys.signing), retain)

    def _move(self, event: Event) -> None:
        assert self.current is not None
        self.current.state = transition(self.current.state, event)
        self.store.save_state(self.config.study_id, self.current.state)

    def _base(self) -> tuple[Mapping[str, np.ndarray], int, bytes]:
        """The base model (params, its version, the new model's parent hash)."""
        latest = self.registry.latest(self.config.study_id)
        if latest is None:
            return self.genesis, 0, GENESIS_PARENT
        record = latest.record
        return (
            self.registry.weights(record.study_id, record.version),
            record.version,
            record.model_hash,
        )

    def _begin(self, announcement: RoundOpen) -> None:
        params, version, parent = self._base()
        self.store.create_round(round_record(announcement))
        accumulator = ShareAccumulator(
            federation_id=announcement.federation_id,
            study_id=announcement.study_id,
            round_number=announcement.round,
            aggregator_index=aggregator_index(announcement, self.me),
            params=announcement.ring,
            length=announcement.vector_length,
            ledger=self.store,
        )
        state = RoundState(announcement.round)
        stall_ms = announcement.deadline_ms + self._ms(self.config.round.agreement_timeout_s)
        self.current = RoundMemory(
            announcement, state, accumulator, params, version + 1, parent, stall_ms
        )
        self._move(StartCollecting())

    def _abort(self, reason: str) -> list[Outgoing]:
        assert self.current is not None
        self._move(Abort(reason))
        a = self.current.announcement
        log.warning("round-abort", extra={"fields": {"round": a.round, "reason": reason}})
        abort = RoundAbort(a.federation_id, a.study_id, a.round, self.me, reason)
        # Retained, so that it replaces the retained RoundOpen: a late node must not train.
        return [self._send(topics.round_topic(a.federation_id, a.study_id), abort, retain=True)]

    def _context(self, message: Message, **more: object) -> RoundMemory:
        """The current round, after checking the message belongs to it."""
        if self.current is None:
            raise MessageRejected("no round is open at this aggregator")
        a = self.current.announcement
        require_fields(
            message, federation_id=a.federation_id, study_id=a.study_id, round=a.round, **more
        )
        return self.current
