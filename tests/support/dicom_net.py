"""Real DICOM network clients and objects for the C-STORE receiver's tests.

`storescu` and `echoscu` are dcmtk's binaries; `pynetdicom_store` is pynetdicom as an SCU
(for what dcmtk cannot be told to do, such as a dataset whose UID differs from its
command's). Objects are real Part 10 files written by pydicom.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from broker.provisioning import pki
from node.synth.writer import SYNTAXES

# storescu's option to propose each of the generator's transfer syntaxes as stored
PROPOSE = {"explicit": "-xe", "rle": "-xr", "j2k": "-xv", "jpeg": "-xy", "jpegls": "-xt"}
CALLING = "PACS1"  # the calling AE title the receiver tests allow


def storescu(
    port: int,
    path: Path,
    called: str = "TESSERA",
    calling: str = CALLING,
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """Push one file with dcmtk's storescu, proposing the file's own transfer syntax."""
    syntax = UID(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    names = [k for k, v in SYNTAXES.items() if v == syntax]
    option = [PROPOSE[names[0]]] if names else []
    command = ["storescu", *option, *extra, "-aet", calling, "-aec", called, "127.0.0.1"]
    return subprocess.run([*command, str(port), str(path)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def image_object(path: Path, side: int = 64, seed: int = 0, uid: str | None = None) -> Path:
    """A CT image of `side` x `side` 16-bit pixels (2 * side**2 bytes), explicit VR LE."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 4096, (side, side), dtype=np.uint16)
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.SOPInstanceUID = uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def tls_files(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a PACS client certificate, as PEM files
    (dcmtk takes them as they are)."""
    ca = pki.create_ca("receiver-test")
    server = pki.issue_leaf(ca, "tessera-node", None, server_names=("127.0.0.1", "localhost"))
    client = pki.issue_leaf(ca, "PACS1", None)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"ca": folder / "ca.pem"}
    files["ca"].write_bytes(pki.certificate_pem(ca.certificate))
    for name, issued in (("server", server), ("client", client)):
        files[name], files[f"{name}_key"] = folder / f"{name}.pem", folder / f"{name}.key"
        pki.save(issued, files[name], files[f"{name}_key"])
    return files
