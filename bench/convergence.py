"""Federated vs centralised vs local-only accuracy on the skewed synthetic task, in one
process: what issue #6's convergence criterion measures, fast enough to compare settings.

    .venv/bin/python bench/convergence.py [--rounds 20] [--noise 0.5] [--per-sample-clip 1.0]
        [--images-per-site 320] [--no-dp] [--seed 1]   (--help for the rest)

The same parts as a live federation, without the processes and the broker: synthetic DICOM
through the real intake and cache, the nodes' `run_local_round` (DP-SGD, per-sample clip,
Opacus accountant), `build_update` (delta clip, sample weight, packed statistics), the sum
of the packed vectors split by `aggregate_from_vector` and averaged by the aggregators'
FedAvg, `apply_update`; secret sharing is left out (it is exact up to the ring's fixed point,
see tests/aggregator). Baselines: `node.demo.report.baselines`, the demo's (same
architecture, genesis, DP-SGD settings and total epochs).

Prints the federated mean held-out accuracy each round and, at the end, the ratios of
federated to centralised and to local-only accuracy, and the gap in points.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from aggregator.strategies import (
    ServerState,
    StrategyConfig,
    aggregate_from_vector,
    apply_update,
    fedavg,
)
from node.demo.federation import FederationSpec, prepare_federation
from node.demo.report import BaselinePlan, SiteData, baselines, load_site_data, mean
from node.intake.ingest import IntakeConfig, run_ingest
from node.privacy.ledger import PrivacyLedger
from node.setup import study_preprocess
from node.synth.sites import SynthConfig, generate
from node.training.trainer import DPSettings, TrainConfig, evaluate, run_local_round
from node.training.update import build_update
from tessera.crypto.flatten import flatten, unflatten
from tessera.models.study import StudyModel
from tessera.models.transfer import trainable_parameters
from tessera.models.weights import load_arrays, state_arrays


def parse() -> argparse.Namespace:
    """The command line (defaults: the demo's DP-SGD terms, four sites, 20 rounds)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--sites", type=int, default=4)
    add("--images-per-site", type=int, default=320)
    add("--test-fraction", type=float, default=0.5)
    add("--skew", type=float, default=0.8)
    add("--lesion-contrast", type=float, default=40.0, help="in units of the scanner's noise")
    add("--rounds", type=int, default=20)
    add("--local-epochs", type=int, default=2)
    add("--learning-rate", type=float, default=0.1)
    add("--batch-size", type=int, default=32)
    add("--noise", type=float, default=0.5, help="DP-SGD noise multiplier")
    add("--per-sample-clip", type=float, default=1.0)
    add("--no-dp", action="store_true", help="plain SGD at the sites (no baselines then)")
    add("--clip-norm", type=float, default=20.0, help="L2 bound on a site's round delta")
    add("--seed", type=int, default=1, help="synthetic hospitals")
    return parser.parse_args()


def prepare(args: argparse.Namespace, root: Path) -> tuple[StudyModel, list[SiteData]]:
    """Synthetic hospitals through the real intake; the study's model and each site's data."""
    generate(SynthConfig(out=root / "synth", sites=args.sites, seed=args.seed,
                         images_per_site=args.images_per_site, skew=args.skew, size=64,
                         modality="cr", lesion_contrast=args.lesion_contrast, lesion_scale=2.5,
                         test_fraction=args.test_fraction))  # fmt: skip
    sites = tuple(f"site-{chr(ord('a') + i)}" for i in range(args.sites))
    folders = {s: root / "synth" / f"site-{i:02d}" for i, s in enumerate(sites)}
    spec = FederationSpec(sites=sites, architecture="spot-cnn-v1", clip_norm=args.clip_norm)
    prepared = prepare_federation(root / "federation", spec)
    model = prepared.study_model()
    preprocess = study_preprocess(model)
    for site in sites:
        run_ingest(IntakeConfig(intake_dir=folders[site] / "dicom", state_dir=prepared.state(site),
                                preprocess=preprocess, label_set=prepared.study().labels,
                                labels_csv=folders[site] / "labels.csv", workers=1))  # fmt: skip
    return model, [load_site_data(s, prepared.state(s), preprocess) for s in sites]


def federate(
    args: argparse.Namespace, model_def: StudyModel, data: list[SiteData], root: Path
) -> list[float]:
    """ROUNDS rounds of FedAvg; the mean held-out accuracy after each."""
    dp = None if args.no_dp else DPSettings(args.noise, args.per_sample_clip)
    model, curve = model_def.build(), []
    for number in range(1, args.rounds + 1):
        base = state_arrays(model)
        trainable = trainable_parameters(model)
        total: np.ndarray | None = None
        for site in data:
            local = model_def.build()
            load_arrays(local, base)
            cfg = TrainConfig(local_epochs=args.local_epochs, batch_size=args.batch_size,
                              learning_rate=args.learning_rate, seed=number, dp=dp,
                              device="cpu")  # fmt: skip
            ledger = None if dp is None else PrivacyLedger(
                root / f"{site.site}.json", "bench", 1e9, 1e-5)  # fmt: skip
            result = run_local_round(local, site.train_x, site.train_y, cfg, ledger, number)
            update = build_update(trainable, trainable_parameters(local), result.train_samples,
                                  result.validation.loss, args.clip_norm,
                                  weight_cap=args.images_per_site)  # fmt: skip
            total = update.values if total is None else total + update.values
        assert total is not None
        step, _ = fedavg(aggregate_from_vector(total, len(data)), ServerState(), StrategyConfig())
        vector, layout = flatten(trainable)
        load_arrays(model, {**base, **unflatten(apply_update(vector, step), layout)})
        accuracy = float(np.mean([evaluate(model, d.test_x, d.test_y).accuracy for d in data]))
        curve.append(accuracy)
        print(f"round {number:3d}  federated mean held-out accuracy {accuracy:.3f}", flush=True)
    return curve


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tessera-convergence-") as tmp:
        root = Path(tmp)
        model_def, data = prepare(args, root)
        print(f"sites: {[(d.site, len(d.train_y), len(d.test_y)) for d in data]} "
              "(training, held-out)")  # fmt: skip
        fed = federate(args, model_def, data, root)[-1]
        if args.no_dp:
            seconds = time.monotonic() - started
            print(f"federated {fed:.3f} (no baselines without DP); {seconds:.0f} s")
            return
        plan = BaselinePlan(epochs=args.rounds * args.local_epochs, batch_size=args.batch_size,
                            learning_rate=args.learning_rate, noise_multiplier=args.noise,
                            max_grad_norm=args.per_sample_clip)  # fmt: skip
        (root / "baselines").mkdir()
        central, local = baselines(model_def, data, plan, root / "baselines")
    cen, loc = mean(central, "accuracy"), mean(local, "accuracy")
    print(f"federated {fed:.3f}  centralised {cen:.3f}  local-only {loc:.3f}")
    print(f"ratio federated/centralised {fed / cen:.3f}  federated/local-only {fed / loc:.3f}  "
          f"gap to centralised {100 * (cen - fed):+.1f} points  "
          f"({time.monotonic() - started:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
