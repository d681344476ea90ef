"""Classify DICOM files with a Tessera ONNX model and nothing of Tessera: a hospital's own
client, written from the model's metadata and the documented pipeline (node/TRAINING.md,
"Using a model without Tessera").

    python plain_onnx_infer.py MODEL.onnx FILE.dcm [FILE.dcm ...]

One JSON line per file: {"file": <name>, "probabilities": {label: p}}. It imports numpy,
pydicom (to read the file) and onnxruntime only; `tests/node/test_plain_onnx.py` checks that
and that the probabilities are those of `tessera node infer`. It knows pipeline version 1
and refuses any other, and refuses what it does not implement (a Modality or VOI LUT
sequence, multi-frame colour) rather than guess.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort
import pydicom

PIPELINE_VERSION = 1
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Antialiased linear resampling weights (a triangle kernel widened by the downscale)."""
    scale = n_out / n_in
    support = max(1.0, 1.0 / scale)
    centres = (np.arange(n_out, dtype=np.float64) + 0.5) / scale - 0.5
    taps = np.arange(n_in, dtype=np.float64)
    weights = np.maximum(0.0, 1.0 - np.abs(taps[None, :] - centres[:, None]) / support)
    sums = weights.sum(axis=1, keepdims=True)
    empty = sums[:, 0] == 0
    if empty.any():  # past the edge when upscaling: the nearest source pixel
        nearest = np.clip(np.rint(centres[empty]), 0, n_in - 1).astype(int)
        weights[empty] = 0.0
        weights[empty, nearest] = 1.0
        sums = weights.sum(axis=1, keepdims=True)
    return (weights / sums).astype(np.float32)


def to_square(image: np.ndarray, size: int) -> np.ndarray:
    """(C, H, W) to (C, size, size): longer side to `size`, aspect kept, centred, zero padded."""
    channels, rows, cols = image.shape
    scale = size / max(rows, cols)
    out_rows, out_cols = max(1, round(rows * scale)), max(1, round(cols * scale))
    wy, wx = resample_matrix(rows, out_rows), resample_matrix(cols, out_cols)
    canvas = np.zeros((channels, size, size), dtype=np.float32)
    top, left = (size - out_rows) // 2, (size - out_cols) // 2
    for c in range(channels):
        canvas[c, top : top + out_rows, left : left + out_cols] = wy @ image[c] @ wx.T
    return canvas


def window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear VOI windowing (DICOM PS3.3 C.11.2.1.2) scaled to [0, 1]."""
    if width <= 1:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def first_number(value: object) -> float | None:
    """The first value of a possibly multi-valued number element."""
    if value is None:
        return None
    if not isinstance(value, str | bytes | int | float):
        value = value[0]  # type: ignore[index]
    return float(value)  # type: ignore[arg-type]


def grey_to_unit(raw: np.ndarray, ds: pydicom.Dataset, terms: dict[str, object]) -> np.ndarray:
    """Rescale to real units, then the model's window (or the file's), into [0, 1]."""
    if "ModalityLUTSequence" in ds:
        raise SystemExit("a Modality LUT Sequence is not implemented by this client")
    values = raw.astype(np.float64)
    if "RescaleSlope" in ds:
        values = values * float(ds.RescaleSlope) + float(ds.get("RescaleIntercept", 0.0) or 0.0)
    spec = str(terms["window"])
    if spec not in ("file", "minmax"):
        center, width = (float(part) for part in spec.split("/"))
        return window(values, center, width)
    if spec == "file":
        if "VOILUTSequence" in ds:
            raise SystemExit("a VOI LUT Sequence is not implemented by this client")
        center = first_number(ds.get("WindowCenter"))
        width = first_number(ds.get("WindowWidth"))
        if center is not None and width is not None and width >= 1:
            return window(values, center, width)
    low, high = float(values.min()), float(values.max())
    return np.zeros_like(values) if high <= low else (values - low) / (high - low)


def preprocess(ds: pydicom.Dataset, terms: dict[str, object]) -> np.ndarray:
    """One dataset to the model's (C, size, size) float32 input, as the metadata says."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    index = frames // 2 if terms["frame"] == "middle" else 0
    raw = ds.pixel_array
    if frames > 1:
        raw = raw[index]
    channels = int(terms["channels"])  # type: ignore[call-overload]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if raw.ndim == 3 and raw.shape[-1] == 3 and photometric != "PALETTE COLOR":
        rgb = raw.astype(np.float32) / float(2 ** int(ds.get("BitsStored", ds.BitsAllocated)) - 1)
        image = (rgb @ LUMA)[None] if channels == 1 else np.moveaxis(rgb, -1, 0)
    elif raw.ndim == 2:
        grey = grey_to_unit(raw, ds, terms)
        if photometric == "MONOCHROME1":
            grey = 1.0 - grey
        image = np.repeat(grey[None], channels, axis=0)
    else:
        raise SystemExit(f"{photometric} images of shape {raw.shape} are not implemented")
    image = np.clip(np.nan_to_num(image, nan=0.0), 0.0, 1.0).astype(np.float32)
    square = to_square(image, int(terms["size"]))  # type: ignore[call-overload]
    mean, std = float(terms["mean"]), float(terms["std"])  # type: ignore[arg-type]
    return ((square - mean) / std).astype(np.float32)


def main(argv: list[str]) -> int:
    """Load the model, read its metadata, classify each file."""
    session = ort.InferenceSession(argv[0], providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    terms = json.loads(meta["tessera.preprocess"])
    labels = json.loads(meta["tessera.labels"])
    if terms.get("pipeline_version") != PIPELINE_VERSION:
        raise SystemExit(f"pipeline version {terms.get('pipeline_version')!r} is not 1")
    missing = [k for k in ("size", "channels", "window", "frame", "mean", "std") if k not in terms]
    if missing:
        raise SystemExit(f"the model's metadata does not say its preprocessing {missing}")
    for path in argv[1:]:
        image = preprocess(pydicom.dcmread(path), terms)
        (probabilities,) = session.run(["probabilities"], {"image": image[None]})
        values = dict(zip(labels, (float(p) for p in probabilities[0]), strict=True))
        print(json.dumps({"file": path.rsplit("/", 1)[-1], "probabilities": values}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
