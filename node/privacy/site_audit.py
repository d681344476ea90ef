"""The membership-inference audit at this site, wherever it is asked for: by an operator
(`tessera audit privacy`, on an accepted version) or by the node daemon (on the candidate
model of a round this site joined, when the study requires an audit before release).

Members are the cache's labelled "train" split (what the site trains on, round after round),
non-members its labelled "test" split (never trained on). The accountant's epsilon comes from
the study's privacy ledger (`<state>/privacy/<study>.json`), composed over this site's rounds
up to the model's round. The shadow models copy the training recipe given, which must be the
site's own (with a DP-trained model, the DP settings are required).

Only aggregate figures come out (`tessera.governance.privacy_report`): no per-example score, no id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from node.errors import NodeError
from node.intake.cache import CachedDataset
from node.intake.preprocess import PreprocessConfig
from node.privacy.attacks import AuditConfig, AuditResult, DPClaim, audit_membership
from node.privacy.ledger import ledger_path, recorded_epsilon
from node.privacy.statistics import Interval
from node.training.trainer import TrainConfig
from tessera.governance.privacy_report import AttackFigures, PrivacyAuditReport, Rate
from tessera.models import ModelSpec
from tessera.models.study import StudyModel
from tessera.models.weights import load_arrays, load_weights
from tessera.wire.release import ModelRelease, ReleaseBundle


@dataclass(frozen=True)
class AuditTarget:
    """The model to audit and where it stands: its version, round and weights hash."""

    model: torch.nn.Module
    spec: ModelSpec
    labels: tuple[str, ...]
    version: int
    round: int
    weights_hash: bytes


@dataclass(frozen=True)
class SiteData:
    """This site: its id, its federation and study, its state folder and preprocessing."""

    site_id: str
    federation_id: str
    study_id: str
    state_dir: Path
    preprocess: PreprocessConfig


def audit_at_site(
    target: AuditTarget, site: SiteData, recipe: TrainConfig, budget: AuditConfig
) -> PrivacyAuditReport:
    """Run both attacks on `target` with this site's data; the unsigned report.

    NodeError when the cache lacks a split, its labels differ from the model's, or the model
    was DP-trained here and `recipe` has no DP settings; `PrivacyAccountingError` when the
    attacks prove more than the accountant's epsilon (no report then: something is wrong).
    """
    members = cached_split(site, "train", target.labels)
    non_members = cached_split(site, "test", target.labels)
    claim = accountant_claim(site.state_dir, site.study_id, target.round)
    if claim is not None and recipe.dp is None:
        raise NodeError(
            f"version {target.version} was trained with DP at this site (epsilon "
            f"{claim.epsilon:.3g}); give the DP settings of training so that the shadow "
            "models match it (`tessera audit privacy`: pass --dp-noise and --dp-clip)"
        )
    result = audit_membership(
        target.model, target.spec, members, non_members, recipe, budget, claim
    )
    return build_report(result, site, target)


def candidate_target(
    release: ModelRelease, bundle: ReleaseBundle, study: StudyModel
) -> AuditTarget:
    """A verified candidate (`tessera.wire.release.verify_candidate`) as the study's model;
    NodeError if its weights do not fit the study's architecture."""
    model = study.build()
    try:
        load_arrays(model, load_weights(bundle.weights))
    except (RuntimeError, ValueError) as error:
        raise NodeError(f"the candidate's weights do not fit the study's model ({error})") from None
    return AuditTarget(model, study.spec, study.labels, release.version, release.round,
                       release.model_hash)  # fmt: skip


def accountant_claim(state_dir: Path, study_id: str, up_to_round: int) -> DPClaim | None:
    """The ledger's composed epsilon over this site's rounds <= `up_to_round`; None when the
    site has charged no DP round for them (the model was not DP-trained here)."""
    recorded = recorded_epsilon(ledger_path(state_dir, study_id), study_id, up_to_round)
    return None if recorded is None else DPClaim(*recorded)


def cached_split(
    site: SiteData, split: str, labels: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """The cache's labelled `split` as (images, labels) arrays."""
    data = CachedDataset(site.state_dir, site.preprocess, split=split, labelled_only=True)
    if tuple(data.label_set) != tuple(labels):
        raise NodeError(
            f"the cache's labels {list(data.label_set)} are not the model's {list(labels)}; "
            "audit with the study's cache"
        )
    return data.stack()


def _unit(value: float) -> float:
    return min(1.0, max(0.0, float(value)))  # float rounding only: rates are in [0, 1]


def _rate(interval: Interval) -> Rate:
    return Rate(_unit(interval.value), _unit(interval.low), _unit(interval.high))


def build_report(result: AuditResult, site: SiteData, target: AuditTarget) -> PrivacyAuditReport:
    """The audit's aggregate figures as an (unsigned) report; nothing per example."""
    attacks = {
        name: AttackFigures(
            _rate(a.auc),
            _rate(a.balanced_accuracy),
            _rate(a.tpr_at_0_1pct_fpr),
            _rate(a.tpr_at_1pct_fpr),
            a.empirical_epsilon,
        )
        for name, a in result.attacks.items()
    }
    claim = result.claim
    return PrivacyAuditReport(
        federation_id=site.federation_id, study_id=site.study_id, site_id=site.site_id,
        model_version=target.version, model_round=target.round,
        model_hash=target.weights_hash, members=result.members,
        non_members=result.non_members, shadow_models=result.shadow_models,
        shadow_epochs=result.shadow_epochs, bootstrap=result.bootstrap,
        confidence=result.confidence, attacks=attacks,
        accountant_epsilon=None if claim is None else claim.epsilon,
        delta=None if claim is None else claim.delta,
    )  # fmt: skip
