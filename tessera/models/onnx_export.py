"""Export a model to one self-describing ONNX file.

The file carries everything point-of-care inference needs, in `metadata_props`:

- `tessera.model_id`: the `ModelSpec` id (architecture, version, channels, classes, norm);
- `tessera.model_version`: the release version of the weights (e.g. "7");
- `tessera.model_hash`: hex SHA-256 of the weights (safetensors) the release names;
- `tessera.labels`: JSON list of the class names, in output order;
- `tessera.preprocess`: JSON object of the whole preprocessing configuration
  (`tessera.pipeline.resolved_preprocess`: every term, defaults filled in, and the pipeline
  version), so an inference service, Tessera's or a plain onnxruntime client, decodes DICOM
  exactly as the training intake did. `export_onnx` refuses metadata that lacks a term.

The graph has one input `image` (batch, C, H, W) with a dynamic batch axis and two outputs,
`logits` and `probabilities` (softmax), so that no client re-implements the softmax.

Determinism (measured with torch 2.13, onnx 1.23, onnxscript 0.7): the default (dynamo)
exporter produced byte-identical files for the same weights in separate processes with
different hash seeds, for all three registered architectures.
`tests/tessera/test_onnx_export.py` compares a fresh process with the test's own, so an
upgrade that breaks this fails the build. Aggregators that cannot reproduce the leader's
bytes fall back to `verify_export`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from tessera.models.nets import TesseraNet
from tessera.models.registry import ModelSpec
from tessera.pipeline import PIPELINE_KEY, PREPROCESS_TERMS

OPSET = 18
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "probabilities")
MAX_SINGLE_FILE_BYTES = 2 * 1024**3 - 1  # protobuf's hard limit for one message
KEYS = ("model_id", "model_version", "model_hash", "labels", "preprocess")


@dataclass(frozen=True)
class ExportMetadata:
    """What the exported file says about itself (see the module docstring)."""

    model_id: str
    model_version: str
    model_hash: str  # hex SHA-256 of the weights bytes
    labels: tuple[str, ...]
    preprocess: Mapping[str, object]

    def __post_init__(self) -> None:
        spec = ModelSpec.from_model_id(self.model_id)
        if len(self.labels) != spec.num_classes:
            raise ValueError(
                f"{len(self.labels)} label names for a {spec.num_classes}-class model; "
                "pass one name per output class, in order"
            )
        if len(self.model_hash) != 64 or not all(c in "0123456789abcdef" for c in self.model_hash):
            raise ValueError("model_hash must be 64 lowercase hex characters (SHA-256)")

    def as_props(self) -> dict[str, str]:
        """The metadata_props entries, canonical JSON where a value is structured."""
        return {
            "tessera.model_id": self.model_id,
            "tessera.model_version": self.model_version,
            "tessera.model_hash": self.model_hash,
            "tessera.labels": json.dumps(list(self.labels)),
            "tessera.preprocess": json.dumps(dict(self.preprocess), sort_keys=True),
        }

    @classmethod
    def from_props(cls, props: Mapping[str, str]) -> ExportMetadata:
        """Read the metadata back; ValueError naming the missing key."""
        missing = [key for key in KEYS if f"tessera.{key}" not in props]
        if missing:
            raise ValueError(
                f"ONNX file lacks metadata {missing}; it was not exported by Tessera "
                "(re-export it with tessera.models.onnx_export.export_onnx)"
            )
        labels = json.loads(props["tessera.labels"])
        preprocess = json.loads(props["tessera.preprocess"])
        if not isinstance(labels, list) or not isinstance(preprocess, dict):
            raise ValueError("ONNX metadata 'labels' must be a JSON list, 'preprocess' an object")
        return cls(
            props["tessera.model_id"],
            props["tessera.model_version"],
            props["tessera.model_hash"],
            tuple(str(label) for label in labels),
            preprocess,
        )


class _WithProbabilities(torch.nn.Module):
    def __init__(self, model: TesseraNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits: torch.Tensor = self.model(image)
        return logits, torch.softmax(logits, dim=1)


def export_onnx(model: TesseraNet, metadata: ExportMetadata, image_size: int) -> bytes:
    """The model as ONNX bytes: dynamic batch, one file, checked with full_check=True.

    The model is exported in eval mode on the CPU (a model on another device is copied, not
    moved) and put back into its previous training mode afterwards. Raises ValueError when the
    file would exceed 2 GB, which a single protobuf cannot hold, or when the metadata's
    preprocessing lacks a term (a file that cannot be used alone).
    """
    missing = sorted({*PREPROCESS_TERMS, PIPELINE_KEY} - set(metadata.preprocess))
    if missing:
        raise ValueError(
            f"export metadata lacks the preprocessing terms {missing}; build it with "
            "tessera.pipeline.resolved_preprocess so the file can be used alone"
        )
    spec = ModelSpec.from_model_id(metadata.model_id)
    was_training = model.training
    model.eval()
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    subject = model if on_cpu else copy.deepcopy(model).cpu()
    example = torch.zeros(1, spec.channels, image_size, image_size)
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)  # "torchvision is not installed": expected here
    try:
        # The exporter prints progress on stdout, which would corrupt JSON-lines output.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _WithProbabilities(subject),
                (example,),
                None,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes={"image": {0: torch.export.Dim("batch", min=1, max=4096)}},
                opset_version=OPSET,
                external_data=False,
                dynamo=True,
            )
    finally:
        registration.setLevel(level)
        model.train(was_training)
    if program is None:  # only a file-path export returns None
        raise RuntimeError("torch.onnx.export returned no program")
    proto = program.model_proto
    del proto.metadata_props[:]
    for key, value in sorted(metadata.as_props().items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    data: bytes = proto.SerializeToString(deterministic=True)
    if len(data) > MAX_SINGLE_FILE_BYTES:
        raise ValueError(
            f"ONNX export is {len(data)} bytes, over the 2 GB single-file limit; this "
            "architecture is too large for a single-file release"
        )
    onnx.checker.check_model(proto, full_check=True)
    return data


def read_metadata(data: bytes) -> ExportMetadata:
    """The Tessera metadata of ONNX bytes (ValueError if absent or malformed)."""
    proto = onnx.load_from_string(data)
    return ExportMetadata.from_props({p.key: p.value for p in proto.metadata_props})


def initializers(data: bytes) -> dict[str, np.ndarray]:
    """The graph's initializers (weights) by name, as numpy arrays."""
    proto = onnx.load_from_string(data)
    return {init.name: onnx.numpy_helper.to_array(init) for init in proto.graph.initializer}


def onnx_hash(data: bytes) -> bytes:
    """SHA-256 of the ONNX bytes (what a release's onnx_hash names)."""
    return hashlib.sha256(data).digest()


def probe_batch(spec: ModelSpec, image_size: int, count: int = 4) -> np.ndarray:
    """A fixed, seeded probe input for comparing two exports or an export and torch."""
    rng = np.random.default_rng(20240229)  # a fixed public probe: no secret, not a mask
    shape = (count, spec.channels, image_size, image_size)
    return rng.standard_normal(shape).astype(np.float32)


def verify_export(
    data: bytes,
    model: TesseraNet,
    metadata: ExportMetadata,
    image_size: int,
    tolerance: float = 1e-4,
    probe: Sequence[np.ndarray] | None = None,
) -> float:
    """Check that ONNX bytes are this model: metadata equal, outputs within `tolerance`.

    For the leader-export-and-verify scheme: an aggregator that could not reproduce the
    leader's bytes runs this against its own weights before signing. Returns the max abs
    difference of the probabilities; raises ValueError on any mismatch.
    """
    import onnxruntime as ort  # only verification needs the runtime

    found = read_metadata(data)
    if found.as_props() != metadata.as_props():
        raise ValueError("ONNX metadata differs from this model's; refuse to sign it")
    spec = ModelSpec.from_model_id(metadata.model_id)
    batch = np.stack(list(probe)) if probe is not None else probe_batch(spec, image_size)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    onnx_probs = session.run([OUTPUT_NAMES[1]], {INPUT_NAME: batch})[0]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            param = next(model.parameters())
            logits = model(torch.from_numpy(batch).to(param.device))
            torch_probs = torch.softmax(logits, dim=1).cpu().numpy()
    finally:
        model.train(was_training)
    diff = float(np.max(np.abs(onnx_probs - torch_probs)))
    if not diff <= tolerance:
        raise ValueError(
            f"ONNX outputs differ from the model's by {diff:.3g} (tolerance {tolerance}); "
            "the export does not match these weights"
        )
    return diff
