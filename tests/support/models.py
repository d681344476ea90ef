"""Helpers for the model, training and inference tests: real DICOM, preprocessed by the intake.

Nothing here is mocked: synthetic hospitals are written as DICOM files by `node.synth`,
ingested by `node.intake` (the real preprocessing and cache), and pydicom's own test files
are decoded by `node.intake.preprocess`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydicom.data import get_testdata_file

from node.inference.runtime import preprocess_metadata
from node.intake.cache import CachedDataset
from node.intake.ingest import IntakeConfig, run_ingest
from node.intake.preprocess import PreprocessConfig, decode_dicom_bytes
from node.synth.sites import SynthConfig, generate
from tessera.models import ModelSpec, TesseraNet, build_model
from tessera.models.onnx_export import ExportMetadata, export_onnx
from tessera.models.weights import model_hash, state_arrays

SIZE = 32
PREPROCESS = PreprocessConfig(size=SIZE, channels=1)
LABELS = ("absent", "present")
PYDICOM_FILES = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtdose.dcm")


def pydicom_file(name: str) -> Path:
    """Path of one of pydicom's bundled test files (shipped with the package, no download)."""
    path = get_testdata_file(name)
    assert path is not None, name
    return Path(str(path))


def preprocessed_pydicom(cfg: PreprocessConfig = PREPROCESS) -> np.ndarray:
    """pydicom's real CT and MR test images through the intake preprocessing, (N, C, H, W)."""
    arrays = [decode_dicom_bytes(pydicom_file(n).read_bytes(), cfg) for n in PYDICOM_FILES[:2]]
    return np.stack(arrays)


@dataclass(frozen=True)
class IngestedSite:
    """A synthetic hospital written as DICOM and ingested: its folders and cached arrays."""

    dicom_dir: Path
    state_dir: Path
    images: np.ndarray
    labels: np.ndarray


def ingested_site(root: Path, images_per_site: int = 40, seed: int = 5) -> IngestedSite:
    """Write one synthetic site, run the real intake, and load the training split."""
    generate(SynthConfig(root / "synth", sites=1, seed=seed, images_per_site=images_per_site,
                         size=SIZE))  # fmt: skip
    site = root / "synth" / "site-00"
    state = root / "state"
    run_ingest(IntakeConfig(site / "dicom", state, preprocess=PREPROCESS, label_set=LABELS,
                            labels_csv=site / "labels.csv", workers=1))  # fmt: skip
    images, labels = CachedDataset(state, PREPROCESS, split="train", labelled_only=True).stack()
    return IngestedSite(site / "dicom", state, images, labels)


def export_model(model: TesseraNet, version: str, spec: ModelSpec) -> bytes:
    """ONNX bytes of `model` with the test preprocessing and labels in its metadata."""
    metadata = ExportMetadata(spec.model_id, version, model_hash(state_arrays(model)).hex(),
                              LABELS, preprocess_metadata(PREPROCESS))  # fmt: skip
    return export_onnx(model, metadata, SIZE)


def small_model(seed: int = 0) -> tuple[TesseraNet, ModelSpec]:
    """A small-cnn (GroupNorm) for 1-channel 2-class inputs."""
    torch.set_num_threads(1)
    spec = ModelSpec("small-cnn", 1, 2, "group")
    return build_model(spec, seed=seed), spec
