"""One intake pass over the watched folder: incremental, parallel, restartable.

A file is named by the keyed hash of its path relative to the intake root. It is skipped
when its size and mtime are unchanged since it was last ingested (or quarantined) under the
current preprocessing digest; when only the stat changed, a keyed content hash decides. Files
that disappeared drop out of the dataset, and their cached arrays are removed. Everything
else is decoded in a process pool (2 workers by default: one per core), in small batches,
with a bounded number in flight so memory stays flat however large the folder.

The C-STORE receiver's folder (`received_dir`) is consumed, not mirrored: with
`received_retention_s` set, each original there is deleted once it is cached or
quarantined and that old, and its row stays (`index.mark_consumed`), so the object stays in
the dataset. The hospital's own folder is never written to.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from node.errors import NodeError
from node.intake import index
from node.intake.labels import folder_label, load_manifest
from node.intake.phi import keyed_hash, load_or_create_site_secret
from node.intake.preprocess import PreprocessConfig
from node.intake.screen import IntakeLimits
from node.intake.worker import TEMP_PREFIX, FileTask, WorkerContext, ingest_batch, shard_path
from tessera.errors import ConfigError
from tessera.observability.events import Event
from tessera.observability.logs import log_event

LOGGER = logging.getLogger("tessera.node.intake")
RECEIVED = PurePosixPath("received")  # where received objects are named, in any layout


@dataclass(frozen=True)
class IntakeConfig:
    """The intake's configuration: where DICOM arrives, where state lives, what to produce."""

    intake_dir: Path | None  # None: only the receiver's folder
    state_dir: Path
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    limits: IntakeLimits = field(default_factory=IntakeLimits)
    label_set: tuple[str, ...] | None = None
    labels_csv: Path | None = None
    folder_labels: bool = False
    workers: int = 2
    batch_size: int = 16
    # The C-STORE receiver's folder when it is not inside intake_dir (a read-only mount):
    # scanned in the same pass, its files named `received/<file>` as if they lay in
    # intake_dir/received. Absent until the first object arrives, which is not an error.
    received_dir: Path | None = None
    # Delete each received original once cached or quarantined and at least this old
    # (seconds); None keeps them.
    received_retention_s: float | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= 64:
            raise ValueError(f"workers must be 1..64, got {self.workers}")
        if not 1 <= self.batch_size <= 1024:
            raise ValueError(f"batch_size must be 1..1024, got {self.batch_size}")
        if self.folder_labels and not self.label_set:
            raise ValueError(
                "folder labels need a label set (e.g. --label-set absent,present): folder "
                "names outside it are ignored, so patient-named folders never become labels"
            )
        if self.label_set is not None and len(set(self.label_set)) != len(self.label_set):
            raise ValueError(f"label set has duplicates: {self.label_set}")
        if self.intake_dir is None and self.received_dir is None:
            raise ValueError("nothing to ingest: give an intake folder or a received folder")
        if self.received_retention_s is not None and self.received_retention_s < 0:
            raise ValueError(f"received_retention_s must be >= 0, got {self.received_retention_s}")

    @property
    def cache_dir(self) -> Path:
        """Root of the preprocessed-array cache."""
        return self.state_dir / "cache"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> IntakeConfig:
        """Build from a TOML table such as node.toml's `[intake]`; unknown keys are refused.

        Keys: intake_dir, state_dir (required); size, channels, window, frame (the model's
        PreprocessConfig); min_side, max_side, max_frames, max_decoded_bytes, max_file_bytes
        (IntakeLimits); label_set, labels_csv, folder_labels, workers, batch_size.
        """
        pre = {"size", "channels", "window", "frame", "mean", "std"}
        lim = {"min_side", "max_side", "max_frames", "max_decoded_bytes", "max_file_bytes"}
        own = {"label_set", "labels_csv", "folder_labels", "workers", "batch_size"}
        known = pre | lim | own | {"intake_dir", "state_dir"}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown [intake] keys {sorted(unknown)}; known: {sorted(known)}")
        if "intake_dir" not in data or "state_dir" not in data:
            raise ConfigError("[intake] needs intake_dir and state_dir")
        try:
            label_set = data.get("label_set")
            return cls(
                intake_dir=Path(data["intake_dir"]),
                state_dir=Path(data["state_dir"]),
                preprocess=PreprocessConfig(**{k: data[k] for k in pre if k in data}),
                limits=IntakeLimits(**{k: data[k] for k in lim if k in data}),
                label_set=tuple(label_set) if label_set is not None else None,
                labels_csv=Path(data["labels_csv"]) if data.get("labels_csv") else None,
                folder_labels=bool(data.get("folder_labels", False)),
                workers=int(data.get("workers", 2)),
                batch_size=int(data.get("batch_size", 16)),
            )
        except (TypeError, ValueError) as error:
            raise ConfigError(f"[intake] is invalid: {error}") from None


@dataclass
class IngestSummary:
    """Counts from one pass (no identifiers)."""

    seen: int = 0
    unchanged: int = 0
    ingested: int = 0
    quarantined: int = 0
    dropped: int = 0
    originals_deleted: int = 0  # received originals deleted once cached or quarantined
    reasons: Counter[str] = field(default_factory=Counter)
    labels_out_of_set: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready view."""
        return {
            "seen": self.seen,
            "unchanged": self.unchanged,
            "ingested": self.ingested,
            "quarantined": self.quarantined,
            "dropped": self.dropped,
            "originals_deleted": self.originals_deleted,
            "reasons": dict(sorted(self.reasons.items())),
            "labels_out_of_set": dict(sorted(self.labels_out_of_set.items())),
        }


def walk_intake(root: Path) -> Iterator[Path]:
    """Every regular file under `root`, recursively, in a stable order (see `scan_intake`)."""
    for path, _ in scan_intake(root):
        yield path


def scan_intake(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """(path, stat) of every regular file under `root`, without following directory links.

    Temp files of the receiver and of the cache (TEMP_PREFIX) are skipped: they are not
    finished yet. One stat per file, taken from the directory scan.
    """
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name, reverse=True)
        except OSError:
            continue  # unreadable folder: its files count as missing until it is readable
        for entry in entries:
            if entry.name.startswith(TEMP_PREFIX):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file():
                    yield Path(entry.path), entry.stat()
            except OSError:
                continue


def _content_key(path: Path, secret: bytes) -> str | None:
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
    return keyed_hash("content", digest, secret)


def remove_stale_temp_files(cache_dir: Path) -> int:
    """Delete temp arrays left by a killed run (the cache's own files, never the intake's)."""
    removed = 0
    if cache_dir.is_dir():
        for tmp in cache_dir.rglob(f"{TEMP_PREFIX}*"):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def run_ingest(cfg: IntakeConfig) -> IngestSummary:
    """Bring the index and cache up to date with the intake folder; return the counts."""
    if cfg.intake_dir is not None and not cfg.intake_dir.is_dir():
        # Refuse rather than treat a missing mount as "every file deleted".
        raise NodeError(
            f"intake folder {cfg.intake_dir} does not exist or is not a directory; "
            "check the DICOM mount before ingesting"
        )
    secret = load_or_create_site_secret(cfg.state_dir)
    ctx = WorkerContext(cfg.cache_dir, cfg.preprocess, cfg.limits, secret)
    with _exclusive(cfg.state_dir):
        return _run_locked(cfg, ctx)


@contextlib.contextmanager
def _exclusive(state_dir: Path) -> Iterator[None]:
    """One intake pass at a time per state directory (a watch loop and a manual run)."""
    lock_path = state_dir / "intake" / "ingest.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise NodeError(
                f"another intake pass holds {lock_path}; wait for it to finish"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_locked(cfg: IntakeConfig, ctx: WorkerContext) -> IngestSummary:
    conn = index.connect(cfg.state_dir)
    summary = IngestSummary()
    try:
        stale = remove_stale_temp_files(cfg.cache_dir)
        scan = index.next_scan(conn)
        index.set_meta(conn, "digest", ctx.digest)
        index.set_meta(conn, "label_set", json.dumps(list(cfg.label_set or ())))
        log_event(LOGGER, Event.INTAKE_START, scan=scan, digest=ctx.digest[:16], stale_temp=stale)
        shards = _shards_on_disk(cfg, ctx)
        _process(cfg, ctx, conn, scan, summary, shards)
        summary.originals_deleted = _delete_consumed(cfg, ctx, conn)
        summary.dropped = index.drop_unseen(conn, scan)
        # Shards no row points at: left by a killed pass, or emptied by deletions/changes.
        for name in _shards_on_disk(cfg, ctx) - index.live_shards(conn, ctx.digest):
            shard_path(cfg.cache_dir, ctx.digest, name).unlink(missing_ok=True)
        if cfg.labels_csv is not None:
            manifest = load_manifest(cfg.labels_csv, ctx.secret, cfg.label_set)
            index.replace_manifest(conn, manifest.rows)
            summary.labels_out_of_set = manifest.out_of_set
        index.set_meta(conn, "last_summary", json.dumps(summary.as_dict()))
        log_event(LOGGER, Event.INTAKE_DONE, scan=scan, summary=summary.as_dict())
    finally:
        conn.close()
    return summary


def _batch_result(
    future: Future[list[index.FileRecord]], cfg: IntakeConfig
) -> list[index.FileRecord]:
    """A worker's records; a failure of the node itself (not of a file) becomes a NodeError."""
    try:
        return future.result()
    except BrokenProcessPool:
        raise NodeError(
            "an intake worker died (killed, or out of memory); rerun the ingest, and lower "
            "IntakeLimits.max_decoded_bytes if it recurs"
        ) from None
    except OSError as error:
        raise NodeError(
            f"writing the cache under {cfg.cache_dir} failed ({error.strerror}); free space "
            "or fix permissions there, then rerun: finished batches are kept"
        ) from None


def _shards_on_disk(cfg: IntakeConfig, ctx: WorkerContext) -> set[str]:
    folder = shard_path(cfg.cache_dir, ctx.digest, "x").parent
    if not folder.is_dir():
        return set()
    return {p.stem for p in folder.glob("*.npy") if not p.name.startswith(TEMP_PREFIX)}


def _process(
    cfg: IntakeConfig, ctx: WorkerContext, conn: sqlite3.Connection, scan: int,
    summary: IngestSummary, shards: set[str],
) -> None:  # fmt: skip
    batch: list[FileTask] = []
    pending: set[Future[list[index.FileRecord]]] = set()
    pool = ProcessPoolExecutor(cfg.workers) if cfg.workers > 1 else None

    def collect(block: bool) -> None:
        nonlocal pending
        if not pending:
            return
        done, pending = wait(pending, return_when=FIRST_COMPLETED, timeout=None if block else 0)
        for future in done:
            _record(conn, _batch_result(future, cfg), scan, summary)

    def submit(tasks: list[FileTask]) -> None:
        if pool is None:
            _record(conn, ingest_batch(tasks, ctx), scan, summary)
            return
        while len(pending) >= 2 * cfg.workers:
            collect(block=True)
        pending.add(pool.submit(ingest_batch, tasks, ctx))

    try:
        for path, relative, stat in scan_roots(cfg):
            task = _plan(cfg, ctx, conn, path, relative, stat, scan, summary, shards)
            if task is not None:
                batch.append(task)
                if len(batch) >= cfg.batch_size:
                    submit(batch)
                    batch = []
            if summary.seen % 256 == 0:
                conn.commit()  # "seen" marks are true whenever they land; commit in chunks
            collect(block=False)
        if batch:
            submit(batch)
        while pending:
            collect(block=True)
    finally:
        conn.commit()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def scan_roots(cfg: IntakeConfig) -> Iterator[tuple[Path, PurePosixPath, os.stat_result]]:
    """(path, name relative to the intake root, stat) of every file of one pass: the intake
    folder's, then the receiver folder's (see `IntakeConfig.received_dir`)."""
    if cfg.intake_dir is not None:
        for path, stat in scan_intake(cfg.intake_dir):
            yield path, PurePosixPath(path.relative_to(cfg.intake_dir).as_posix()), stat
    yield from _scan_received(cfg)


def _scan_received(cfg: IntakeConfig) -> Iterator[tuple[Path, PurePosixPath, os.stat_result]]:
    if cfg.received_dir is not None and cfg.received_dir.is_dir():
        for path, stat in scan_intake(cfg.received_dir):
            relative = PurePosixPath(path.relative_to(cfg.received_dir).as_posix())
            yield path, RECEIVED / relative, stat


def _delete_consumed(cfg: IntakeConfig, ctx: WorkerContext, conn: sqlite3.Connection) -> int:
    """Delete the received originals that this pass left cached or quarantined under the
    current preprocessing and that are older than the retention period; return how many.

    Each is marked consumed (committed) before its unlink: a kill in between leaves a file
    the next pass finds unchanged and deletes then.
    """
    if cfg.received_retention_s is None:
        return 0
    cutoff_ns = time.time_ns() - int(cfg.received_retention_s * 1e9)
    live = index.live_shards(conn, ctx.digest)
    deleted = 0
    for path, relative, stat in _scan_received(cfg):
        if stat.st_mtime_ns > cutoff_ns:
            continue
        path_key = keyed_hash("path", relative.as_posix(), ctx.secret)
        stored = index.lookup(conn, path_key)
        if stored is None:
            continue
        size, mtime_ns, _, status, digest, shard = stored
        current = digest == ctx.digest and (status == "quarantined" or shard in live)
        if current and (size, mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            index.mark_consumed(conn, path_key)
            path.unlink(missing_ok=True)
            deleted += 1
    return deleted


def _plan(
    cfg: IntakeConfig, ctx: WorkerContext, conn: sqlite3.Connection, path: Path,
    relative: PurePosixPath, stat: os.stat_result, scan: int, summary: IngestSummary,
    shards: set[str],
) -> FileTask | None:  # fmt: skip
    """Decide whether `path` needs (re)ingesting; mark it seen when it does not."""
    summary.seen += 1
    path_key = keyed_hash("path", relative.as_posix(), ctx.secret)
    stored = index.lookup(conn, path_key)
    label = folder_label(relative, cfg.label_set or ()) if cfg.folder_labels else None
    task = FileTask(str(path), path_key, stat.st_size, stat.st_mtime_ns, label)
    if stored is None:
        return task
    size, mtime_ns, content_key, status, digest, shard = stored
    current = digest == ctx.digest and (status == "quarantined" or shard in shards)
    if not current:
        return task
    if (size, mtime_ns) != (stat.st_size, stat.st_mtime_ns):
        # Touched or copied again: only a change of content means re-ingesting.
        if _content_key(path, ctx.secret) != content_key:
            return task
    index.mark_seen(conn, path_key, scan, stat.st_size, stat.st_mtime_ns)
    summary.unchanged += 1
    return None


def _record(
    conn: sqlite3.Connection, records: list[index.FileRecord], scan: int,
    summary: IngestSummary,
) -> None:  # fmt: skip
    index.store(conn, records, scan)
    for record in records:
        if record.status == "ingested":
            summary.ingested += 1
        else:
            summary.quarantined += 1
            summary.reasons[record.reason or "unknown"] += 1
            log_event(
                LOGGER, Event.INTAKE_QUARANTINE, logging.WARNING,
                file=record.path_key, reason=record.reason, detail=record.detail,
            )  # fmt: skip
