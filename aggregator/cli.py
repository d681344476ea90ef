"""`tessera aggregator ...` and `tessera models ...` sub-commands: a thin dispatcher."""

from __future__ import annotations

import argparse
from pathlib import Path

from aggregator import models_cli


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this package's sub-commands to the `tessera` parser."""
    aggregator = commands.add_parser("aggregator", help="the aggregation service")
    sub = aggregator.add_subparsers(dest="aggregator_command", metavar="ACTION", required=True)
    run = sub.add_parser("run", help="run the aggregator service until SIGTERM")
    run.add_argument("--config", type=Path, required=True, help="the aggregator's TOML file")
    run.set_defaults(handler=run_command)
    rebuild = sub.add_parser(
        "rebuild-state",
        help="rebuild a lost or empty state store from models/ and the audit log",
    )
    rebuild.add_argument("--config", type=Path, required=True, help="the aggregator's TOML file")
    rebuild.add_argument(
        "--anchor", help="SEQ:HASH of the audit log, kept apart from it: checked first"
    )
    rebuild.set_defaults(handler=rebuild_command)
    models_cli.register(commands)


def run_command(args: argparse.Namespace) -> int:
    """Load the configuration, log JSON at its level, run the daemon."""
    from aggregator.config import load_config
    from aggregator.state_history import open_checked_store
    from tessera.errors import DiskFull
    from tessera.observability.logs import configure_logging

    config = load_config(args.config)
    configure_logging(config.log_level)
    # A lost or stale store is refused here, in a second, before the slow imports (torch);
    # the daemon checks again when it opens the store for good.
    config.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        open_checked_store(config.layout, config.study_id).close()
    except DiskFull:
        pass  # the daemon starts, not ready, and opens the store once the space is back
    from aggregator.daemon import run

    return run(config)


def rebuild_command(args: argparse.Namespace) -> int:
    """Rebuild the store (aggregator.rebuild) and print what was recovered."""
    from aggregator.config import load_config
    from aggregator.rebuild import rebuild_state
    from aggregator.setup import load_study_setup
    from tessera.errors import ConfigError
    from tessera.governance.audit import Anchor

    config = load_config(args.config)
    try:
        anchor = None if args.anchor is None else Anchor.from_text(args.anchor)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    report = rebuild_state(config, load_study_setup(config), anchor)
    print("\n".join(report.lines()))
    return 0
