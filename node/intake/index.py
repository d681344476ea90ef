"""The intake index: one SQLite database (WAL) in the state directory.

It holds no patient data: files are named by a keyed hash of their relative path, instances,
studies and accession numbers by keyed hashes (node.intake.phi), and quarantine details are the
node's own words. Labels are study vocabulary ("present", "absent"), stored in clear.
A row is committed only after its cached array is on disk, so a process killed at any
point leaves rows that are all true; the next run redoes whatever has no row.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path_key TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    content_key TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ingested', 'quarantined')),
    reason TEXT,
    detail TEXT,
    instance_key TEXT,
    study_key TEXT,
    accession_key TEXT,
    folder_label TEXT,
    digest TEXT,
    shard TEXT,
    row INTEGER,
    scan INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS files_instance ON files (instance_key);
CREATE INDEX IF NOT EXISTS files_shard ON files (shard);
CREATE TABLE IF NOT EXISTS manifest (
    kind TEXT NOT NULL CHECK (kind IN ('instance', 'study', 'accession')),
    key TEXT NOT NULL,
    label TEXT NOT NULL,
    split TEXT NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS consumed (path_key TEXT PRIMARY KEY);
"""


@dataclass(frozen=True)
class FileRecord:
    """The outcome of ingesting one file; what the index stores about it."""

    path_key: str
    size: int
    mtime_ns: int
    content_key: str
    status: str
    reason: str | None = None
    detail: str | None = None
    instance_key: str | None = None
    study_key: str | None = None
    accession_key: str | None = None
    folder_label: str | None = None
    digest: str | None = None
    shard: str | None = None
    row: int | None = None


def index_path(state_dir: Path) -> Path:
    """Where the intake index of `state_dir` lives."""
    return state_dir / "intake" / "index.sqlite3"


def connect(state_dir: Path) -> sqlite3.Connection:
    """Open (creating if needed) the index, in WAL mode with synchronous commits."""
    path = index_path(state_dir)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)  # SQLite gives its -wal and -shm files these modes
    conn = sqlite3.connect(path, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL under WAL: a power cut may lose the last commits, never consistency; the next
    # pass redoes whatever has no row.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(SCHEMA)
    return conn


def lookup(conn: sqlite3.Connection, path_key: str) -> tuple[Any, ...] | None:
    """(size, mtime_ns, content_key, status, digest, shard) stored for a path, or None."""
    return conn.execute(  # type: ignore[no-any-return]
        "SELECT size, mtime_ns, content_key, status, digest, shard FROM files WHERE path_key = ?",
        (path_key,),
    ).fetchone()


def mark_seen(conn: sqlite3.Connection, path_key: str, scan: int, size: int, mtime_ns: int) -> None:
    """Record that a path still exists (and its current stat) in scan number `scan`."""
    conn.execute(
        "UPDATE files SET scan = ?, size = ?, mtime_ns = ? WHERE path_key = ?",
        (scan, size, mtime_ns, path_key),
    )


def store(conn: sqlite3.Connection, records: Iterable[FileRecord], scan: int) -> None:
    """Insert or replace records, in one transaction."""
    with conn:
        conn.executemany(
            "INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [
                (
                    r.path_key, r.size, r.mtime_ns, r.content_key, r.status, r.reason,
                    r.detail, r.instance_key, r.study_key, r.accession_key, r.folder_label,
                    r.digest, r.shard, r.row, scan,
                )
                for r in records
            ],
        )  # fmt: skip
        # A path that is back (re-sent, restored) is a file again until it is consumed again.
        back = [(r.path_key,) for r in records]
        conn.executemany("DELETE FROM consumed WHERE path_key = ?", back)


def drop_unseen(conn: sqlite3.Connection, scan: int) -> int:
    """Delete rows of files not seen in `scan` (deleted from the intake); return how many.

    Rows of consumed files stay: the node deleted those itself, once they were cached.
    """
    with conn:
        return conn.execute(
            "DELETE FROM files WHERE scan != ? AND path_key NOT IN (SELECT path_key FROM consumed)",
            (scan,),
        ).rowcount


def mark_consumed(conn: sqlite3.Connection, path_key: str) -> None:
    """Record that the node is deleting a cached original: its row stays in the dataset."""
    with conn:
        conn.execute("INSERT OR IGNORE INTO consumed VALUES (?)", (path_key,))


def live_shards(conn: sqlite3.Connection, digest: str) -> set[str]:
    """Shards that at least one ingested row still points at."""
    rows = conn.execute(
        "SELECT DISTINCT shard FROM files WHERE status = 'ingested' AND digest = ? "
        "AND shard IS NOT NULL",
        (digest,),
    )
    return {str(r[0]) for r in rows}


def next_scan(conn: sqlite3.Connection) -> int:
    """A fresh scan number, persisted so numbers never repeat across runs."""
    with conn:
        row = conn.execute("SELECT value FROM meta WHERE name = 'scan'").fetchone()
        scan = (int(row[0]) if row else 0) + 1
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('scan', ?)", (str(scan),))
    return scan


def set_meta(conn: sqlite3.Connection, name: str, value: str) -> None:
    """Store one named setting (label set, preprocessing digest)."""
    with conn:
        conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))


def get_meta(conn: sqlite3.Connection, name: str) -> str | None:
    """Read one named setting, or None."""
    row = conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    return None if row is None else str(row[0])


def replace_manifest(conn: sqlite3.Connection, rows: Iterable[tuple[str, str, str, str]]) -> None:
    """Replace the label manifest with (kind, keyed hash, label, split) rows, atomically."""
    with conn:
        conn.execute("DELETE FROM manifest")
        conn.executemany("INSERT OR REPLACE INTO manifest VALUES (?,?,?,?)", rows)


def labelled_instances(
    conn: sqlite3.Connection, digest: str
) -> Iterator[tuple[str, str | None, str, str, int]]:
    """(instance_key, label or None, split, shard, row) per ingested instance under `digest`.

    A label comes from the manifest by instance, else by study, else by accession, else
    from the class folder; split defaults to 'train'.
    """
    query = """
        SELECT f.instance_key,
               COALESCE(mi.label, ms.label, ma.label, f.folder_label),
               COALESCE(mi.split, ms.split, ma.split, 'train'),
               f.shard, f.row, MAX(f.rowid)
        FROM files f
        LEFT JOIN manifest mi ON mi.kind = 'instance' AND mi.key = f.instance_key
        LEFT JOIN manifest ms ON ms.kind = 'study' AND ms.key = f.study_key
        LEFT JOIN manifest ma ON ma.kind = 'accession' AND ma.key = f.accession_key
        WHERE f.status = 'ingested' AND f.digest = ?
        GROUP BY f.instance_key
        ORDER BY f.instance_key
    """
    # SQLite takes the bare shard and row from the row holding MAX(rowid): one consistent
    # (shard, row) pair when several files carry the same instance.
    for key, label, split, shard, row, _ in conn.execute(query, (digest,)):
        yield str(key), (None if label is None else str(label)), str(split), str(shard), int(row)
