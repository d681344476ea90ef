"""The aggregator's SQLite schema, and how a state store is opened and its version checked.

Tables: `rounds` (one row per round and its stage), `shares` (the shares received per round:
the seed, or the path of a full share's file), `partial_sums` (the honest-aggregator facts:
at most one partial sum per round, each naming its base model and sorted participant set, so
that a retry on a summed base model can be held to the retry rule), `models` (the
registry's rows) and `server_state` (where the optimiser state that produced the latest
model lies). `meta` holds the schema version. A store of schema 1 (one partial sum per
round) or 2 (one per base model) is migrated to schema 3 in one transaction on open; any
other version is refused, never guessed at.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath

from aggregator.errors import StoreError
from tessera.files import disk_full_error, make_private_file

SCHEMA_VERSION = 4

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    study_id TEXT NOT NULL, round INTEGER NOT NULL, stage TEXT NOT NULL,
    base_model_hash BLOB NOT NULL, ring_params BLOB NOT NULL, vector_length INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL, algorithm TEXT NOT NULL, received INTEGER NOT NULL,
    close_reason TEXT, participants TEXT, model_version TEXT, abort_reason TEXT,
    created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
    PRIMARY KEY (study_id, round));
CREATE TABLE IF NOT EXISTS shares (
    study_id TEXT NOT NULL, round INTEGER NOT NULL, node_id TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('seed', 'full')), seed BLOB, path TEXT,
    envelope_digest BLOB NOT NULL, received_ms INTEGER NOT NULL,
    PRIMARY KEY (study_id, round, node_id));
CREATE TABLE IF NOT EXISTS partial_sums (
    study_id TEXT NOT NULL, round INTEGER NOT NULL, participant_set_hash BLOB NOT NULL,
    decided_ms INTEGER NOT NULL, base_model_hash BLOB NOT NULL, participants TEXT,
    PRIMARY KEY (study_id, round));
CREATE TABLE IF NOT EXISTS models (
    study_id TEXT NOT NULL, version INTEGER NOT NULL, round INTEGER NOT NULL,
    parent_hash BLOB NOT NULL, model_hash BLOB NOT NULL, onnx_hash BLOB NOT NULL,
    card_hash BLOB NOT NULL, folder TEXT NOT NULL, card_json TEXT NOT NULL,
    signatures TEXT NOT NULL, created_ms INTEGER NOT NULL,
    PRIMARY KEY (study_id, version));
CREATE TABLE IF NOT EXISTS server_state (
    study_id TEXT PRIMARY KEY, round INTEGER NOT NULL, algorithm TEXT NOT NULL,
    path TEXT, updated_ms INTEGER NOT NULL);
"""


def open_database(path: Path) -> sqlite3.Connection:
    """Open or create the store at `path` (mode 0600): WAL, synchronous=FULL, secure
    delete, the schema, its version.

    StoreError, naming the fix, when SQLite cannot open it or it has another schema version;
    DiskFull (tessera.errors) when the file system is full, which is not damage.
    """
    # Private from the first byte: SQLite gives the -wal and -shm files the database's mode.
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if name == path or name.exists():
            make_private_file(name)
    db: sqlite3.Connection | None = None
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # Deleted rows (a purged round's seeds) are overwritten with zeros, not left in free
        # space; Store.purge_shares then folds the WAL back and truncates it.
        db.execute("PRAGMA secure_delete=ON")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(SCHEMA)
        _check_schema_version(db, path)
    except sqlite3.DatabaseError as exc:
        if db is not None:
            db.close()  # a daemon waiting for space opens it again, later
        full = disk_full_error(exc, path)
        if full is not None:
            raise full from None
        raise StoreError(
            f"state store {path} cannot be opened ({exc}); restore it from a backup, or "
            "move it aside (keep it) and run `tessera aggregator rebuild-state --config "
            "<this aggregator's config>`, which rebuilds it from the signed releases in "
            "models/ and the audit log. Never start on an empty store: the federation would "
            "restart from the genesis model and stall"
        ) from None
    return db


@contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """Raise DiskFull (naming `path`) for an SQLite error that a full disk caused; any other
    error passes unchanged (`tessera.files.disk_full_error` decides)."""
    try:
        yield
    except sqlite3.Error as exc:
        full = disk_full_error(exc, path)
        if full is None:
            raise
        raise full from None


# Schema 1 or 2 -> 3: every partial-sum fact is kept, with the round's base model and its
# participant set (from the rounds table, where the move to SUMMING stored it), and a base
# model may carry several facts (the retry rule, issue #18 attack 2). A fact whose round has
# no recorded set keeps NULL: agreement.check_retry_rule then never sums that base again.
_MIGRATE_TO_3 = """
BEGIN IMMEDIATE;
ALTER TABLE partial_sums RENAME TO partial_sums_old;
CREATE TABLE partial_sums (
    study_id TEXT NOT NULL, round INTEGER NOT NULL, participant_set_hash BLOB NOT NULL,
    decided_ms INTEGER NOT NULL, base_model_hash BLOB NOT NULL, participants TEXT,
    PRIMARY KEY (study_id, round));
INSERT INTO partial_sums
    SELECT p.study_id, p.round, p.participant_set_hash, p.decided_ms, r.base_model_hash,
        r.participants
    FROM partial_sums_old p JOIN rounds r ON r.study_id = p.study_id AND r.round = p.round;
DROP TABLE partial_sums_old;
CREATE INDEX partial_sums_base ON partial_sums (study_id, base_model_hash);
UPDATE meta SET value = '3' WHERE key = 'schema';
COMMIT;
"""


def _relative(path: str, parts: int) -> str:
    """An absolute registry path of schema 3 as schema 4 stores it: its last `parts` parts."""
    return "/".join(PurePath(path).parts[-parts:]) if PurePath(path).is_absolute() else path


def _migrate_to_4(db: sqlite3.Connection) -> None:
    """Schema 3 -> 4 in one transaction: registry paths relative to the registry's root."""
    db.execute("BEGIN IMMEDIATE")
    rows = db.execute("SELECT study_id, version, folder FROM models").fetchall()
    for study, version, folder in rows:
        db.execute("UPDATE models SET folder = ? WHERE study_id = ? AND version = ?",
                   (_relative(folder, 2), study, version))  # fmt: skip
    for study, state_path in db.execute("SELECT study_id, path FROM server_state").fetchall():
        if state_path is not None:
            db.execute("UPDATE server_state SET path = ? WHERE study_id = ?",
                       (_relative(state_path, 3), study))  # fmt: skip
    db.execute("UPDATE meta SET value = '4' WHERE key = 'schema'")
    db.execute("COMMIT")


def _check_schema_version(db: sqlite3.Connection, path: Path) -> None:
    row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    try:
        if row is not None and int(row[0]) in (1, 2):
            db.executescript(_MIGRATE_TO_3)
            row = ("3",)
        if row is not None and int(row[0]) == 3:
            _migrate_to_4(db)
            row = ("4",)
    except sqlite3.DatabaseError as exc:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise StoreError(
            f"state store {path} has schema {row[0] if row else '?'} and could not be "
            f"migrated to schema {SCHEMA_VERSION} ({exc}); restore it from a backup, or move "
            "it aside and run `tessera aggregator rebuild-state`"
        ) from None
    if row is None:  # a new store (the index needs schema 3's partial_sums, so it is here)
        db.execute("CREATE INDEX partial_sums_base ON partial_sums (study_id, base_model_hash)")
        db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
    elif int(row[0]) != SCHEMA_VERSION:
        raise StoreError(
            f"state store {path} has schema {row[0]}, this version reads "
            f"{SCHEMA_VERSION}; run the matching release or migrate the store"
        )
