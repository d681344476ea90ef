"""The round an aggregator holds in memory, as one object: what the leader announced, where
the state machine stands, what has arrived so far, and the store every move is persisted to.

`RoundContext.open` records a new round; `move` runs the pure `rounds.transition`, persists
the state it returns and, once the round is over (released or aborted), deletes its shares,
seeds and files alike: nothing secret outlives its round. The steps that touch only the
round are here too, each over the pure helpers: `admit_share` (aggregator.admission),
`close_collection`, `partial_sums_for` (aggregator.agreement, aggregator.partials), and
`keep_received` and `keep_partial`, which keep what the other aggregators send whenever it
arrives (first copy wins). Which step comes when, and what is sent, is the protocol's
business (aggregator.service).

Also here: what a round starts from, `base_model` (the newest release, or the genesis
model) and `latest_server_state` (the server optimiser's state after that release).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from aggregator.accumulator import ShareAccumulator
from aggregator.admission import (
    aggregator_index,
    check_share_envelope,
    collection_close_reason,
    open_share,
)
from aggregator.agreement import check_partial_sum_request, statement_mismatches
from aggregator.config import AggregatorConfig
from aggregator.errors import DuplicateShare, MessageRejected
from aggregator.leader import round_record
from aggregator.partials import seal_partial_sums
from aggregator.registry import GENESIS_PARENT, Registry, weights_bytes
from aggregator.release_build import BuiltRelease, build_signed_release, carry_epsilon
from aggregator.rounds import (
    CollectionClosed,
    Event,
    ParticipantsAgreed,
    RoundState,
    ShareAccepted,
    Stage,
    transition,
)
from aggregator.store import Store
from aggregator.strategies import ServerState, server_state_from_bytes
from tessera.governance.privacy_report import PrivacyAuditReport
from tessera.observability.events import Event as LogEvent
from tessera.wire.envelopes import Message, require_fields
from tessera.wire.messages import (
    ModelRelease,
    PartialSum,
    ParticipantSet,
    RoundOpen,
    ShareEnvelope,
)
from tessera.wire.statement import NodeStatement, open_statement

# One logger for all of the service's events, wherever the step lives.
log = logging.getLogger("tessera.aggregator.service")


def ms(seconds: float) -> int:
    """Seconds as the whole milliseconds that deadlines are counted in."""
    return int(seconds * 1000)


@dataclass(frozen=True)
class BaseModel:
    """What the next round trains on: its parameters and version, and the hash that the
    new model names as its parent."""

    params: Mapping[str, np.ndarray]
    version: int
    parent_hash: bytes

    def weights_hash(self) -> bytes:
        """SHA-256 of the weights' canonical bytes: what a RoundOpen names as its base."""
        return hashlib.sha256(weights_bytes(self.params)).digest()


def base_model(registry: Registry, study_id: str, genesis: Mapping[str, np.ndarray]) -> BaseModel:
    """The study's newest released model, or the genesis model before the first release."""
    latest = registry.latest(study_id)
    if latest is None:
        return BaseModel(genesis, 0, GENESIS_PARENT)
    record = latest.record
    weights = registry.weights(record.study_id, record.version)
    return BaseModel(weights, record.version, record.model_hash)


def latest_server_state(registry: Registry, study_id: str) -> ServerState:
    """The server optimiser's state after the newest release (empty before the first)."""
    stored = registry.store.server_state(study_id)
    if stored is None or stored.path is None:
        return ServerState()
    return server_state_from_bytes(registry.resolve(stored.path).read_bytes())


@dataclass(eq=False)
class RoundContext:
    """What this aggregator keeps of the round in progress, and the store it persists to."""

    store: Store
    announcement: RoundOpen
    state: RoundState
    accumulator: ShareAccumulator
    base_params: Mapping[str, np.ndarray]
    version: int  # of the model this round releases
    parent_hash: bytes
    stall_ms: int  # past this, a round that is not collecting any more aborts
    # leader only: per aggregator, node -> the commitment of the statement it holds
    received: dict[str, dict[str, bytes]] = field(default_factory=dict)
    left_out: tuple[str, ...] = ()  # leader only: nodes whose statements differed
    set_hash: bytes | None = None
    partials: dict[str, PartialSum] = field(default_factory=dict)
    own_partial: np.ndarray | None = None
    statements: dict[str, NodeStatement] = field(default_factory=dict)  # per node, sealed
    candidate: BuiltRelease | None = None  # audited studies: the release before the gate
    audit_deadline_ms: int | None = None
    reports: dict[str, PrivacyAuditReport] = field(default_factory=dict)  # per site
    audit_conflicts: set[str] = field(default_factory=set)  # sites with two different reports
    built: BuiltRelease | None = None  # the release to sign (after the gate, if audited)
    note_sent: bool = False  # follower: its signature is out; the leader decides now
    notes: dict[str, ModelRelease] = field(default_factory=dict)  # leader only

    @classmethod
    def open(
        cls,
        announcement: RoundOpen,
        *,
        me: str,
        base: BaseModel,
        store: Store,
        agreement_timeout_s: float,
    ) -> RoundContext:
        """Record the announced round in `store` and hold it, at stage OPEN."""
        store.create_round(round_record(announcement))
        accumulator = ShareAccumulator(
            federation_id=announcement.federation_id,
            study_id=announcement.study_id,
            round_number=announcement.round,
            aggregator_index=aggregator_index(announcement, me),
            params=announcement.ring,
            length=announcement.vector_length,
            ledger=store,
        )
        return cls(
            store,
            announcement,
            RoundState(announcement.round),
            accumulator,
            base.params,
            base.version + 1,
            base.parent_hash,
            stall_ms=announcement.deadline_ms + ms(agreement_timeout_s),
        )

    @property
    def is_over(self) -> bool:
        """True once the round is released or aborted."""
        return self.state.stage.is_terminal

    def move(self, event: Event) -> None:
        """Move the state machine and persist the state; purge the shares once it is over."""
        study = self.announcement.study_id
        self.state = transition(self.state, event)
        self.store.save_state(study, self.state)
        if self.state.stage.is_terminal:
            self.store.purge_shares(study, self.state.round)

    def close_collection(self, now_ms: int | None) -> tuple[str, ...] | None:
        """The node ids held, if collection closes now (the round moves to AGREEING): at
        the deadline, or once every expected node reported (all that `now_ms` None, on a
        share, asks). None while it stays open, or once it is no longer collecting."""
        if self.state.stage is not Stage.COLLECTING:
            return None
        a = self.announcement
        if now_ms is None and self.state.received < len(a.expected_nodes):
            return None  # on a share, before everyone reported: nothing to read (O(1), not O(N))
        held = self.store.held_nodes(a.study_id, a.round)
        reason = collection_close_reason(now_ms, a.deadline_ms, held, a.expected_nodes)
        if reason is None:
            return None
        self.move(CollectionClosed(reason))
        return held

    def partial_sums_for(
        self,
        participants: ParticipantSet,
        me: str,
        hpke: Mapping[str, X25519PublicKey],
        k: int,
    ) -> list[PartialSum]:
        """This aggregator's one partial sum over the agreed set, sealed to each other
        aggregator, once the set passed its own checks (PartialSumRefused otherwise): at
        least max(`k`, the round's k) members, where `k` is this aggregator's own (never
        below the study's), no sum in this round before, and on a base model summed before,
        the retry rule (agreement.check_retry_rule). The move to SUMMING is
        committed with the partial-sum decision, in one transaction."""
        a = self.announcement
        members = check_partial_sum_request(
            round_number=a.round,
            requested=participants.node_ids,
            requested_hash=participants.digest(),
            held=self.store.held_nodes(a.study_id, a.round),
            expected_nodes=a.expected_nodes,
            min_participants=max(k, a.min_participants),
            already_published=self.store.published_on_base(a.study_id, a.base_model_hash),
        )
        self.state = transition(self.state, ParticipantsAgreed(members))
        self.set_hash = participants.digest()
        self.store.decide_partial_sum(a.study_id, self.state, self.set_hash)
        self.own_partial = self.accumulator.finalize(members)
        return seal_partial_sums(self.own_partial, a, me, self.set_hash, hpke)

    def admit_share(self, message: ShareEnvelope, me: str, hpke: X25519PrivateKey) -> bool:
        """Check, open and accumulate a node's share; False for a second copy (the first
        wins, logged), and ShareRejected or AuthenticationError for one that fails."""
        check_share_envelope(message, self.announcement, me, self.state.stage)
        share = open_share(message, self.announcement, me, hpke)
        statement = open_statement(message, self.announcement, hpke)
        digest = hashlib.sha256(message.sealed).digest()
        try:
            self.accumulator.add(message.node_id, share, envelope_digest=digest)
        except DuplicateShare:
            log.info(LogEvent.SHARE_DUPLICATE, extra={"fields": {"round": message.round}})
            return False
        self.statements[message.node_id] = statement
        self.move(ShareAccepted(message.node_id))
        return True

    def keep_received(self, signer: str, statements: Mapping[str, bytes]) -> None:
        """Leader: keep an aggregator's ReceivedSet (node -> statement commitment);
        MessageRejected for a stranger or a second one."""
        if signer not in self.announcement.aggregator_ids or signer in self.received:
            raise MessageRejected(f"ReceivedSet from {signer!r} is unexpected or repeated")
        self.received[signer] = dict(statements)

    def consistent_received(self) -> dict[str, list[str]]:
        """Leader: each aggregator's ReceivedSet without the nodes whose statement
        commitments differ between aggregators (kept in `left_out`, for the audit log):
        a node that told the aggregators different things is left out, like a dropout."""
        self.left_out = statement_mismatches(self.received)
        if self.left_out:
            fields = {"round": self.announcement.round, "nodes": len(self.left_out)}
            log.warning(LogEvent.STATEMENT_MISMATCH, extra={"fields": fields})
        return {
            agg: [node for node in held if node not in self.left_out]
            for agg, held in self.received.items()
        }

    def commitments(self, held: tuple[str, ...]) -> tuple[bytes, ...]:
        """The commitment of each held node's statement, in `held`'s order (a ReceivedSet's)."""
        return tuple(self.statements[node].commitment() for node in held)

    def keep_partial(self, message: PartialSum, signer: str) -> None:
        """Keep another aggregator's partial sum, opened once the set is agreed;
        MessageRejected for a stranger's or a second one."""
        if signer not in self.announcement.aggregator_ids:
            raise MessageRejected(f"partial sum signed by {signer!r}, not an aggregator")
        if message.from_aggregator in self.partials:
            raise MessageRejected(
                f"second partial sum from {message.from_aggregator!r}; first wins"
            )
        self.partials[message.from_aggregator] = message

    def build_release(
        self,
        decoded: np.ndarray,
        registry: Registry,
        config: AggregatorConfig,
        export_onnx: Callable[[Mapping[str, np.ndarray], int], bytes],
        key: Ed25519PrivateKey,
    ) -> BuiltRelease:
        """Step 7 on the checked aggregate: the strategy, the card (epsilon per site from the
        agreed statements, the parent's figure for sites that sat this round out), the release
        signed by this aggregator."""
        a = self.announcement
        participants = self.state.participants or ()
        parent = registry.latest(a.study_id)
        epsilon = carry_epsilon(
            None if parent is None else parent.card,
            {node: self.statements[node].epsilon_total for node in participants},
        )
        return build_signed_release(
            config=config,
            announcement=a,
            decoded=decoded,
            participants=len(participants),
            base_params=self.base_params,
            server_state=latest_server_state(registry, config.study_id),
            version=self.version,
            parent_hash=self.parent_hash,
            onnx=export_onnx,
            key=key,
            epsilon_per_site=epsilon,
        )

    def check(self, message: Message, **more: object) -> None:
        """Refuse a message for another federation, study or round (AuthenticationError,
        naming the field), or one whose `more` fields differ."""
        a = self.announcement
        require_fields(
            message, federation_id=a.federation_id, study_id=a.study_id, round=a.round, **more
        )
