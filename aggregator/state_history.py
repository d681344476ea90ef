"""What an aggregator's state folder says happened, apart from its SQLite store, and the
start-up check that the store is not behind it (issue 19, point 3).

Two records outlive a lost store: the registry's folders (`models/<study hex>/<version>/`,
each with the release every aggregator signed) and the hash-chained audit log (every round
opened, every participant set summed, every release and abort). Both are written only after
the store's own commit (a round is created in the store before `round-opened` is appended;
a version is registered before `release` is), so neither can legitimately be ahead of the
store. One exception: a crash between a version's files and its store transaction leaves one
unregistered folder, the store's newest version + 1, which the next registration overwrites;
that alone is not a lost store.

So a store that holds fewer rounds than the audit log names, or older versions than the
audit log or the registry hold, was lost, emptied or restored from an older backup. Starting
on it would reopen round 1 from the genesis model: the other aggregators refuse a base model
they do not hold, the nodes refuse a round number they already answered, and the federation
stalls for good. `open_checked_store` refuses to start instead and names the fix:
`tessera aggregator rebuild-state` (aggregator.rebuild).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from aggregator.errors import StoreError
from aggregator.layout import StateLayout
from aggregator.store import Store
from tessera.governance.audit import Anchor, AuditEntry, read_entries
from tessera.wire.release import RELEASE_FILE

# The audit kinds that name a round of a study (aggregator.daemon writes them).
ROUND_KINDS = frozenset({"round-opened", "participant-set", "release", "round-aborted"})


@dataclass(frozen=True)
class SummedSet:
    """A `participant-set` entry: this aggregator decided its partial sum over `nodes`."""

    round: int
    nodes: tuple[str, ...]


@dataclass
class AuditHistory:
    """One study's rounds as the audit log records them."""

    entries: int = 0  # every entry of the log, whichever study
    anchor: Anchor | None = None  # the log's last entry
    opened: dict[int, dict[str, object]] = field(default_factory=dict)  # round -> fields
    summed: list[SummedSet] = field(default_factory=list)
    released: dict[int, tuple[int, str]] = field(default_factory=dict)  # version -> round, hash
    aborted: dict[int, str] = field(default_factory=dict)  # round -> reason

    @property
    def latest_round(self) -> int:
        """The highest round number the log names for the study (0: none)."""
        rounds = [*self.opened, *self.aborted, *(s.round for s in self.summed)]
        rounds += [number for number, _ in self.released.values()]
        return max(rounds, default=0)

    @property
    def latest_version(self) -> int:
        """The highest released version the log names for the study (0: none)."""
        return max(self.released, default=0)


def read_audit_history(path: Path, study_id: str, anchor: Anchor | None = None) -> AuditHistory:
    """The study's rounds from the audit log at `path`, after verifying its chain (and the
    anchor, if given); AuditVerificationError naming the first bad line otherwise. A missing
    log is an empty history."""
    if not path.exists():
        return AuditHistory()
    entries = read_entries(path, anchor)
    history = AuditHistory(len(entries), Anchor(entries[-1].seq, entries[-1].hash) if entries
                           else None)  # fmt: skip
    for entry in entries:
        if entry.kind in ROUND_KINDS and entry.fields.get("study_id") == study_id:
            _note(history, entry)
    return history


def _note(history: AuditHistory, entry: AuditEntry) -> None:
    fields, number = entry.fields, int(entry.fields["round"])
    if entry.kind == "round-opened":
        history.opened[number] = dict(fields)
    elif entry.kind == "participant-set":
        history.summed.append(SummedSet(number, tuple(sorted(fields["nodes"]))))
    elif entry.kind == "release":
        history.released[int(fields["version"])] = (number, str(fields["model_hash"]))
    else:
        history.aborted[number] = str(fields.get("reason", ""))


def registry_versions(registry_root: Path, study_id: str) -> dict[int, Path]:
    """The versions whose folder under the registry holds a signed release, by number."""
    folder = registry_root / study_id.encode("utf-8").hex()
    if not folder.is_dir():
        return {}
    return {
        int(child.name): child
        for child in folder.iterdir()
        if child.name.isdigit() and (child / RELEASE_FILE).is_file()
    }


def check_not_behind(
    store_path: Path, held_round: int, held_version: int, layout: StateLayout, study_id: str
) -> None:
    """StoreError naming the fix when the store (newest round `held_round`, newest version
    `held_version`) is behind the audit log or the registry (see the module docstring)."""
    history = read_audit_history(layout.audit_log, study_id)
    on_disk = max(registry_versions(layout.registry, study_id), default=0)
    logged, behind = [], []
    if history.latest_round > held_round:
        logged.append(f"round {history.latest_round}")
    if history.latest_version > held_version:
        logged.append(f"the release of version {history.latest_version}")
    if logged:
        behind.append(f"the audit log records {' and '.join(logged)}")
    if on_disk > held_version + 1:
        behind.append(f"models/ holds version {on_disk}")
    if not behind:
        return
    held = (
        f"the store holds round {held_round} and version {held_version}"
        if held_round or held_version
        else "the store is empty or missing"
    )
    raise StoreError(
        f"state store {store_path} is behind this aggregator's own history: "
        f"{'; '.join(behind)}; but {held}. It was lost, emptied or restored from an older "
        "backup; starting on it would reopen rounds from the genesis model and stall the "
        f"federation. Move {store_path.name} aside (keep it) and run `tessera aggregator "
        "rebuild-state --config <this aggregator's config>`, which rebuilds it from the "
        "signed releases in models/ and the audit log; or restore a backup of the whole "
        "state folder taken at one time"
    )


def store_is_blank(path: Path) -> bool:
    """True when the store file is missing or has no bytes (SQLite would create it anew)."""
    return not path.exists() or path.stat().st_size == 0


def open_checked_store(layout: StateLayout, study_id: str) -> Store:
    """Open the store for the daemon, refusing one that is behind its own history (the
    module docstring). A missing or empty file is checked before SQLite touches it, so a
    refusal creates nothing."""
    if store_is_blank(layout.database):
        check_not_behind(layout.database, 0, 0, layout, study_id)
    store = Store(layout.database, layout.shares)
    try:
        versions = [record.version for record in store.list_models(study_id)]
        held_round = store.latest_round(study_id) or 0
        check_not_behind(layout.database, held_round, max(versions, default=0), layout,
                         study_id)  # fmt: skip
    except BaseException:
        store.close()
        raise
    return store
