"""`tessera aggregator ...` and `tessera models ...` sub-commands: a thin dispatcher."""

from __future__ import annotations

import argparse

from aggregator import models_cli


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this package's sub-commands to the `tessera` parser."""
    models_cli.register(commands)
