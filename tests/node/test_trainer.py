"""Local trainer: seeding, FedSGD/FedAvg plans, FedProx, validation metrics, real DICOM cache."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from node.errors import NodeError
from node.training.metrics import binary_auc, macro_auc
from node.training.trainer import TrainConfig, run_local_round, select_device, split_validation
from tessera.models.onnx_export import read_metadata
from tessera.models.transfer import trainable_parameters
from tessera.models.weights import load_weights, model_hash
from tests.support.models import LABELS, ingested_site, small_model

torch.set_num_threads(1)


def _data(n: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(0, 1, (n, 1, 16, 16)).astype(np.float32)
    x[y == 1, :, 4:12, 4:12] += 1.5  # a bright square marks class 1
    return x, y


def _delta_norm(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum((after[k] - before[k]) ** 2)) for k in before))


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    x, y = _data()
    results = []
    for seed in (1, 1, 2):
        model, _ = small_model()
        run_local_round(model, x, y, TrainConfig(local_epochs=2, batch_size=8, seed=seed))
        results.append(trainable_parameters(model))
    assert all(np.array_equal(results[0][k], results[1][k]) for k in results[0])
    assert any(not np.array_equal(results[0][k], results[2][k]) for k in results[0])


def test_fedsgd_is_one_gradient_step() -> None:
    x, y = _data(20)
    model, _ = small_model()
    cfg = TrainConfig(algorithm="fedsgd", batch_size=64, learning_rate=0.1, seed=3)
    train_idx, _ = split_validation(len(x), cfg.validation_fraction, cfg.seed)
    before = {k: torch.from_numpy(v) for k, v in trainable_parameters(model).items()}
    # The expected step: -lr * gradient of the mean loss over the whole training split.
    reference, _ = small_model()
    loss = F.cross_entropy(
        reference(torch.from_numpy(x[train_idx])), torch.from_numpy(y[train_idx])
    )
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    result = run_local_round(model, x, y, cfg)
    assert result.steps == 1 and result.train_samples == len(train_idx)
    after = trainable_parameters(model)
    for (name, _), grad in zip(reference.named_parameters(), grads, strict=True):
        expected = before[name] - 0.1 * grad
        np.testing.assert_allclose(after[name], expected.detach().numpy(), atol=1e-5)


def test_fedavg_step_plans() -> None:
    x, y = _data(50)  # 40 train after the 20% validation split
    model, _ = small_model()
    assert run_local_round(model, x, y, TrainConfig(local_epochs=3, batch_size=16)).steps == 9
    assert run_local_round(model, x, y, TrainConfig(local_steps=7, batch_size=16)).steps == 7


def test_fedprox_keeps_the_model_closer_to_the_start() -> None:
    x, y = _data()
    distances = []
    for mu in (0.0, 5.0):
        model, _ = small_model()
        start = trainable_parameters(model)
        cfg = TrainConfig(local_epochs=4, batch_size=8, learning_rate=0.1, prox_mu=mu)
        run_local_round(model, x, y, cfg)
        distances.append(_delta_norm(start, trainable_parameters(model)))
    assert 0 < distances[1] < 0.8 * distances[0], distances


def test_a_proximal_step_that_would_erase_or_reverse_every_step_is_refused() -> None:
    """Found by a sweep: with learning_rate * prox_mu = 1 every local step was pulled all the
    way back to the round's start, and nodes sent all-zero updates without a word."""
    TrainConfig(learning_rate=0.5, prox_mu=1.9)
    for mu in (2.0, 3.0):
        with pytest.raises(ValueError, match="must be below 1"):
            TrainConfig(learning_rate=0.5, prox_mu=mu)


def test_validation_split_is_seeded_disjoint_and_complete() -> None:
    train, val = split_validation(30, 0.2, seed=4)
    assert len(val) == 6 and not set(train) & set(val)
    assert sorted([*train, *val]) == list(range(30))
    assert np.array_equal(split_validation(30, 0.2, seed=4)[1], val)
    assert not np.array_equal(split_validation(30, 0.2, seed=5)[1], val)
    with pytest.raises(NodeError):
        split_validation(1, 0.2, 0)


def test_auc_matches_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 40).astype(float)  # many ties
    labels = rng.integers(0, 2, 40).astype(bool)
    pos, neg = scores[labels], scores[~labels]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    assert binary_auc(scores, labels) == pytest.approx(wins / (len(pos) * len(neg)))
    assert binary_auc(np.array([0.1, 0.9]), np.array([False, True])) == 1.0
    assert math.isnan(binary_auc(np.array([0.1, 0.2]), np.array([True, True])))
    three = np.eye(3)[[0, 1, 2, 0]] * 0.8 + 0.05
    assert macro_auc(three, np.array([0, 1, 2, 0])) == 1.0


def test_device_selection() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
    assert select_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(NodeError, match="no CUDA device"):
            select_device("cuda")


def test_train_command_on_real_ingested_dicom(tmp_path: Path) -> None:
    site = ingested_site(tmp_path)  # synthetic hospital -> DICOM files -> real intake cache
    assert len(site.images) >= 20 and set(site.labels) == {0, 1}
    out = tmp_path / "out"
    command = [sys.executable, "-m", "tessera.cli", "node", "train", "--state", str(site.state_dir),
               "--out", str(out), "--size", "32", "--epochs", "2", "--batch-size", "8",
               "--device", "cpu", "--version", "local-7"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout)
    assert summary["steps"] == 2 * math.ceil(summary["train_samples"] / 8)
    assert 0.0 <= summary["validation_accuracy"] <= 1.0 and summary["validation_loss"] > 0
    assert summary["epsilon_total"] is None  # no DP asked for
    weights = load_weights((out / "weights.safetensors").read_bytes())
    meta = read_metadata((out / "model.onnx").read_bytes())
    assert meta.model_hash == model_hash(weights).hex() == summary["model_hash"]
    assert meta.labels == LABELS and meta.model_version == "local-7"
