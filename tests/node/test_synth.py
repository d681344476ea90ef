"""Synthetic hospitals: determinism, HU after rescale, MONOCHROME1, every transfer syntax."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from node.synth.people import fake_patient
from node.synth.sites import PROFILES, SynthConfig, generate, prevalence
from node.synth.writer import SYNTAXES, build_instance, uid_for


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def test_generation_is_deterministic_by_seed(tmp_path: Path) -> None:
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        generate(SynthConfig(tmp_path / name, sites=2, seed=seed, images_per_site=6, size=32))
    first, second, other = (digests(tmp_path / n) for n in "abc")
    assert first == second
    assert first != other


def test_sites_write_their_profile_syntax_and_photometric(synth_root: Path) -> None:
    summary = json.loads((synth_root / "synth.json").read_text())
    seen = set()
    for site, info in enumerate(summary["per_site"]):
        profile = PROFILES[site]
        files = sorted((synth_root / info["site"] / "dicom").rglob("*.dcm"))
        assert len(files) == 12
        for path in files:
            ds = pydicom.dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == SYNTAXES[profile.syntax]
            assert ds.PhotometricInterpretation == profile.photometric
            assert ds.Manufacturer == profile.manufacturer
            assert ds.Modality == profile.modality
            assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
        seen.add(profile.syntax)
    assert seen == set(SYNTAXES)  # explicit VR LE, RLE, JPEG 2000, JPEG baseline, JPEG-LS
    assert [p.photometric for p in PROFILES].count("MONOCHROME1") == 1


def roundtrip(hu: np.ndarray, syntax: str) -> tuple[pydicom.Dataset, np.ndarray]:
    scanner = dataclasses.replace(PROFILES[0], syntax=syntax)
    rng = np.random.default_rng(0)
    study = uid_for("rt", syntax)
    ds = build_instance(hu, scanner, fake_patient(rng, 0, 1),
                        (study, uid_for(study, 1), uid_for(study, 2)), 1)  # fmt: skip
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    read = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    return read, apply_modality_lut(read.pixel_array, read)


@pytest.mark.parametrize("syntax", sorted(SYNTAXES))
def test_ct_hu_survive_each_transfer_syntax(syntax: str) -> None:
    rng = np.random.default_rng(1)
    hu = np.clip(rng.normal(0, 300, size=(32, 32)), -1024, 1000)
    hu[0, 0], hu[0, 1] = -1024.0, 1000.0
    ds, back = roundtrip(hu, syntax)
    assert ds.file_meta.TransferSyntaxUID == SYNTAXES[syntax]
    assert float(ds.RescaleIntercept) == -1024.0
    if syntax == "jpeg":  # 8-bit lossy: slope 8 HU per step, plus JPEG error
        assert int(ds.BitsStored) == 8 and float(ds.RescaleSlope) == 8.0
        assert np.mean(np.abs(back - hu)) < 40.0
    else:
        assert int(ds.BitsStored) == 12 and ds.pixel_array.max() < 4096
        assert np.array_equal(back, np.rint(hu))


def test_monochrome1_site_stores_inverted_values() -> None:
    attenuation = np.linspace(0, 4095, 32 * 40).reshape(40, 32)
    scanner = PROFILES[1]
    assert scanner.photometric == "MONOCHROME1"
    rng = np.random.default_rng(0)
    study = uid_for("m1")
    ds = build_instance(attenuation, scanner, fake_patient(rng, 1, 1),
                        (study, uid_for(study, 1), uid_for(study, 2)), 1)  # fmt: skip
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    read = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    assert np.array_equal(read.pixel_array, 4095 - np.rint(attenuation).astype(np.uint16))


def test_manifest_labels_splits_and_skew(synth_root: Path) -> None:
    cfg = SynthConfig(synth_root, sites=5, seed=11, images_per_site=12, size=32)
    fractions = []
    for site in range(5):
        with open(synth_root / f"site-{site:02d}" / "labels.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == 12
        assert {r["split"] for r in rows} == {"train", "test"}
        assert sum(r["split"] == "test" for r in rows) == round(0.2 * 12)
        present = sum(r["label"] == "present" for r in rows)
        assert present == round(prevalence(cfg, site) * 12)
        fractions.append(present / 12)
    assert fractions == sorted(fractions) and fractions[0] < 0.4 < 0.6 < fractions[-1]
    iid = SynthConfig(synth_root, sites=5, skew=0.0)
    assert {prevalence(iid, s) for s in range(5)} == {0.5}


def test_fake_phi_is_present_in_the_files(synth_root: Path) -> None:
    ds = pydicom.dcmread(next((synth_root / "site-00" / "dicom").rglob("*.dcm")))
    assert "^" in str(ds.PatientName) and ds.PatientID.startswith("MRN")
    assert len(ds.PatientBirthDate) == 8 and ds.AccessionNumber.startswith("ACC")
    # folders are named by patient ID, as many PACS exports are
    assert any(p.name == ds.PatientID for p in (synth_root / "site-00" / "dicom").iterdir())


def test_synth_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tessera.cli import main

    argv = ["synth", "--out", str(tmp_path), "--sites", "2", "--seed", "9", "--size", "24",
            "--images-per-site", "5", "--modality", "ct", "--skew", "0"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((tmp_path / "synth.json").read_text())
    assert capsys.readouterr().out.strip() == str(tmp_path / "synth.json")
    assert [s["scanner"]["modality"] for s in summary["per_site"]] == ["CT", "CT"]
    ds = pydicom.dcmread(next((tmp_path / "site-01").rglob("*.dcm")))
    assert ds.Modality == "CT" and ds.PhotometricInterpretation == "MONOCHROME1"
    assert (ds.Rows, ds.Columns) == (24, 24) and float(ds.RescaleIntercept) == -1024.0
    assert main(["synth", "--out", str(tmp_path), "--sites", "0"]) == 2
    assert "sites must be 1..64" in capsys.readouterr().err
