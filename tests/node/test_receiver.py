"""C-STORE from dcmtk's real `storescu` into the node's receiver, then into the dataset."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pydicom
from pydicom.uid import UID

from node.intake.cache import CachedDataset
from node.intake.ingest import IntakeConfig, run_ingest
from node.intake.phi import instance_key, load_or_create_site_secret
from node.intake.preprocess import PreprocessConfig
from node.intake.receiver import ReceiverConfig, start_receiver
from node.synth.writer import SYNTAXES

# storescu's option to propose each of the generator's transfer syntaxes as stored
PROPOSE = {"explicit": "-xe", "rle": "-xr", "j2k": "-xv", "jpeg": "-xy", "jpegls": "-xt"}


def storescu(
    port: int, path: Path, called: str = "TESSERA", calling: str = "PACS1"
) -> subprocess.CompletedProcess[str]:
    syntax = UID(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    option = PROPOSE[next(k for k, v in SYNTAXES.items() if v == syntax)]
    command = ["storescu", option, "-aet", calling, "-aec", called, "127.0.0.1", str(port)]
    return subprocess.run([*command, str(path)], capture_output=True, text=True, timeout=60)


def test_storescu_objects_land_in_the_dataset(synth_root: Path, tmp_path: Path) -> None:
    # one file from each site: every transfer syntax the generator writes
    files = [sorted((synth_root / f"site-{s:02d}" / "dicom").rglob("*.dcm"))[0] for s in range(5)]
    intake, state = tmp_path / "intake", tmp_path / "state"
    server = start_receiver(ReceiverConfig(intake, state, host="127.0.0.1", port=0))
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
    names = sorted(p.name for p in (intake / "received").iterdir())
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (intake / "received").iterdir()}
    assert modes == {0o600}  # a received object carries PHI in full: owner-only
    assert names == sorted(f"{instance_key(u, secret)}.dcm" for u in uids)
    for uid, original in zip(uids, files, strict=True):
        sent = pydicom.dcmread(original)
        got = pydicom.dcmread(intake / "received" / f"{instance_key(uid, secret)}.dcm")
        assert got.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        assert (got.pixel_array == sent.pixel_array).all()

    summary = run_ingest(IntakeConfig(intake, state, preprocess=PreprocessConfig(size=32)))
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
    # Named as if it lay in intake/received: the layout `tessera node receive` writes.
    (intake / "received").mkdir()
    (intake / "received" / files[2].name).write_bytes(files[2].read_bytes())
    no_separate = IntakeConfig(intake, state, preprocess=PreprocessConfig(size=32))
    assert run_ingest(no_separate).ingested == 1
    (intake / "received" / files[2].name).unlink()
    (received / files[2].name).write_bytes(files[2].read_bytes())
    moved = run_ingest(cfg)
    assert (moved.ingested, moved.unchanged) == (0, 3)  # same name, same key: not re-ingested
