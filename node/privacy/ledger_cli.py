"""`tessera node rebuild-ledger`: rebuild a node's privacy ledger from its audit log.

For a ledger that was lost (deleted, on a volume restored without it) or restored from an
older backup, which the node refuses to train with (`ledger-behind`). It verifies the audit
log's hash chain (and `--anchor`, where one was kept), then writes the ledger from the log's
`epsilon-spent` entries, keeping every round the ledger still holds
(`node.privacy.reconcile.rebuild_ledger`). It may run beside the running node: both take the
ledger's lock, and the node sees the rebuilt file within seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def register(node_commands: Subparsers) -> None:
    """Add rebuild-ledger under `tessera node`."""
    rebuild = node_commands.add_parser(
        "rebuild-ledger", help="rebuild the privacy ledger from the verified audit log"
    )
    rebuild.add_argument("--config", type=Path, required=True, help="the node's TOML file")
    rebuild.add_argument(
        "--anchor", help="SEQ:HASH of the log's last entry, kept apart (shows a cut-off tail)"
    )
    rebuild.set_defaults(handler=rebuild_command)


def rebuild_command(args: argparse.Namespace) -> int:
    """Rebuild, then print what was done and a JSON summary."""
    from node.config import load_node_config
    from node.privacy.ledger import ledger_path
    from node.privacy.reconcile import rebuild_ledger
    from node.setup import AUDIT_FILE
    from tessera.errors import ConfigError
    from tessera.governance.audit import Anchor

    config = load_node_config(args.config)
    try:
        anchor = Anchor.from_text(args.anchor) if args.anchor else None
    except ValueError as error:
        raise ConfigError(f"--anchor: {error}") from None
    path = ledger_path(config.state_dir, config.study_id)
    audit_path = config.state_dir / AUDIT_FILE
    report = rebuild_ledger(path, audit_path, config.study_id, anchor)
    tail = "" if anchor else "; without --anchor a cut-off tail cannot be seen"
    print(f"audit log {audit_path}: chain intact ({report.entries} entries{tail})")
    if report.moved_aside is not None:
        print(f"the unreadable ledger was moved aside to {report.moved_aside}")
    restored = ", ".join(f"round {n}" for n in report.restored) or "none"
    print(f"ledger {path} rebuilt: {len(report.rounds)} round(s); from the audit log: {restored}")
    print(
        f"epsilon {report.epsilon_before:.4g} -> {report.epsilon_after:.4g} (the audit log "
        f"records {report.audit_epsilon:.4g}; delta {report.delta:g}, {report.accountant})"
    )
    print(json.dumps({
        "study": config.study_id, "rounds": list(report.rounds),
        "restored": list(report.restored), "epsilon_before": report.epsilon_before,
        "epsilon": report.epsilon_after, "audit_epsilon": report.audit_epsilon,
    }))  # fmt: skip
    return 0
