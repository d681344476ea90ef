"""`tessera demo`: the README's first command (see node.demo.run)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `tessera demo`."""
    from node.demo.options import DemoOptions

    defaults = DemoOptions()
    demo = commands.add_parser(
        "demo", help="run a local federation (3 hospitals, 2 aggregators) and report"
    )
    demo.add_argument("--out", type=Path, default=defaults.out, help="where to write it all")
    demo.add_argument("--rounds", type=int, default=defaults.rounds)
    demo.add_argument("--images-per-site", type=int, default=defaults.images_per_site)
    demo.add_argument("--seed", type=int, default=defaults.seed)
    demo.add_argument(
        "--broker",
        choices=("embedded", "mosquitto"),
        default=defaults.broker,
        help="embedded: in-process development broker (default); mosquitto: the local "
        "mosquitto binary with the provisioned TLS certificates and ACL",
    )
    demo.set_defaults(handler=demo_command)


def demo_command(args: argparse.Namespace) -> int:
    """Run the demo; 0 when every round released a model."""
    from node.demo.options import DemoOptions
    from node.demo.run import run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("amqtt").setLevel(logging.CRITICAL)  # its PUBACK retries are noise
    options = DemoOptions(out=args.out, rounds=args.rounds,
                          images_per_site=args.images_per_site, seed=args.seed,
                          broker=args.broker)  # fmt: skip
    report = run_demo(options)
    return 0 if len(report["rounds"]) == options.rounds else 1  # type: ignore[arg-type]
