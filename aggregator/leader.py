"""The leader's pure steps: plan a round (the RoundOpen it announces) and its store record;
and every aggregator's check of a RoundOpen before it adopts it (`check_round_open`), which
takes nothing on the leader's word: k, the expected set, the aggregators, the leader, the
clip norm, the caps and the ring are held to this aggregator's own `StudyTerms` and roster.

The ring is derived from the update layout's bound (docs/architecture.md, section 3: overflow
is impossible by construction): with weights scaled into (0, 1], every coordinate of one
node's vector is at most `tessera.crypto.update_layout.required_bound(clip_norm, loss_cap)` in
magnitude, and at most len(expected_nodes) vectors are summed.
`tessera.crypto.encoding.derive_ring_params` picks 32 or 64 bits from that.
"""

from __future__ import annotations

import hmac
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from aggregator.agreement import PublishedSum
from aggregator.config import AggregatorConfig, RoundSettings
from aggregator.errors import AggregatorConfigError, BaseModelSpent, MessageRejected
from aggregator.records import RoundRecord
from aggregator.rounds import RoundState
from tessera.crypto.encoding import RingParams, derive_ring_params
from tessera.crypto.update_layout import check_representable, required_bound
from tessera.wire.envelopes import require_fields
from tessera.wire.messages import ALGORITHMS, RoundOpen
from tessera.wire.round_terms import RoundTermsRefused, check_expected_set, check_round_encoding


@dataclass(frozen=True)
class StudyTerms:
    """What every RoundOpen is held to, from the verified manifest and roster at start-up
    (aggregator.setup), never from the leader: the study's k and clip norm, the roster's
    leader, and its sites (the only nodes a round may expect)."""

    min_participants: int  # the study's k
    clip_norm: float  # the study's clip norm
    leader_id: str  # the roster's leader
    sites: tuple[str, ...]  # the roster's sites

    def k_for(self, config: AggregatorConfig) -> int:
        """k_eff: this aggregator's own k, never below the study's. AggregatorConfigError if
        `config` names another leader than the roster's."""
        if config.leader_id != self.leader_id:
            raise AggregatorConfigError(
                f"leader_id = {config.leader_id!r}, but the roster's leader is "
                f"{self.leader_id!r}; remove leader_id from the configuration"
            )
        return max(config.round.min_participants, self.min_participants)


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


def check_round_settings(settings: RoundSettings, n_params: int) -> None:
    """The leader's check at start-up that its [round] caps can represent an update of the
    study's `n_params` parameters (`tessera.crypto.update_layout.check_representable`, for a
    node at the cap): every other party would refuse its rounds. AggregatorConfigError
    naming the fix otherwise."""
    try:
        check_representable(
            weight_cap=settings.weight_cap,
            frac_bits=settings.frac_bits,
            clip_norm=settings.clip_norm,
            n_params=n_params,
        )
    except ValueError as exc:
        raise AggregatorConfigError(
            f"[round] cannot represent an update of this study's model: {exc}"
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
        opened_ms=now_ms,
    )


def required_nodes(prior: Sequence[PublishedSum]) -> tuple[str, ...]:
    """The sorted nodes every retry on a summed base model must include: every node of
    every set summed on it (`prior`, from store.published_on_base)."""
    return tuple(sorted({node for fact in prior for node in fact.participants or ()}))


def check_base_reopenable(
    round_number: int,
    prior: Sequence[PublishedSum],
    expected_nodes: Sequence[str],
    available: Collection[str] | None = None,
) -> None:
    """The leader's check before it opens `round_number` on a base model already summed
    without a release (`prior`, from store.published_on_base; nothing to check if empty).
    Every honest aggregator holds a retry to the retry rule (agreement.check_retry_rule):
    it must keep every node summed before. So the round opens only if `expected_nodes` (and
    `available`, the nodes online, where given) include all of them; otherwise it could never
    release and would cost every node epsilon for nothing. BaseModelSpent, naming the nodes
    that must return, otherwise."""
    if any(fact.participants is None for fact in prior):
        raise BaseModelSpent(
            f"round {round_number} would start from a base model summed before the store "
            "recorded participant sets (a migrated store); no retry can be checked, so no "
            "round can release on it: an operator registers a new base model"
        )
    usable = set(expected_nodes) if available is None else set(expected_nodes) & set(available)
    missing = [node for node in required_nodes(prior) if node not in usable]
    if missing:
        raise BaseModelSpent(
            f"round {round_number} would retry the base model that round {prior[-1].round} "
            f"summed without a release; a retry must include every node of that sum, and "
            f"{', '.join(missing)} must return (on the roster and online) before a round "
            "opens, else it could never release and would cost every node epsilon "
            "(docs/architecture.md, section 6)"
        )


def check_round_open(
    message: RoundOpen,
    signer: str,
    config: AggregatorConfig,
    *,
    terms: StudyTerms,
    aggregator_ids: Sequence[str],
    base: bytes,
    held_round: int | None,
    now_ms: int,
) -> None:
    """Every aggregator's checks of a RoundOpen before it holds the round (issue #18, attack
    1): signed by the roster's leader, for this federation and study, newer than
    `held_round` (the newest round in this aggregator's store), from `base` (the hash of the
    newest model this aggregator holds), naming exactly the roster's aggregators in index
    order, k at least k_eff (`StudyTerms.k_for`), an expected set of at least k_eff roster
    sites, the study's clip norm and caps with exactly the ring they require
    (`tessera.wire.round_terms`), and a deadline still ahead. MessageRejected
    (AuthenticationError for another federation or study) otherwise."""
    if signer != terms.leader_id or message.leader_id != signer:
        raise MessageRejected(f"RoundOpen signed by {signer!r}, the leader is {terms.leader_id!r}")
    require_fields(message, federation_id=config.federation_id, study_id=config.study_id)
    if held_round is not None and message.round <= held_round:
        raise MessageRejected(f"RoundOpen for round {message.round} is not new")
    if not hmac.compare_digest(message.base_model_hash, base):
        raise MessageRejected(
            f"round {message.round} starts from a base model this aggregator does not hold"
        )
    if tuple(message.aggregator_ids) != tuple(aggregator_ids):
        raise MessageRejected(
            f"round {message.round} names aggregators {list(message.aggregator_ids)}, the "
            f"roster has {list(aggregator_ids)} (in that order)"
        )
    k = terms.k_for(config)
    if message.min_participants < k:
        raise MessageRejected(
            f"round {message.round} asks for k={message.min_participants}, this aggregator "
            f"requires k >= {k} (its own k, never below the study's)"
        )
    try:
        check_expected_set(message, k=k, sites=terms.sites)
        check_round_encoding(message, max_clip_norm=terms.clip_norm)
    except RoundTermsRefused as refused:
        raise MessageRejected(f"round {message.round}: {refused}") from None
    if message.deadline_ms <= now_ms:
        raise MessageRejected(
            f"round {message.round}'s deadline (Unix ms {message.deadline_ms}) has passed"
        )


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
