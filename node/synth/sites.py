"""`tessera synth`: write N synthetic hospitals, deterministic by seed.

Layout of OUT:
    synth.json                       parameters and per-site counts (no identifiers)
    site-00/dicom/<PatientID>/<n>.dcm  the images, in the site's transfer syntax
    site-00/labels.csv               sop_instance_uid, study_instance_uid, accession_number,
                                     label, split (train | held-out test)
Folders are named by patient ID on purpose, as many PACS exports are: the node must
not leak paths.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from node.synth.people import fake_patient
from node.synth.phantoms import LESION_CONTRAST, ct_slice_hu, radiograph
from node.synth.writer import Scanner, build_instance, uid_for

LABELS = ("absent", "present")
MODALITIES = ("mixed", "ct", "cr", "dx")

# Site i takes profile i % 5: each has its own vendor, transfer syntax and noise, and the
# CR site stores MONOCHROME1.
PROFILES = (
    Scanner("SIEMENS", "SOMATOM Force", "St Aldhelm General Hospital", "CT", "explicit",
            "MONOCHROME2", 0.68, 14.0, 0.0),
    Scanner("AGFA", "CR 30-X", "Northgate Royal Infirmary", "CR", "rle",
            "MONOCHROME1", 0.15, 55.0, 60.0),
    Scanner("GE MEDICAL SYSTEMS", "Definium 656", "Lakeside University Clinic", "DX", "j2k",
            "MONOCHROME2", 0.14, 45.0, -80.0),
    Scanner("Philips", "Incisive CT", "Riverbend Community Hospital", "CT", "jpegls",
            "MONOCHROME2", 0.78, 18.0, 12.0),
    Scanner("CARESTREAM HEALTH", "DRX-Evolution", "Hillcrest Children's Hospital", "DX",
            "jpeg", "MONOCHROME2", 0.139, 50.0, 40.0),
)  # fmt: skip


@dataclass(frozen=True)
class SynthConfig:
    """What `tessera synth` writes."""

    out: Path
    sites: int = 3
    seed: int = 0
    images_per_site: int = 200
    skew: float = 0.5
    modality: str = "mixed"
    size: int = 64
    test_fraction: float = 0.2
    lesion_contrast: float = LESION_CONTRAST  # peak, in units of the scanner's noise sigma
    lesion_scale: float = 1.0  # lesion radius relative to the default 2.5-4 px per 64 px

    def __post_init__(self) -> None:
        if not (self.lesion_contrast > 0 and self.lesion_scale > 0):
            raise ValueError("lesion contrast and scale must be positive")
        if not 1 <= self.sites <= 64:
            raise ValueError(f"sites must be 1..64, got {self.sites}")
        if not 4 <= self.images_per_site <= 100_000:
            raise ValueError(f"images per site must be 4..100000, got {self.images_per_site}")
        if not 0.0 <= self.skew <= 1.0:
            raise ValueError(f"skew must be in [0, 1], got {self.skew}")
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if not 16 <= self.size <= 1024:
            raise ValueError(f"size must be 16..1024, got {self.size}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test fraction must be in [0, 1), got {self.test_fraction}")


def site_scanner(cfg: SynthConfig, site: int) -> Scanner:
    """The scanner profile of `site`, with the modality override applied."""
    scanner = PROFILES[site % len(PROFILES)]
    if cfg.modality != "mixed" and cfg.modality.upper() != scanner.modality:
        modality = cfg.modality.upper()
        noise = {"CT": 16.0, "CR": 55.0, "DX": 48.0}[modality]
        scanner = replace(scanner, modality=modality, noise=noise,
                          pixel_spacing=0.7 if modality == "CT" else 0.15)  # fmt: skip
    return scanner


def prevalence(cfg: SynthConfig, site: int) -> float:
    """Share of 'present' at `site`: 0.5 everywhere at skew 0, 0.1..0.9 across sites at 1."""
    if cfg.sites == 1:
        return 0.5
    return 0.5 + cfg.skew * 0.4 * (2.0 * site / (cfg.sites - 1) - 1.0)


def render(
    scanner: Scanner,
    rng: np.random.Generator,
    size: int,
    lesion: bool,
    contrast: float = LESION_CONTRAST,
    scale: float = 1.0,
) -> np.ndarray:
    """One image in physical units (HU for CT, attenuation for radiographs)."""
    if scanner.modality == "CT":
        return ct_slice_hu(rng, size, size, scanner.noise, lesion, contrast, scale) + scanner.offset
    image = radiograph(rng, size + size // 8, size, scanner.noise, lesion, contrast, scale)
    return image + scanner.offset


def write_site(cfg: SynthConfig, site: int) -> dict[str, object]:
    """Write one site's images and manifest; return its (identifier-free) summary."""
    scanner = site_scanner(cfg, site)
    rng = np.random.default_rng([cfg.seed, site])
    n = cfg.images_per_site
    present = round(prevalence(cfg, site) * n)
    labels = np.array([1] * present + [0] * (n - present))
    rng.shuffle(labels)
    n_test = round(cfg.test_fraction * n)
    root = cfg.out / f"site-{site:02d}"
    rows: list[dict[str, str]] = []
    counts = {f"{split}/{label}": 0 for split in ("train", "test") for label in LABELS}
    for serial in range(n):
        lesion = bool(labels[serial])
        split = "test" if serial >= n - n_test else "train"
        patient = fake_patient(rng, site, serial)
        image = render(scanner, rng, cfg.size, lesion, cfg.lesion_contrast, cfg.lesion_scale)
        study = uid_for(cfg.seed, site, serial, "study")
        uids = (study, uid_for(study, "series"), uid_for(study, "instance"))
        ds = build_instance(image, scanner, patient, uids, serial + 1)
        path = root / "dicom" / patient.patient_id / f"{serial + 1:05d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        rows.append({
            "sop_instance_uid": str(uids[2]), "study_instance_uid": str(study),
            "accession_number": patient.accession, "label": LABELS[lesion], "split": split,
        })  # fmt: skip
        counts[f"{split}/{LABELS[lesion]}"] += 1
    _write_csv(root / "labels.csv", rows)
    return {"site": f"site-{site:02d}", "scanner": asdict(scanner), "counts": counts,
            "prevalence": round(present / n, 3)}  # fmt: skip


def _write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def generate(cfg: SynthConfig) -> dict[str, object]:
    """Write every site under `cfg.out` and a `synth.json` summary; return the summary."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, object] = {
        "seed": cfg.seed, "sites": cfg.sites, "images_per_site": cfg.images_per_site,
        "skew": cfg.skew, "modality": cfg.modality, "size": cfg.size,
        "test_fraction": cfg.test_fraction, "labels": list(LABELS),
        "per_site": [write_site(cfg, site) for site in range(cfg.sites)],
    }  # fmt: skip
    (cfg.out / "synth.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
