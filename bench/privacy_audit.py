"""The privacy audit's cost: shadow-model training time over one local training round.

Run: .venv/bin/python bench/privacy_audit.py [--record] [--quick]

Baseline: one local round of `node.training.trainer.run_local_round` with the site's recipe on the
members (what a site spends per federated round). Candidate: the shadow training of
`node.privacy.attacks.audit_membership` with the same recipe (S shadows, each on a random half
of members + non-members), measured inside the same audit. The rest of the audit (scoring,
bootstrap, the empirical-epsilon search) is reported as a ratio to the same baseline.
Baseline and audit alternate, and the median of the repeats is reported, so load from other
processes on a shared machine hits both alike. Plain SGD and DP-SGD (Opacus) recipes.

Expected shape: shadows ~ S * (pool / 2) / members rounds, since each shadow trains on half
the pool for the recipe's epochs; the default budget is S = 8.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.privacy.attacks import AuditConfig, DPClaim, audit_membership
from node.privacy.ledger import PrivacyLedger
from node.training.trainer import DPSettings, TrainConfig, run_local_round
from tessera.models import ModelSpec, build_model

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## privacy_audit (`bench/privacy_audit.py`)"


def data(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes: a brighter square in class 1, plus noise (learnable, not trivial)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(0, 1, (n, 1, size, size)).astype(np.float32)
    x[y == 1, :, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] += 0.5
    return x, y


def one_case(label: str, recipe: TrainConfig, args: argparse.Namespace) -> list[str]:
    """Median seconds of one round and of the audit's parts; the ratio lines."""
    spec = ModelSpec("small-cnn", 1, 2, "group")
    members = data(args.members, args.size, 1)
    non_members = data(args.non_members, args.size, 2)
    budget = AuditConfig(shadow_models=args.shadows, bootstrap=args.bootstrap, seed=0)
    rounds, shadows, rest = [], [], []
    with tempfile.TemporaryDirectory() as scratch:  # warm-up: thread pools, Opacus imports
        ledger = PrivacyLedger(Path(scratch) / "l.json", "bench", 1e9, 1e-5)
        run_local_round(build_model(spec), *members, recipe, ledger if recipe.dp else None)
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as scratch:
            ledger = None
            if recipe.dp is not None:
                ledger = PrivacyLedger(Path(scratch) / "l.json", "bench", 1e9, 1e-5)
            model = build_model(spec, seed=repeat)
            start = time.perf_counter()
            run_local_round(model, *members, recipe, ledger, round_number=1)
            rounds.append(time.perf_counter() - start)
            claim = DPClaim(ledger.spent, 1e-5) if ledger is not None else None
            start = time.perf_counter()
            result = audit_membership(model, spec, members, non_members, recipe, budget, claim)
            total = time.perf_counter() - start
            shadows.append(result.shadow_seconds)
            rest.append(total - result.shadow_seconds)
    base, shadow, other = (statistics.median(v) for v in (rounds, shadows, rest))
    lira = result.attacks["lira"].auc.value
    return [
        f"{label:>5}  round {base:6.2f}s  shadows {shadow:7.2f}s  ratio {shadow / base:5.2f}x"
        f"  ({shadow / base / args.shadows:4.2f}x per shadow)  rest of audit "
        f"{other:5.2f}s = {other / base:4.2f}x  [LiRA AUC {lira:.2f}]"
    ]


def main() -> None:
    """Run the plain and the DP case, print them, optionally record them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="update bench/RESULTS.md")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller data")
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    args.members, args.non_members = (400, 100) if args.quick else (800, 200)
    args.repeats = 1 if args.quick else 3
    args.shadows, args.bootstrap = 8, 200
    torch.set_num_threads(max(1, torch.get_num_threads()))
    recipe = TrainConfig(local_epochs=1, batch_size=32, learning_rate=0.05, momentum=0.9,
                         device="cpu", validation_fraction=0.2)  # fmt: skip
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0)
    wall = time.perf_counter()
    lines = [
        f"privacy audit cost: small-cnn {args.size}x{args.size}, {args.members} members + "
        f"{args.non_members} non-members, recipe 1 epoch batch 32, S = {args.shadows} shadows "
        f"(each on half the pool), {args.bootstrap} bootstrap resamples, median of "
        f"{args.repeats}, {torch.get_num_threads()} torch threads",
        *one_case("plain", recipe, args),
        *one_case("dp", TrainConfig(**{**recipe.__dict__, "dp": dp}), args),
        f"(total benchmark time {time.perf_counter() - wall:.0f} s)",
    ]
    print("\n".join(lines))
    if args.record:
        record(lines, sys.argv[1:])


def record(lines: list[str], argv: list[str]) -> None:
    """Replace (or append) only this benchmark's section of bench/RESULTS.md, re-read now."""
    text = RESULTS.read_text()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = " ".join([".venv/bin/python bench/privacy_audit.py", *argv])
    body = (
        f"\n\nCommand: `{command}` (run {when} on the shared 2-core machine; other work was "
        "running, so absolute times are noisy, the ratios less so)\n\n```\n"
        + "\n".join(lines)
        + "\n```\n"
    )
    if SECTION not in text:
        RESULTS.write_text(text.rstrip("\n") + "\n\n" + SECTION + body)
        return
    start = text.index(SECTION) + len(SECTION)
    end = text.find("\n## ", start)
    end = len(text) if end == -1 else end
    RESULTS.write_text(text[:start] + body + text[end:])


if __name__ == "__main__":
    main()
