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
    models_cli.register(commands)


def run_command(args: argparse.Namespace) -> int:
    """Load the configuration, log JSON at its level, run the daemon."""
    from aggregator.config import load_config
    from aggregator.daemon import run
    from tessera.observability.logs import configure_logging

    config = load_config(args.config)
    configure_logging(config.log_level)
    return run(config)
