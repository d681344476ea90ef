"""`tessera node ...` and `tessera synth` sub-commands.

A thin dispatcher: each feature module registers its own commands. To add `tessera node
<cmd>`, add its `register(node_commands)` function to NODE_COMMANDS below.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

from node import daemon_cli
from node.inference import cli as inference_cli
from node.intake import cli as intake_cli
from node.privacy import ledger_cli

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

# Each adds its sub-commands under `tessera node`.
NODE_COMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    intake_cli.register,
    inference_cli.register,
    daemon_cli.register,
    ledger_cli.register,
)


def register(commands: Subparsers) -> None:
    """Add this package's sub-commands to the `tessera` parser."""
    node = commands.add_parser("node", help="the hospital node")
    node_commands = node.add_subparsers(dest="node_command", metavar="NODE_COMMAND")
    node.set_defaults(handler=lambda _args: _usage(node))
    for add in NODE_COMMANDS:
        add(node_commands)
    intake_cli.register_synth(commands)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2
