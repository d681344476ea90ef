"""Steps 2 to 4 of a round at the node (docs/architecture.md, section 3): check, train, share, seal.

`participate(round_open_bytes, ctx)` is a pure-ish protocol step: it takes the signed
RoundOpen as it arrived and everything the node knows as an explicit `ParticipationContext`,
and returns what to publish. It publishes nothing, reads no clock unless `now` is omitted,
and touches disk only through the privacy ledger (charged before training) and the audit
log it is given. The daemon wraps it with MQTT.

Order, and what each step guarantees:

1. The envelope is opened against the aggregators' signing keys from the roster, and must be
   signed by the roster's leader: AuthenticationError (vague) otherwise. Nothing is audited
   for a forgery, so an attacker cannot fill the log.
2. The round's terms are checked by `node.round.policy.check_round` (manifest, approval, window,
   k, clip norm, rounds, epsilon), then by the protocol checks here: the round names exactly
   the roster's aggregators, lists this site, expects at least max(study k, round k) sites
   of the manifest and no one else, fits the study's caps with exactly the ring they require
   (`tessera.wire.round_terms`: a round that can never release must not cost epsilon), can
   represent this node's own update (its weight, from its training-set size, times the clip
   norm above the fixed point's rounding: `tessera.crypto.update_layout.check_representable`;
   else the update could round to all zeros and the round fail after the epsilon is spent), is
   before its deadline on the leader's clock (this node's own, corrected by the offset it
   measured; a node whose clock is off by more than it tolerates refuses with "clock-skew"
   and the fix: `node.round.clock`), is the first RoundOpen this node answers for its round
   number (a leader that signs two cannot have a node refuse one and join the other), and
   starts from the model this node holds. All of this runs before one image is touched. A refusal
   appends a `round-refused` entry and returns `Refused`, which carries no outgoing message
   at all. Every answer's audit entry names the RoundOpen's hash (`round_open`), and the
   audit log is what the node reads back to know which rounds it answered, so a restart
   does not forget. First of all, the privacy ledger is re-read and held against the audit
   log (`node.privacy.reconcile.ledger_gap`): a ledger missing or behind refuses the round
   (`ledger-behind`), since its budget would restart from a lower figure.
3. Only then is a copy of the model trained (`ctx.train`, default `train_for_round`; the
   node's own model stays the base model, so an aborted round leaves it untouched).
4. The encoded vector is split into one share per aggregator (`tessera.crypto.sharing.split`),
   each sealed with HPKE to its aggregator under `share_binding`, with the node's statement
   (its composed epsilon, sealed the same way: `tessera.wire.statement`), wrapped in a ShareEnvelope
   signed with the node's key, and addressed to `broker.topics.share_topic`. A `round-joined`
   entry (and, with DP, an `epsilon-spent` entry) is appended before returning; it names
   the commitment of the statement, which each aggregator's receipts must list
   (`node.round.receipts`).
"""

from __future__ import annotations

import copy
import datetime as dt
import hmac
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from broker.topics import share_topic
from node.errors import NodeError
from node.privacy.ledger import BudgetExceeded, PrivacyLedger
from node.privacy.reconcile import charge_fields, ledger_gap
from node.round.clock import ClockReading
from node.round.policy import LedgerState, RoundAnnouncement, RoundRefused, SitePolicy, check_round
from node.training.federated import RoundUpdate, SiteTraining, round_train_config, train_for_round
from node.training.trainer import planned_steps, split_validation
from tessera.crypto.sealing import seal
from tessera.crypto.sharing import ShareContext, split
from tessera.crypto.update_layout import STATS_LENGTH, check_representable
from tessera.errors import AuthenticationError
from tessera.governance.approvals import Approval
from tessera.governance.audit import AuditLog, read_entries
from tessera.governance.manifest import Manifest
from tessera.limits import MAX_ROUND_OPEN_BYTES
from tessera.models.nets import TesseraNet
from tessera.models.weights import model_hash, state_arrays
from tessera.wire.envelopes import open_envelope_as, seal_envelope, share_binding
from tessera.wire.messages import RoundOpen, ShareEnvelope
from tessera.wire.round_terms import RoundTermsRefused, check_expected_set, check_round_encoding
from tessera.wire.statement import NodeStatement, seal_statement

# Refusals found here, beside node.round.policy.REASONS (which check_round raises).
PROTOCOL_REASONS = (
    "dp-required",
    "bad-terms",
    "aggregators-not-in-roster",
    "not-expected",
    "expected-not-in-manifest",
    "expected-below-k",
    "ring-outside-caps",
    "update-unrepresentable",
    "deadline-passed",
    "clock-skew",
    "already-joined",
    "already-answered",
    "base-model-mismatch",
    "not-enough-data",
    "budget-exhausted",
    "ledger-behind",
)

Trainer = Callable[
    [RoundOpen, TesseraNet, np.ndarray, np.ndarray, SiteTraining, PrivacyLedger | None],
    RoundUpdate,
]


@dataclass(frozen=True, eq=False)
class ParticipationContext:
    """Everything a node needs to answer one RoundOpen, passed in explicitly.

    `aggregator_signing_keys` and `aggregator_hpke_keys` come from the verified roster (all
    aggregators, never only those a RoundOpen names); `leader_id` is the roster's leader.
    `architecture` is the model's architecture id as the study's allowlist spells it.
    `ledger` is the study's privacy ledger, required when `site.dp` is set. `clock` is what
    the node measured of its clock against the leader's (`node.round.clock`); None: not
    known, as for a node that never compared them.
    """

    site_id: str
    signing_key: Ed25519PrivateKey
    leader_id: str
    aggregator_signing_keys: Mapping[str, Ed25519PublicKey]
    aggregator_hpke_keys: Mapping[str, X25519PublicKey]
    manifest: Manifest
    approvals: Sequence[Approval]
    policy: SitePolicy
    architecture: str
    model: TesseraNet
    images: np.ndarray
    labels: np.ndarray
    site: SiteTraining
    ledger: PrivacyLedger | None
    audit: AuditLog
    train: Trainer = field(default=train_for_round)
    max_round_open_bytes: int = MAX_ROUND_OPEN_BYTES
    clock: ClockReading | None = None


class Outgoing(NamedTuple):
    """One message to publish (QoS 1): its topic and its signed envelope bytes."""

    topic: str
    payload: bytes


@dataclass(frozen=True)
class Joined:
    """The node took part: publish `messages`, one sealed share per aggregator."""

    round_open: RoundOpen
    messages: tuple[Outgoing, ...]
    epsilon_spent: float  # what this round added to the study's composed total
    update: RoundUpdate

    @property
    def joined(self) -> bool:
        return True


@dataclass(frozen=True)
class Refused:
    """The node declined the round; nothing is sent (`messages` is always empty)."""

    round_open: RoundOpen
    reason: str
    detail: str

    @property
    def joined(self) -> bool:
        return False

    @property
    def messages(self) -> tuple[Outgoing, ...]:
        return ()


Participation = Joined | Refused


def participate(
    round_open_bytes: bytes, ctx: ParticipationContext, now: dt.datetime | None = None
) -> Participation:
    """Answer one signed RoundOpen: `Joined` with the share envelopes to publish, or
    `Refused` (audited, no messages). See the module docstring for the order of checks.
    `now` is the leader's time as this node reads it (its own clock corrected by
    `ctx.clock`, which the daemon measured); default: this machine's clock.

    Raises AuthenticationError for an envelope not signed by the roster's leader, CodecError
    for malformed bytes; errors while training (other than the budget) propagate.
    """
    now = dt.datetime.now(dt.UTC) if now is None else now
    signed = open_envelope_as(
        round_open_bytes, RoundOpen, ctx.aggregator_signing_keys, ctx.max_round_open_bytes
    )
    if signed.signer_id != ctx.leader_id:
        raise AuthenticationError("round announcement is not from the federation's leader")
    round_open = signed.message
    try:
        state = _ledger_state(round_open, ctx)
        announcement = _announcement(round_open, ctx)
        check_round(ctx.manifest, ctx.approvals, ctx.policy, announcement, state, now)
        _check_protocol(round_open, ctx, now)
    except RoundRefused as refused:
        return _refuse(round_open, ctx, refused)
    try:
        update = ctx.train(round_open, copy.deepcopy(ctx.model), ctx.images, ctx.labels,
                           ctx.site, ctx.ledger)  # fmt: skip
    except BudgetExceeded as error:  # another process spent the budget since the check
        return _refuse(round_open, ctx, RoundRefused("budget-exhausted", str(error)))
    charge = update.result.dp_charge
    spent = max(0.0, charge.epsilon_total - state.epsilon_spent) if charge else 0.0
    epsilon_total = charge.epsilon_total if charge else state.epsilon_spent
    statement = NodeStatement.fresh(epsilon_total)  # one per round, the same for every one
    messages = tuple(seal_shares(round_open, update.encoded, ctx, epsilon_total, statement))
    ctx.audit.append("round-joined", {
        "federation_id": round_open.federation_id, "study_id": round_open.study_id,
        "round": round_open.round, "round_open": round_open.digest().hex(),
        "aggregators": len(messages),
        "samples": update.result.train_samples, "clipped": update.update.clipped,
        # what each aggregator's receipts must list (node.round.receipts): a salted hash
        "statement": statement.commitment().hex(),
    })  # fmt: skip
    if charge is not None:
        assert ctx.ledger is not None  # train_for_round charges only a ledger it was given
        ctx.audit.append("epsilon-spent", charge_fields(ctx.ledger, asdict(charge), spent))
    return Joined(round_open, messages, spent, update)


def seal_shares(
    round_open: RoundOpen,
    encoded: np.ndarray,
    ctx: ParticipationContext,
    epsilon_total: float = 0.0,
    statement: NodeStatement | None = None,
) -> list[Outgoing]:
    """Split `encoded` into one share per aggregator of the round, seal each to its
    aggregator, sign each envelope as this site, and address it; ordered by aggregator index.
    Every envelope carries the same statement (`epsilon_total`, the site's composed epsilon
    for the study, this round included, which the model card reports, and one fresh salt),
    sealed to its aggregator like the share: the broker never reads the epsilon. `statement`
    is that statement when the caller keeps its commitment (a fresh one otherwise).

    Guarantee: each aggregator can open only its own share and statement, only under the
    binding it builds from its own RoundOpen, and fewer than all shares reveal nothing of
    the vector.
    """
    share_ctx = ShareContext(
        round_open.federation_id, round_open.study_id, round_open.round, ctx.site_id
    )
    shares = split(encoded, len(round_open.aggregator_ids), share_ctx, round_open.ring)
    if statement is None:  # one per round, the same for every aggregator
        statement = NodeStatement.fresh(epsilon_total)
    out = []
    for share in shares:
        aggregator = round_open.aggregator_ids[share.aggregator_index]
        hpke = ctx.aggregator_hpke_keys[aggregator]
        binding = share_binding(round_open, ctx.site_id, aggregator)
        sealed = seal(share.plaintext(), hpke, binding)
        stated = seal_statement(statement, round_open, ctx.site_id, aggregator, hpke)
        envelope = ShareEnvelope(
            round_open.federation_id, round_open.study_id, round_open.round,
            round_open.base_model_hash, ctx.site_id, aggregator, round_open.ring,
            round_open.vector_length, sealed, stated,
        )  # fmt: skip
        topic = share_topic(round_open.federation_id, round_open.study_id, aggregator, ctx.site_id)
        out.append(Outgoing(topic, seal_envelope(envelope, ctx.site_id, ctx.signing_key)))
    return out


def _refuse(round_open: RoundOpen, ctx: ParticipationContext, refused: RoundRefused) -> Refused:
    ctx.audit.append("round-refused", {
        "federation_id": round_open.federation_id, "study_id": round_open.study_id,
        "round": round_open.round, "round_open": round_open.digest().hex(),
        "reason": refused.reason, "detail": refused.detail,
    })  # fmt: skip
    return Refused(round_open, refused.reason, refused.detail)


def _answered_rounds(round_open: RoundOpen, ctx: ParticipationContext) -> dict[int, str]:
    """Rounds of this study that the audit log records an answer to (joined or refused),
    each with its entry kind ("round-joined" wins over "round-refused")."""
    answered: dict[int, str] = {}
    for entry in read_entries(ctx.audit.path):
        if (
            entry.kind in ("round-joined", "round-refused")
            and entry.fields.get("study_id") == round_open.study_id
            and entry.fields.get("federation_id") == round_open.federation_id
        ):
            number = int(entry.fields["round"])
            if answered.get(number) != "round-joined":
                answered[number] = entry.kind
    return answered


def _joined_rounds(round_open: RoundOpen, ctx: ParticipationContext) -> set[int]:
    """Rounds of this study that the audit log records as joined."""
    answered = _answered_rounds(round_open, ctx)
    return {number for number, kind in answered.items() if kind == "round-joined"}


def _ledger_state(round_open: RoundOpen, ctx: ParticipationContext) -> LedgerState:
    # With DP the ledger is the authority, once it holds every charge the audit log records
    # (re-read here: it may have been deleted, restored or rebuilt since the last round);
    # without DP, the audit log counts joined rounds.
    if ctx.ledger is not None:
        gap = ledger_gap(ctx.ledger, ctx.audit.path)
        if gap is not None:
            raise RoundRefused("ledger-behind", gap.reason)
        return ctx.ledger.state()
    return LedgerState(epsilon_spent=0.0, rounds_joined=len(_joined_rounds(round_open, ctx)))


def projected_epsilon(round_open: RoundOpen, ctx: ParticipationContext) -> float:
    """What this round would add to the study's composed epsilon, computed with the same
    plan `train_for_round` will charge (0 without DP)."""
    dp = ctx.site.dp
    if dp is None:
        return 0.0
    if ctx.ledger is None:
        raise NodeError("DP is on but no privacy ledger was given; pass the study's ledger")
    cfg = round_train_config(round_open, ctx.site)
    try:
        train_idx, _ = split_validation(len(ctx.images), cfg.validation_fraction, cfg.seed)
    except NodeError as error:
        raise RoundRefused("not-enough-data", str(error)) from None
    sample_rate = 1.0 / math.ceil(len(train_idx) / cfg.batch_size)
    steps = planned_steps(len(train_idx), cfg)
    return ctx.ledger.projected_increment(dp.noise_multiplier, sample_rate, steps)


def _announcement(round_open: RoundOpen, ctx: ParticipationContext) -> RoundAnnouncement:
    try:
        return RoundAnnouncement(
            federation_id=round_open.federation_id, study_id=round_open.study_id,
            round=round_open.round, architecture=ctx.architecture,
            min_participants=round_open.min_participants, clip_norm=round_open.clip_norm,
            projected_epsilon=projected_epsilon(round_open, ctx),
        )  # fmt: skip
    except ValueError as error:
        raise RoundRefused("bad-terms", str(error)) from None


def _check_protocol(round_open: RoundOpen, ctx: ParticipationContext, now: dt.datetime) -> None:
    if ctx.site.dp is None or ctx.ledger is None:
        # Every study's terms carry a DP budget per site; training without DP-SGD would
        # release an update the steward never approved.
        raise RoundRefused(
            "dp-required",
            "the study's terms require DP-SGD with a privacy ledger; configure the site's "
            "DP settings (noise multiplier) and the study's ledger",
        )
    roster = set(ctx.aggregator_hpke_keys)
    if set(round_open.aggregator_ids) != roster or set(ctx.aggregator_signing_keys) != roster:
        raise RoundRefused(
            "aggregators-not-in-roster",
            f"round names aggregators {sorted(round_open.aggregator_ids)}, the roster has "
            f"{sorted(roster)}; shares go to every roster aggregator or to none",
        )
    if ctx.site_id not in round_open.expected_nodes:
        raise RoundRefused(
            "not-expected", f"site {ctx.site_id!r} is not among the round's expected nodes"
        )
    _check_round_terms(round_open, ctx)
    _check_own_update(round_open, ctx)
    if ctx.clock is not None and ctx.clock.beyond:
        raise RoundRefused("clock-skew", ctx.clock.refusal())
    late_s = now.timestamp() - round_open.deadline_ms / 1000
    if late_s >= 0:
        clock = ctx.clock.describe() if ctx.clock is not None else "clock not compared"
        raise RoundRefused(
            "deadline-passed",
            f"the round's deadline (Unix ms {round_open.deadline_ms}) passed {late_s:.0f} s "
            f"ago on the leader's clock as this node reads it ({clock})",
        )
    answered = _answered_rounds(round_open, ctx).get(round_open.round)
    if answered == "round-joined":
        raise RoundRefused(
            "already-joined", f"this site already sent shares for round {round_open.round}"
        )
    if answered is not None:
        raise RoundRefused(
            "already-answered",
            f"this site already refused a RoundOpen for round {round_open.round}; it answers "
            "one announcement per round number (a leader that signs two is equivocating)",
        )
    if not hmac.compare_digest(model_hash(state_arrays(ctx.model)), round_open.base_model_hash):
        raise RoundRefused(
            "base-model-mismatch",
            f"the round starts from model {round_open.base_model_hash.hex()[:16]}..., this "
            "node holds another; accept that release first",
        )


def _check_round_terms(round_open: RoundOpen, ctx: ParticipationContext) -> None:
    """The expected set and the ring, checked against the study's terms (issue #18, attack
    3): at least max(study k, round k) sites of the manifest, and the ring the caps require."""
    study = ctx.manifest.study(round_open.study_id)
    if study is None:  # check_round refused it already; kept for the type checker
        raise RoundRefused("unknown-study", f"study {round_open.study_id!r} is not in the manifest")
    sites = {site.id for site in ctx.manifest.sites}
    try:
        k = max(study.min_participants, round_open.min_participants)
        check_expected_set(round_open, k=k, sites=sites)
        check_round_encoding(round_open, max_clip_norm=study.clip_norm)
    except RoundTermsRefused as refused:
        raise RoundRefused(refused.reason, refused.detail) from None


def _check_own_update(round_open: RoundOpen, ctx: ParticipationContext) -> None:
    """This node's update, weighted by its own training-set size, must survive the round's
    fixed point (issue 19, point 9: a ResNet-18 update of 15-sample sites at weight_cap
    10,000 rounded to all zeros, and the round failed after every site spent its epsilon)."""
    cfg = round_train_config(round_open, ctx.site)
    try:
        train_idx, _ = split_validation(len(ctx.images), cfg.validation_fraction, cfg.seed)
    except NodeError as error:
        raise RoundRefused("not-enough-data", str(error)) from None
    try:
        check_representable(
            weight_cap=round_open.weight_cap,
            frac_bits=round_open.ring.frac_bits,
            clip_norm=round_open.clip_norm,
            n_params=max(1, round_open.vector_length - STATS_LENGTH),
            samples=len(train_idx),
        )
    except ValueError as error:
        raise RoundRefused("update-unrepresentable", str(error)) from None
