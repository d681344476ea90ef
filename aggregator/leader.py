"""The leader's pure steps: plan a round (the RoundOpen it announces) and its store record;
and the followers' check of a RoundOpen they receive.

The ring is derived from the update layout's bound (docs/architecture.md, section 3: overflow
is impossible by construction): with weights scaled into (0, 1], every coordinate of one
node's vector is at most `tessera.crypto.update_layout.required_bound(clip_norm, loss_cap)` in
magnitude, and at most len(expected_nodes) vectors are summed.
`tessera.crypto.encoding.derive_ring_params` picks 32 or 64 bits from that.
"""

from __future__ import annotations

from collections.abc import Sequence

from aggregator.config import AggregatorConfig, RoundSettings
from aggregator.errors import AggregatorConfigError, MessageRejected
from aggregator.records import RoundRecord
from aggregator.rounds import RoundState
from tessera.crypto.encoding import RingParams, derive_ring_params
from tessera.crypto.update_layout import required_bound
from tessera.wire.envelopes import require_fields
from tessera.wire.messages import ALGORITHMS, RoundOpen


def ring_bound(settings: RoundSettings) -> float:
    """The largest magnitude any coordinate of one node's update vector may have."""
    return required_bound(settings.clip_norm, settings.loss_cap)


def ring_for(settings: RoundSettings, n_nodes: int) -> RingParams:
    """The ring parameters for a round over `n_nodes` expected nodes."""
    try:
        return derive_ring_params(ring_bound(settings), max(n_nodes, 1), settings.frac_bits)
    except ValueError as exc:
        raise AggregatorConfigError(
            f"[round] clip_norm, loss_cap and frac_bits do not fit a 64-bit ring "
            f"for {n_nodes} nodes ({exc})"
        ) from None


def plan_round(
    config: AggregatorConfig,
    *,
    round_number: int,
    base_model_hash: bytes,
    model_version: int,
    algorithm: str,
    aggregator_ids: Sequence[str],
    expected_nodes: Sequence[str],
    vector_length: int,
    now_ms: int,
) -> RoundOpen:
    """The RoundOpen the leader signs and publishes.

    FedAvg asks for `round.local_epochs` epochs; FedSGD for exactly one local step (epochs 0).
    `aggregator_ids` order is the aggregator index; `expected_nodes` the round's roster.
    """
    if not config.is_leader:
        raise AggregatorConfigError(
            f"aggregator {config.aggregator_id!r} is not the leader ({config.leader_id!r}); "
            "only the leader opens rounds"
        )
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm!r} is unknown; use one of {ALGORITHMS}")
    settings = config.round
    if len(expected_nodes) < settings.min_participants:
        raise AggregatorConfigError(
            f"only {len(expected_nodes)} node(s) on the roster, fewer than "
            f"round.min_participants={settings.min_participants}; no round can succeed"
        )
    fedavg = algorithm == "fedavg"
    return RoundOpen(
        federation_id=config.federation_id,
        study_id=config.study_id,
        round=round_number,
        base_model_hash=base_model_hash,
        model_version=model_version,
        deadline_ms=now_ms + int(settings.collect_timeout_s * 1000),
        algorithm=algorithm,
        local_epochs=settings.local_epochs if fedavg else 0,
        local_steps=0 if fedavg else 1,
        learning_rate=settings.learning_rate,
        prox_mu=settings.prox_mu,
        clip_norm=settings.clip_norm,
        ring=ring_for(settings, len(expected_nodes)),
        min_participants=settings.min_participants,
        vector_length=vector_length,
        aggregator_ids=tuple(aggregator_ids),
        expected_nodes=tuple(sorted(expected_nodes)),
        leader_id=config.leader_id,
        weight_cap=settings.weight_cap,
        loss_cap=settings.loss_cap,
    )


def check_round_open(
    message: RoundOpen, signer: str, config: AggregatorConfig, held_round: int | None
) -> None:
    """A follower's checks of a RoundOpen before it holds the round: signed by this study's
    leader, for this federation and study, and newer than `held_round` (the round this
    aggregator holds, if any). MessageRejected (AuthenticationError for another federation
    or study) otherwise. The base model is checked by the caller, which holds it."""
    if signer != config.leader_id or message.leader_id != signer:
        raise MessageRejected(f"RoundOpen signed by {signer!r}, the leader is {config.leader_id!r}")
    require_fields(message, federation_id=config.federation_id, study_id=config.study_id)
    if held_round is not None and message.round <= held_round:
        raise MessageRejected(f"RoundOpen for round {message.round} is not new")


def round_record(announcement: RoundOpen) -> RoundRecord:
    """The store record of an announced (or accepted) round, at stage OPEN."""
    return RoundRecord(
        study_id=announcement.study_id,
        base_model_hash=announcement.base_model_hash,
        ring_params=announcement.ring.to_bytes(),
        vector_length=announcement.vector_length,
        deadline_ms=announcement.deadline_ms,
        algorithm=announcement.algorithm,
        state=RoundState(announcement.round),
    )
