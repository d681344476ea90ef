"""A full disk, recognised in one place (tessera.files; issue 19, point 5), on a real full
file system: a tmpfs filled until the kernel says ENOSPC."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from support.disk import small_disk

from tessera.errors import DiskFull
from tessera.files import DiskWatch, atomic_write, disk_full_error


def test_a_full_disk_is_one_clear_error_and_a_watch_until_the_space_is_back(
    tmp_path: Path,
) -> None:
    with small_disk(tmp_path / "state", size_kib=512) as disk:
        target = disk.path / "model.onnx"
        atomic_write(target, b"old")
        database = disk.path / "index.sqlite3"
        db = sqlite3.connect(database)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE t (x BLOB)")
        db.close()
        disk.fill()

        # A plain write: DiskFull (still an OSError), the old file intact, no temporary left.
        with pytest.raises(DiskFull) as caught:
            atomic_write(target, bytes(100_000))
        full = caught.value
        assert str(full).startswith(f"disk full: {disk.path}, needs about 100000 bytes, free ")
        assert isinstance(full, OSError) and full.free < full.needed
        assert target.read_bytes() == b"old" and sorted(disk.path.iterdir()) == sorted(
            [target, database, disk.filler]
        )

        # SQLite says "disk I/O error" when it cannot map its -shm file on a full disk.
        with pytest.raises(sqlite3.OperationalError) as sqlite_error:
            sqlite3.connect(database).execute("SELECT count(*) FROM t").fetchone()
        assert "disk I/O error" in str(sqlite_error.value)
        mapped = disk_full_error(sqlite_error.value, database)
        assert mapped is not None and str(mapped).startswith(f"disk full: {database}")
        assert disk_full_error(ValueError("not about space"), database) is None

        watch = DiskWatch(reserve=200_000)
        watch.note(full)
        assert watch.full and not watch.poll()
        reason = watch.readiness()
        assert isinstance(reason, str)
        assert reason.startswith(f"disk full: {disk.path}, needs about 200000 bytes")

        disk.free()
        assert watch.poll() and not watch.full and watch.readiness() is True
        atomic_write(target, bytes(100_000))
