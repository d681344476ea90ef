"""No patient identifier in anything the node prints or writes outside its cache arrays.

The synthetic files carry recognisable fake PHI (names, MRNs, birth dates, accession
numbers, UIDs, and patient-ID folder names). The node ingests them from the command line,
with a labels manifest, a few broken files and a C-STORE push, prints its report, and then
every log line, report line and file under the state directory is searched. Everything
runs at log level DEBUG: no level may write an identifier, the libraries' included.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom

from tessera.observability.events import Event

TESSERA = [sys.executable, "-m", "tessera.cli"]


def phi_strings(intake: Path) -> set[str]:
    found: set[str] = set()
    for path in intake.rglob("*.dcm"):
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - the deliberately broken files
            continue
        name = str(ds.PatientName)
        found |= {name, *(part for part in name.split("^") if len(part) >= 4)}
        for keyword in ("PatientID", "PatientBirthDate", "AccessionNumber", "StudyInstanceUID",
                        "SeriesInstanceUID", "SOPInstanceUID"):  # fmt: skip
            found.add(str(ds.get(keyword)))
    found |= {p.name for p in intake.rglob("MRN*")}
    return {s for s in found if s and s != "None"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_nothing_the_node_writes_or_prints_names_a_patient(
    synth_root: Path, tmp_path: Path
) -> None:
    intake, state, outbox = tmp_path / "intake", tmp_path / "state", tmp_path / "outbox"
    for site in (0, 1, 4):
        shutil.copytree(synth_root / f"site-{site:02d}" / "dicom", intake / f"s{site}")
    pushed = next((synth_root / "site-03" / "dicom").rglob("*.dcm"))
    broken = next((intake / "s0").rglob("*.dcm"))
    (broken.parent / "broken.dcm").write_bytes(broken.read_bytes()[:900])
    secrets = phi_strings(intake) | phi_strings(pushed.parent)
    assert len(secrets) > 100

    port = free_port()
    receiver = subprocess.Popen(
        [*TESSERA, "node", "receive", "--state", str(state), "--host", "127.0.0.1",
         "--port", str(port), "--allow-aet", "PACS1", "--log-level", "DEBUG"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # Wait for the receiver to listen: it imports pydicom and pynetdicom first, which
        # takes tens of seconds on a loaded machine. The limit only guards against a hang.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert receiver.poll() is None, f"the receiver exited with {receiver.returncode}"
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        command = ["storescu", "-xt", "-aet", "PACS1", "-aec", "TESSERA", "127.0.0.1", str(port),
                   str(pushed)]  # fmt: skip
        store = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert store.returncode == 0, store.stderr
    finally:
        receiver.send_signal(signal.SIGTERM)
        receiver_out, receiver_err = receiver.communicate(timeout=30)
    assert f'"{Event.RECEIVER_STORED}"' in receiver_err

    outbox.mkdir()
    manifest = outbox / "labels.csv"
    manifest.write_text((synth_root / "site-00" / "labels.csv").read_text())
    assert sum(s in manifest.read_text() for s in secrets) >= 30  # the search does find PHI
    ingest = subprocess.run(
        [*TESSERA, "node", "ingest", "--intake", str(intake), "--state", str(state),
         "--labels", str(manifest), "--label-set", "absent,present", "--size", "32", "--report",
         "--log-level", "DEBUG"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ingest.returncode == 0, ingest.stderr
    assert f'"{Event.INTAKE_QUARANTINE}"' in ingest.stderr and "truncated" in ingest.stdout
    report = subprocess.run(
        [*TESSERA, "node", "ingest", "--intake", str(intake), "--state", str(state),
         "--size", "32", "--report-only", "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert report.returncode == 0 and '"files_ingested": 37' in report.stdout

    printed = {"receiver stdout": receiver_out, "receiver log": receiver_err,
               "ingest log": ingest.stderr, "ingest report": ingest.stdout,
               "json report": report.stdout}  # fmt: skip
    for where, text in printed.items():
        leaks = sorted(s for s in secrets if s in text)
        assert not leaks, f"{where} leaks {leaks[:5]}"
    written = [p for p in state.rglob("*") if p.is_file() and p.suffix != ".npy"]
    assert any(p.name.startswith("index.sqlite3") for p in written)
    for path in written:
        data = path.read_bytes()
        leaks = sorted(s for s in secrets if s.encode() in data)
        assert not leaks, f"{path.relative_to(state)} leaks {leaks[:5]}"
    # the received original, which carries the patient's identity in full, is gone once cached
    assert list((state / "received").iterdir()) == []
