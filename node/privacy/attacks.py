"""Membership-inference audit of one model at this site: loss threshold and LiRA.

Two attacks try to tell the site's training members from its held-out non-members, using
only the model's outputs:

- **Loss threshold** (Yeom et al. 2018): score = -cross-entropy of the true label. Needs no
  shadow model.
- **LiRA, online, fixed variance** (Carlini et al. 2022): `shadow_models` models are trained
  here, with the site's own training recipe (`TrainConfig`, DP included), each on a random
  half of the audited pool (members and non-members together), so that every example is IN
  for half of the shadows and OUT for the rest. For each example the logit-scaled confidence
  phi = log(p_y / (1 - p_y)) is fitted with one Gaussian over the IN shadows and one over
  the OUT shadows (per-example means, pooled variances: the variant the paper recommends
  below 64 shadows); the score is the log-likelihood ratio of the target's phi.

Budget (bounded, and recorded in the report): at most `MAX_SHADOW_MODELS` shadows, each
trained for `shadow_epochs` epochs (default: the recipe's) on about half the pool, and the
pool holds at most `max_examples` members plus `max_examples` non-members (a seeded sample
above that). So shadow training costs about shadow_models * shadow_epochs / (2 * recipe
epochs) local rounds' worth of work at most; bench/privacy_audit.py measures it.

Shadows under DP are charged to a scratch ledger that is deleted afterwards, not to the
study's: they never leave this process, only the aggregate figures do (see
`tessera.governance.privacy_report`). Those figures are not themselves DP-protected; they are a
handful of numbers over at least `min_examples` examples per side.

Consistency check: with DP, the empirical lower bound (`node.privacy.statistics.
empirical_epsilon`, a one-sided 95% bound) above the accountant's epsilon means the
accounting, the sampling or the training code is wrong; `PrivacyAccountingError` says so.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from node.errors import NodeError
from node.privacy.ledger import PrivacyLedger
from node.privacy.statistics import (
    Interval,
    Metric,
    auc,
    balanced_accuracy,
    bootstrap_interval,
    empirical_epsilon,
    tpr_at_fpr,
)
from node.training.trainer import TrainConfig, run_local_round, select_device, split_validation
from tessera.models import ModelSpec, build_model

MAX_SHADOW_MODELS = 64
ATTACKS = ("loss", "lira")
_SCRATCH_BUDGET = 1e9  # the scratch ledger of shadow models must never refuse a round


class PrivacyAccountingError(NodeError):
    """The attack proves more leakage than the accountant's epsilon allows: a bug."""


@dataclass(frozen=True)
class AuditConfig:
    """The audit's budget and statistics settings (see the module docstring)."""

    shadow_models: int = 8
    shadow_epochs: int | None = None  # None: the training recipe's local_epochs
    bootstrap: int = 200
    confidence: float = 0.95
    seed: int = 0
    min_examples: int = 20
    max_examples: int = 5000

    def __post_init__(self) -> None:
        if not 2 <= self.shadow_models <= MAX_SHADOW_MODELS or self.shadow_models % 2:
            raise ValueError(
                f"shadow_models must be even and in 2..{MAX_SHADOW_MODELS}, got "
                f"{self.shadow_models}; each example must be IN for half of them"
            )
        if self.shadow_epochs is not None and not 1 <= self.shadow_epochs <= 1000:
            raise ValueError(f"shadow_epochs must be in 1..1000, got {self.shadow_epochs}")
        if self.bootstrap < 10 or not 0.5 <= self.confidence < 1.0:
            raise ValueError("need bootstrap >= 10 resamples and confidence in [0.5, 1)")
        if not 4 <= self.min_examples <= self.max_examples:
            raise ValueError("need 4 <= min_examples <= max_examples")


@dataclass(frozen=True)
class DPClaim:
    """What the accountant says about the audited model at this site."""

    epsilon: float
    delta: float


@dataclass(frozen=True)
class AttackResult:
    """One attack's aggregate figures (no per-example value)."""

    auc: Interval
    balanced_accuracy: Interval
    tpr_at_0_1pct_fpr: Interval
    tpr_at_1pct_fpr: Interval
    empirical_epsilon: float | None  # with DP only


@dataclass(frozen=True)
class AuditResult:
    """What an audit measured, all aggregate: counts, per-attack figures, budget."""

    members: int
    non_members: int
    attacks: dict[str, AttackResult]
    shadow_models: int
    shadow_epochs: int
    shadow_seconds: float
    bootstrap: int
    confidence: float
    claim: DPClaim | None

    @property
    def empirical_epsilon(self) -> float | None:
        """The largest lower bound over the attacks (None without DP)."""
        bounds = [a.empirical_epsilon for a in self.attacks.values()]
        known = [b for b in bounds if b is not None]
        return max(known) if known else None

    @property
    def worst_tpr_at_0_1pct_fpr(self) -> float:
        """The strongest attack's TPR at 0.1% FPR: what a release gate compares."""
        return max(a.tpr_at_0_1pct_fpr.value for a in self.attacks.values())


def example_scores(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Per-example (cross-entropy loss, phi = log p_y - log(1 - p_y)), in eval mode.

    phi is computed from the logits as logit_y - logsumexp(other logits), which is exact
    and stays finite where p_y rounds to 1.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses, phis = [], []
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
                y = torch.from_numpy(np.asarray(labels[start : start + batch_size], np.int64))
                logits = model(x.to(device)).double().cpu()
                true = logits.gather(1, y[:, None])[:, 0]
                losses.append((torch.logsumexp(logits, dim=1) - true).numpy())
                others = logits.scatter(1, y[:, None], -math.inf)
                phis.append((true - torch.logsumexp(others, dim=1)).numpy())
    finally:
        model.train(was_training)
    return np.concatenate(losses), np.concatenate(phis)


def _limit(n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n) if n <= cap else np.sort(rng.choice(n, cap, replace=False))


def _shadow_phis(
    spec: ModelSpec,
    images: np.ndarray,
    labels: np.ndarray,
    recipe: TrainConfig,
    cfg: AuditConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Train the shadows; returns phi (shadows, examples) and which examples each trained on."""
    count = cfg.shadow_models
    n = len(images)
    # Each example IN for exactly half the shadows: a random half of the shadow indices.
    chosen = np.argsort(rng.random((count, n)), axis=0) < count // 2
    trained = np.zeros_like(chosen)
    phis = np.empty((count, n))
    epochs = cfg.shadow_epochs or recipe.local_epochs
    with tempfile.TemporaryDirectory(prefix="tessera-shadow-") as scratch:
        ledger = None
        if recipe.dp is not None:
            ledger = PrivacyLedger(Path(scratch) / "shadows.json", "shadow-audit",
                                   _SCRATCH_BUDGET, 1e-5, recipe.dp.accountant)  # fmt: skip
        for s in range(count):
            subset = np.flatnonzero(chosen[s])
            seed = int(rng.integers(0, 2**62))
            plan = dataclasses.replace(recipe, seed=seed, local_epochs=epochs)
            model = build_model(spec, seed=seed)
            run_local_round(model, images[subset], labels[subset], plan, ledger, s + 1)
            # run_local_round holds out a validation split: those examples are OUT.
            kept, _ = split_validation(len(subset), plan.validation_fraction, plan.seed)
            trained[s, subset[kept]] = True
            phis[s] = example_scores(model, images, labels)[1]
    return phis, trained


def lira_scores(target_phi: np.ndarray, shadow_phi: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """Online LiRA with pooled variances: log N(phi; mu_in, s_in) - log N(phi; mu_out, s_out).

    An example with no IN (or no OUT) shadow takes the mean over all IN (OUT) values.
    """
    inside, outside = trained, ~trained
    n_in, n_out = inside.sum(axis=0), outside.sum(axis=0)
    all_in = shadow_phi[inside].mean() if inside.any() else 0.0
    all_out = shadow_phi[outside].mean() if outside.any() else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        mu_in = np.where(n_in > 0, (shadow_phi * inside).sum(axis=0) / n_in, all_in)
        mu_out = np.where(n_out > 0, (shadow_phi * outside).sum(axis=0) / n_out, all_out)
    var_in = _pooled_variance(shadow_phi - mu_in, inside)
    var_out = _pooled_variance(shadow_phi - mu_out, outside)
    log_in = -0.5 * ((target_phi - mu_in) ** 2 / var_in + math.log(var_in))
    log_out = -0.5 * ((target_phi - mu_out) ** 2 / var_out + math.log(var_out))
    return np.asarray(log_in - log_out)


def _pooled_variance(residuals: np.ndarray, mask: np.ndarray) -> float:
    values = residuals[mask]
    return max(float(np.var(values)) if len(values) > 1 else 1.0, 1e-6)


def _figures(
    members: np.ndarray,
    non_members: np.ndarray,
    cfg: AuditConfig,
    claim: DPClaim | None,
    rng: np.random.Generator,
) -> AttackResult:
    def interval(metric: Metric) -> Interval:
        return bootstrap_interval(metric, members, non_members, rng, cfg.bootstrap, cfg.confidence)

    bound = None
    if claim is not None:
        bound = empirical_epsilon(members, non_members, claim.delta, rng, cfg.confidence)
    return AttackResult(
        auc=interval(auc),
        balanced_accuracy=interval(balanced_accuracy),
        tpr_at_0_1pct_fpr=interval(lambda a, b: tpr_at_fpr(a, b, 0.001)),
        tpr_at_1pct_fpr=interval(lambda a, b: tpr_at_fpr(a, b, 0.01)),
        empirical_epsilon=bound,
    )


def audit_membership(
    target: nn.Module,
    spec: ModelSpec,
    members: tuple[np.ndarray, np.ndarray],
    non_members: tuple[np.ndarray, np.ndarray],
    recipe: TrainConfig,
    cfg: AuditConfig,
    claim: DPClaim | None = None,
) -> AuditResult:
    """Run both attacks on `target`; raises PrivacyAccountingError if the empirical bound
    exceeds `claim.epsilon` (see the module docstring). Arrays: (N, C, H, W) images, labels."""
    (x_in, y_in), (x_out, y_out) = members, non_members
    if min(len(x_in), len(x_out)) < cfg.min_examples:
        raise NodeError(
            f"the audit needs at least {cfg.min_examples} members and non-members, got "
            f"{len(x_in)} and {len(x_out)}; ingest a held-out test split"
        )
    rng = np.random.default_rng(cfg.seed)  # statistics and data sampling, not secrets
    keep_in = _limit(len(x_in), cfg.max_examples, rng)
    keep_out = _limit(len(x_out), cfg.max_examples, rng)
    images = np.concatenate([x_in[keep_in], x_out[keep_out]]).astype(np.float32, copy=False)
    labels = np.concatenate([y_in[keep_in], y_out[keep_out]]).astype(np.int64)
    is_member = np.arange(len(images)) < len(keep_in)
    device = select_device(recipe.device)
    target = target.to(device)
    losses, target_phi = example_scores(target, images, labels)
    start = time.perf_counter()
    shadow_phi, trained = _shadow_phis(spec, images, labels, recipe, cfg, rng)
    seconds = time.perf_counter() - start
    scores = {"loss": -losses, "lira": lira_scores(target_phi, shadow_phi, trained)}
    attacks = {name: _figures(s[is_member], s[~is_member], cfg, claim, rng)
               for name, s in scores.items()}  # fmt: skip
    result = AuditResult(len(keep_in), len(keep_out), attacks, cfg.shadow_models,
                         cfg.shadow_epochs or recipe.local_epochs, seconds, cfg.bootstrap,
                         cfg.confidence, claim)  # fmt: skip
    check_consistency(result)
    return result


def check_consistency(result: AuditResult) -> None:
    """PrivacyAccountingError when an attack's lower bound exceeds the accountant's epsilon."""
    if result.claim is None:
        return
    for name, attack in result.attacks.items():
        bound = attack.empirical_epsilon
        if bound is not None and bound > result.claim.epsilon:
            raise PrivacyAccountingError(
                f"privacy audit: the {name} attack proves epsilon >= {bound:.3f} (one-sided "
                f"lower bound at delta {result.claim.delta:g}), above the accountant's "
                f"{result.claim.epsilon:.3f}; the DP accounting, the Poisson sampling or the "
                "training code is wrong. Hold this model and check the privacy ledger "
                "against the training configuration (noise multiplier, sample rate, steps)"
            )
