"""Aspect-preserving resize in plain numpy.

Method: separable resampling with a triangle (linear) kernel whose support widens with the
downscale factor, as Pillow's antialiased BILINEAR does. Upscaling is plain bilinear;
downscaling averages every source pixel under the output pixel, so no aliasing and no
dropped lesions. Each axis is one dense weight matrix, so a resize is two matrix products.
The image is scaled so its longer side equals the target, then centred on a square canvas
padded with `fill`.
"""

from __future__ import annotations

import numpy as np


def resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Row-stochastic (n_out, n_in) weights mapping a length-n_in signal to n_out samples."""
    scale = n_out / n_in
    support = max(1.0, 1.0 / scale)
    centres = (np.arange(n_out, dtype=np.float64) + 0.5) / scale - 0.5
    taps = np.arange(n_in, dtype=np.float64)
    weights = np.maximum(0.0, 1.0 - np.abs(taps[None, :] - centres[:, None]) / support)
    sums = weights.sum(axis=1, keepdims=True)
    # An output sample past the edge (possible when upscaling) takes its nearest source.
    empty = sums[:, 0] == 0
    if empty.any():
        nearest = np.clip(np.rint(centres[empty]), 0, n_in - 1).astype(int)
        weights[empty] = 0.0
        weights[empty, nearest] = 1.0
        sums = weights.sum(axis=1, keepdims=True)
    normalised: np.ndarray = (weights / sums).astype(np.float32)
    return normalised


def fitted_shape(rows: int, cols: int, size: int) -> tuple[int, int]:
    """The (rows, cols) an image takes when its longer side is scaled to `size`."""
    scale = size / max(rows, cols)
    return max(1, round(rows * scale)), max(1, round(cols * scale))


def resize_to_square(image: np.ndarray, size: int, fill: float = 0.0) -> np.ndarray:
    """Resize (C, H, W) float32 to (C, size, size), keeping the aspect ratio, padding evenly."""
    if image.ndim != 3:
        raise ValueError(f"expected a (C, H, W) array, got shape {image.shape}")
    channels, rows, cols = image.shape
    out_rows, out_cols = fitted_shape(rows, cols, size)
    weights_y = resample_matrix(rows, out_rows)
    weights_x = resample_matrix(cols, out_cols)
    resized = np.stack([weights_y @ image[c] @ weights_x.T for c in range(channels)])
    canvas = np.full((channels, size, size), fill, dtype=np.float32)
    top = (size - out_rows) // 2
    left = (size - out_cols) // 2
    canvas[:, top : top + out_rows, left : left + out_cols] = resized
    return canvas
