"""Image content for the synthetic task: CT slices in HU and projection radiographs.

The task is lesion present / absent. A CT lesion is a small hypodense blob in the liver; a
radiograph lesion is a faint nodule in a lung field. Both classes carry the same distractors
(vessels, ribs, anatomy jitter), so the signal is visible but not trivial. `LESION_CONTRAST`
sets the difficulty: it was tuned (bench/synth_accuracy.py) so that a small CNN trained on
all sites together lands at roughly 85-95 % test accuracy, not 100 % (measured: 0.85-0.93
over the last epochs, see bench/RESULTS.md).

All randomness comes from the caller's numpy Generator: this is synthetic data that must be
reproducible from a seed, not anything secret.
"""

from __future__ import annotations

import numpy as np

# Peak lesion contrast in units of the site's noise sigma (tuned, see module docstring).
# Each lesion draws its own fraction of it from LESION_FAINTEST..1, so some are too faint
# to see: that, not label noise, keeps a good model below 100 %.
LESION_CONTRAST = 12.0
LESION_FAINTEST = 0.1


def _grid(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    return y / rows, x / cols


def _ellipse(
    y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float, rx: float
) -> np.ndarray:
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def _blob(y: np.ndarray, x: np.ndarray, cy: float, cx: float, radius: float) -> np.ndarray:
    """A soft-edged disc (Gaussian profile), peak 1."""
    return np.exp(-(((y - cy) ** 2 + (x - cx) ** 2) / (2.0 * radius**2)))


def ct_slice_hu(
    rng: np.random.Generator,
    rows: int,
    cols: int,
    noise_hu: float,
    lesion: bool,
    contrast: float = LESION_CONTRAST,
    radius_scale: float = 1.0,
) -> np.ndarray:
    """An abdominal CT slice in Hounsfield units, with an optional liver lesion."""
    y, x = _grid(rows, cols)
    image = np.full((rows, cols), -1000.0)
    cy, cx = 0.5 + rng.normal(0, 0.02), 0.5 + rng.normal(0, 0.02)
    ry, rx = 0.36 + rng.normal(0, 0.02), 0.44 + rng.normal(0, 0.02)
    image[_ellipse(y, x, cy, cx, ry, rx)] = -100.0  # subcutaneous fat
    image[_ellipse(y, x, cy, cx, ry - 0.04, rx - 0.04)] = 40.0  # soft tissue
    liver = _ellipse(y, x, cy - 0.06, cx - 0.14, 0.2, 0.2 + rng.normal(0, 0.02))
    image[liver] = 60.0
    image[_ellipse(y, x, cy + 0.22, cx, 0.07, 0.07)] = 700.0  # vertebra
    image[_ellipse(y, x, cy - 0.02, cx + 0.22, 0.1, 0.06)] = 30.0  # spleen
    for _ in range(rng.integers(2, 5)):  # contrast-filled vessels in both classes
        vy, vx = cy + rng.uniform(-0.2, 0.15), cx + rng.uniform(-0.25, 0.05)
        image += 120.0 * _blob(y * rows, x * cols, vy * rows, vx * cols, rng.uniform(0.6, 1.2))
    if lesion:
        ly, lx = cy - 0.06 + rng.uniform(-0.11, 0.11), cx - 0.14 + rng.uniform(-0.11, 0.11)
        radius = rng.uniform(2.5, 4.0) * radius_scale * rows / 64
        strength = contrast * rng.uniform(LESION_FAINTEST, 1.0) * noise_hu
        image -= strength * _blob(y * rows, x * cols, ly * rows, lx * cols, radius)
    return image + rng.normal(0.0, noise_hu, size=image.shape)


def radiograph(
    rng: np.random.Generator,
    rows: int,
    cols: int,
    noise: float,
    lesion: bool,
    contrast: float = LESION_CONTRAST,
    radius_scale: float = 1.0,
) -> np.ndarray:
    """A chest radiograph as attenuation in 0..4095 (bright = dense), optional nodule."""
    y, x = _grid(rows, cols)
    image = np.full((rows, cols), 2600.0) + 300.0 * (y - 0.5)
    lungs = []
    for side in (-1, 1):
        cy, cx = 0.45 + rng.normal(0, 0.02), 0.5 + side * (0.2 + rng.normal(0, 0.015))
        mask = _ellipse(y, x, cy, cx, 0.3, 0.14)
        image[mask] -= 1300.0
        lungs.append((cy, cx))
    image[_ellipse(y, x, 0.55, 0.5, 0.28, 0.07)] += 300.0  # mediastinum
    phase = rng.uniform(0, 2 * np.pi)
    image += 120.0 * np.sin(2 * np.pi * 7.0 * y + phase) * (np.abs(x - 0.5) > 0.08)  # ribs
    if lesion:
        cy, cx = lungs[rng.integers(0, 2)]
        ly, lx = cy + rng.uniform(-0.18, 0.18), cx + rng.uniform(-0.07, 0.07)
        radius = rng.uniform(2.5, 4.0) * radius_scale * cols / 64
        strength = contrast * rng.uniform(LESION_FAINTEST, 1.0) * noise
        image += strength * _blob(y * rows, x * cols, ly * rows, lx * cols, radius)
    image += rng.normal(0.0, noise, size=image.shape)
    return np.clip(image, 0.0, 4095.0)
