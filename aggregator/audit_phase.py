"""The AUDITING stage of a round, for studies that require a privacy audit before every
release (manifest term `privacy_audit`; the checks and the gate are aggregator.privacy_gate).

The release built after combining is a candidate. The leader publishes it, signed by itself
only, to each participant's own candidate topic, so that no other site can read it. Each
participating site audits it and publishes a signed report of aggregate figures. Each
aggregator checks every report against its *own* candidate, so that a leader cannot have
sites audit another model. A report may overtake this aggregator's combining: it is
verified and kept, and checked once the candidate exists. Once every participant reported
(or at `round.audit_timeout_s`) the gate runs. A pass re-cards the release with the figures
and the signature exchange follows. A hold (a site over the study's limit, or reports
missing at the deadline) is written to the audit log, and the round aborts: nothing is
released.

`AuditPhase` keeps no round of its own: it works on the service's held RoundContext.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aggregator.config import AggregatorConfig
from aggregator.errors import MessageRejected
from aggregator.privacy_gate import (
    AuditSetup,
    GateDecision,
    ReleaseCandidate,
    card_figures,
    check_report,
    gate_release,
)
from aggregator.release_build import BuiltRelease, with_audit_figures
from aggregator.round_context import RoundContext, ms
from aggregator.rounds import CandidateBuilt, Stage
from aggregator.signed_messages import Outgoing, Publisher
from broker import topics
from tessera.errors import TesseraError
from tessera.governance.privacy_report import report_from_json, verify_report
from tessera.limits import MAX_AUDIT_REPORT_BYTES
from tessera.observability.events import Event

# One logger for all of the service's events (`tessera.aggregator.service`), wherever the
# step lives: operators and the README filter on it.
log = logging.getLogger("tessera.aggregator.service")


def candidate_of(current: RoundContext) -> ReleaseCandidate:
    """What the sites audit: the round's candidate model and the sites that trained it."""
    assert current.candidate is not None
    return ReleaseCandidate(
        study_id=current.announcement.study_id,
        version=current.version,
        model_hash=current.candidate.release.model_hash,
        sites=frozenset(current.state.participants or ()),
    )


def log_refused_report(exc: Exception) -> None:
    """Log a report that was dropped (the reason names no share content and no PHI)."""
    log.warning(
        Event.MESSAGE_REJECTED,
        extra={"fields": {"kind": "AUDIT", "error": type(exc).__name__, "reason": str(exc)}},
    )


class AuditPhase:
    """The privacy audit of one study's candidates (see the module docstring)."""

    def __init__(
        self,
        setup: AuditSetup,
        config: AggregatorConfig,
        publisher: Publisher,
        clock: Callable[[], float],
    ) -> None:
        self.setup, self.config, self.publisher, self.clock = setup, config, publisher, clock

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def open(self, current: RoundContext, candidate: BuiltRelease) -> list[Outgoing]:
        """Keep the candidate, move to AUDITING, check the reports that came early, and
        (leader) address one copy of the candidate to each participant."""
        a = current.announcement
        current.candidate = candidate
        current.move(CandidateBuilt())
        current.audit_deadline_ms = self._now_ms() + ms(self.config.round.audit_timeout_s)
        current.stall_ms = current.audit_deadline_ms + ms(self.config.round.agreement_timeout_s)
        early, current.reports = current.reports, {}
        for site, report in sorted(early.items()):
            try:
                check_report(report, self.setup.manifest, candidate_of(current), current.reports)
            except TesseraError as exc:
                log_refused_report(exc)
                continue
            current.reports[site] = report
        log.info(
            Event.CANDIDATE_BUILT,
            extra={"fields": {"round": a.round, "version": candidate.release.version}},
        )
        if not self.config.is_leader:
            return []
        # One copy per participant, each on its own topic: no other site sees the model.
        envelope = self.publisher.seal(candidate.release)
        return [
            Outgoing(topics.candidate_topic(a.federation_id, a.study_id, node), envelope)
            for node in current.state.participants or ()
        ]

    def admit_report(
        self, topic: topics.Topic, payload: bytes, current: RoundContext | None
    ) -> None:
        """Keep a site's signed report for the round in progress, or raise why not: it is
        verified now and checked against our own candidate once that exists (a report may
        overtake this aggregator's combining). A repeat of the same report counts once; a
        second, different one from the same site is a conflict, which holds the release."""
        if len(payload) > MAX_AUDIT_REPORT_BYTES:
            raise MessageRejected(
                f"audit report of {len(payload)} bytes is over the limit of "
                f"{MAX_AUDIT_REPORT_BYTES}"
            )
        report = report_from_json(payload)
        routed = (topic.federation, topic.study, topic.node) == (
            report.federation_id, report.study_id, report.site_id,
        )  # fmt: skip
        if not routed:
            raise MessageRejected("audit report arrived on a topic meant for another")
        verify_report(report, self.setup.manifest)  # AuthenticationError, vague
        if current is None or current.is_over:
            raise MessageRejected("no round is waiting for audit reports")
        if report.model_round != current.state.round or report.study_id != self.config.study_id:
            raise MessageRejected(
                f"audit report is for round {report.model_round}, not round {current.state.round}"
            )
        first = current.reports.get(report.site_id)
        if first is not None and first.signed_bytes() == report.signed_bytes():
            raise MessageRejected(f"audit report from {report.site_id!r} repeated; it counts once")
        if first is not None:
            # Two different reports from one site: whichever reached which aggregator first,
            # the release is held at every aggregator that sees both (never two cards).
            current.audit_conflicts.add(report.site_id)
            log.warning(
                Event.AUDIT_REPORT_CONFLICT,
                extra={"fields": {"round": report.model_round, "site": report.site_id}},
            )
            return
        if current.candidate is not None:
            check_report(report, self.setup.manifest, candidate_of(current), current.reports)
        current.reports[report.site_id] = report
        log.info(
            Event.AUDIT_REPORT,
            extra={"fields": {"round": report.model_round, "site": report.site_id}},
        )

    def gate(self, current: RoundContext, final: bool) -> GateDecision | None:
        """The release gate, once every participant reported (or, `final`, at the audit
        deadline); None while it waits. On a pass the round's release to sign is the
        candidate re-carded with the figures; a hold is in the audit log, the caller aborts."""
        if current.state.stage is not Stage.AUDITING:
            return None
        # A site's two different reports hold the release even after a pass, as long as this
        # aggregator may still abort: a follower whose note is out leaves that to the leader.
        conflict = bool(current.audit_conflicts) and not current.note_sent
        if current.built is not None and not conflict:
            return None
        candidate = candidate_of(current)
        if not final and not conflict and candidate.sites - set(current.reports):
            return None
        decision = gate_release(
            self.setup.manifest, candidate, current.reports.values(), self.setup.log,
            conflicts=current.audit_conflicts,
        )  # fmt: skip
        if not decision.release:
            return decision
        log.info(
            Event.AUDIT_PASSED,
            extra={"fields": {"round": current.state.round, "detail": decision.detail}},
        )
        assert current.candidate is not None
        figures = card_figures(current.reports.values())
        current.built = with_audit_figures(
            current.candidate, figures, self.publisher.sender, self.publisher.key
        )
        current.stall_ms = self._now_ms() + ms(self.config.round.agreement_timeout_s)
        return decision
