"""The `tessera` command. Service packages add sub-commands through the
`tessera.commands` entry-point group, so the core never imports them.

A package may also add an action under a command another package owns (for example the
node's `tessera audit privacy`, under the core's `tessera audit`): it registers a function
in the `tessera.command_extensions` group, which runs after every command exists and finds
the command's actions with `subcommands(commands, "audit")`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from tessera import __version__
from tessera.errors import TesseraError

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]
Register = Callable[["Subparsers"], None]

COMMAND_GROUP = "tessera.commands"
EXTENSION_GROUP = "tessera.command_extensions"


def subcommands(commands: Subparsers, name: str) -> Subparsers:
    """The actions of the existing command `name`, for an extension to add one to.

    ValueError naming the fix if there is no such command or it takes no actions.
    """
    parser = commands.choices.get(name)
    if parser is None:
        raise ValueError(f"no `tessera {name}` command to extend; is its package installed?")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise ValueError(f"`tessera {name}` takes no actions, so none can be added to it")


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with every installed service's sub-commands."""
    parser = argparse.ArgumentParser(prog="tessera", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tessera {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in (COMMAND_GROUP, EXTENSION_GROUP):  # extensions last: they add to commands
        for entry in sorted(entry_points(group=group), key=lambda e: e.name):
            register: Register = entry.load()
            register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, dispatch, and turn Tessera's own errors into a one-line message and exit 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        result = handler(args)
    except TesseraError as error:
        print(f"tessera: error: {error}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
