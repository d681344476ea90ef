"""Ingest one file: read, screen, decode, preprocess, write the cached array.

Runs inside pool workers, so everything here is a plain top-level function over explicit
arguments. The hospital's file is only ever opened for reading. The array is written to a
temp file in the cache, fsynced, then renamed into place (atomic on POSIX), so a reader or
a restarted ingest never sees half an array.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from node.errors import UnusableImageError
from node.intake.index import FileRecord
from node.phi import instance_key, keyed_hash
from node.preprocess import PreprocessConfig, preprocess
from node.screen import IntakeLimits, quiet_pydicom, read_dataset, screen_dataset

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


def array_path(cache_dir: Path, digest: str, key: str) -> Path:
    """Where the preprocessed array of instance `key` under `digest` lives."""
    return cache_dir / digest[:16] / key[:2] / f"{key}.npy"


def write_array_atomically(path: Path, array: np.ndarray) -> None:
    """Write `array` as .npy via temp file + fsync + rename; readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{TEMP_PREFIX}{secrets.token_hex(8)}.npy"
    try:
        with open(tmp, "wb") as handle:
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
    """Ingest one file and describe the outcome; never raises for a bad file."""
    # pydicom converts values lazily and warns with the value quoted: keep it quiet throughout.
    with quiet_pydicom():
        return _ingest_file(task, ctx)


def _ingest_file(task: FileTask, ctx: WorkerContext) -> FileRecord:
    base = {
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
        ds = read_dataset(data)
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
        write_array_atomically(array_path(ctx.cache_dir, ctx.digest, key), array)
        return FileRecord(
            **base,
            content_key=content_key,
            status="ingested",
            instance_key=key,
            study_key=keyed_hash("study", study, ctx.secret) if study else None,
            accession_key=keyed_hash("accession", accession, ctx.secret) if accession else None,
            digest=ctx.digest,
        )
    return FileRecord(
        **base,
        content_key=content_key,
        status="quarantined",
        reason=reason,
        detail=detail,
        digest=ctx.digest,
    )


def ingest_batch(tasks: list[FileTask], ctx: WorkerContext) -> list[FileRecord]:
    """Ingest a batch of files in a pool worker (batches amortise inter-process overhead)."""
    return [ingest_file(task, ctx) for task in tasks]
