"""The signed privacy-audit report: strict round trip, signatures by the site's node key from
the manifest, and the optional study term that requires an audit."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from tessera.cli import subcommands
from tessera.errors import AuthenticationError, CodecError, ConfigError
from tessera.governance.manifest import loads_manifest, study_hash, verify_manifest
from tessera.governance.privacy_report import (
    AttackFigures,
    PrivacyAuditReport,
    Rate,
    report_from_json,
    sign_report,
    verify_report,
)
from tests.support.governance import Federation, build_federation


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    return build_federation(tmp_path_factory.mktemp("report"), n_sites=2)


def _report(fed: Federation, site: str = "site-1", dp: bool = True) -> PrivacyAuditReport:
    figures = AttackFigures(Rate(0.61, 0.55, 0.67), Rate(0.58, 0.54, 0.62),
                            Rate(0.002, 0.0, 0.01), Rate(0.03, 0.01, 0.05),
                            0.4 if dp else None)  # fmt: skip
    return PrivacyAuditReport(
        federation_id=fed.manifest.federation_id, study_id="chest-xray", site_id=site,
        model_version=2, model_round=5, model_hash=hashlib.sha256(b"w").digest(), members=800,
        non_members=200, shadow_models=8, shadow_epochs=1, bootstrap=200, confidence=0.95,
        attacks={"loss": figures, "lira": figures},
        accountant_epsilon=2.5 if dp else None, delta=1e-5 if dp else None,
    )  # fmt: skip


@pytest.mark.parametrize("dp", [True, False])
def test_signed_report_round_trips_and_verifies(fed: Federation, dp: bool) -> None:
    signed = sign_report(_report(fed, dp=dp), fed.keys["node-site-1"])
    parsed = report_from_json(signed.to_json())
    assert parsed == signed
    verify_report(parsed, fed.manifest)
    assert parsed.worst_tpr_at_0_1pct_fpr == 0.002
    assert parsed.empirical_epsilon == (0.4 if dp else None)


def test_a_changed_figure_or_another_sites_key_does_not_verify(fed: Federation) -> None:
    signed = sign_report(_report(fed), fed.keys["node-site-1"])
    lira = dataclasses.replace(signed.attacks["lira"], tpr_at_0_1pct_fpr=Rate(0.0, 0.0, 0.0))
    tampered = dataclasses.replace(signed, attacks={**signed.attacks, "lira": lira})
    with pytest.raises(AuthenticationError):
        verify_report(tampered, fed.manifest)
    impostor = sign_report(_report(fed, site="site-1"), fed.keys["node-site-2"])
    with pytest.raises(AuthenticationError):
        verify_report(impostor, fed.manifest)
    with pytest.raises(AuthenticationError):
        verify_report(_report(fed), fed.manifest)  # unsigned
    unknown = sign_report(_report(fed, site="site-9"), fed.keys["node-site-1"])
    with pytest.raises(AuthenticationError):
        verify_report(unknown, fed.manifest)


def test_parser_refuses_extra_or_missing_keys(fed: Federation) -> None:
    document = json.loads(sign_report(_report(fed), fed.keys["node-site-1"]).to_json())
    extra = json.loads(json.dumps(document))
    extra["attacks"]["loss"]["scores"] = [0.1, 0.9]  # a per-example list may not ride along
    with pytest.raises(CodecError, match="unknown keys \\['scores'\\]"):
        report_from_json(json.dumps(extra).encode())
    missing = json.loads(json.dumps(document))
    del missing["population"]
    with pytest.raises(CodecError, match="missing keys \\['population'\\]"):
        report_from_json(json.dumps(missing).encode())
    document["attacks"]["lira"]["auc"]["value"] = 1.5
    with pytest.raises(CodecError, match="rate"):
        report_from_json(json.dumps(document).encode())


def test_study_term_is_optional_and_signed_when_present(fed: Federation) -> None:
    # Absent: the canonical form (and so every existing signature) has no such key.
    study = fed.manifest.studies[0]
    assert study.privacy_audit is None and "privacy_audit" not in study.canonical_dict()
    text = fed.manifest_path.read_text()
    with_term = text.replace("[[studies]]", "[[studies]]\nprivacy_audit = { "
                             "max_tpr_at_0_1pct_fpr = 0.05 }", 1)  # fmt: skip
    changed = loads_manifest(with_term)
    assert changed.studies[0].privacy_audit is not None
    assert changed.studies[0].privacy_audit.max_tpr_at_0_1pct_fpr == 0.05
    assert study_hash(changed.studies[0]) != study_hash(study)
    with pytest.raises(AuthenticationError):  # the term is covered by the signature
        verify_manifest(changed, fed.coordinator_public)
    with pytest.raises(ConfigError, match="max_tpr_at_0_1pct_fpr"):
        loads_manifest(text.replace("[[studies]]", "[[studies]]\nprivacy_audit = { "
                                    "max_tpr_at_0_1pct_fpr = 2.0 }", 1))  # fmt: skip


def test_signed_example_manifests_still_verify() -> None:
    data = Path(__file__).parents[1] / "data" / "governance"
    for path in sorted(data.glob("*.toml")):
        manifest = loads_manifest(path.read_text())
        verify_manifest(manifest, None)


def test_subcommands_finds_an_existing_commands_actions() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command")
    audit = commands.add_parser("audit").add_subparsers(dest="action")
    audit.add_parser("verify")
    commands.add_parser("plain")
    subcommands(commands, "audit").add_parser("extra")
    assert parser.parse_args(["audit", "extra"]).action == "extra"
    with pytest.raises(ValueError, match="no `tessera missing`"):
        subcommands(commands, "missing")
    with pytest.raises(ValueError, match="takes no actions"):
        subcommands(commands, "plain")
