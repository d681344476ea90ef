"""C-STORE from dcmtk's real `storescu` into the node's receiver, then into the dataset; and
what the intake does with received originals once they are cached."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pydicom

from node.intake.cache import CachedDataset
from node.intake.ingest import IntakeConfig, run_ingest
from node.intake.phi import instance_key, load_or_create_site_secret
from node.intake.preprocess import PreprocessConfig
from node.intake.receiver import ReceiverConfig, start_receiver
from tests.support.dicom_net import CALLING, storescu


def test_storescu_objects_land_in_the_dataset(synth_root: Path, tmp_path: Path) -> None:
    # one file from each site: every transfer syntax the generator writes
    files = [sorted((synth_root / f"site-{s:02d}" / "dicom").rglob("*.dcm"))[0] for s in range(5)]
    state = tmp_path / "state"
    cfg = ReceiverConfig(state, allowed_calling_aets=(CALLING,), host="127.0.0.1", port=0)
    server = start_receiver(cfg)
    try:
        port = server.server_address[1]
        for path in files:
            result = storescu(port, path)
            assert result.returncode == 0, result.stderr
        refused = storescu(port, files[0], called="SOMEONE")  # wrong called AE title
        assert refused.returncode != 0
    finally:
        server.shutdown()

    secret = load_or_create_site_secret(state)
    uids = [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
    names = sorted(p.name for p in (state / "received").iterdir())
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (state / "received").iterdir()}
    assert modes == {0o600}  # a received object carries PHI in full: owner-only
    assert names == sorted(f"{instance_key(u, secret)}.dcm" for u in uids)
    for uid, original in zip(uids, files, strict=True):
        sent = pydicom.dcmread(original)
        got = pydicom.dcmread(state / "received" / f"{instance_key(uid, secret)}.dcm")
        assert got.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        assert (got.pixel_array == sent.pixel_array).all()

    received = state / "received"
    cfg_in = IntakeConfig(None, state, preprocess=PreprocessConfig(size=32), received_dir=received)
    summary = run_ingest(cfg_in)
    assert (summary.ingested, summary.quarantined) == (5, 0)
    dataset = CachedDataset(state, PreprocessConfig(size=32))
    assert sorted(dataset.keys) == sorted(instance_key(u, secret) for u in uids)


def test_a_separate_received_folder_is_ingested_with_the_intake_folder(
    synth_root: Path, tmp_path: Path
) -> None:
    """The node daemon's layout: the DICOM folder (read-only) plus `<state>/received`."""
    files = sorted((synth_root / "site-00" / "dicom").rglob("*.dcm"))[:3]
    intake, state = tmp_path / "intake", tmp_path / "state"
    received = state / "received"
    for folder, chosen in ((intake, files[:2]), (received, files[2:])):
        folder.mkdir(parents=True)
        for path in chosen:
            (folder / path.name).write_bytes(path.read_bytes())
    cfg = IntakeConfig(intake, state, preprocess=PreprocessConfig(size=32), received_dir=received)
    assert (run_ingest(cfg).ingested, run_ingest(cfg).unchanged) == (3, 3)
    (received / files[2].name).unlink()
    summary = run_ingest(cfg)
    assert (summary.unchanged, summary.dropped) == (2, 1)
    # The same name as if it lay in intake/received: one path key for both layouts.
    (intake / "received").mkdir()
    (intake / "received" / files[2].name).write_bytes(files[2].read_bytes())
    no_separate = IntakeConfig(intake, state, preprocess=PreprocessConfig(size=32))
    assert run_ingest(no_separate).ingested == 1
    (intake / "received" / files[2].name).unlink()
    (received / files[2].name).write_bytes(files[2].read_bytes())
    moved = run_ingest(cfg)
    assert (moved.ingested, moved.unchanged) == (0, 3)  # same name, same key: not re-ingested


def test_received_originals_are_deleted_once_cached_or_quarantined(
    synth_root: Path, tmp_path: Path
) -> None:
    files = sorted((synth_root / "site-01" / "dicom").rglob("*.dcm"))[:3]
    intake, state = tmp_path / "intake", tmp_path / "state"
    received = state / "received"
    intake.mkdir()
    received.mkdir(parents=True)
    (intake / "own.dcm").write_bytes(files[0].read_bytes())
    for path in files[1:]:
        (received / path.name).write_bytes(path.read_bytes())
    (received / "broken.dcm").write_bytes(files[1].read_bytes()[:900])
    pre = PreprocessConfig(size=32)
    cfg = IntakeConfig(intake, state, pre, received_dir=received, received_retention_s=3600)

    first = run_ingest(cfg)  # cached and quarantined, but younger than the retention period
    assert (first.ingested, first.quarantined, first.originals_deleted) == (2 + 1, 1, 0)
    assert len(list(received.iterdir())) == 3
    for path in received.iterdir():
        os.utime(path, (path.stat().st_atime - 7200, path.stat().st_mtime - 7200))
    second = run_ingest(cfg)
    assert second.originals_deleted == 3 and list(received.iterdir()) == []
    third = run_ingest(cfg)  # deleted because consumed, not withdrawn: still in the dataset
    assert (third.dropped, third.unchanged) == (0, 1)
    assert len(CachedDataset(state, pre).keys) == 3
    assert (intake / "own.dcm").exists()  # the hospital's own folder is never touched
