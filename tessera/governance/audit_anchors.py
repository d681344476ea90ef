"""Where an audit log's anchors go: out of reach of whoever can rewrite the log.

A hash chain cannot show that its last entries were deleted; an anchor (the latest
`SEQ:HASH`) kept elsewhere can (`tessera.governance.audit_chain.read_entries`). A service
can rewrite anything it can write, so an anchor helps only where the service cannot take it
back: a line in the log stream, which the site's collector (docker logs, the cluster's log
shipper, a SIEM) has already taken away, and a line appended to a file on another volume,
which the site can make append-only (`chattr +a`, a WORM share) or ship away.

`AnchorTrail` is that file: opened `O_APPEND`, one fsynced `SEQ:HASH` line per anchor, never
truncated or rewritten, and never in the log's own folder (it would share the log's fate).
"""

from __future__ import annotations

import os
from pathlib import Path

from tessera.errors import ConfigError
from tessera.governance.audit_chain import Anchor

__all__ = ["AnchorTrail", "check_anchor_outside", "check_anchor_place"]


def check_anchor_place(anchor_file: Path, log_path: Path) -> None:
    """ValueError, with the fix, when `anchor_file` lies in the log's folder or below it."""
    folder = Path(os.path.abspath(log_path)).parent
    if Path(os.path.abspath(anchor_file)).is_relative_to(folder):
        raise ValueError(
            f"anchor file {anchor_file} is inside {folder}, beside the audit log it anchors: "
            "whoever can rewrite the log can rewrite it there; put it outside, on a volume "
            "the service can only append to or the site's log shipper reads"
        )


def check_anchor_outside(anchor_file: Path | None, state_dir: Path) -> None:
    """ConfigError naming `audit_anchor_file` when it lies in a service's state folder."""
    if anchor_file is None:
        return
    folder = Path(os.path.abspath(state_dir))
    if Path(os.path.abspath(anchor_file)).is_relative_to(folder):
        raise ConfigError(
            f"audit_anchor_file = {str(anchor_file)!r} is in state_dir {folder}, which the "
            "service can rewrite; put it outside, on a volume the service can only append to "
            "or the site's log shipper reads (or leave it unset: anchors go to the log stream)"
        )


class AnchorTrail:
    """An append-only file of anchors, one `SEQ:HASH` line each (module docstring)."""

    def __init__(self, path: Path, log_path: Path) -> None:
        check_anchor_place(path, log_path)
        self.path = path
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fd = os.open(path, flags, 0o640)

    def append(self, anchor: Anchor) -> None:
        """Add one line and fsync it; earlier lines are never touched."""
        line = (anchor.to_text() + "\n").encode("ascii")
        view = memoryview(line)
        while view:  # one write in practice; the loop covers a short write
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

    def close(self) -> None:
        """Release the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
