"""`tessera audit privacy`: audit one accepted model version at this site and write the
signed aggregate report (`tessera.governance.privacy_report`).

The model comes from the node's model store (`<state>/models/<version>/`, weights re-checked
against the accepted hash); members, non-members and the accountant's epsilon as in
`node.privacy.site_audit`. Shadow models are trained with the recipe given on the command line,
which should be the site's own training settings.

Nothing per-patient is printed or written: the report and the summary hold aggregate figures.
Exit status: 0 with a report; 2 (with the reason) on an error, including the consistency
check (`PrivacyAccountingError`), in which case no report is written.

The audit trains shadow models on the site's patient data, so every run that reaches the
data appends a `privacy-audit` entry to the node's audit log (`<state>/audit.log`, counts
only), as an audit of a round's candidate does: the version, the outcome (`reported`, or
`failed` / `accounting-error` with the reason) and the headline figures, with
`command = "tessera audit privacy"`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from node.errors import NodeError
from tessera.cli import subcommands

if TYPE_CHECKING:  # torch, opacus and onnxruntime load in the handler: `tessera` stays fast
    import torch

    from node.privacy.attacks import AuditConfig
    from node.round.releases import ModelStore
    from node.training.trainer import TrainConfig
    from tessera.cli import Subparsers
    from tessera.governance.audit import AuditLog
    from tessera.governance.privacy_report import PrivacyAuditReport
    from tessera.models import ModelSpec
    from tessera.models.onnx_export import ExportMetadata


def register(commands: Subparsers) -> None:
    """Add `privacy` under the core's `tessera audit` (a tessera.command_extensions entry)."""
    privacy = subcommands(commands, "audit").add_parser(
        "privacy", help="membership-inference audit of a model version at this site"
    )
    privacy.add_argument("--state", type=Path, required=True, help="the node's state folder")
    privacy.add_argument("--site", required=True, help="this site's id in the manifest")
    privacy.add_argument("--key", type=Path, required=True, help="the node's signing key (PEM)")
    privacy.add_argument("--out", type=Path, required=True, help="the signed report to write")
    privacy.add_argument("--version", type=int, help="model version (default: current)")
    recipe = privacy.add_argument_group("training recipe (the site's; the shadows copy it)")
    recipe.add_argument("--epochs", type=int, default=1)
    recipe.add_argument("--batch-size", type=int, default=32)
    recipe.add_argument("--lr", type=float, default=0.01)
    recipe.add_argument("--momentum", type=float, default=0.0)
    recipe.add_argument("--validation-fraction", type=float, default=0.2)
    recipe.add_argument("--dp-noise", type=float, help="DP noise multiplier, if DP is on")
    recipe.add_argument("--dp-clip", type=float, default=1.0)
    recipe.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    budget = privacy.add_argument_group("audit budget")
    budget.add_argument("--shadow-models", type=int, default=8, help="even, at most 64")
    budget.add_argument("--shadow-epochs", type=int, help="default: --epochs")
    budget.add_argument("--bootstrap", type=int, default=200)
    budget.add_argument("--seed", type=int, default=0)
    privacy.set_defaults(handler=audit_privacy_command)


@dataclass(frozen=True)
class SiteAudit:
    """Which model to audit at this site, and how: the inputs of `run_site_audit`."""

    state_dir: Path
    site_id: str
    recipe: TrainConfig
    audit: AuditConfig
    version: int | None = None


def audit_privacy_command(args: argparse.Namespace) -> int:
    """Run the audit, sign the report with the node key, write it, print the figures."""
    from node.privacy.attacks import AuditConfig
    from node.setup import AUDIT_FILE
    from node.training.trainer import DPSettings, TrainConfig
    from tessera.crypto.signing import load_private_key
    from tessera.files import atomic_write
    from tessera.governance.audit import AuditLog
    from tessera.governance.privacy_report import sign_report

    dp = None
    if args.dp_noise is not None:
        dp = DPSettings(args.dp_noise, args.dp_clip)
    try:
        recipe = TrainConfig(local_epochs=args.epochs, batch_size=args.batch_size,
                             learning_rate=args.lr, momentum=args.momentum, device=args.device,
                             validation_fraction=args.validation_fraction, dp=dp)  # fmt: skip
        budget = AuditConfig(shadow_models=args.shadow_models, shadow_epochs=args.shadow_epochs,
                             bootstrap=args.bootstrap, seed=args.seed)  # fmt: skip
    except ValueError as error:
        raise NodeError(f"audit settings: {error}") from None
    key = load_private_key(args.key)
    with AuditLog.open(args.state / AUDIT_FILE, counts_only=True) as audit:
        job = SiteAudit(args.state, args.site, recipe, budget, args.version)
        report = run_site_audit(job, audit)
    signed = sign_report(report, key)
    atomic_write(args.out, signed.to_json())
    print(json.dumps(summary(signed), indent=1, sort_keys=True))
    print(f"wrote the signed report to {args.out}; publish it, nothing else leaves the site")
    return 0


def run_site_audit(job: SiteAudit, audit: AuditLog | None = None) -> PrivacyAuditReport:
    """Audit the stored model version (default: current); returns the unsigned report.
    With `audit`, the run is recorded there once it reaches the site's data (the module
    docstring), whatever its outcome."""
    from node.inference.runtime import preprocess_from_metadata
    from node.privacy.attacks import PrivacyAccountingError
    from node.privacy.site_audit import AuditTarget, SiteData, audit_at_site
    from node.round.releases import open_model_store

    store = open_model_store(job.state_dir)
    version = job.version if job.version is not None else store.current()
    if version is None:
        raise NodeError("the model store holds no model; accept a release first")
    record = store.get(version)
    if record is None:
        known = ", ".join(str(m.version) for m in store.versions())
        raise NodeError(f"model version {version} is not in the store (have: {known})")
    model, spec, metadata = _load_model(store, version, record.model_hash)
    target = AuditTarget(model, spec, metadata.labels, version, record.round,
                         bytes.fromhex(record.model_hash))  # fmt: skip
    site = SiteData(job.site_id, store.federation_id, store.study_id, job.state_dir,
                    preprocess_from_metadata(dict(metadata.preprocess)))  # fmt: skip
    facts = {"study_id": store.study_id, "round": record.round, "version": version,
             "model_hash": record.model_hash, "command": "tessera audit privacy"}  # fmt: skip
    try:
        report = audit_at_site(target, site, job.recipe, job.audit)
    except NodeError as error:
        if audit is not None:
            outcome = "accounting-error" if isinstance(error, PrivacyAccountingError) else "failed"
            audit.append("privacy-audit", {**facts, "outcome": outcome, "detail": str(error)})
        raise
    if audit is not None:
        audit.append("privacy-audit", {**facts, "outcome": "reported", **report.headline()})
    return report


def _load_model(
    store: ModelStore, version: int, expected_hash: str
) -> tuple[torch.nn.Module, ModelSpec, ExportMetadata]:
    from tessera.models import ModelSpec, build_model
    from tessera.models.onnx_export import read_metadata
    from tessera.models.weights import load_arrays, load_weights, model_hash
    from tessera.wire.release import WEIGHTS_FILE

    metadata = read_metadata(store.onnx_bytes(version))
    arrays = load_weights((store.folder(version) / WEIGHTS_FILE).read_bytes())
    if model_hash(arrays).hex() != expected_hash:
        raise NodeError(
            f"stored weights of version {version} do not match the accepted hash; the disk "
            "copy is damaged: accept the release again"
        )
    spec = ModelSpec.from_model_id(metadata.model_id)
    model = build_model(spec)
    load_arrays(model, arrays)
    return model, spec, metadata


def summary(report: PrivacyAuditReport) -> dict[str, object]:
    """What the command prints: the headline figures of the report."""
    return {
        "model_version": report.model_version,
        "members": report.members,
        "non_members": report.non_members,
        "attacks": {
            name: {
                "auc": f.auc.value,
                "tpr_at_0_1pct_fpr": f.tpr_at_0_1pct_fpr.value,
                "tpr_at_1pct_fpr": f.tpr_at_1pct_fpr.value,
                "empirical_epsilon": f.empirical_epsilon,
            }
            for name, f in report.attacks.items()
        },
        "accountant_epsilon": report.accountant_epsilon,
    }
