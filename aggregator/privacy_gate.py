"""The release gate of a study that requires a privacy audit (manifest term `privacy_audit`).

Each site audits the candidate model on its own node (`tessera audit privacy`) and publishes
a signed report of aggregate figures (`tessera.governance.privacy_report`). The aggregator:

1. checks each report as it arrives with `check_report`: signed by that site's node key from
   the (verified) manifest, for this federation, study, model version and weights hash, from
   a site that trained this model, and not a second one from the same site. Anything else
   raises (`AuthenticationError` for a signature, `AuditReportRefused` for the rest) and the
   report must be dropped;
2. decides with `gate_release` once the reports are in: the release goes ahead only if every
   participating site reported and no site's strongest attack has a TPR at 0.1% FPR above
   the study's `max_tpr_at_0_1pct_fpr`, and no site published two different reports for
   the round (`audit-conflict`: whatever order they arrived in, never two cards). A hold is
   appended to the audit log (kind `release`, outcome `held`) with its reason, the limit
   and the sites concerned, and returned;
3. records the figures on the model card with `card_figures` (per site, or only the count and
   the worst figures where fewer than k sites would be named; see `aggregator.model_card`).

Pure functions over their arguments; the audit log is the one side effect, and only on a hold.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from aggregator.errors import AggregatorError
from tessera.errors import ConfigError
from tessera.governance.audit import AuditLog
from tessera.governance.manifest import Manifest
from tessera.governance.privacy_report import PrivacyAuditReport, verify_report

NOT_REQUIRED = "audit-not-required"
PASSED = "audit-passed"
MISSING = "audit-missing"
OVER_LIMIT = "audit-limit-exceeded"
CONFLICT = "audit-conflict"


class AuditReportRefused(AggregatorError):
    """A correctly signed report that is not about this release; `reason` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"privacy audit report refused ({reason}): {detail}")
        self.reason = reason


@dataclass(frozen=True)
class AuditSetup:
    """What an aggregator service needs to gate the releases of its study: the verified
    manifest (the study's limit, the sites' node keys) and the audit log for holds."""

    manifest: Manifest
    log: AuditLog

    def required(self, study_id: str) -> bool:
        """True when the study requires a privacy audit before every release."""
        study = self.manifest.study(study_id)
        return study is not None and study.privacy_audit is not None


@dataclass(frozen=True)
class ReleaseCandidate:
    """The model a release would publish, and the sites whose data trained it."""

    study_id: str
    version: int
    model_hash: bytes
    sites: frozenset[str]


@dataclass(frozen=True)
class GateDecision:
    """Release or hold, why, and the figure each reporting site's worst attack reached."""

    release: bool
    reason: str
    detail: str
    limit: float | None = None
    worst_tpr: Mapping[str, float] = field(default_factory=dict)


def check_report(
    report: PrivacyAuditReport,
    manifest: Manifest,
    candidate: ReleaseCandidate,
    seen: Collection[str] = (),
) -> None:
    """Return only if `report` is a valid audit of `candidate` (see the module doc).

    `manifest` must already be verified with the pinned coordinator key; `seen` holds the
    sites whose reports were already accepted.
    """
    verify_report(report, manifest)  # AuthenticationError, deliberately vague
    if report.study_id != candidate.study_id:
        raise AuditReportRefused(
            "wrong-study", f"report is for study {report.study_id!r}, not {candidate.study_id!r}"
        )
    if report.model_hash != candidate.model_hash or report.model_version != candidate.version:
        raise AuditReportRefused(
            "wrong-model",
            f"report audits version {report.model_version} ({report.model_hash.hex()[:16]}...), "
            f"the candidate is version {candidate.version} "
            f"({candidate.model_hash.hex()[:16]}...); the site must audit the candidate",
        )
    if report.site_id not in candidate.sites:
        raise AuditReportRefused(
            "not-a-participant", f"site {report.site_id!r} did not train this model"
        )
    if report.site_id in seen:
        raise AuditReportRefused("duplicate", f"site {report.site_id!r} already reported")


def gate_release(
    manifest: Manifest,
    candidate: ReleaseCandidate,
    reports: Iterable[PrivacyAuditReport],
    audit: AuditLog,
    conflicts: Collection[str] = (),
) -> GateDecision:
    """Release or hold `candidate`; every report is checked with `check_report` (which
    raises on a bad one), and a hold is written to `audit` before it is returned.

    `conflicts` names the sites that published two different reports for this round: any
    one holds the release, so that no order of delivery can give two aggregators two cards.
    """
    study = manifest.study(candidate.study_id)
    if study is None:
        raise ConfigError(f"the manifest has no study {candidate.study_id!r}")
    if study.privacy_audit is None:
        return GateDecision(True, NOT_REQUIRED, "the study requires no privacy audit")
    limit = study.privacy_audit.max_tpr_at_0_1pct_fpr
    accepted: dict[str, PrivacyAuditReport] = {}
    for report in reports:
        check_report(report, manifest, candidate, accepted)
        accepted[report.site_id] = report
    worst = {site: accepted[site].worst_tpr_at_0_1pct_fpr for site in sorted(accepted)}
    missing = sorted(candidate.sites - set(accepted))
    over = sorted(site for site, tpr in worst.items() if tpr > limit)
    if conflicts:
        detail = f"{len(conflicts)} site(s) published two different audit reports"
        return _hold(audit, candidate, CONFLICT, detail, limit, worst, sorted(conflicts))
    if missing:
        detail = f"{len(missing)} of {len(candidate.sites)} sites have not reported an audit"
        return _hold(audit, candidate, MISSING, detail, limit, worst, missing)
    if over:
        detail = (
            f"attack TPR at 0.1% FPR {max(worst[s] for s in over):.4f} exceeds the study's "
            f"limit {limit} at {len(over)} site(s)"
        )
        return _hold(audit, candidate, OVER_LIMIT, detail, limit, worst, over)
    detail = f"{len(worst)} site(s) audited, worst TPR at 0.1% FPR {max(worst.values()):.4f}"
    return GateDecision(True, PASSED, detail, limit, worst)


def _hold(
    audit: AuditLog,
    candidate: ReleaseCandidate,
    reason: str,
    detail: str,
    limit: float,
    worst: Mapping[str, float],
    sites: list[str],
) -> GateDecision:
    audit.append(
        "release",
        {
            "outcome": "held",
            "reason": reason,
            "detail": detail,
            "study_id": candidate.study_id,
            "version": candidate.version,
            "model_hash": candidate.model_hash.hex(),
            "limit": limit,
            "sites": sites,
        },
    )
    return GateDecision(False, reason, detail, limit, dict(worst))


def card_figures(reports: Iterable[PrivacyAuditReport]) -> dict[str, dict[str, float]]:
    """Per site: the strongest attack's AUC and TPRs, and the empirical and accountant
    epsilons where the model was DP-trained (for `ModelCard.privacy_audit`)."""
    return {report.site_id: report.headline() for report in sorted(reports, key=_site)}


def _site(report: PrivacyAuditReport) -> str:
    return report.site_id
