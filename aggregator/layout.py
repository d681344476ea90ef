"""An aggregator's state folder: what lives where under `state_dir`, defined once.

    <state_dir>/
        aggregator.sqlite3   the store: rounds, share index, registered models (aggregator.store)
        shares/              full-length shares, until their round ends
        models/              every released model version (aggregator.registry)
        audit.log            the hash-chained audit log (tessera.governance.audit)
        spool/               MQTT transfers too large to reassemble in memory (broker.chunking)

The daemon writes this layout (through `AggregatorConfig`) and `tessera models` reads it back
from a `--state` folder, so both go through `StateLayout` and can never disagree on a name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Where the container image mounts the state volume.
DEFAULT_STATE_DIR = Path("/var/lib/tessera")


@dataclass(frozen=True)
class StateLayout:
    """The paths of one aggregator's state under `root` (its `state_dir`)."""

    root: Path

    @property
    def database(self) -> Path:
        """The SQLite state store."""
        return self.root / "aggregator.sqlite3"

    @property
    def shares(self) -> Path:
        """Where full-length shares wait until their round ends."""
        return self.root / "shares"

    @property
    def registry(self) -> Path:
        """Where every released model version lives."""
        return self.root / "models"

    @property
    def audit_log(self) -> Path:
        """The aggregator's audit log."""
        return self.root / "audit.log"

    @property
    def spool(self) -> Path:
        """Where the MQTT link spools large incoming transfers."""
        return self.root / "spool"
