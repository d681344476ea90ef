"""What the demo measures once the federation has run: every released model on every site's
held-out data, the two baselines, the wire, the privacy spent, the strategy, a plot.

Baselines train the same architecture from the same genesis weights with the same DP-SGD
settings and the same total number of local epochs as the federation:

- centralised: one model on the union of the sites' training data (what pooling the images
  in one place, which the federation exists to avoid, would give);
- local-only: each site alone on its own training data, evaluated on its own held-out data.

Evaluation runs the released ONNX files through ONNX Runtime (what a site serves), and the
baselines through torch; both on the cache's `test` split, which no training ever sees.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from node.inference.runtime import load_model
from node.intake.cache import CachedDataset
from node.intake.preprocess import PreprocessConfig
from node.privacy.ledger import PrivacyLedger
from node.training.metrics import macro_auc
from node.training.trainer import DPSettings, TrainConfig, evaluate, run_local_round
from tessera.models.study import StudyModel


@dataclass(frozen=True)
class Score:
    """Accuracy and AUC on one held-out set."""

    accuracy: float
    auc: float

    @classmethod
    def of(cls, probabilities: np.ndarray, labels: np.ndarray) -> Score:
        """Score class probabilities against labels."""
        accuracy = float(np.mean(probabilities.argmax(axis=1) == labels))
        return cls(accuracy, macro_auc(probabilities, labels))


@dataclass(frozen=True)
class SiteData:
    """One site's cached training and held-out arrays."""

    site: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def load_site_data(site: str, state_dir: Path, preprocess: PreprocessConfig) -> SiteData:
    """The site's labelled train and test splits from its cache."""
    train = CachedDataset(state_dir, preprocess, split="train", labelled_only=True).stack()
    test = CachedDataset(state_dir, preprocess, split="test", labelled_only=True).stack()
    return SiteData(site, *train, *test)


def score_onnx(onnx: bytes, data: Sequence[SiteData]) -> dict[str, Score]:
    """Each site's held-out score for one released ONNX model (ONNX Runtime)."""
    model = load_model(onnx, threads=1)
    return {d.site: Score.of(model.probabilities(d.test_x), d.test_y) for d in data}


@dataclass(frozen=True)
class BaselinePlan:
    """How the baselines train: the federation's settings, totalled over its rounds."""

    epochs: int
    batch_size: int
    learning_rate: float
    noise_multiplier: float
    max_grad_norm: float
    seed: int = 0


def _train_and_score(
    model_def: StudyModel,
    x: np.ndarray,
    y: np.ndarray,
    tests: Sequence[SiteData],
    plan: BaselinePlan,
    ledger_path: Path,
) -> dict[str, Score]:
    """Train one baseline model (in a worker process) and score it on `tests`."""
    import torch

    torch.set_num_threads(1)
    model = model_def.build()
    cfg = TrainConfig(
        local_epochs=plan.epochs,
        batch_size=plan.batch_size,
        learning_rate=plan.learning_rate,
        seed=plan.seed,
        dp=DPSettings(plan.noise_multiplier, plan.max_grad_norm),
        device="cpu",
    )
    ledger = PrivacyLedger(ledger_path, "baseline", 1e6, 1e-5)  # no limit: a measurement
    run_local_round(model, x, y, cfg, ledger, 1)
    scores = {}
    for d in tests:
        metrics = evaluate(model, d.test_x, d.test_y)
        scores[d.site] = Score(metrics.accuracy, metrics.auc)
    return scores


def baselines(
    model_def: StudyModel, data: Sequence[SiteData], plan: BaselinePlan, work: Path
) -> tuple[dict[str, Score], dict[str, Score]]:
    """(centralised, local-only) scores, trained in parallel worker processes.

    Centralised: one model on every site's training data, scored on each site's held-out
    data. Local-only: each site's own model, scored on its own held-out data.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pooled_x = np.concatenate([d.train_x for d in data])
    pooled_y = np.concatenate([d.train_y for d in data])
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        central = pool.submit(
            _train_and_score,
            model_def,
            pooled_x,
            pooled_y,
            data,
            plan,
            work / "centralised-ledger.json",
        )
        local = [
            pool.submit(
                _train_and_score,
                model_def,
                d.train_x,
                d.train_y,
                [d],
                plan,
                work / f"local-{d.site}.json",
            )
            for d in data
        ]
        local_scores = {}
        for future in local:
            local_scores.update(future.result())
        return central.result(), local_scores


@dataclass
class RunRecord:
    """What the federation did, gathered from the services' logs and stores."""

    rounds: list[dict[str, object]] = field(default_factory=list)  # per released version
    aborts: list[dict[str, object]] = field(default_factory=list)
    joined: dict[str, int] = field(default_factory=dict)  # rounds joined per site
    epsilon: dict[str, float] = field(default_factory=dict)  # per site, composed total
    bytes_sent: int = 0  # share envelopes the nodes published
    plaintext_bytes: int = 0  # the same updates as float32
    switches: list[dict[str, object]] = field(default_factory=list)


def mean(scores: Mapping[str, Score], what: str) -> float:
    """The mean accuracy or AUC over sites (NaN-aware)."""
    values = [getattr(s, what) for s in scores.values()]
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def plot_curves(
    path: Path,
    curve: Sequence[tuple[int, Mapping[str, Score]]],
    central: Mapping[str, Score],
    local: Mapping[str, Score],
) -> None:
    """A PNG of held-out accuracy and AUC by round, with the two baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    rounds = [r for r, _ in curve]
    for axis, what, title in ((axes[0], "accuracy", "Accuracy"), (axes[1], "auc", "AUC")):
        axis.plot(rounds, [mean(s, what) for _, s in curve], "o-", label="federated (mean)")
        sites = sorted(curve[0][1]) if curve else []
        for site in sites:
            axis.plot(
                rounds,
                [getattr(s[site], what) for _, s in curve],
                alpha=0.35,
                label=f"federated, {site}",
            )
        axis.axhline(mean(central, what), color="black", ls="--", label="centralised")
        axis.axhline(mean(local, what), color="grey", ls=":", label="local-only (mean)")
        axis.set_xlabel("round")
        axis.set_title(f"Held-out {title}")
        axis.set_ylim(0.0, 1.02)
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_json(path: Path, value: object) -> None:
    """Write the machine-readable summary next to the plot."""
    path.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
