"""A small real file system to fill up: a tmpfs mounted on a folder (tests run as root).

    with small_disk(folder, size_kib=4096) as disk:
        disk.fill()        # write until the kernel says ENOSPC
        ...
        disk.free()        # delete the filler: the space is back at once

Whatever the folder held is copied onto the tmpfs first, so a state folder keeps its files;
on exit the tmpfs is unmounted (lazily, in case a killed process still holds a file) and the
folder is left empty, as it was found or emptier.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class SmallDisk:
    """A mounted tmpfs and the file that fills it."""

    path: Path

    @property
    def filler(self) -> Path:
        return self.path / ".filler"

    def fill(self) -> int:
        """Write zeros to the filler until the file system is full; the bytes written."""
        written = 0
        descriptor = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for block in (1 << 20, 1 << 16, 1 << 12, 1):
                while True:
                    try:
                        written += os.write(descriptor, b"\0" * block)
                    except OSError as error:
                        if error.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(descriptor)
        return written

    def free(self) -> None:
        """Delete the filler."""
        self.filler.unlink(missing_ok=True)

    def free_bytes(self) -> int:
        status = os.statvfs(self.path)
        return status.f_bavail * status.f_frsize


@contextmanager
def small_disk(folder: Path, size_kib: int) -> Iterator[SmallDisk]:
    """Mount a `size_kib` tmpfs on `folder` (created if missing), keeping its files."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as saved:
        kept = Path(saved) / "kept"
        shutil.copytree(folder, kept)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0700", "tmpfs", str(folder)],
            check=True,
        )
        try:
            shutil.copytree(kept, folder, dirs_exist_ok=True)
            yield SmallDisk(folder)
        finally:
            subprocess.run(["umount", "-l", str(folder)], check=True)
