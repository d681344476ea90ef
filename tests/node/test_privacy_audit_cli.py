"""`tessera audit privacy` end to end: synthetic DICOM through the real intake, a model
trained on the cache's train split and accepted as a jointly signed release, then the audit
over the model store, the cache's test split and the privacy ledger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from node.intake.cache import CachedDataset
from node.intake.ingest import IntakeConfig, run_ingest
from node.privacy import attacks as privacy_audit
from node.privacy.ledger import PrivacyLedger
from node.round.releases import ModelStore, accept_release
from node.synth.sites import SynthConfig, generate
from node.training.trainer import TrainConfig, run_local_round
from tessera.cli import main
from tessera.crypto.signing import generate_signing_key, public_key_bytes, save_private_key
from tessera.governance.audit import read_entries
from tessera.governance.privacy_report import report_from_json
from tessera.models.weights import model_hash, state_arrays, weights_bytes
from tessera.wire.release import ReleaseBundle, build_release, sign_release
from tests.support.models import LABELS, PREPROCESS, export_model, small_model

FED, STUDY = "fed-1", "chest-xray"
EPOCHS = "5"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A node state with 36 train and 24 test images and version 1 (trained on the train
    split) accepted in its model store; returns (state dir, the model's hash).

    (Whether the attacks detect anything is tested on arrays in test_privacy_audit.py: a
    small-cnn barely memorises 29 smooth synthetic radiographs in a test's time budget.)"""
    root = tmp_path_factory.mktemp("audit-site")
    generate(SynthConfig(root / "synth", sites=1, seed=3, images_per_site=60, size=32,
                         test_fraction=0.4))  # fmt: skip
    dicom = root / "synth" / "site-00"
    state = root / "state"
    run_ingest(IntakeConfig(dicom / "dicom", state, preprocess=PREPROCESS, label_set=LABELS,
                            labels_csv=dicom / "labels.csv", workers=1))  # fmt: skip
    images, labels = CachedDataset(state, PREPROCESS, split="train", labelled_only=True).stack()
    model, spec = small_model(0)
    recipe = TrainConfig(local_epochs=int(EPOCHS), batch_size=8, learning_rate=0.05,
                         momentum=0.9, device="cpu")  # fmt: skip
    run_local_round(model, images, labels, recipe)
    weights = weights_bytes(state_arrays(model))
    bundle = ReleaseBundle(weights, export_model(model, "1", spec), b'{"card": 1}')
    release = build_release(FED, STUDY, 1, 1, bytes(32), bundle)
    keys = {agg: generate_signing_key() for agg in ("agg-1", "agg-2")}
    for agg, key in keys.items():
        release = sign_release(release, agg, key)
    store = ModelStore(state, FED, STUDY)
    accept_release(release.to_bytes(), {a: k.public_key() for a, k in keys.items()}, store)
    return state, model_hash(state_arrays(model)).hex()


def _args(state: Path, key: Path, out: Path, *extra: str) -> list[str]:
    return ["audit", "privacy", "--state", str(state), "--site", "site-1", "--key", str(key),
            "--out", str(out), "--epochs", EPOCHS, "--batch-size", "8", "--lr", "0.05",
            "--momentum", "0.9", "--device", "cpu", "--shadow-models", "2", "--bootstrap", "20",
            *extra]  # fmt: skip


def test_audit_writes_a_signed_aggregate_report(
    site: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state, digest = site
    key = generate_signing_key()
    save_private_key(key, tmp_path / "node.pem")
    out = tmp_path / "report.json"
    assert main(_args(state, tmp_path / "node.pem", out)) == 0
    report = report_from_json(out.read_bytes())
    assert (report.federation_id, report.study_id, report.site_id) == (FED, STUDY, "site-1")
    assert report.model_hash.hex() == digest and report.model_version == 1
    assert (report.members, report.non_members) == (36, 24)
    assert report.accountant_epsilon is None  # no DP round in the ledger
    for attack in report.attacks.values():
        assert 0.0 <= attack.auc.low <= attack.auc.high <= 1.0
    assert report.signature is not None
    key.public_key().verify(report.signature, b"tessera/privacy-audit-report/v1\x00"
                            + report.signed_bytes())  # fmt: skip
    printed = json.loads(capsys.readouterr().out.split("\nwrote")[0])
    assert set(printed) == {"model_version", "members", "non_members", "attacks",
                            "accountant_epsilon"}  # fmt: skip
    assert public_key_bytes(key) not in out.read_bytes()
    # Issue 19, point 10: the run trained shadow models on patient data: it is on record.
    (entry,) = [e for e in read_entries(state / "audit.log") if e.kind == "privacy-audit"
                and e.fields["outcome"] == "reported"]  # fmt: skip
    assert entry.fields["command"] == "tessera audit privacy"
    assert (entry.fields["version"], entry.fields["model_hash"]) == (1, digest)
    assert entry.fields["auc"] == max(a["auc"] for a in printed["attacks"].values())


def test_dp_ledger_above_the_evidence_fails_the_consistency_check(
    site: tuple[Path, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state, _ = site
    save_private_key(generate_signing_key(), tmp_path / "node.pem")
    out = tmp_path / "report.json"
    ledger_path = state / "privacy" / f"{STUDY}.json"
    # A ledger that claims almost no privacy was spent, for a model trained without noise.
    PrivacyLedger(ledger_path, STUDY, 8.0, 1e-5).charge_round(1, 50.0, 0.01, 1)
    try:
        assert main(_args(state, tmp_path / "node.pem", out)) == 2
        assert "pass --dp-noise" in capsys.readouterr().err
        # The attack "proves" epsilon >= 5 (the statistic is stubbed; everything else is the
        # real command): the check must stop the command, and no report may be written.
        monkeypatch.setattr(privacy_audit, "empirical_epsilon", lambda *_a, **_k: 5.0)
        assert main(_args(state, tmp_path / "node.pem", out, "--dp-noise", "1.0")) == 2
        error = capsys.readouterr().err
        assert "above the accountant's" in error and "accounting" in error
        assert not out.exists()  # no report leaves the site
        # Both runs read the site's images: each is on record with its outcome.
        outcomes = [e.fields["outcome"] for e in read_entries(state / "audit.log")
                    if e.kind == "privacy-audit"]  # fmt: skip
        assert outcomes[-2:] == ["failed", "accounting-error"]
    finally:
        ledger_path.unlink()
