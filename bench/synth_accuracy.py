"""How hard is the synthetic task? Train a small CNN centrally on all sites' training
splits (through the real intake and cache) and report accuracy on the held-out test splits.

Target: about 85-95 % (a task every method solves perfectly cannot tell strategies apart).

    .venv/bin/python bench/synth_accuracy.py --sites 5 --images-per-site 400 --epochs 12
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from node.intake.cache import CachedDataset
from node.intake.ingest import IntakeConfig, run_ingest
from node.intake.preprocess import PreprocessConfig
from node.synth.sites import LABELS, SynthConfig, generate


def small_cnn() -> nn.Module:
    """Three conv blocks and a linear head: the size of model the demo trains."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
        nn.Flatten(), nn.Linear(64, 2),
    )  # fmt: skip


def load(root: Path, sites: int, cfg: PreprocessConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Ingest every site into its own state dir; return stacked train and test arrays."""
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    for site in range(sites):
        state = root / "state" / f"site-{site:02d}"
        intake = IntakeConfig(
            root / "synth" / f"site-{site:02d}" / "dicom", state, preprocess=cfg,
            label_set=LABELS, labels_csv=root / "synth" / f"site-{site:02d}" / "labels.csv",
        )  # fmt: skip
        run_ingest(intake)
        for split in parts:
            parts[split].append(CachedDataset(state, cfg, split=split, labelled_only=True).stack())
    return {
        split: (np.concatenate([x for x, _ in chunks]), np.concatenate([y for _, y in chunks]))
        for split, chunks in parts.items()
    }


def main() -> None:
    """Generate, ingest, train, evaluate; print the test accuracy."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--images-per-site", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    cfg = PreprocessConfig()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(SynthConfig(root / "synth", sites=args.sites, seed=args.seed,
                             images_per_site=args.images_per_site))  # fmt: skip
        data = load(root, args.sites, cfg)
    x_train, y_train = (torch.from_numpy(a) for a in data["train"])
    x_test, y_test = (torch.from_numpy(a) for a in data["test"])
    model = small_cnn()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    history: list[float] = []
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train))
        for i in range(0, len(order), 32):
            batch = order[i : i + 32]
            optimiser.zero_grad()
            loss = loss_fn(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimiser.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        history.append(accuracy)
        print(f"epoch {epoch + 1:2d}  loss {loss.item():.3f}  test accuracy {accuracy:.3f}")
    print(f"train {len(x_train)}  test {len(x_test)}  seconds {time.perf_counter() - start:.0f}")
    tail = history[-5:]
    print(f"central test accuracy: last epoch {accuracy:.3f}, mean of last {len(tail)} "
          f"epochs {sum(tail) / len(tail):.3f}, best {max(history):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
