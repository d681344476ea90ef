"""Ingest a batch of files: read, screen, decode, preprocess, write one cache shard.

Runs inside pool workers, so everything here is a plain top-level function over explicit
arguments. The hospital's file is only ever opened for reading. A batch's arrays go into
one fixed-shape shard, `<cache>/<digest16>/<token>.npy` of shape (n, C, H, W): written to a
temp file, fsynced, then renamed into place (atomic on POSIX), so a reader or a restarted
ingest never sees half a shard. One fsync per batch instead of one per image is what lets
the first pass keep up with raw pydicom.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from node.errors import UnusableImageError
from node.intake.index import FileRecord
from node.intake.phi import instance_key, keyed_hash
from node.intake.preprocess import PreprocessConfig, preprocess
from node.intake.screen import IntakeLimits, quiet_pydicom, read_dataset, screen_dataset

TEMP_PREFIX = ".tessera-tmp-"


@dataclass(frozen=True)
class WorkerContext:
    """What every worker needs; sent once per worker process, not per file."""

    cache_dir: Path
    cfg: PreprocessConfig
    limits: IntakeLimits
    secret: bytes

    @property
    def digest(self) -> str:
        """The preprocessing digest that names this cache."""
        return self.cfg.digest()


@dataclass(frozen=True)
class FileTask:
    """One file to ingest, named by its keyed path hash."""

    path: str
    path_key: str
    size: int
    mtime_ns: int
    folder_label: str | None


def shard_path(cache_dir: Path, digest: str, shard: str) -> Path:
    """Where shard `shard` of the cache for preprocessing `digest` lives."""
    return cache_dir / digest[:16] / f"{shard}.npy"


def write_array_atomically(path: Path, array: np.ndarray) -> None:
    """Write `array` as .npy via temp file + fsync + rename; readers see all or nothing."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}.npy"
    try:
        # Owner-only: preprocessed images are still patient data.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
            np.save(handle, np.ascontiguousarray(array, dtype=np.float32))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _uid(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    text = str(value).strip() if value is not None else ""
    return text or None


def ingest_file(task: FileTask, ctx: WorkerContext) -> FileRecord:
    """The outcome of one file, without writing anything (see `process_file`)."""
    return process_file(task, ctx)[0]


def process_file(task: FileTask, ctx: WorkerContext) -> tuple[FileRecord, np.ndarray | None]:
    """Decode one file; return its record and preprocessed array. Never raises for a bad file."""
    # pydicom converts values lazily and warns with the value quoted: keep it quiet throughout.
    with quiet_pydicom():
        return _process_file(task, ctx)


def _process_file(task: FileTask, ctx: WorkerContext) -> tuple[FileRecord, np.ndarray | None]:
    base: dict[str, Any] = {
        "path_key": task.path_key,
        "size": task.size,
        "mtime_ns": task.mtime_ns,
        "folder_label": task.folder_label,
    }
    content_key = ""
    try:
        if task.size > ctx.limits.max_file_bytes:
            raise UnusableImageError(
                "decompressed-size",
                f"file of {task.size} bytes; the limit is {ctx.limits.max_file_bytes}",
            )
        try:
            with open(task.path, "rb") as handle:
                data = handle.read()
        except OSError as error:
            raise UnusableImageError(
                "unreadable", f"{type(error).__name__} (errno {error.errno})"
            ) from None
        content_key = keyed_hash("content", hashlib.sha256(data).hexdigest(), ctx.secret)
        ds = read_dataset(data, ctx.limits)
        screen_dataset(ds, ctx.limits)
        array = preprocess(ds, ctx.cfg)
    except UnusableImageError as error:
        reason, detail = error.reason, error.detail
    except MemoryError:
        reason, detail = "decompressed-size", "decoding ran out of memory"
    except Exception as error:  # noqa: BLE001 - one bad file must never stop the intake
        reason, detail = "corrupt-pixel-data", f"unexpected {type(error).__name__} while decoding"
    else:
        sop = _uid(ds, "SOPInstanceUID")
        # An image without a SOP Instance UID is still usable; its content names it instead.
        key = instance_key(sop if sop else f"content:{content_key}", ctx.secret)
        study = _uid(ds, "StudyInstanceUID")
        accession = _uid(ds, "AccessionNumber")
        record = FileRecord(
            **base,
            content_key=content_key,
            status="ingested",
            instance_key=key,
            study_key=keyed_hash("study", study, ctx.secret) if study else None,
            accession_key=keyed_hash("accession", accession, ctx.secret) if accession else None,
            digest=ctx.digest,
        )
        return record, array
    quarantined = FileRecord(
        **base,
        content_key=content_key,
        status="quarantined",
        reason=reason,
        detail=detail,
        digest=ctx.digest,
    )
    return quarantined, None


def ingest_batch(tasks: list[FileTask], ctx: WorkerContext) -> list[FileRecord]:
    """Ingest a batch in a pool worker: one shard for its usable images, one record each.

    The shard is durable before the records are returned, so the index (written by the
    caller afterwards) never points at an array that is not on disk.
    """
    outcomes = [process_file(task, ctx) for task in tasks]
    arrays = [array for _, array in outcomes if array is not None]
    if not arrays:
        return [record for record, _ in outcomes]
    shard = secrets.token_hex(12)
    write_array_atomically(shard_path(ctx.cache_dir, ctx.digest, shard), np.stack(arrays))
    records, row = [], 0
    for record, array in outcomes:
        if array is not None:
            record = replace(record, shard=shard, row=row)
            row += 1
        records.append(record)
    return records
