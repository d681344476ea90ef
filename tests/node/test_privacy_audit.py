"""The membership-inference audit: its statistics, a positive control (an overfitted model
without DP is detected), a DP run (near chance, empirical bound below the accountant's
epsilon), the consistency check, and that the report carries aggregate figures only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from node.intake.preprocess import PreprocessConfig
from node.privacy import statistics as ps
from node.privacy.attacks import (
    AuditConfig,
    AuditResult,
    DPClaim,
    PrivacyAccountingError,
    audit_membership,
    check_consistency,
    lira_scores,
)
from node.privacy.ledger import PrivacyLedger
from node.privacy.site_audit import AuditTarget, SiteData, accountant_claim, build_report
from node.training.trainer import DPSettings, TrainConfig, run_local_round, split_validation
from tessera.cli import build_parser
from tessera.governance.privacy_report import report_from_json
from tessera.models import ModelSpec, build_model

torch.set_num_threads(1)
SPEC = ModelSpec("small-cnn", 1, 2)
BUDGET = AuditConfig(shadow_models=4, bootstrap=100, min_examples=10, seed=3)


def _noise_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pure noise with random labels: anything a model learns about them is memorised."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 1, 16, 16)).astype(np.float32), rng.integers(0, 2, n)


def _train(n: int, recipe: TrainConfig, ledger: PrivacyLedger | None = None):  # type: ignore[no-untyped-def]
    x, y = _noise_images(n, seed=0)
    model = build_model(SPEC, seed=0)
    run_local_round(model, x, y, recipe, ledger, round_number=1)
    members, held_out = split_validation(n, recipe.validation_fraction, recipe.seed)
    return model, (x[members], y[members]), (x[held_out], y[held_out])


OVERFIT = TrainConfig(local_epochs=40, batch_size=8, learning_rate=0.05, momentum=0.9,
                      device="cpu", validation_fraction=0.5)  # fmt: skip


@pytest.fixture(scope="module")
def overfit_audit() -> AuditResult:
    """Positive control: 48 noise images memorised over 40 epochs, no DP."""
    model, members, non_members = _train(96, OVERFIT)
    return audit_membership(model, SPEC, members, non_members, OVERFIT, BUDGET)


# -- statistics ---------------------------------------------------------------------------


def test_auc_is_the_mann_whitney_statistic_with_ties() -> None:
    rng = np.random.default_rng(1)
    a, b = np.round(rng.normal(1, 1, 300)), np.round(rng.normal(0, 1, 200))
    expected = stats.mannwhitneyu(a, b).statistic / (len(a) * len(b))
    assert ps.auc(a, b) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("k", "n"), [(0, 50), (3, 50), (17, 100), (50, 50), (999, 1000)])
def test_clopper_pearson_matches_the_beta_quantiles(k: int, n: int) -> None:
    low = stats.beta.ppf(0.025, k, n - k + 1) if k > 0 else 0.0
    high = stats.beta.ppf(0.975, k + 1, n - k) if k < n else 1.0
    assert ps.clopper_pearson_lower(k, n, 0.025) == pytest.approx(low, abs=1e-9)
    assert ps.clopper_pearson_upper(k, n, 0.025) == pytest.approx(high, abs=1e-9)


def test_tpr_at_fpr_allows_no_false_positive_below_one_in_n() -> None:
    members = np.array([5.0, 4.0, 3.0, 0.5])
    non_members = np.array([3.0, 2.0, 1.0, 0.0])
    # 4 non-members: any FPR target below 25% allows none, so the threshold is above 3.0.
    assert ps.tpr_at_fpr(members, non_members, 0.001) == 0.5
    assert ps.tpr_at_fpr(members, non_members, 0.25) == 0.75  # one false positive allowed
    assert ps.balanced_accuracy(members, non_members) == 0.75


def test_empirical_epsilon_is_zero_for_indistinguishable_scores() -> None:
    rng = np.random.default_rng(2)
    bounds = [ps.empirical_epsilon(rng.normal(size=200), rng.normal(size=200), 1e-5, rng)
              for _ in range(20)]  # fmt: skip
    assert max(bounds) < 0.5 and np.mean(bounds) < 0.1


def test_lira_scores_rank_the_example_near_its_in_mean_higher() -> None:
    shadow = np.array([[4.0, 0.0], [4.2, 0.1], [0.1, 4.0], [0.0, 4.1]])
    trained = np.array([[True, False], [True, False], [False, True], [False, True]])
    scores = lira_scores(np.array([4.1, 0.05]), shadow, trained)
    assert scores[0] > 0 > scores[1]


# -- the attacks on real training ---------------------------------------------------------


def test_positive_control_overfitted_model_is_detected(overfit_audit: AuditResult) -> None:
    for name in ("loss", "lira"):
        auc = overfit_audit.attacks[name].auc
        assert auc.value > 0.8 and auc.low > 0.6, (name, auc)
    assert overfit_audit.worst_tpr_at_0_1pct_fpr > 0.3
    assert overfit_audit.empirical_epsilon is None  # no DP, no bound reported
    assert (overfit_audit.members, overfit_audit.non_members) == (48, 48)


def test_dp_model_scores_near_chance_and_below_the_accountant(tmp_path: Path) -> None:
    dp = DPSettings(noise_multiplier=4.0, max_grad_norm=1.0, noise_seed=7)  # seeded: a test
    recipe = TrainConfig(local_epochs=3, batch_size=16, learning_rate=0.05, momentum=0.9,
                         device="cpu", validation_fraction=0.5, dp=dp)  # fmt: skip
    ledger = PrivacyLedger(tmp_path / "privacy" / "s.json", "s", 8.0, 1e-5)
    model, members, non_members = _train(200, recipe, ledger)
    claim = accountant_claim(tmp_path, "s", up_to_round=1)
    assert claim is not None and claim.epsilon == pytest.approx(ledger.spent)
    assert claim.epsilon < 1.0  # small epsilon
    result = audit_membership(model, SPEC, members, non_members, recipe, BUDGET, claim)
    for attack in result.attacks.values():
        assert attack.auc.low < 0.5 < attack.auc.high or abs(attack.auc.value - 0.5) < 0.1
        assert attack.empirical_epsilon is not None
    assert result.empirical_epsilon is not None
    assert result.empirical_epsilon < claim.epsilon


def test_bound_above_the_accountant_epsilon_is_an_error(overfit_audit: AuditResult) -> None:
    # The overfitted model's leakage, measured again, against a claimed epsilon of 0.01.
    model, members, non_members = _train(96, OVERFIT)
    with pytest.raises(PrivacyAccountingError, match="accounting"):
        audit_membership(model, SPEC, members, non_members, OVERFIT, BUDGET,
                         DPClaim(epsilon=0.01, delta=1e-5))  # fmt: skip


def test_consistency_check_passes_a_bound_below_the_claim(overfit_audit: AuditResult) -> None:
    check_consistency(overfit_audit)  # no claim: nothing to check


def test_audit_refuses_too_few_examples() -> None:
    x, y = _noise_images(12, seed=1)
    with pytest.raises(Exception, match="at least 10 members"):
        audit_membership(build_model(SPEC), SPEC, (x[:6], y[:6]), (x[6:], y[6:]), OVERFIT,
                         BUDGET)  # fmt: skip


def test_shadow_budget_is_bounded() -> None:
    with pytest.raises(ValueError, match="shadow_models"):
        AuditConfig(shadow_models=65)
    with pytest.raises(ValueError, match="even"):
        AuditConfig(shadow_models=3)


# -- what leaves the site -----------------------------------------------------------------


def _leaves(value: object, path: str = "") -> list[tuple[str, object]]:
    if isinstance(value, dict):
        return [leaf for key, item in value.items() for leaf in _leaves(item, f"{path}.{key}")]
    return [(path, value)]


def test_report_holds_aggregate_figures_only(overfit_audit: AuditResult) -> None:
    site = SiteData("site-1", "fed", "study", Path("unused"), PreprocessConfig())
    target = AuditTarget(torch.nn.Identity(), SPEC, ("a", "b"), 3, 7, bytes(32))
    report = build_report(overfit_audit, site, target)
    document = json.loads(report.to_json())
    leaves = _leaves(document)
    # No list anywhere (no per-example score), only scalars, and exactly the documented keys.
    assert all(isinstance(v, str | int | float | type(None)) for _, v in leaves)
    rates = ("auc", "balanced_accuracy", "tpr_at_0_1pct_fpr", "tpr_at_1pct_fpr")
    figures = {f".{k}.{r}" for k in rates for r in ("value", "low", "high")}
    figures.add(".empirical_epsilon")
    expected = {".format", ".federation_id", ".study_id", ".site_id", ".model.version",
                ".model.round", ".model.hash", ".population.members",
                ".population.non_members", ".budget.shadow_models", ".budget.shadow_epochs",
                ".budget.bootstrap", ".budget.confidence", ".dp"}  # fmt: skip
    expected |= {f".attacks.{a}{f}" for a in ("loss", "lira") for f in figures}
    assert {path for path, _ in leaves} == expected
    assert report_from_json(report.to_json()) == report


def test_cli_attaches_privacy_under_audit() -> None:
    parser = build_parser()
    args = parser.parse_args(["audit", "privacy", "--state", "s", "--site", "site-1", "--key",
                              "k.pem", "--out", "r.json", "--shadow-models", "4"])  # fmt: skip
    assert args.handler.__name__ == "audit_privacy_command"
    assert args.shadow_models == 4
    # The core's own actions are still there.
    assert parser.parse_args(["audit", "verify", "log"]).audit_command == "verify"
