"""The one preprocessing path, shared by training and point-of-care inference.

Pipeline for one DICOM instance (each step is why the model sees comparable pixels from
different scanners):

1. Frame policy: a multi-frame object contributes one image, its middle frame
   (`frame="middle"`, the slab centre for volumes) or its first (`frame="first"`); only that
   frame is decoded, so a large cine never sits in memory whole.
2. Modality LUT: rescale slope/intercept (or a Modality LUT Sequence) to real units (HU).
3. VOI: `window="file"` uses the file's VOI LUT, else its first Window Center/Width, else the
   image's min..max; a named preset (`WINDOW_PRESETS`) or "C/W" applies a fixed window per
   study; `"minmax"` always stretches min..max. Output lies in [0, 1].
4. MONOCHROME1 is inverted so that bright always means dense.
5. Colour: RGB (pydicom converts YBR to RGB), or palette colour through its LUT; converted
   to luminance (ITU-R BT.601) for one channel, or kept for three. Grey is repeated for three.
6. Resize (node.intake.resize): the longer side to `size`, aspect kept, centred, zero padded.
7. Normalise: (x - mean) / std.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID

from node.errors import UnusableImageError
from node.intake.codestream import check_codestream
from node.intake.resize import resize_to_square
from node.intake.screen import (
    IntakeLimits,
    alternative_plugins,
    frame_count,
    quiet_pydicom,
    read_dataset,
    screen_dataset,
)
from tessera.pipeline import PIPELINE_VERSION, WINDOW_PRESETS

__all__ = ["WINDOW_PRESETS", "PreprocessConfig", "decode_dicom_bytes", "preprocess"]

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class PreprocessConfig:
    """What the model expects; part of every cache key through `digest()`. The defaults are
    `tessera.pipeline.PREPROCESS_DEFAULTS` (a test keeps them equal)."""

    size: int = 64
    channels: int = 1
    window: str = "file"
    frame: str = "middle"
    mean: float = 0.5
    std: float = 0.25

    def __post_init__(self) -> None:
        if not 8 <= self.size <= 2048:
            raise ValueError(f"size must be 8..2048 pixels, got {self.size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.frame not in ("middle", "first"):
            raise ValueError(f"frame must be 'middle' or 'first', got {self.frame!r}")
        if not self.std > 0:
            raise ValueError(f"std must be positive, got {self.std}")
        self.window_bounds()  # validates the window spelling

    def window_bounds(self) -> tuple[float, float] | None:
        """(center, width) of a fixed window, or None for 'file' / 'minmax'."""
        if self.window in ("file", "minmax"):
            return None
        if self.window in WINDOW_PRESETS:
            return WINDOW_PRESETS[self.window]
        try:
            center, width = (float(part) for part in self.window.split("/"))
        except ValueError:
            raise ValueError(
                f"window {self.window!r} is not 'file', 'minmax', a preset "
                f"({', '.join(WINDOW_PRESETS)}) or 'CENTER/WIDTH' such as '40/400'"
            ) from None
        if width < 1:
            raise ValueError(f"window width must be >= 1, got {width}")
        return center, width

    def digest(self) -> str:
        """Hex SHA-256 of the canonical config and pipeline version; names the cache."""
        blob = json.dumps({"v": PIPELINE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def preprocess(ds: Dataset, cfg: PreprocessConfig) -> np.ndarray:
    """Decode and preprocess one dataset to float32 (channels, size, size).

    Call `screen_dataset` first for untrusted input (`decode_dicom_bytes` does); decoding
    errors raise `UnusableImageError("corrupt-pixel-data" | "truncated" | ...)`.
    """
    frames = frame_count(ds)
    index = frames // 2 if cfg.frame == "middle" else 0
    check_codestream(ds, index, frames)
    try:
        with quiet_pydicom():
            raw = pixel_array(ds, index=index if frames > 1 else None)
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - decoder failures become quarantine reasons
        # The decoder's own message may quote header values, so only its type is kept.
        text = str(error).lower()
        short = "insufficient" in text or "end of" in text
        reason = "truncated" if short else "corrupt-pixel-data"
        syntax = UID(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))
        others = alternative_plugins(syntax)
        hint = f"; not installed, and may decode it: {others}" if others else ""
        raise UnusableImageError(
            reason, f"'{syntax.name}' decoder failed ({type(error).__name__}){hint}"
        ) from None
    if raw.ndim == 3 and frames > 1 and raw.shape[0] == frames:
        raw = raw[index]  # a decoder that ignored `index`
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(raw, ds).astype(np.float32)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        image = _colour_to_channels(rgb / float(2**bits - 1), cfg.channels)
    elif raw.ndim == 3 and raw.shape[-1] == 3:
        bits = int(ds.get("BitsStored", ds.BitsAllocated))
        image = _colour_to_channels(raw.astype(np.float32) / float(2**bits - 1), cfg.channels)
    elif raw.ndim == 2:
        grey = _grey_to_unit(raw, ds, cfg)
        if photometric == "MONOCHROME1":
            grey = 1.0 - grey
        image = np.repeat(grey[None], cfg.channels, axis=0)
    else:
        raise UnusableImageError("unsupported-image", f"decoded array of shape {raw.shape}")
    image = np.clip(np.nan_to_num(image, nan=0.0), 0.0, 1.0).astype(np.float32)
    square = resize_to_square(image, cfg.size, fill=0.0)
    return ((square - cfg.mean) / cfg.std).astype(np.float32)


def _grey_to_unit(raw: np.ndarray, ds: Dataset, cfg: PreprocessConfig) -> np.ndarray:
    if "ModalityLUTSequence" in ds or "RescaleSlope" not in ds:
        with quiet_pydicom():
            values = apply_modality_lut(raw, ds).astype(np.float64)
    else:  # the common case, plain rescale: same arithmetic as pydicom's, minus its overhead
        slope = float(ds.RescaleSlope)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        values = raw.astype(np.float64) * slope + intercept
    fixed = cfg.window_bounds()
    if fixed is not None:
        return _window(values, *fixed)
    if cfg.window == "file":
        if "VOILUTSequence" in ds:
            try:
                lut_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
                with quiet_pydicom():
                    out = apply_voi_lut(values, ds, index=0, prefer_lut=True)
                return np.asarray(out, dtype=np.float64) / float(2**lut_bits - 1)
            except (AttributeError, IndexError, KeyError, TypeError, ValueError):
                pass  # a malformed VOI LUT falls back to the window or min..max
        center, width = _first_number(ds, "WindowCenter"), _first_number(ds, "WindowWidth")
        if center is not None and width is not None and width >= 1:
            return _window(values, center, width)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values)
    return (values - low) / (high - low)


def _window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 linear windowing, scaled to [0, 1]."""
    if width <= 1:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _first_number(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    if value is None:
        return None
    try:
        # Multi-valued Window Center/Width: the first pair is the default view (PS3.3 C.11.2).
        if not isinstance(value, str | bytes | int | float):
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _colour_to_channels(rgb: np.ndarray, channels: int) -> np.ndarray:
    if channels == 1:
        return (rgb @ _LUMA)[None]
    return np.moveaxis(rgb, -1, 0)


def decode_dicom_bytes(
    data: bytes, cfg: PreprocessConfig, limits: IntakeLimits | None = None
) -> np.ndarray:
    """Screen, decode and preprocess one DICOM file's bytes (the inference entry point).

    Raises `UnusableImageError` with a quarantine reason for anything unusable; never
    returns a partial image.
    """
    limits = limits or IntakeLimits()
    if len(data) > limits.max_file_bytes:
        raise UnusableImageError(
            "decompressed-size", f"{len(data)} bytes; the file limit is {limits.max_file_bytes}"
        )
    with quiet_pydicom():
        ds = read_dataset(data, limits)
        screen_dataset(ds, limits)
        return preprocess(ds, cfg)
