"""The preprocessing pipeline's identity, shared by nodes (which run it) and aggregators
(which write it into every ONNX export they release).

`PIPELINE_VERSION` changes whenever `node.intake.preprocess` would turn the same DICOM file into
different pixels; a model trained under one version is refused by a node running another.
`PREPROCESS_TERMS` are the study terms that parameterise the pipeline (the fields of
`node.intake.preprocess.PreprocessConfig`; a test keeps the two in step); other study
preprocessing terms are documentation for stewards and do not reach the model.
"""

from __future__ import annotations

PIPELINE_VERSION = 1
PIPELINE_KEY = "pipeline_version"
PREPROCESS_TERMS = ("size", "channels", "window", "frame", "mean", "std")
