"""`tessera aggregator ...` sub-commands."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this package's sub-commands to the `tessera` parser."""
    del commands  # sub-commands arrive with the aggregator issue
