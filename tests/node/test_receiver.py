"""C-STORE from dcmtk's real `storescu` into the node's receiver, then into the dataset."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pydicom
from pydicom.uid import UID

from node.cache import CachedDataset
from node.intake.ingest import IntakeConfig, run_ingest
from node.intake.receiver import ReceiverConfig, start_receiver
from node.phi import instance_key, load_or_create_site_secret
from node.preprocess import PreprocessConfig
from node.synth.writer import SYNTAXES

# storescu's option to propose each of the generator's transfer syntaxes as stored
PROPOSE = {"explicit": "-xe", "rle": "-xr", "j2k": "-xv", "jpeg": "-xy", "jpegls": "-xt"}


def storescu(port: int, path: Path, called: str = "TESSERA") -> subprocess.CompletedProcess[str]:
    syntax = UID(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    option = PROPOSE[next(k for k, v in SYNTAXES.items() if v == syntax)]
    command = ["storescu", option, "-aet", "PACS1", "-aec", called, "127.0.0.1", str(port)]
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
