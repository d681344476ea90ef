"""The watched folder: incremental passes, labels, the dataset view and the report."""

from __future__ import annotations

import csv
import os
import shutil
import sqlite3
import stat
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.errors import NodeError
from node.intake.cache import UNLABELLED, CachedDataset
from node.intake.ingest import IntakeConfig, run_ingest
from node.intake.phi import SECRET_FILE, instance_key, load_or_create_site_secret
from node.intake.preprocess import PreprocessConfig
from node.intake.report import build_report, format_report, quarantined_paths

LABELS = ("absent", "present")
CFG = PreprocessConfig(size=32)


def site_copy(synth_root: Path, tmp_path: Path, site: int = 0) -> tuple[Path, Path]:
    """A private copy of one site's DICOM folder and its manifest."""
    intake = tmp_path / "intake"
    shutil.copytree(synth_root / f"site-{site:02d}" / "dicom", intake)
    return intake, synth_root / f"site-{site:02d}" / "labels.csv"


def config(intake: Path, state: Path, **extra: object) -> IntakeConfig:
    return IntakeConfig(intake, state, preprocess=CFG, label_set=LABELS, **extra)  # type: ignore[arg-type]


def test_incremental_passes(synth_root: Path, tmp_path: Path) -> None:
    intake, labels = site_copy(synth_root, tmp_path, site=2)
    state = tmp_path / "state"
    cfg = config(intake, state, labels_csv=labels)
    first = run_ingest(cfg)
    assert (first.ingested, first.quarantined, first.unchanged) == (12, 0, 0)
    second = run_ingest(cfg)
    assert (second.ingested, second.unchanged) == (0, 12)

    files = sorted(intake.rglob("*.dcm"))
    # touched but identical content: the keyed content hash says "unchanged"
    os.utime(files[0], ns=(1_000_000_000, 1_000_000_000))
    # changed content: a different image under the same path is re-ingested
    ds = pydicom.dcmread(files[1])
    replacement = pydicom.dcmread(files[2])
    replacement.save_as(files[1], enforce_file_format=True)
    del ds
    # deleted: dropped from the dataset, its cached array removed
    gone = pydicom.dcmread(files[3]).SOPInstanceUID
    files[3].unlink()
    third = run_ingest(cfg)
    assert (third.ingested, third.unchanged, third.dropped) == (1, 10, 1)

    secret = load_or_create_site_secret(state)
    dataset = CachedDataset(state, CFG)
    assert len(dataset) == 10  # 11 files, two of them now the same instance
    assert instance_key(gone, secret) not in dataset.keys
    # shards nothing points at any more are removed; every remaining one is in use
    shards = {p.stem for p in (state / "cache").rglob("*.npy")}
    with sqlite3.connect(state / "intake" / "index.sqlite3") as conn:
        used = {r[0] for r in conn.execute("SELECT DISTINCT shard FROM files")}
    assert shards == used
    # what the node writes is owner-only: arrays are still images of patients
    for written in [*(state / "cache").rglob("*.npy"), state / "intake" / "index.sqlite3"]:
        assert stat.S_IMODE(written.stat().st_mode) == 0o600, written
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_dataset_view_labels_and_splits(synth_root: Path, tmp_path: Path) -> None:
    intake, labels = site_copy(synth_root, tmp_path, site=0)
    state = tmp_path / "state"
    run_ingest(config(intake, state, labels_csv=labels))
    with open(labels, newline="") as handle:
        truth = {r["sop_instance_uid"]: r for r in csv.DictReader(handle)}
    secret = load_or_create_site_secret(state)
    by_key = {instance_key(uid, secret): row for uid, row in truth.items()}
    train, test = CachedDataset(state, CFG, split="train"), CachedDataset(state, CFG, split="test")
    assert len(train) + len(test) == 12 and len(test) == round(0.2 * 12)
    assert train.label_set == LABELS
    for view, split in ((train, "train"), (test, "test")):
        for i, key in enumerate(view.keys):
            assert by_key[key]["split"] == split
            array, label = view[i]
            assert LABELS[label] == by_key[key]["label"]
            assert isinstance(array, np.memmap) and array.shape == (1, 32, 32)
            assert array.dtype == np.float32 and not array.flags.writeable
    x, y = train.stack()
    assert x.shape == (len(train), 1, 32, 32) and np.array_equal(y, train.labels)
    # a different preprocessing config sees nothing until it is ingested
    assert len(CachedDataset(state, PreprocessConfig(size=48))) == 0


@pytest.mark.parametrize("column", ["study_instance_uid", "accession_number"])
def test_labels_by_study_or_accession_and_out_of_set(
    synth_root: Path, tmp_path: Path, column: str
) -> None:
    intake, labels = site_copy(synth_root, tmp_path, site=1)
    with open(labels, newline="") as handle:
        rows = list(csv.DictReader(handle))
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([column, "label"])
        for i, row in enumerate(rows):
            if i == 0:
                continue  # left unlabelled: still usable for inference
            writer.writerow([row[column], "maybe" if i == 1 else row["label"]])
    state = tmp_path / "state"
    summary = run_ingest(config(intake, state, labels_csv=manifest))
    assert summary.labels_out_of_set == {"maybe": 1}
    everything = CachedDataset(state, CFG)
    labelled = CachedDataset(state, CFG, labelled_only=True)
    assert len(everything) == 12 and len(labelled) == 10
    assert int((everything.labels == UNLABELLED).sum()) == 2
    report = build_report(state, CFG.digest())
    assert report["labels_out_of_set"] == {"maybe": 1}
    assert "'maybe': 1 rows" in format_report(report)


def test_folder_per_class_labels(synth_root: Path, tmp_path: Path) -> None:
    intake = tmp_path / "intake"
    source = sorted((synth_root / "site-03" / "dicom").rglob("*.dcm"))
    for i, path in enumerate(source[:6]):
        folder = intake / ("present" if i % 2 else "absent") / f"case{i}"
        folder.mkdir(parents=True)
        shutil.copy(path, folder / "image.dcm")
    (intake / "Smith_John").mkdir()  # a folder that is not a class stays unlabelled
    shutil.copy(source[6], intake / "Smith_John" / "image.dcm")
    state = tmp_path / "state"
    run_ingest(config(intake, state, folder_labels=True))
    dataset = CachedDataset(state, CFG)
    assert sorted(dataset.labels.tolist()) == [-1, 0, 0, 0, 1, 1, 1]
    with sqlite3.connect(state / "intake" / "index.sqlite3") as conn:
        stored = {r[0] for r in conn.execute("SELECT DISTINCT folder_label FROM files")}
    assert stored == {None, "absent", "present"}
    with pytest.raises(ValueError, match="label set"):
        IntakeConfig(intake, state, folder_labels=True)


def test_report_and_paths_for_quarantined_files(synth_root: Path, tmp_path: Path) -> None:
    intake, _ = site_copy(synth_root, tmp_path, site=4)
    (intake / "notes").mkdir()
    (intake / "notes" / "readme.txt").write_text("not an image")
    good = next(intake.rglob("*.dcm")).read_bytes()
    (intake / "notes" / "cut.dcm").write_bytes(good[: len(good) // 2])
    state = tmp_path / "state"
    cfg = config(intake, state)
    run_ingest(cfg)
    report = build_report(state, CFG.digest())
    assert report["files_ingested"] == 12 and report["files_quarantined"] == 2
    assert set(report["quarantine"]) == {"not-dicom", "truncated"}  # type: ignore[arg-type]
    text = format_report(report)
    assert "not-dicom" in text and "truncated" in text and "readme" not in text
    located = sorted((rel, reason) for rel, reason, _ in quarantined_paths(cfg))
    assert located == [("notes/cut.dcm", "truncated"), ("notes/readme.txt", "not-dicom")]


def test_site_secret_is_private_and_missing_mount_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    secret = load_or_create_site_secret(state)
    assert len(secret) == 32 and load_or_create_site_secret(state) == secret
    assert stat.S_IMODE((state / SECRET_FILE).stat().st_mode) == 0o600
    os.chmod(state / SECRET_FILE, 0o644)
    with pytest.raises(NodeError, match="chmod 600"):
        load_or_create_site_secret(state)
    with pytest.raises(NodeError, match="does not exist"):
        run_ingest(IntakeConfig(tmp_path / "unmounted", tmp_path / "s2"))


def test_config_from_a_toml_table(tmp_path: Path) -> None:
    from tessera.errors import ConfigError

    table = {"intake_dir": "/data/dicom", "state_dir": str(tmp_path), "size": 32,
             "window": "ct-lung", "label_set": ["absent", "present"], "max_frames": 10}  # fmt: skip
    cfg = IntakeConfig.from_mapping(table)
    assert cfg.preprocess == PreprocessConfig(size=32, window="ct-lung")
    assert cfg.limits.max_frames == 10 and cfg.label_set == LABELS and cfg.workers == 2
    with pytest.raises(ConfigError, match="unknown"):
        IntakeConfig.from_mapping({**table, "sizes": 3})
    with pytest.raises(ConfigError, match="invalid"):
        IntakeConfig.from_mapping({**table, "size": 3})


def test_cli_ingest_and_report(
    synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tessera.cli import main

    intake, labels = site_copy(synth_root, tmp_path, site=3)
    state = tmp_path / "state"
    argv = ["node", "ingest", "--intake", str(intake), "--state", str(state), "--size", "32",
            "--labels", str(labels), "--label-set", "absent,present", "--report"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ingested files:    12" in out and "train/present" in out
    assert main(["node", "ingest", "--intake", str(tmp_path / "nope"), "--state", str(state)]) == 2
    assert "does not exist" in capsys.readouterr().err
