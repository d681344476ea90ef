"""The privacy audit of a round's candidate model at the node: check, audit, sign.

For a study that requires an audit before release, the leader publishes each round's
candidate model, signed by itself alone, on each participant's own candidate topic.
`audit_candidate(candidate_bytes, ctx)` answers one such message the way `participate`
answers a RoundOpen: everything it needs comes in an explicit `CandidateContext`, and it
returns what to publish. It publishes nothing; it touches disk only through the audit log
it is given and the site's cache and ledger that the audit reads. The daemon wraps it.

Order, and what each step guarantees:

1. The envelope is opened against the aggregators' signing keys from the roster and must be
   signed by the roster's leader; the candidate must name this federation and study, and
   carry the leader's signature alone over hashes its payload matches
   (`tessera.wire.release.verify_candidate`). Otherwise `CandidateRefused`, naming the
   error's class only: nothing is audited, so a forgery cannot fill the log.
2. Its round must be one this site joined and has not audited yet (`ctx.joined`);
   otherwise `CandidateIgnored`: a round this site did not train, or a redelivered copy.
3. Its parent must be the base model of that round, the model this site's update went into
   (32 zero bytes for the first model); otherwise `CandidateRefused("not-from-our-base")`.
4. The round is taken from `ctx.joined` (audited once, whatever the outcome), and both
   attacks run on the site's data with the round's recipe and the `[privacy_audit]` budget
   (`node.privacy.site_audit.audit_at_site`). An audit that fails (too few held-out images,
   or an empirical bound above the accountant's epsilon) appends a `privacy-audit` entry
   with its outcome and returns `AuditFailed`: nothing is sent, so the aggregators hold the
   release for the missing report.
5. Otherwise the report of aggregate figures is signed with the node key, a `privacy-audit`
   entry with the headline figures is appended, and `Reported` carries the one message to
   publish on this site's audit topic. A candidate is never installed or served.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.topics import audit_topic
from node.errors import NodeError
from node.privacy.attacks import AuditConfig, PrivacyAccountingError
from node.privacy.site_audit import AuditTarget, SiteData, audit_at_site, candidate_target
from node.round.participation import Outgoing
from node.training.federated import SiteTraining, round_train_config
from node.training.trainer import TrainConfig
from tessera.errors import AuthenticationError, TesseraError
from tessera.governance.audit import AuditLog
from tessera.governance.privacy_report import PrivacyAuditReport, sign_report
from tessera.limits import MAX_RELEASE_PAYLOAD_BYTES
from tessera.models.study import StudyModel
from tessera.wire.envelopes import open_envelope_as, require_fields
from tessera.wire.messages import ModelRelease, RoundOpen
from tessera.wire.release import ReleaseBundle, verify_candidate

JOINED_KEPT = 8  # the rounds joined whose candidates this node would still audit
GENESIS_PARENT = bytes(32)  # the parent hash of a study's first model

Auditor = Callable[[AuditTarget, SiteData, TrainConfig, AuditConfig], PrivacyAuditReport]


class JoinedRounds:
    """The last `kept` rounds this site joined and has not audited, by round number.

    A round is taken out when its candidate is audited, so a redelivered candidate finds
    nothing; only the newest `kept` are remembered, so an unanswered round does not stay.
    """

    def __init__(self, kept: int = JOINED_KEPT) -> None:
        self._kept = kept
        self._rounds: dict[int, RoundOpen] = {}

    def remember(self, round_open: RoundOpen) -> None:
        """Note a round this site sent shares for; forget all but the newest `kept`."""
        self._rounds[round_open.round] = round_open
        for old in sorted(self._rounds)[: -self._kept]:
            del self._rounds[old]

    def get(self, round_number: int) -> RoundOpen | None:
        """The joined round `round_number`, not yet audited; None otherwise."""
        return self._rounds.get(round_number)

    def take(self, round_number: int) -> None:
        """Mark `round_number` audited: its candidate is not audited again."""
        self._rounds.pop(round_number, None)


@dataclass(frozen=True, eq=False)
class CandidateContext:
    """Everything a node needs to audit one candidate, passed in explicitly.

    `aggregator_signing_keys` come from the verified roster and `leader_id` is the roster's
    leader; `site` names this site, its federation and study, its state folder (cache and
    privacy ledger) and the study's preprocessing; `training` is the site's own training
    settings, which with the round's plan make the shadow models' recipe.
    """

    site: SiteData
    leader_id: str
    aggregator_signing_keys: Mapping[str, Ed25519PublicKey]
    signing_key: Ed25519PrivateKey
    model: StudyModel
    training: SiteTraining
    budget: AuditConfig
    joined: JoinedRounds
    audit: AuditLog
    run_audit: Auditor = field(default=audit_at_site)
    max_payload: int = MAX_RELEASE_PAYLOAD_BYTES


@dataclass(frozen=True)
class CandidateRefused:
    """Not a candidate this site may audit; `error` names what failed (no values)."""

    error: str


@dataclass(frozen=True)
class CandidateIgnored:
    """A genuine candidate of a round this site did not join, or already audited."""

    round: int


@dataclass(frozen=True)
class AuditFailed:
    """The audit ran and failed (`outcome` "failed" or "accounting-error"); nothing is sent."""

    round: int
    outcome: str
    detail: str


@dataclass(frozen=True)
class Reported:
    """The audit succeeded: publish `message`, the signed report; `figures` are its headline."""

    round: int
    message: Outgoing
    figures: dict[str, float]


CandidateOutcome = CandidateRefused | CandidateIgnored | AuditFailed | Reported


def audit_candidate(candidate_bytes: bytes, ctx: CandidateContext) -> CandidateOutcome:
    """Answer one candidate message; see the module docstring for the order of steps.

    Errors other than a refused candidate and a failed audit propagate (the round's entry in
    `ctx.joined` is taken by then, so the candidate is not audited twice).
    """
    try:
        candidate, bundle = _verified(candidate_bytes, ctx)
    except (TesseraError, ValueError) as error:
        return CandidateRefused(type(error).__name__)
    round_open = ctx.joined.get(candidate.round)
    if round_open is None:
        return CandidateIgnored(candidate.round)
    base = GENESIS_PARENT if round_open.model_version == 0 else round_open.base_model_hash
    if candidate.parent_hash != base:
        return CandidateRefused("not-from-our-base")  # not the model this site's update went into
    ctx.joined.take(candidate.round)
    site = ctx.site
    facts = {"study_id": site.study_id, "round": candidate.round, "version": candidate.version,
             "model_hash": candidate.model_hash.hex()}  # fmt: skip
    try:
        target = candidate_target(candidate, bundle, ctx.model)
        recipe = round_train_config(round_open, ctx.training)
        report = ctx.run_audit(target, site, recipe, ctx.budget)
    except (PrivacyAccountingError, NodeError) as error:
        outcome = "accounting-error" if isinstance(error, PrivacyAccountingError) else "failed"
        ctx.audit.append("privacy-audit", {**facts, "outcome": outcome, "detail": str(error)})
        return AuditFailed(candidate.round, outcome, str(error))
    signed_report = sign_report(report, ctx.signing_key)
    figures = report.headline()
    ctx.audit.append("privacy-audit", {**facts, "outcome": "reported", **figures})
    topic = audit_topic(site.federation_id, site.study_id, site.site_id)
    return Reported(candidate.round, Outgoing(topic, signed_report.to_json()), figures)


def _verified(data: bytes, ctx: CandidateContext) -> tuple[ModelRelease, ReleaseBundle]:
    """Step 1: the candidate and its bundle, or AuthenticationError / CodecError."""
    signed = open_envelope_as(data, ModelRelease, ctx.aggregator_signing_keys, ctx.max_payload)
    if signed.signer_id != ctx.leader_id:
        raise AuthenticationError("candidate is not from the federation's leader")
    candidate = signed.message
    require_fields(candidate, federation_id=ctx.site.federation_id, study_id=ctx.site.study_id)
    leader_key = ctx.aggregator_signing_keys[ctx.leader_id]
    return candidate, verify_candidate(candidate, ctx.leader_id, leader_key)
