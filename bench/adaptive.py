"""Adaptive aggregation vs FedAvg alone vs FedSGD alone on the skewed synthetic task.

Run: .venv/bin/python bench/adaptive.py [--rounds 8] [--target 0.80] [--seed 0]
         [--variants fedavg,fedsgd,adaptive,adaptive-0.5-2]

Each variant is a whole `tessera demo` federation (embedded broker, real processes: two
aggregators, three nodes) on the same seed, hence the same synthetic hospitals, genesis
weights, DP settings and local plan; only the aggregation policy differs:

- fedavg: adaptive off, every round FedAvg (the baseline: ratios are against it);
- fedsgd: adaptive off, every round FedSGD (one local step a round);
- adaptive: adaptive on, starting with FedAvg, the demo's band (lower 1, upper 4);
- adaptive-0.5-2: adaptive on with the module defaults of PolicyConfig (lower 0.5, upper 2),
  the band that, before `dispersion` was divided by n - 1, read DP noise as drift.

Rounds-to-target is the first round whose released model reaches the target mean held-out
accuracy over the sites (`report["rounds"]`, ONNX Runtime on each site's test split); "-"
when it never does within --rounds. The requirement: adaptive needs no more rounds than the
better of fedavg and fedsgd. The dispersion the policy saw each round is read from the
released model cards (validation.dispersion).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from node.demo.options import DemoOptions
from node.demo.progress import Progress
from node.demo.run import run_demo

VARIANTS = {
    "fedavg": {"adaptive": False, "algorithm": "fedavg"},
    "fedsgd": {"adaptive": False, "algorithm": "fedsgd"},
    "adaptive": {"adaptive": True, "algorithm": "fedavg"},
    "adaptive-0.5-2": {
        "adaptive": True,
        "algorithm": "fedavg",
        "adaptive_lower": 0.5,
        "adaptive_upper": 2.0,
    },
}


def rounds_to_target(curve: list[dict[str, object]], target: float) -> int | None:
    """The first round whose release reaches `target` mean accuracy, or None."""
    for entry in curve:
        if float(entry["accuracy"]) >= target:  # type: ignore[arg-type]
            return int(entry["round"])  # type: ignore[call-overload]
    return None


def dispersions(out: Path) -> list[float]:
    """The dispersion each released round's aggregate had (from site-a's model cards)."""
    models = out / "federation" / "state" / "site-a" / "models"
    found = []
    for folder in sorted(models.iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else 0):
        card = folder / "card.json"
        if card.exists():
            value = json.loads(card.read_text())["validation"]["dispersion"]
            found.append(float(value) if value != "inf" else math.inf)
    return found


def run_variant(name: str, extra: dict[str, object], args: argparse.Namespace, root: Path) -> dict:
    opts = DemoOptions(
        out=root / name,
        rounds=args.rounds,
        seed=args.seed,
        timeout_s=args.timeout,
        **extra,  # type: ignore[arg-type]
    )
    with (root / f"{name}.log").open("w") as log:
        report = run_demo(opts, Progress(log))
    curve = report["rounds"]
    assert isinstance(curve, list)
    central = report["centralised"]
    local = report["local_only"]
    assert isinstance(central, dict) and isinstance(local, dict)
    return {
        "curve": curve,
        "dispersion": dispersions(root / name),
        "switches": report["switches"],
        "to_target": rounds_to_target(curve, args.target),
        "final": curve[-1]["accuracy"] if curve else math.nan,
        "centralised": sum(v["accuracy"] for v in central.values()) / len(central),
        "local_only": sum(v["accuracy"] for v in local.values()) / len(local),
        "seconds": report["seconds"],
    }


def show(value: int | None) -> str:
    return "-" if value is None else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--target", type=float, default=0.80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0, help="per round, seconds")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs here")
    args = parser.parse_args()
    variants = {name: VARIANTS[name] for name in args.variants.split(",")}
    results = {}
    with tempfile.TemporaryDirectory(prefix="tessera-adaptive-") as scratch:
        root = args.keep or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        for name, extra in variants.items():
            start = time.monotonic()
            results[name] = run_variant(name, extra, args, root)
            print(f"ran {name} in {time.monotonic() - start:.0f} s", file=sys.stderr)
    print(
        f"## adaptive vs fedavg vs fedsgd: 3 sites x 160 images, skew 0.8, seed {args.seed}, "
        f"{args.rounds} rounds, DP noise 0.5, lr 0.1, 2 local epochs; target mean held-out "
        f"accuracy {args.target:.2f}"
    )
    print("mean held-out accuracy per round (algorithm used: a = FedAvg, s = FedSGD)")
    width = max(len(n) for n in results)
    header = "  ".join(f"r{i + 1:<5}" for i in range(args.rounds))
    print(f"  {'variant':{width}}  {header}")
    for name, r in results.items():
        cells = "  ".join(f"{float(e['accuracy']):.3f}{str(e['algorithm'])[3]}" for e in r["curve"])
        print(f"  {name:{width}}  {cells}")
    print("dispersion of each round's aggregate (what the policy saw)")
    for name, r in results.items():
        cells = "  ".join(f"{d:<6.3g}" for d in r["dispersion"])
        print(f"  {name:{width}}  {cells}")
    base = results.get("fedavg")
    print("summary (ratios: rounds-to-target / fedavg's, final accuracy / fedavg's)")
    for name, r in results.items():
        steps, final = "-", "-"
        if base and r["to_target"] and base["to_target"]:
            steps = f"{r['to_target'] / base['to_target']:.2f}x"
        if base:
            final = f"{float(r['final']) / float(base['final']):.2f}x"
        print(
            f"  {name:{width}}  rounds-to-target {show(r['to_target']):>2} ({steps:>5})  "
            f"final {float(r['final']):.3f} ({final})  "
            f"switches {len(r['switches'])}  {r['seconds']:.0f} s"
        )
    for name, r in results.items():
        print(
            f"  baselines of {name} (same epochs): centralised {r['centralised']:.3f}, "
            f"local-only {r['local_only']:.3f}"
        )
    if {"fedavg", "fedsgd"} <= results.keys():
        best = min(
            (results[n]["to_target"] for n in ("fedavg", "fedsgd") if results[n]["to_target"]),
            default=None,
        )
        for name in (n for n in results if n.startswith("adaptive")):
            reached = results[name]["to_target"]
            holds = reached is not None and (best is None or reached <= best)
            print(
                f"requirement ({name} rounds-to-target <= better of fedavg/fedsgd = "
                f"{show(best)}): {show(reached)} -> {'MET' if holds else 'NOT MET'}"
            )
    for name, r in results.items():
        for switch in r["switches"]:
            print(f"  {name} switch: {switch}")


if __name__ == "__main__":
    main()
