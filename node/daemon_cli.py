"""`tessera node run` and `tessera node models list|pin|unpin|rollback`.

`models` works on the state folder of a node, running or not: the running node re-reads
its model store every few seconds and swaps the served model to match (see node.daemon).
Every change is appended to the node's audit log.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def register(node_commands: Subparsers) -> None:
    """Add run and models under `tessera node`."""
    run = node_commands.add_parser("run", help="run the node service until SIGTERM")
    run.add_argument("--config", type=Path, required=True, help="the node's TOML file")
    run.set_defaults(handler=run_command)

    models = node_commands.add_parser("models", help="the node's accepted models: list, pin")
    models.add_argument("--state", type=Path, default=Path("/var/lib/tessera"))
    sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    sub.add_parser("list", help="accepted versions; * marks the one served").set_defaults(
        handler=models_command
    )
    pin = sub.add_parser("pin", help="serve this version whatever newer releases arrive")
    pin.add_argument("version", type=int)
    pin.set_defaults(handler=models_command)
    sub.add_parser("unpin", help="follow the newest release again").set_defaults(
        handler=models_command
    )
    sub.add_parser("rollback", help="pin the version before the current one").set_defaults(
        handler=models_command
    )


def run_command(args: argparse.Namespace) -> int:
    """Load the configuration, log JSON at its level, run the node."""
    from node.config import load_node_config
    from node.daemon import run
    from tessera.observability.logs import configure_logging

    config = load_node_config(args.config)
    configure_logging(config.log_level)
    return run(config)


def models_command(args: argparse.Namespace) -> int:
    """List, pin, unpin or roll back; prints what is served afterwards."""
    from node.round.releases import open_model_store
    from node.setup import AUDIT_FILE
    from tessera.governance.audit import AuditLog

    with AuditLog.open(args.state / AUDIT_FILE, counts_only=True) as audit:
        store = open_model_store(args.state, audit)
        action = args.models_command
        if action == "pin":
            store.pin(args.version)
        elif action == "unpin":
            store.unpin()
        elif action == "rollback":
            store.rollback()
    current = store.current()
    for record in store.versions():
        mark = "*" if record.version == current else " "
        print(
            f"{mark} version {record.version}  round {record.round}  "
            f"model {record.model_hash[:16]}  signed by {', '.join(record.signers)}"
        )
    print(json.dumps({"serving": current, "pinned": store.pinned}))
    return 0
