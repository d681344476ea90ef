"""What the C-STORE receiver keeps: objects stream to disk under a size cap and a quota,
only the image storage classes the study can train on are accepted, and a known SOP
Instance UID never takes different content. Real server; dcmtk's storescu and pynetdicom
as the senders."""

from __future__ import annotations

import logging
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from node.intake.phi import instance_key, load_or_create_site_secret
from node.intake.receiver import ReceiverConfig, start_receiver
from tessera.governance.audit import read_entries
from tessera.observability.events import Event
from tests.support.dicom_net import CALLING, image_object, storescu

MIB = 1 << 20


@pytest.fixture(autouse=True)
def _receiver_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tessera.node.receiver")


def receive(state: Path, files: list[Path], **overrides: Any) -> list[int]:
    """Push each file with storescu to a fresh receiver; return storescu's exit codes."""
    settings = {"host": "127.0.0.1", "port": 0, "allowed_calling_aets": (CALLING,), **overrides}
    server = start_receiver(ReceiverConfig(state_dir=state, **settings))
    try:
        return [storescu(server.server_address[1], f).returncode for f in files]
    finally:
        server.shutdown()


def received(state: Path) -> list[Path]:
    folder = state / "received"
    return sorted(p for p in folder.iterdir() if p.suffix == ".dcm") if folder.is_dir() else []


def events(caplog: pytest.LogCaptureFixture, event: Event) -> list[dict[str, Any]]:
    """The fields of every `event` the receiver logged."""
    return [r.fields for r in caplog.records if r.getMessage() == event]  # type: ignore[attr-defined]


def test_objects_stream_to_disk_and_one_over_the_cap_is_cut_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    incoming = tmp_path / "tmp"  # where pynetdicom writes objects in flight (TMPDIR)
    incoming.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(incoming))
    fits = image_object(tmp_path / "fits.dcm", side=2900)  # 16 MiB
    too_big = image_object(tmp_path / "too-big.dcm", side=4096)  # 32 MiB
    state = tmp_path / "state"
    settings = {"host": "127.0.0.1", "port": 0, "allowed_calling_aets": (CALLING,)}
    server = start_receiver(ReceiverConfig(state_dir=state, max_object_bytes=20 * MIB, **settings))
    codes, peaks = [], []
    tracemalloc.start()
    try:
        for path in (fits, too_big):
            tracemalloc.reset_peak()
            codes.append(storescu(server.server_address[1], path).returncode)
            peaks.append(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()
        server.shutdown()
    assert codes[0] == 0 and codes[1] != 0
    # Streamed to disk: the receiver held a small part of either object at a time (holding
    # one whole takes twice its size: the request, then the bytes written).
    assert max(peaks) < fits.stat().st_size / 4, [f"{p / MIB:.1f} MiB" for p in peaks]
    (stored,) = received(state)
    assert pydicom.dcmread(stored).PixelData == pydicom.dcmread(fits).PixelData
    assert list(incoming.iterdir()) == []  # the cut-off object's partial file is gone
    (cut,) = events(caplog, Event.RECEIVER_TOO_LARGE)
    assert cut["limit"] == 20 * MIB and 20 * MIB < cut["size"] < 21 * MIB


def test_the_quota_refuses_with_out_of_resources(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = [image_object(tmp_path / f"{i}.dcm", side=512, seed=i) for i in range(3)]
    quota = int(2.5 * files[0].stat().st_size)
    codes = receive(tmp_path / "state", files, quota_bytes=quota)
    assert codes[:2] == [0, 0] and codes[2] != 0
    assert len(received(tmp_path / "state")) == 2
    (refused,) = events(caplog, Event.RECEIVER_STORE_REFUSED)
    assert refused["reason"] == "quota"


def test_objects_the_study_cannot_train_on_are_refused(tmp_path: Path) -> None:
    never = [get_testdata_file(n) for n in ("rtplan.dcm", "test-SR.dcm", "waveform_ecg.dcm")]
    image = image_object(tmp_path / "ct.dcm")
    codes = receive(tmp_path / "state", [*(Path(str(p)) for p in never), image])
    assert all(code != 0 for code in codes[:3]) and codes[3] == 0
    assert len(received(tmp_path / "state")) == 1


def test_a_known_uid_never_takes_different_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    uid = generate_uid()
    original = image_object(tmp_path / "original.dcm", seed=1, uid=uid)
    tampered = image_object(tmp_path / "tampered.dcm", seed=2, uid=uid)
    # The same tampered dataset under a fresh command UID (pynetdicom sends the file's raw
    # dataset with the file meta's UID in the command): the dataset still claims `uid`.
    disguised = image_object(tmp_path / "disguised.dcm", seed=2, uid=uid)
    ds = pydicom.dcmread(disguised)
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(disguised)  # as it is: enforce_file_format would set the meta's UID back

    state = tmp_path / "state"
    settings = {"host": "127.0.0.1", "port": 0, "allowed_calling_aets": (CALLING,)}
    server = start_receiver(ReceiverConfig(state, audit_log=state / "audit.log", **settings))
    port = server.server_address[1]
    try:
        first, again, overwrite = (storescu(port, p) for p in (original, original, tampered))
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
        sender = AE(ae_title=CALLING)
        sender.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
        assoc = sender.associate("127.0.0.1", port, ae_title="TESSERA")
        assert assoc.is_established
        status = assoc.send_c_store(disguised)
        assoc.release()
    finally:
        server.shutdown()
    assert first.returncode == 0 and again.returncode == 0  # the same object twice: fine
    assert overwrite.returncode != 0, overwrite.stderr
    assert status.Status != 0x0000
    (stored,) = received(state)
    assert pydicom.dcmread(stored).PixelData == pydicom.dcmread(original).PixelData

    key = instance_key(uid, load_or_create_site_secret(state))
    refused = [e.fields for e in read_entries(state / "audit.log") if e.kind == "dicom-refused"]
    assert [(e["reason"], e["instance"]) for e in refused] == [
        ("overwrite", key),
        ("uid-mismatch", key),
    ]
    logged = [(e["reason"], e["instance"]) for e in events(caplog, Event.RECEIVER_STORE_REFUSED)]
    assert logged == [("overwrite", key), ("uid-mismatch", key)]
    assert not any(uid in str(getattr(r, "fields", "")) for r in caplog.records)
