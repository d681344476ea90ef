"""A node killed between charging its privacy ledger and auditing the round: at its next
start, `reconcile_epsilon_audit` records the charge, and ledger and audit log agree."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.privacy.ledger import PrivacyLedger
from node.round.participation import reconcile_epsilon_audit
from tessera.governance.audit import AuditLog, epsilon_by_study, read_entries


def test_a_charge_without_an_audit_entry_is_recorded_once(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.json", "study", 100.0, 1e-5)
    first = ledger.charge_round(1, 1.0, 0.1, 10)
    with AuditLog.open(tmp_path / "audit.log", counts_only=True) as audit:
        audit.append("epsilon-spent", {"study_id": "study", "round": 1,
                                       "epsilon": first.epsilon_total,
                                       "total": first.epsilon_total})  # fmt: skip
        second = ledger.charge_round(2, 1.0, 0.1, 10)  # ...and the node is killed here
        assert epsilon_by_study(read_entries(audit.path))["study"] < ledger.spent
        assert reconcile_epsilon_audit(ledger, audit) == 1
        assert reconcile_epsilon_audit(ledger, audit) == 0
    entries = [e for e in read_entries(tmp_path / "audit.log") if e.kind == "epsilon-spent"]
    assert [e.fields["round"] for e in entries] == [1, 2]
    assert entries[1].fields["total"] == pytest.approx(second.epsilon_total)
    assert "stopped before the round finished" in entries[1].fields["note"]
    assert epsilon_by_study(read_entries(tmp_path / "audit.log"))["study"] == pytest.approx(
        ledger.spent
    )
