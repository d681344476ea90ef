"""ONNX export: full check, metadata, parity on real DICOM, dynamic batch, determinism."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tessera.models import ModelSpec, build_model
from tessera.models.onnx_export import (
    INPUT_NAME,
    ExportMetadata,
    initializers,
    read_metadata,
    verify_export,
)
from tessera.models.weights import model_hash, state_arrays
from tests.support.models import LABELS, PREPROCESS, SIZE, export_model, preprocessed_pydicom

torch.set_num_threads(1)
SPEC = ModelSpec("small-cnn", 1, 2, "group")

# Run in a fresh interpreter (own hash seed, own allocator state): prints the export's SHA-256.
_EXPORT_SCRIPT = """
import hashlib, torch
torch.set_num_threads(1)
from tests.tessera.test_onnx_export import SPEC, exported_model
from tests.support.models import export_model
print(hashlib.sha256(export_model(exported_model(), "9", SPEC)).hexdigest())
"""


def exported_model() -> torch.nn.Module:
    """The model under test: seeded, with non-trivial GroupNorm affine terms."""
    model = build_model(SPEC, seed=3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "weight" in name and param.dim() == 1:
                param.mul_(1.5)
    return model


@pytest.fixture(scope="module")
def exported() -> tuple[torch.nn.Module, bytes]:
    model = exported_model()
    return model, export_model(model, "9", SPEC)  # type: ignore[arg-type]


def test_export_passes_full_check_and_carries_metadata(exported: tuple[object, bytes]) -> None:
    model, data = exported
    proto = onnx.load_from_string(data)
    onnx.checker.check_model(proto, full_check=True)
    assert len(proto.graph.initializer) > 0  # weights inside the file, not external data
    assert not any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer
    )
    meta = read_metadata(data)
    assert meta.model_version == "9" and meta.labels == LABELS
    assert meta.model_id == SPEC.model_id
    assert meta.model_hash == model_hash(state_arrays(model)).hex()  # type: ignore[arg-type]
    assert meta.preprocess["size"] == SIZE and meta.preprocess["window"] == PREPROCESS.window
    broken = onnx.load_from_string(data)
    del broken.metadata_props[:]
    with pytest.raises(ValueError, match="lacks metadata"):
        read_metadata(broken.SerializeToString())


def test_parity_with_torch_on_real_preprocessed_dicom(exported: tuple[object, bytes]) -> None:
    model, data = exported
    batch = preprocessed_pydicom()  # pydicom's CT_small and MR_small through the intake
    assert batch.shape == (2, 1, SIZE, SIZE) and batch.std() > 0.1
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    logits_onnx, probs_onnx = session.run(None, {INPUT_NAME: batch})
    with torch.inference_mode():
        logits_torch = model.eval()(torch.from_numpy(batch)).numpy()  # type: ignore[operator]
    assert np.max(np.abs(logits_onnx - logits_torch)) <= 1e-4
    np.testing.assert_allclose(probs_onnx.sum(axis=1), 1.0, atol=1e-6)
    assert verify_export(data, model, read_metadata(data), SIZE, probe=list(batch)) <= 1e-4  # type: ignore[arg-type]
    # The dynamic batch axis: 1 and 5 images through the same file.
    for n in (1, 5):
        out = session.run(["probabilities"], {INPUT_NAME: np.repeat(batch[:1], n, axis=0)})[0]
        assert out.shape == (n, 2)


def test_verify_export_refuses_other_weights(exported: tuple[object, bytes]) -> None:
    _, data = exported
    other = build_model(SPEC, seed=4)
    meta = read_metadata(data)
    with pytest.raises(ValueError, match="differ"):
        verify_export(data, other, meta, SIZE)
    wrong = ExportMetadata(meta.model_id, "10", meta.model_hash, meta.labels, meta.preprocess)
    with pytest.raises(ValueError, match="metadata"):
        verify_export(data, other, wrong, SIZE)
    names = initializers(data)
    assert any(name.endswith("head.weight") for name in names)


def test_export_is_byte_identical_across_processes(exported: tuple[object, bytes]) -> None:
    # The aggregators rely on this (or fall back to leader-export-and-verify): a fresh
    # process (its own hash seed and allocator state) must produce this process's bytes.
    run = subprocess.run([sys.executable, "-c", _EXPORT_SCRIPT], capture_output=True, text=True,
                         timeout=240, check=True)  # fmt: skip
    _, data = exported
    assert len(run.stdout.strip()) == 64
    assert run.stdout.strip() == hashlib.sha256(data).hexdigest()
