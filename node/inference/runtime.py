"""Point-of-care inference: ONNX Runtime over the intake's own preprocessing.

A model is loaded from one ONNX file exported by `tessera.models.onnx_export`; its metadata
carries the labels, version, hash and the preprocessing configuration, so nothing else is
needed. DICOM bytes go through the same screening and `node.intake.preprocess.preprocess` as the
training intake (`decode_dicom_bytes` does the same steps; the dataset is kept here because
the SOP Instance UID names the result, as a keyed hash).

Hot swap: `ModelSlot` holds the current `LoadedModel`. A request reads the slot once and
uses that one model for its whole life (preprocessing config, session, version, labels), so
a swap in the middle can neither fail a request nor mix two versions: replacing a Python
attribute is atomic, and the old model stays alive as long as a request still holds it.

Results carry no PHI: the instance is named by HMAC-SHA256 under the site secret
(`node.intake.phi`), and error answers carry only a reason code and the node's own words.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import onnxruntime as ort

from node.errors import NodeError, UnusableImageError
from node.intake.phi import instance_key, keyed_hash
from node.intake.preprocess import PreprocessConfig, preprocess
from node.intake.screen import IntakeLimits, quiet_pydicom, read_dataset, screen_dataset
from tessera.models.onnx_export import INPUT_NAME, OUTPUT_NAMES, ExportMetadata, read_metadata
from tessera.pipeline import PIPELINE_KEY, PIPELINE_VERSION, resolved_preprocess


def preprocess_metadata(cfg: PreprocessConfig) -> dict[str, object]:
    """The preprocessing config as an export's metadata holds it: every term, resolved
    (`tessera.pipeline.resolved_preprocess`, as for a release), with the pipeline version."""
    return resolved_preprocess(asdict(cfg))


def preprocess_from_metadata(values: dict[str, object]) -> PreprocessConfig:
    """Rebuild the PreprocessConfig an export was trained with; NodeError if incompatible."""
    if values.get(PIPELINE_KEY) != PIPELINE_VERSION:
        raise NodeError(
            f"the model was trained with preprocessing pipeline version "
            f"{values.get(PIPELINE_KEY)!r}, this node runs {PIPELINE_VERSION}; update the node "
            "or re-export the model from a matching release"
        )
    names = {f.name for f in fields(PreprocessConfig)}
    unknown = sorted(set(values) - names - {PIPELINE_KEY})
    if unknown:
        raise NodeError(f"model preprocessing metadata has unknown keys {unknown}")
    try:
        return PreprocessConfig(**{k: v for k, v in values.items() if k in names})  # type: ignore[arg-type]
    except (TypeError, ValueError) as error:
        raise NodeError(f"model preprocessing metadata is invalid: {error}") from None


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Batch-1 latency settings: intra-op threads = usable cores, sequential execution."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings from graph fusion are not the operator's concern
    return options


@dataclass(frozen=True)
class LoadedModel:
    """One ONNX model ready to serve: session, metadata and its preprocessing."""

    session: ort.InferenceSession
    metadata: ExportMetadata
    preprocess: PreprocessConfig
    onnx_sha256: str

    @property
    def version(self) -> str:
        """The release version the metadata names."""
        return self.metadata.model_version

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities for a (N, C, H, W) float32 batch."""
        out = self.session.run([OUTPUT_NAMES[1]], {INPUT_NAME: batch})
        return np.asarray(out[0])


def load_model(data: bytes, threads: int | None = None) -> LoadedModel:
    """Parse, check and open ONNX bytes; NodeError naming what is wrong."""
    try:
        metadata = read_metadata(data)
    except Exception as error:  # noqa: BLE001 - protobuf and JSON errors are varied
        raise NodeError(f"not a Tessera ONNX model ({type(error).__name__}: {error})") from None
    cfg = preprocess_from_metadata(dict(metadata.preprocess))
    try:
        session = ort.InferenceSession(
            data, sess_options=session_options(threads), providers=["CPUExecutionProvider"]
        )
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own types
        raise NodeError(f"onnxruntime cannot load the model: {error}") from None
    return LoadedModel(session, metadata, cfg, hashlib.sha256(data).hexdigest())


class ModelSlot:
    """The model currently served; `swap` replaces it atomically (see the module docstring)."""

    def __init__(self, model: LoadedModel | None = None) -> None:
        self._model = model
        self._lock = threading.Lock()  # orders concurrent swaps; readers never take it

    def current(self) -> LoadedModel:
        """The model to use for one whole request; NodeError if none is loaded yet."""
        model = self._model
        if model is None:
            raise NodeError("no model is loaded yet; the node serves after its first release")
        return model

    def swap(self, model: LoadedModel) -> LoadedModel | None:
        """Install `model`; returns the one it replaced."""
        with self._lock:
            old, self._model = self._model, model
        return old


def instance_name(ds_uid: str | None, data: bytes, secret: bytes) -> str:
    """Keyed hash of the SOP Instance UID, or of the content when the UID is missing."""
    if ds_uid:
        return instance_key(ds_uid, secret)
    return keyed_hash("content", hashlib.sha256(data).hexdigest(), secret)


def infer_dicom_bytes(
    model: LoadedModel, data: bytes, secret: bytes, limits: IntakeLimits | None = None
) -> dict[str, Any]:
    """Screen, preprocess and classify one DICOM file's bytes; the JSON-ready result.

    Raises UnusableImageError (with a quarantine reason) for input that is not a usable
    DICOM image. The result names the instance by keyed hash only.
    """
    limits = limits or IntakeLimits()
    if len(data) > limits.max_file_bytes:
        raise UnusableImageError(
            "decompressed-size", f"{len(data)} bytes; the file limit is {limits.max_file_bytes}"
        )
    with quiet_pydicom():
        ds = read_dataset(data)
        screen_dataset(ds, limits)
        image = preprocess(ds, model.preprocess)
    uid = ds.get("SOPInstanceUID")
    probabilities = model.probabilities(image[None])[0]
    labels = model.metadata.labels
    return {
        "instance": instance_name(str(uid) if uid else None, data, secret),
        "label": labels[int(np.argmax(probabilities))],
        "probabilities": {label: float(p) for label, p in zip(labels, probabilities, strict=True)},
        "model_version": model.version,
        "model_hash": model.metadata.model_hash,
    }
