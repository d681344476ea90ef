"""The privacy ledger against the audit log, both ways, on real files (real accountant, real
hash-chained log): a killed node's charge is recorded once; a ledger ahead by more than that
is reported; a ledger missing or behind is a gap; a rebuild from the verified log restores
it, never lower, and refuses a log whose chain does not verify."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from node.errors import NodeError
from node.privacy.ledger import PrivacyLedger, compose_epsilon
from node.privacy.reconcile import (
    charge_fields,
    ledger_gap,
    rebuild_ledger,
    reconcile_epsilon_audit,
)
from tessera.governance.audit import AuditLog, epsilon_by_study, read_entries
from tessera.observability.events import Event

STUDY = "study"


def charge_and_audit(ledger: PrivacyLedger, audit: AuditLog, round_number: int) -> float:
    """One DP round as `participate` records it: charged, then audited with its terms."""
    before = ledger.spent
    charge = ledger.charge_round(round_number, 1.0, 0.1, 10 + round_number)
    epsilon = charge.epsilon_total - before
    audit.append("epsilon-spent", charge_fields(ledger, dataclasses.asdict(charge), epsilon))
    return charge.epsilon_total


def test_a_charge_without_an_audit_entry_is_recorded_once(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json", STUDY, 100.0, 1e-5)
    with AuditLog.open(tmp_path / "audit.log", counts_only=True) as audit:
        charge_and_audit(ledger, audit, 1)
        second = ledger.charge_round(2, 1.0, 0.1, 10)  # ...and the node is killed here
        assert epsilon_by_study(read_entries(audit.path))[STUDY] < ledger.spent
        assert reconcile_epsilon_audit(ledger, audit) == 1
        assert reconcile_epsilon_audit(ledger, audit) == 0
        assert ledger_gap(ledger, audit.path) is None
    entries = [e for e in read_entries(tmp_path / "audit.log") if e.kind == "epsilon-spent"]
    assert [e.fields["round"] for e in entries] == [1, 2]
    assert entries[1].fields["total"] == pytest.approx(second.epsilon_total)
    assert "stopped before the round finished" in entries[1].fields["note"]
    assert entries[1].fields["steps"] == 10  # the terms a rebuild needs
    assert epsilon_by_study(read_entries(tmp_path / "audit.log"))[STUDY] == pytest.approx(
        ledger.spent
    )


def test_a_ledger_ahead_by_more_than_the_interrupted_round_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The audit log restored from an older copy: every charge it lacks is recorded, and all
    but the newest are said to be what they are, not an interrupted round."""
    ledger = PrivacyLedger(tmp_path / "ledger.json", STUDY, 100.0, 1e-5)
    for number in (1, 2, 3):
        ledger.charge_round(number, 1.0, 0.1, 10)
    with caplog.at_level(logging.WARNING), AuditLog.open(tmp_path / "audit.log") as audit:
        assert reconcile_epsilon_audit(ledger, audit) == 3
    notes = [e.fields["note"] for e in read_entries(tmp_path / "audit.log")]
    assert all("did not record this charge" in note for note in notes[:2])
    assert "stopped before the round finished" in notes[2]
    (record,) = [r for r in caplog.records if r.msg == Event.EPSILON_AUDIT_BEHIND]
    assert record.fields["rounds"] == [1, 2]  # type: ignore[attr-defined]


def test_a_lost_ledger_is_a_gap_until_rebuilt_and_the_budget_continues(tmp_path: Path) -> None:
    path = tmp_path / "privacy" / f"{STUDY}.json"
    ledger = PrivacyLedger(path, STUDY, 100.0, 1e-5)
    with AuditLog.open(tmp_path / "audit.log", counts_only=True) as audit:
        for number in (1, 2):
            charge_and_audit(ledger, audit, number)
        backup = path.read_bytes()
        charge_and_audit(ledger, audit, 3)
        spent = ledger.spent

        path.unlink()  # lost: a fresh ledger would start at 0
        gap = ledger_gap(ledger, audit.path)
        assert gap is not None and gap.missing_rounds == (1, 2, 3)
        assert gap.ledger_epsilon == 0 and gap.audit_epsilon == pytest.approx(spent)
        assert "missing" in gap.reason and "tessera node rebuild-ledger" in gap.reason

        path.write_bytes(backup)  # an older backup: behind by round 3
        gap = ledger_gap(ledger, audit.path)
        assert gap is not None and gap.missing_rounds == (3,) and "behind" in gap.reason

        report = rebuild_ledger(path, audit.path, STUDY)
        assert report.rounds == (1, 2, 3) and report.restored == (3,)
        assert report.epsilon_after == pytest.approx(spent)
        assert report.epsilon_before < report.epsilon_after
        assert ledger_gap(ledger, audit.path) is None
        assert ledger.spent == pytest.approx(spent, rel=1e-12)
        unbroken = compose_epsilon([(1.0, 0.1, 10 + n) for n in (1, 2, 3, 4)], 1e-5, "rdp")
        assert ledger.charge_round(4, 1.0, 0.1, 14).epsilon_total == pytest.approx(unbroken)
        again = rebuild_ledger(path, audit.path, STUDY)  # round 4 is in the ledger only: kept
        assert again.rounds == (1, 2, 3, 4) and again.epsilon_after == pytest.approx(ledger.spent)
    (rebuilt, _) = [e for e in read_entries(audit.path) if e.kind == "ledger-rebuilt"]
    assert rebuilt.fields["restored"] == 1


def test_a_rebuild_needs_a_verified_chain_and_writes_nothing_otherwise(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, STUDY, 100.0, 1e-5)
    with AuditLog.open(tmp_path / "audit.log") as audit:
        for number in (1, 2):
            charge_and_audit(ledger, audit, number)
    path.unlink()
    lines = (tmp_path / "audit.log").read_text().splitlines()
    edited = json.loads(lines[0])
    edited["fields"]["steps"] = 1  # a smaller charge, to lower the rebuilt budget
    (tmp_path / "audit.log").write_text("\n".join([json.dumps(edited), *lines[1:]]) + "\n")
    with pytest.raises(NodeError, match=r"line 1.*restore the ledger"):
        rebuild_ledger(path, tmp_path / "audit.log", STUDY)
    assert not path.exists()
