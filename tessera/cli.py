"""The `tessera` command. Service packages add sub-commands through the
`tessera.commands` entry-point group, so the core never imports them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from tessera import __version__
from tessera.errors import TesseraError

Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with every installed service's sub-commands."""
    parser = argparse.ArgumentParser(prog="tessera", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tessera {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for entry in sorted(entry_points(group="tessera.commands"), key=lambda e: e.name):
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
