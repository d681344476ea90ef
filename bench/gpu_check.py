"""GPU smoke check: a few training steps on CUDA, plain and DP-SGD, and an ONNX parity check.

Run on a machine with a GPU: .venv/bin/python bench/gpu_check.py
Exits non-zero (AssertionError) if CUDA is unavailable or training did not run on it.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.privacy.ledger import PrivacyLedger
from node.training.trainer import DPSettings, TrainConfig, run_local_round
from tessera.models import ModelSpec, build_model
from tessera.models.onnx_export import ExportMetadata, export_onnx, verify_export
from tessera.pipeline import resolved_preprocess


def main() -> None:
    """Train on CUDA (forced), check the device and that the weights moved, export from GPU."""
    assert torch.cuda.is_available(), "no CUDA device visible to torch"
    print("device:", torch.cuda.get_device_name(0), "torch", torch.__version__)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((256, 1, 64, 64)).astype(np.float32)
    labels = rng.integers(0, 2, 256)
    for arch in ("small-cnn", "mobilenet-v2", "resnet18"):
        spec = ModelSpec(arch, 1, 2, "group")
        model = build_model(spec)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        cfg = TrainConfig(local_steps=5, batch_size=32, device="cuda")
        result = run_local_round(model, images, labels, cfg)
        assert result.device == "cuda", result.device
        assert next(model.parameters()).device.type == "cuda"
        moved = any(not torch.equal(before[k], v.cpu()) for k, v in model.state_dict().items())
        assert moved, "training on CUDA did not change the weights"
        print(f"{arch}: {result.images_per_second:.0f} img/s on cuda, val loss "
              f"{result.validation.loss:.3f}")  # fmt: skip
        meta = ExportMetadata(
            spec.model_id, "gpu", "0" * 64, ("a", "b"), resolved_preprocess({"size": 64})
        )
        data = export_onnx(model, meta, 64)  # exports from a CPU copy; the model stays on GPU
        assert next(model.parameters()).device.type == "cuda"
        print(f"{arch}: ONNX parity {verify_export(data, model, meta, 64):.2e}")
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ledger = PrivacyLedger(Path(folder) / "l.json", "gpu-check", 100.0, 1e-5)
        model = build_model(ModelSpec("small-cnn", 1, 2, "group"))
        cfg = TrainConfig(local_steps=5, batch_size=32, device="cuda", dp=DPSettings(1.0, 1.0))
        result = run_local_round(model, images, labels, cfg, ledger, 1)
        assert result.device == "cuda" and result.dp_charge is not None
        print(f"DP-SGD on cuda: {result.images_per_second:.0f} img/s, "
              f"epsilon {result.dp_charge.epsilon_total:.2f}")  # fmt: skip
    print("gpu_check OK")


if __name__ == "__main__":
    main()
