"""Local training: FedAvg (epochs or steps) or FedSGD (one step), optional FedProx and DP-SGD.

`run_local_round` is one round at this site: split off the validation set, charge the
privacy ledger first when DP is on (an over-budget round is refused before any training),
train, then measure loss, accuracy and AUC on the validation split. Only parameters with
`requires_grad` change (transfer modes freeze the rest).

Reproducibility: the validation split, the initial order of batches and Poisson sampling
follow `seed` (the global torch RNG is forked, not disturbed). DP noise does *not* follow
the seed unless `DPSettings.noise_seed` is set (tests only): noise that someone could
regenerate from a configuration value would not protect anyone. Opacus' secure mode
(torchcsprng) is not used, so the noise comes from torch's Mersenne Twister seeded from
os.urandom; see the README's DP section for what this does and does not guarantee.

FedProx: the proximal term mu/2 |w - w0|^2 is applied as a decoupled step
`w -= lr * mu * (w - w0)` after each optimiser step. Its gradient needs no data, so under
DP it costs no privacy and needs no per-sample gradient (Opacus would ignore it in the loss).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from node.errors import NodeError
from node.privacy.ledger import ACCOUNTANTS, PrivacyLedger, RoundCharge
from node.training.metrics import macro_auc
from tessera.models.transfer import set_train_mode
from tessera.wire.messages import ALGORITHMS

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DPSettings:
    """DP-SGD terms: per-sample clip, noise multiplier, accountant (rdp or prv)."""

    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    noise_seed: int | None = None  # tests only: reproducible noise is not private

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")


@dataclass(frozen=True)
class TrainConfig:
    """One round's client plan (from RoundOpen) plus this site's local settings."""

    algorithm: str = "fedavg"
    local_epochs: int = 1
    local_steps: int = 0  # > 0: this many steps instead of epochs (FedAvg only)
    batch_size: int = 32
    learning_rate: float = 0.01
    momentum: float = 0.0
    prox_mu: float = 0.0
    seed: int = 0
    device: str = "auto"
    validation_fraction: float = 0.2
    dp: DPSettings | None = None

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.local_epochs < 1 or self.local_steps < 0 or self.batch_size < 1:
            raise ValueError("local_epochs and batch_size must be >= 1, local_steps >= 0")
        if not (self.learning_rate > 0 and 0 <= self.momentum < 1 and self.prox_mu >= 0):
            raise ValueError("need learning_rate > 0, 0 <= momentum < 1 and prox_mu >= 0")
        if self.learning_rate * self.prox_mu >= 1:
            raise ValueError(
                f"learning_rate * prox_mu = {self.learning_rate * self.prox_mu:g} must be below "
                "1: the proximal step moves the weights that fraction of the way back to the "
                "round's start, so at 1 it erases every step and above 1 it overshoots"
            )
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(
                f"validation_fraction must be in (0, 1), got {self.validation_fraction}"
            )


@dataclass(frozen=True)
class Metrics:
    """Validation loss (mean cross-entropy), accuracy, AUC (NaN if a class is absent)."""

    loss: float
    accuracy: float
    auc: float
    count: int


@dataclass(frozen=True)
class TrainResult:
    """What a round did: samples, steps, timings, validation metrics, the DP charge."""

    train_samples: int
    steps: int
    images_seen: int  # expected count under Poisson sampling
    train_loss: float
    validation: Metrics
    device: str
    seconds: float
    dp_charge: RoundCharge | None = field(default=None)

    @property
    def images_per_second(self) -> float:
        """Training throughput (images seen per wall-clock second of the training loop)."""
        return self.images_seen / self.seconds if self.seconds > 0 else float("nan")


def select_device(preference: str) -> torch.device:
    """CUDA when available for 'auto', else CPU; 'cuda' without a GPU raises NodeError."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise NodeError("device 'cuda' was forced but no CUDA device is available; use 'auto'")
    if preference in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def split_validation(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded (train, validation) index split; each side gets at least one sample."""
    if n < 2:
        raise NodeError(f"{n} labelled images: training needs at least 2 (one to validate)")
    order = np.random.default_rng(seed).permutation(n)  # a data split, not a secret
    n_val = min(max(1, round(n * fraction)), n - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def planned_steps(n_train: int, cfg: TrainConfig) -> int:
    """Optimiser steps this round will take (what the DP accountant is charged for)."""
    if cfg.algorithm == "fedsgd":
        return 1
    if cfg.local_steps:
        return cfg.local_steps
    return cfg.local_epochs * math.ceil(n_train / cfg.batch_size)


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> Metrics:
    """Loss, accuracy and AUC of `model` on (x, y), in eval mode without gradients."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    probabilities, losses = [], []
    try:
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                xb = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size]))
                yb = torch.from_numpy(np.asarray(y[start : start + batch_size], dtype=np.int64))
                logits = model(xb.to(device)).float().cpu()
                losses.append(F.cross_entropy(logits, yb, reduction="sum").item())
                probabilities.append(torch.softmax(logits, dim=1).numpy())
    finally:
        model.train(was_training)
    probs = np.concatenate(probabilities)
    labels = np.asarray(y)
    accuracy = float(np.mean(probs.argmax(axis=1) == labels))
    return Metrics(sum(losses) / len(x), accuracy, macro_auc(probs, labels), len(x))


def run_local_round(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    cfg: TrainConfig,
    ledger: PrivacyLedger | None = None,
    round_number: int = 0,
) -> TrainResult:
    """Train `model` in place for one round (see the module docstring)."""
    if images.ndim != 4 or len(images) != len(labels):
        raise NodeError(
            f"need images (N, C, H, W) and N labels, got {images.shape}, {labels.shape}"
        )
    train_idx, val_idx = split_validation(len(images), cfg.validation_fraction, cfg.seed)
    steps = planned_steps(len(train_idx), cfg)
    charge = None
    if cfg.dp is not None:
        if ledger is None:
            raise NodeError("DP training needs the site's privacy ledger; none was given")
        check_dp_compatible(model)  # before charging: a model DP cannot train costs nothing
        # Opacus' Poisson sampler uses q = 1 / (batches per epoch); charge exactly that.
        sample_rate = 1.0 / math.ceil(len(train_idx) / cfg.batch_size)
        charge = ledger.charge_round(round_number, cfg.dp.noise_multiplier, sample_rate, steps)
    device = select_device(cfg.device)
    model.to(device)
    x = torch.from_numpy(np.ascontiguousarray(images[train_idx])).to(device)
    y = torch.from_numpy(np.asarray(labels[train_idx], dtype=np.int64)).to(device)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.dp is None:
            loss = _train_plain(model, x, y, cfg, steps)
        else:
            loss, accounted = _train_dp(model, x, y, cfg, cfg.dp, steps)
            # The ledger was charged from the plan; refuse to hand out an update if Opacus'
            # own accountant saw anything else (a silent under-count would void the budget).
            assert charge is not None
            if accounted != [(charge.noise_multiplier, charge.sample_rate, charge.steps)]:
                raise NodeError(
                    f"DP accounting mismatch: charged {charge}, Opacus accounted {accounted}; "
                    "the update is discarded"
                )
    seconds = time.perf_counter() - start
    metrics = evaluate(model, images[val_idx], labels[val_idx])
    seen = steps * min(cfg.batch_size, len(train_idx))
    return TrainResult(len(train_idx), steps, seen, loss, metrics, device.type, seconds, charge)


def check_dp_compatible(model: nn.Module) -> None:
    """NodeError naming the fix when Opacus cannot compute per-sample gradients of `model`."""
    from opacus.validators import ModuleValidator

    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        raise NodeError(
            f"DP-SGD cannot train this model ({type(problems[0]).__name__}: {problems[0]}); "
            "use the architecture's GroupNorm variant (norm='group')"
        )


def _optimizer_and_anchor(
    model: nn.Module, cfg: TrainConfig
) -> tuple[torch.optim.Optimizer, list[tuple[torch.Tensor, torch.Tensor]]]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise NodeError("no parameter is trainable; check the transfer mode")
    optimizer = torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum)
    anchor: list[tuple[torch.Tensor, torch.Tensor]] = []
    if cfg.prox_mu > 0:
        anchor = [(p, p.detach().clone()) for p in params]
    return optimizer, anchor


def _proximal_step(anchor: list[tuple[torch.Tensor, torch.Tensor]], cfg: TrainConfig) -> None:
    with torch.no_grad():
        for param, start in anchor:
            param.sub_(param - start, alpha=cfg.learning_rate * cfg.prox_mu)


def _train_plain(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, steps: int
) -> float:
    optimizer, anchor = _optimizer_and_anchor(model, cfg)
    set_train_mode(model)
    total = torch.zeros((), device=x.device)
    order = torch.randperm(len(x), device="cpu")
    cursor = 0
    for _ in range(steps):
        if cursor >= len(x):  # next epoch: a fresh order
            order, cursor = torch.randperm(len(x), device="cpu"), 0
        batch = order[cursor : cursor + cfg.batch_size].to(x.device)
        cursor += cfg.batch_size
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        if anchor:
            _proximal_step(anchor, cfg)
        total += loss.detach()
    return float(total.item()) / steps


def _train_dp(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    dp: DPSettings,
    steps: int,
) -> tuple[float, list[tuple[float, float, int]]]:
    """DP-SGD with Opacus; returns the mean loss and Opacus' accountant history."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    optimizer, anchor = _optimizer_and_anchor(model, cfg)
    noise_seed = dp.noise_seed if dp.noise_seed is not None else int.from_bytes(os.urandom(8))
    noise = torch.Generator(device=x.device).manual_seed(noise_seed)
    loader = DataLoader(TensorDataset(x, y), batch_size=min(cfg.batch_size, len(x)))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")  # see docstring
        engine = PrivacyEngine(accountant=dp.accountant)
    private, dp_optimizer, dp_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm, poisson_sampling=True, noise_generator=noise,
    )  # fmt: skip
    set_train_mode(private)
    total, done = 0.0, 0
    try:
        with warnings.catch_warnings():
            # The first layer's input needs no gradient, which makes torch warn every step.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            while done < steps:
                for xb, yb in dp_loader:
                    dp_optimizer.zero_grad(set_to_none=True)
                    logits = private(xb)
                    if len(xb):
                        loss = F.cross_entropy(logits, yb)
                        total += float(loss.detach())
                    else:
                        # Poisson sampling drew an empty batch. The step must still run
                        # (zero-size per-sample gradients, then noise), or whether a step
                        # happened would depend on the data, which the accounting assumes not.
                        loss = logits.sum()
                    loss.backward()  # type: ignore[no-untyped-call]
                    dp_optimizer.step()
                    if anchor:
                        _proximal_step(anchor, cfg)
                    done += 1
                    if done >= steps:
                        break
    finally:
        private._close()  # removes Opacus' hooks; `model` keeps the trained weights
    history = [(float(n), float(q), int(k)) for n, q, k in engine.accountant.history]
    return total / steps, history
