"""The privacy-audit release gate: a release that breaks the study's limit at any site is
held (and the hold audited), one within it goes through; bad reports are refused; the model
card records the figures."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from aggregator.model_card import card_from_bytes
from aggregator.privacy_gate import (
    MISSING,
    NOT_REQUIRED,
    OVER_LIMIT,
    PASSED,
    AuditReportRefused,
    ReleaseCandidate,
    card_figures,
    check_report,
    gate_release,
)
from tessera.errors import AuthenticationError
from tessera.governance.audit import AuditLog, read_entries
from tessera.governance.privacy_report import AttackFigures, PrivacyAuditReport, Rate, sign_report
from tests.aggregator.test_registry import card
from tests.support.governance import STUDY_ID, Federation, build_federation

LIMIT = 0.05
MODEL = hashlib.sha256(b"the candidate weights").digest()


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    root = tmp_path_factory.mktemp("gate")
    return build_federation(root, n_sites=3, study={"privacy_audit": {"max_tpr_at_0_1pct_fpr":
                                                                     LIMIT}})  # fmt: skip


def _candidate(fed: Federation) -> ReleaseCandidate:
    return ReleaseCandidate(STUDY_ID, 4, MODEL, frozenset(fed.site_ids))


def _report(fed: Federation, site: str, tpr: float, **changes: object) -> PrivacyAuditReport:
    rate = Rate(0.5, 0.45, 0.55)
    strong = AttackFigures(rate, rate, Rate(tpr, 0.0, min(1.0, tpr + 0.02)), rate, 0.1)
    weak = AttackFigures(rate, rate, Rate(0.0, 0.0, 0.01), rate, 0.0)
    fields: dict[str, object] = dict(
        federation_id=fed.manifest.federation_id, study_id=STUDY_ID, site_id=site,
        model_version=4, model_round=4, model_hash=MODEL, members=400, non_members=100,
        shadow_models=8, shadow_epochs=2, bootstrap=200, confidence=0.95,
        attacks={"lira": strong, "loss": weak}, accountant_epsilon=2.0, delta=1e-5,
    )  # fmt: skip
    fields.update(changes)
    report = PrivacyAuditReport(**fields)  # type: ignore[arg-type]
    return sign_report(report, fed.keys[f"node-{site}"])


def _log(tmp_path: Path) -> AuditLog:
    return AuditLog.open(tmp_path / "audit.log")


def test_release_within_the_limit_goes_through(fed: Federation, tmp_path: Path) -> None:
    reports = [_report(fed, site, 0.01) for site in fed.site_ids]
    with _log(tmp_path) as log:
        decision = gate_release(fed.manifest, _candidate(fed), reports, log)
    assert decision.release and decision.reason == PASSED
    assert decision.worst_tpr == {site: 0.01 for site in fed.site_ids}
    assert list(read_entries(tmp_path / "audit.log")) == []  # nothing held, nothing logged


def test_release_over_the_limit_at_one_site_is_held_and_audited(
    fed: Federation, tmp_path: Path
) -> None:
    reports = [_report(fed, site, 0.01) for site in fed.site_ids[:-1]]
    reports.append(_report(fed, fed.site_ids[-1], 0.2))  # LiRA beats the limit at one site
    with _log(tmp_path) as log:
        decision = gate_release(fed.manifest, _candidate(fed), reports, log)
    assert not decision.release and decision.reason == OVER_LIMIT
    assert "0.2000 exceeds the study's limit 0.05 at 1 site" in decision.detail
    [entry] = read_entries(tmp_path / "audit.log")
    assert entry.kind == "release"
    assert entry.fields["outcome"] == "held" and entry.fields["reason"] == OVER_LIMIT
    assert entry.fields["sites"] == [fed.site_ids[-1]]
    assert entry.fields["model_hash"] == MODEL.hex() and entry.fields["limit"] == LIMIT


def test_release_with_a_missing_site_is_held(fed: Federation, tmp_path: Path) -> None:
    reports = [_report(fed, site, 0.0) for site in fed.site_ids[:2]]
    with _log(tmp_path) as log:
        decision = gate_release(fed.manifest, _candidate(fed), reports, log)
    assert not decision.release and decision.reason == MISSING
    assert [e.fields["reason"] for e in read_entries(tmp_path / "audit.log")] == [MISSING]


def test_study_without_the_term_needs_no_audit(tmp_path: Path) -> None:
    plain = build_federation(tmp_path / "plain", n_sites=2)
    with _log(tmp_path) as log:
        decision = gate_release(plain.manifest, _candidate(plain), [], log)
    assert decision.release and decision.reason == NOT_REQUIRED


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"model_hash": hashlib.sha256(b"other").digest()}, "wrong-model"),
        ({"model_version": 3}, "wrong-model"),
        ({"study_id": "other-study"}, "wrong-study"),
    ],
)
def test_reports_for_another_model_or_study_are_refused(
    fed: Federation, changes: dict[str, object], reason: str
) -> None:
    report = _report(fed, fed.site_ids[0], 0.0, **changes)
    with pytest.raises(AuditReportRefused) as caught:
        check_report(report, fed.manifest, _candidate(fed))
    assert caught.value.reason == reason


def test_forged_and_duplicate_reports_are_refused(fed: Federation) -> None:
    site = fed.site_ids[0]
    good = _report(fed, site, 0.0)
    candidate = _candidate(fed)
    forged = sign_report(good, fed.keys[f"node-{fed.site_ids[1]}"])  # another site's key
    with pytest.raises(AuthenticationError):
        check_report(forged, fed.manifest, candidate)
    with pytest.raises(AuditReportRefused, match="already reported"):
        check_report(good, fed.manifest, candidate, seen={site})
    outsider = ReleaseCandidate(STUDY_ID, 4, MODEL, frozenset(fed.site_ids[1:]))
    with pytest.raises(AuditReportRefused, match="did not train"):
        check_report(good, fed.manifest, outsider)


def test_model_card_records_the_figures_per_site_or_only_the_worst(fed: Federation) -> None:
    reports = [_report(fed, site, 0.01 * (i + 1)) for i, site in enumerate(fed.site_ids)]
    figures = card_figures(reports)
    assert set(figures) == set(fed.site_ids)
    assert figures[fed.site_ids[2]]["tpr_at_0_1pct_fpr"] == pytest.approx(0.03)
    named = card_from_bytes(card(1, privacy_audit=figures).to_bytes())
    assert set(named["privacy_audit"]["per_site"]) == set(fed.site_ids)
    # Fewer sites than k = 3: only the count and the worst figures, no site named.
    hidden = card_from_bytes(card(1, privacy_audit=dict(list(figures.items())[:2])).to_bytes())
    assert hidden["privacy_audit"] == {
        "sites": 2, "worst": {**figures[fed.site_ids[1]], "auc": 0.5},
    }  # fmt: skip
    # A card without an audit has the same bytes as before the field existed.
    assert "privacy_audit" not in card_from_bytes(card(1).to_bytes())
