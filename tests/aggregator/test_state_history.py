"""The start-up check that an aggregator's store is not behind its own registry and audit log
(issue 19, point 3; the daemon, the rebuild and the federation going on are taken end to end
in tests/e2e/test_e2e_lost_store.py)."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from aggregator.errors import StoreError
from aggregator.layout import StateLayout
from aggregator.records import RoundRecord
from aggregator.registry import GENESIS_PARENT, Registry
from aggregator.rounds import RoundState, Stage
from aggregator.state_history import open_checked_store
from aggregator.store import Store
from tessera.governance.audit import AuditLog
from tests.aggregator.test_registry import PUBLIC, card, signed

STUDY = "study-1"


def register_versions(layout: StateLayout, versions: int, backup: Path | None = None) -> None:
    """Release `versions` chained versions (round n gives version n) as the daemon does:
    the round in the store, then the version, then the audit log's entry.
    With `backup`, an online backup of the store (SQLite's backup API) is taken after
    version 1."""
    with Store(layout.database, layout.shares) as store, AuditLog.open(layout.audit_log) as log:
        registry, parent = Registry(store, layout.registry), GENESIS_PARENT
        for version in range(1, versions + 1):
            release = signed(card(version, parent), seed=version)
            state = RoundState(version, Stage.RELEASED, model_version=str(version))
            store.create_round(RoundRecord(STUDY, parent, b"ring", 8, 0, "fedavg", state))
            registry.register(release, PUBLIC)
            log.append("release", {"study_id": STUDY, "round": version, "version": version,
                                   "model_hash": release.model_hash.hex()})  # fmt: skip
            parent = release.model_hash
            if backup is not None and version == 1:
                with sqlite3.connect(backup) as copy:
                    store._db.backup(copy)


def test_a_deleted_or_emptied_store_is_refused_and_nothing_is_created(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path)
    register_versions(layout, 2)
    layout.database.unlink()
    with pytest.raises(StoreError, match="rebuild-state") as refused:
        open_checked_store(layout, STUDY)
    assert "version 2" in str(refused.value) and "empty or missing" in str(refused.value)
    assert not layout.database.exists()  # the refusal created no new, empty store
    layout.database.write_bytes(b"")
    with pytest.raises(StoreError, match="rebuild-state"):
        open_checked_store(layout, STUDY)
    assert layout.database.stat().st_size == 0
    with pytest.raises(StoreError, match="models/ holds version 2"):  # no audit log either
        layout.audit_log.unlink()
        open_checked_store(layout, STUDY)


def test_a_store_restored_from_an_older_backup_is_refused(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path / "state")
    register_versions(layout, 2, backup=tmp_path / "backup.sqlite3")
    shutil.copy(tmp_path / "backup.sqlite3", layout.database)  # the store alone restored
    with pytest.raises(StoreError, match="holds round 1 and version 1") as refused:
        open_checked_store(layout, STUDY)
    assert "round 2" in str(refused.value) and "release of version 2" in str(refused.value)


def test_a_version_folder_a_crash_left_unregistered_is_not_a_lost_store(tmp_path: Path) -> None:
    layout = StateLayout(tmp_path)
    register_versions(layout, 2)
    with Store(layout.database, layout.shares) as store:  # as if killed before the commit
        store._db.execute("DELETE FROM models WHERE version = 2")
        store._db.execute("DELETE FROM rounds WHERE round = 2")
    entries = layout.audit_log.read_bytes().splitlines(keepends=True)
    layout.audit_log.write_bytes(entries[0])  # the release entry comes after the commit
    with open_checked_store(layout, STUDY) as store:
        assert [r.version for r in store.list_models(STUDY)] == [1]
    # A fresh state folder (nothing anywhere) starts as before.
    with open_checked_store(StateLayout(tmp_path / "fresh"), STUDY) as store:
        assert store.latest_round(STUDY) is None
