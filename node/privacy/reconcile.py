"""The privacy ledger against the audit log, both ways: a privacy budget never goes down.

The ledger (`node.privacy.ledger`) is charged before a round trains; the audit log records
the charge, with its accountant terms, once the round's shares are out (`epsilon-spent`:
study, round, epsilon, total, noise_multiplier, sample_rate, steps, delta, accountant).

- **Ledger ahead of the log** (`reconcile_epsilon_audit`, at start-up): a node killed while
  training leaves its newest charge unrecorded; the charge stands and is recorded with a
  note. Any other charge the log lacks means the log was restored from an older copy or the
  ledger was charged outside the daemon: it is recorded too, with that note, and reported
  (`epsilon-audit-behind`), since the ledger is the higher figure and stays the authority.
- **Ledger missing or behind the log** (`ledger_gap`): the log records a charge the ledger
  does not hold (deleted, restored from an older backup). A node would restart its budget
  from a lower figure, so it trains in no round (`ledger-behind`) until the ledger is
  restored from backup or rebuilt from the log.
- **Rebuild** (`rebuild_ledger`, `tessera node rebuild-ledger`): verify the log's hash chain
  (and its anchor, if given), then write the ledger from its `epsilon-spent` entries,
  keeping every round a readable ledger already holds: the union, never less. The composed
  total must reach what the log recorded, or nothing is written.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.errors import NodeError
from node.privacy.ledger import (
    PrivacyLedger,
    compose_epsilon,
    ledger_lock,
    new_ledger,
    read_ledger,
    write_ledger,
)
from tessera.governance.audit import Anchor, AuditLog, AuditVerificationError, read_entries
from tessera.observability.events import Event

log = logging.getLogger("tessera.node.privacy")

REBUILD_HINT = "tessera node rebuild-ledger --config <node.toml>"
TERMS = ("noise_multiplier", "sample_rate", "steps")
_REL = 1e-9  # float noise between a total recorded in JSON and the same total recomposed


@dataclass(frozen=True)
class AuditedCharge:
    """One round's `epsilon-spent` entry of the audit log."""

    round: int
    total: float  # the composed total the ledger reached with this round
    seq: int
    terms: tuple[float, float, int] | None  # None in entries written before terms were
    delta: float | None
    accountant: str | None


def charge_fields(
    ledger: PrivacyLedger, charge: Mapping[str, Any], epsilon: float, **more: Any
) -> dict[str, Any]:
    """The fields of the `epsilon-spent` entry of `charge` (a ledger round, or a RoundCharge
    as a dict): enough to rebuild the ledger from the audit log alone."""
    return {
        "study_id": ledger.study_id, "round": int(charge["round"]), "epsilon": epsilon,
        "total": float(charge["epsilon_total"]),
        "noise_multiplier": float(charge["noise_multiplier"]),
        "sample_rate": float(charge["sample_rate"]), "steps": int(charge["steps"]),
        "delta": ledger.delta, "accountant": ledger.accountant, **more,
    }  # fmt: skip


def audited_charges(audit_path: Path, study_id: str, anchor: Anchor | None = None
                    ) -> dict[int, AuditedCharge]:  # fmt: skip
    """Every round of `study_id` the audit log records a charge for (the first entry of a
    round); AuditVerificationError when the chain (or the anchor) does not verify."""
    found: dict[int, AuditedCharge] = {}
    for entry in read_entries(audit_path, anchor):
        fields = entry.fields
        if entry.kind != "epsilon-spent" or fields.get("study_id") != study_id:
            continue
        number = int(fields["round"])
        if number in found:
            continue
        terms = None
        if all(name in fields for name in TERMS):
            terms = (float(fields["noise_multiplier"]), float(fields["sample_rate"]),
                     int(fields["steps"]))  # fmt: skip
        total = float(fields.get("total", fields["epsilon"]))
        delta = float(fields["delta"]) if "delta" in fields else None
        accountant = str(fields["accountant"]) if "accountant" in fields else None
        found[number] = AuditedCharge(number, total, entry.seq, terms, delta, accountant)
    return found


@dataclass(frozen=True)
class LedgerGap:
    """The ledger holds less than the audit log records: the node must not train."""

    path: Path
    ledger_epsilon: float
    audit_epsilon: float
    missing_rounds: tuple[int, ...]

    @property
    def reason(self) -> str:
        """What is wrong and the fix, for the log, the refusal and `/readyz`."""
        state = "missing" if not self.path.exists() else "behind the audit log"
        rounds = ", ".join(str(r) for r in self.missing_rounds) or "none"
        return (
            f"privacy ledger {self.path} is {state}: it records epsilon "
            f"{self.ledger_epsilon:.4g}, the audit log {self.audit_epsilon:.4g} (rounds the "
            f"ledger lacks: {rounds}); this node trains in no round until the ledger is "
            f"restored from backup or rebuilt from the audit log with `{REBUILD_HINT}`"
        )


def ledger_gap(ledger: PrivacyLedger, audit_path: Path) -> LedgerGap | None:
    """Re-read the ledger and compare it with the audit log: a LedgerGap if the log records
    a round the ledger lacks or a higher total, else None."""
    ledger.reload()
    charges = audited_charges(audit_path, ledger.study_id)
    held = {int(r["round"]) for r in ledger.rounds}
    missing = tuple(sorted(set(charges) - held))
    audit_epsilon = max((c.total for c in charges.values()), default=0.0)
    spent = ledger.spent
    if missing or spent < audit_epsilon * (1 - _REL):
        return LedgerGap(ledger.path, spent, audit_epsilon, missing)
    return None


def reconcile_epsilon_audit(ledger: PrivacyLedger, audit: AuditLog) -> int:
    """Append an `epsilon-spent` entry for every round the ledger charged but the audit log
    does not record; return how many. Call at start-up (see the module docstring)."""
    logged = set(audited_charges(audit.path, ledger.study_id))
    charges = ledger.rounds
    newest = max((int(c["round"]) for c in charges), default=None)
    added, unrecorded, before = 0, [], 0.0
    for charge in charges:
        total, number = float(charge["epsilon_total"]), int(charge["round"])
        if number not in logged:
            if number == newest:
                note = "charged before training; the node stopped before the round finished"
            else:
                note = ("the audit log did not record this charge (restored from an older "
                        "copy, or the ledger was charged outside the node daemon)")  # fmt: skip
                unrecorded.append(number)
            audit.append("epsilon-spent", charge_fields(ledger, charge, max(0.0, total - before),
                                                        note=note))  # fmt: skip
            added += 1
        before = total
    if unrecorded:
        fields = {"study": ledger.study_id, "rounds": unrecorded, "epsilon": ledger.spent}
        log.warning(Event.EPSILON_AUDIT_BEHIND, extra={"fields": fields})
    return added


@dataclass(frozen=True)
class RebuildReport:
    """What `rebuild_ledger` did."""

    entries: int  # audit entries verified
    rounds: tuple[int, ...]  # the rebuilt ledger's rounds
    restored: tuple[int, ...]  # of them, taken from the audit log
    epsilon_before: float
    epsilon_after: float
    audit_epsilon: float
    delta: float
    accountant: str
    moved_aside: Path | None


def rebuild_ledger(
    path: Path, audit_path: Path, study_id: str, anchor: Anchor | None = None
) -> RebuildReport:
    """Rebuild the ledger at `path` from the verified audit log at `audit_path` (module
    docstring) and record a `ledger-rebuilt` entry. NodeError, with the fix, when it cannot
    be done safely; then nothing is written."""
    try:
        with AuditLog.open(audit_path, counts_only=True) as audit:  # verifies, or refuses
            entries = len(read_entries(audit.path, anchor))
            charges = audited_charges(audit.path, study_id, anchor)
            report = _rebuild(path, study_id, charges, entries)
            audit.append("ledger-rebuilt", {
                "study_id": study_id, "rounds": len(report.rounds),
                "restored": len(report.restored), "epsilon_before": report.epsilon_before,
                "epsilon": report.epsilon_after,
            })  # fmt: skip
    except AuditVerificationError as error:
        raise NodeError(
            f"{error}; a ledger is rebuilt only from a log whose chain verifies: restore the "
            "ledger (or the audit log) from backup"
        ) from None
    return report


def _rebuild(
    path: Path, study_id: str, charges: dict[int, AuditedCharge], entries: int
) -> RebuildReport:
    if not charges:
        raise NodeError(
            f"the audit log records no epsilon spent on study {study_id!r}: there is nothing "
            "to rebuild (check the study id and the state folder)"
        )
    delta, accountant = _accounting(charges)
    with ledger_lock(path):
        data, moved = _existing(path, study_id, delta, accountant)
        before = max((float(r["epsilon_total"]) for r in data["rounds"]), default=0.0)
        held = {int(r["round"]): r for r in data["rounds"]}
        restored = tuple(sorted(set(charges) - set(held)))
        for number in set(charges) & set(held):
            _same_terms(charges[number], held[number])
        history = sorted(
            [(int(r["round"]), _terms_of(r)) for r in held.values()]
            + [(n, _need_terms(charges[n])) for n in restored]
        )
        rounds = _recompose(history, delta, accountant, held, charges)
        after = rounds[-1]["epsilon_total"]
        recorded = max(c.total for c in charges.values())
        if after < recorded * (1 - _REL):
            raise NodeError(
                f"the audit log records epsilon {recorded:.6g} for study {study_id!r}, but its "
                f"charges and the ledger's compose to only {after:.6g}: a charge is missing "
                "from both; restore the ledger from backup"
            )
        write_ledger(path, {**data, "rounds": rounds})
    return RebuildReport(entries, tuple(n for n, _ in history), restored, before, after,
                         recorded, delta, accountant, moved)  # fmt: skip


def _accounting(charges: dict[int, AuditedCharge]) -> tuple[float, str]:
    pairs = {(c.delta, c.accountant) for c in charges.values()}
    if len(pairs) != 1 or None in next(iter(pairs)):
        raise NodeError(
            "the audit log's epsilon-spent entries do not all name one delta and accountant "
            "(entries written before the log recorded them, or edited): restore the ledger "
            "from backup"
        )
    delta, accountant = next(iter(pairs))
    assert delta is not None and accountant is not None
    return delta, accountant


def _existing(
    path: Path, study_id: str, delta: float, accountant: str
) -> tuple[dict[str, Any], Path | None]:
    """The ledger already at `path` (an unreadable one is moved aside, kept as evidence)."""
    if not path.exists():
        return new_ledger(study_id, accountant, delta), None
    try:
        data = read_ledger(path)
    except NodeError:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = path.with_name(f"{path.name}.unreadable-{stamp}")
        path.rename(aside)
        return new_ledger(study_id, accountant, delta), aside
    for key, want in (("study_id", study_id), ("delta", delta), ("accountant", accountant)):
        if data.get(key) != want:
            raise NodeError(
                f"privacy ledger {path} records {key}={data.get(key)!r}, the audit log "
                f"{want!r}: they are not the same study's accounting; check the state folder"
            )
    return data, None


def _terms_of(charge: dict[str, Any]) -> tuple[float, float, int]:
    return (float(charge["noise_multiplier"]), float(charge["sample_rate"]),
            int(charge["steps"]))  # fmt: skip


def _need_terms(charge: AuditedCharge) -> tuple[float, float, int]:
    if charge.terms is None:
        raise NodeError(
            f"the audit log's charge of round {charge.round} (entry {charge.seq}) does not "
            "record its accountant terms (written by an older version): restore the ledger "
            "from backup"
        )
    return charge.terms


def _same_terms(charge: AuditedCharge, held: dict[str, Any]) -> None:
    if charge.terms is not None and not all(
        math.isclose(a, b, rel_tol=_REL) for a, b in zip(charge.terms, _terms_of(held), strict=True)
    ):
        raise NodeError(
            f"round {charge.round}: the ledger charged terms {_terms_of(held)}, the audit log "
            f"(entry {charge.seq}) {charge.terms}; one of them was altered: restore from backup"
        )


def _recompose(
    history: list[tuple[int, tuple[float, float, int]]],
    delta: float,
    accountant: str,
    held: dict[int, dict[str, Any]],
    charges: dict[int, AuditedCharge],
) -> list[dict[str, Any]]:
    """The ledger's rounds, oldest first; each round's epsilons are composed anew from the
    first round the ledger did not hold (before it, the held figures stand)."""
    rounds: list[dict[str, Any]] = []
    terms: list[tuple[float, float, int]] = []
    changed = False
    for number, term in history:
        terms.append(term)
        noise, rate, steps = term
        kept = held.get(number)
        changed = changed or kept is None
        if kept is not None:
            alone, when, more = float(kept["epsilon_round"]), kept["at"], {}
        else:
            alone = compose_epsilon([term], delta, accountant)
            when = dt.datetime.now(dt.UTC).timestamp()
            more = {"rebuilt_from_audit_entry": charges[number].seq}
        total = (compose_epsilon(terms, delta, accountant) if changed or kept is None
                 else float(kept["epsilon_total"]))  # fmt: skip
        rounds.append({"round": number, "noise_multiplier": noise, "sample_rate": rate,
                       "steps": steps, "epsilon_round": alone, "epsilon_total": total,
                       "at": when, **more})  # fmt: skip
    return rounds
