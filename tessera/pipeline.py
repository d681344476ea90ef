"""The preprocessing pipeline's identity, shared by nodes (which run it) and aggregators
(which write it into every ONNX export they release).

`PIPELINE_VERSION` changes whenever `node.intake.preprocess` would turn the same DICOM file into
different pixels; a model trained under one version is refused by a node running another.
`PREPROCESS_TERMS` are the study terms that parameterise the pipeline (the fields of
`node.intake.preprocess.PreprocessConfig`, whose defaults are `PREPROCESS_DEFAULTS`; a test
keeps the two in step); other study preprocessing terms are documentation for stewards and
do not reach the model.

Every export, released or trained locally, carries `resolved_preprocess` of its terms: all
six terms, a named window preset spelled as its numbers, and the pipeline version, so that a
client without Tessera can preprocess an image from the file alone (node/TRAINING.md,
"Using a model without Tessera").
"""

from __future__ import annotations

from collections.abc import Mapping

PIPELINE_VERSION = 1
PIPELINE_KEY = "pipeline_version"
PREPROCESS_TERMS = ("size", "channels", "window", "frame", "mean", "std")
PREPROCESS_DEFAULTS: Mapping[str, object] = {
    "size": 64,
    "channels": 1,
    "window": "file",  # the file's VOI LUT, else its first window, else min..max
    "frame": "middle",
    "mean": 0.5,
    "std": 0.25,
}
# Named fixed windows, (center, width) in Hounsfield units.
WINDOW_PRESETS: Mapping[str, tuple[float, float]] = {
    "ct-soft-tissue": (40.0, 400.0),
    "ct-abdomen": (60.0, 400.0),
    "ct-lung": (-600.0, 1500.0),
    "ct-bone": (400.0, 1800.0),
    "ct-brain": (40.0, 80.0),
}


def resolved_preprocess(terms: Mapping[str, object]) -> dict[str, object]:
    """Every preprocessing term, as an export's `tessera.preprocess` metadata holds it: the
    given terms over `PREPROCESS_DEFAULTS`, a window preset as "CENTER/WIDTH", mean and std
    as floats, and the pipeline version. ValueError naming an unknown term or another
    pipeline version."""
    unknown = sorted(set(terms) - set(PREPROCESS_TERMS) - {PIPELINE_KEY})
    if terms.get(PIPELINE_KEY, PIPELINE_VERSION) != PIPELINE_VERSION:
        raise ValueError(
            f"preprocessing of pipeline version {terms[PIPELINE_KEY]!r} cannot be resolved by "
            f"version {PIPELINE_VERSION}"
        )
    if unknown:
        raise ValueError(
            f"unknown preprocessing terms {unknown}; the pipeline takes {list(PREPROCESS_TERMS)}"
        )
    resolved = {name: terms.get(name, PREPROCESS_DEFAULTS[name]) for name in PREPROCESS_TERMS}
    window = resolved["window"]
    if isinstance(window, str) and window in WINDOW_PRESETS:
        center, width = WINDOW_PRESETS[window]
        resolved["window"] = f"{center:g}/{width:g}"
    for name in ("mean", "std"):
        value = resolved[name]
        if isinstance(value, int) and not isinstance(value, bool):
            resolved[name] = float(value)
    resolved[PIPELINE_KEY] = PIPELINE_VERSION
    return resolved
