"""One local training run over the cache: what `tessera node train` does.

Builds the model from the registry, optionally starts from a pretrained backbone with a
transfer mode, trains with `node.training.trainer` (DP charged to the study's ledger when enabled),
then writes `weights.safetensors` and a self-describing `model.onnx` into the output folder
atomically. The summary holds numbers only (no identifiers).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from node.errors import NodeError
from node.inference.runtime import preprocess_metadata
from node.intake.cache import CachedDataset
from node.intake.preprocess import PreprocessConfig
from node.privacy.ledger import PrivacyLedger, ledger_path
from node.training.trainer import DPSettings, TrainConfig, run_local_round
from tessera.files import atomic_write
from tessera.models import ModelSpec, build_model
from tessera.models.onnx_export import ExportMetadata, export_onnx
from tessera.models.transfer import apply_transfer_mode, init_from_backbone, load_backbone_file
from tessera.models.weights import model_hash, state_arrays, weights_bytes


@dataclass(frozen=True)
class LocalRunConfig:
    """Everything a local run needs, validated by the dataclasses it is made of."""

    state_dir: Path
    out_dir: Path
    arch: str
    norm: str
    preprocess: PreprocessConfig
    train: TrainConfig
    backbone: Path | None = None
    transfer: str = "full"
    last_k: int = 1
    epsilon_budget: float = 4.0
    delta: float = 1e-5
    study_id: str = "local"
    round_number: int = 1
    version: str = "local-1"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LocalRunConfig:
        """Build from `tessera node train` arguments."""
        dp = None
        if args.dp_noise is not None:
            dp = DPSettings(args.dp_noise, args.dp_clip, args.accountant)
        return cls(
            state_dir=args.state, out_dir=args.out, arch=args.arch, norm=args.norm,
            preprocess=PreprocessConfig(size=args.size, channels=args.channels,
                                        window=args.window, frame=args.frame),
            train=TrainConfig(local_epochs=args.epochs, batch_size=args.batch_size,
                              learning_rate=args.lr, seed=args.seed, device=args.device, dp=dp),
            backbone=args.backbone, transfer=args.transfer, last_k=args.last_k,
            epsilon_budget=args.dp_epsilon, delta=args.dp_delta, study_id=args.study_id,
            round_number=args.round, version=args.version,
        )  # fmt: skip


def run_local_training(cfg: LocalRunConfig) -> dict[str, Any]:
    """Train, export, write the files; returns the JSON-ready summary."""
    data = CachedDataset(cfg.state_dir, cfg.preprocess, split="train", labelled_only=True)
    if len(data.label_set) < 2:
        raise NodeError(
            f"the cache has {len(data.label_set)} label(s); training needs at least two "
            "(ingest with --label-set and labelled data)"
        )
    images, labels = data.stack()
    spec = ModelSpec(cfg.arch, cfg.preprocess.channels, len(data.label_set), cfg.norm)
    model = build_model(spec, seed=cfg.train.seed)
    if cfg.backbone is not None:
        init_from_backbone(model, load_backbone_file(cfg.backbone))
    apply_transfer_mode(model, cfg.transfer, cfg.last_k)
    ledger = None
    if cfg.train.dp is not None:
        ledger = PrivacyLedger(ledger_path(cfg.state_dir, cfg.study_id), cfg.study_id,
                               cfg.epsilon_budget, cfg.delta, cfg.train.dp.accountant)  # fmt: skip
    result = run_local_round(model, images, labels, cfg.train, ledger, cfg.round_number)
    model.to(torch.device("cpu"))
    arrays = state_arrays(model)
    digest = model_hash(arrays)
    metadata = ExportMetadata(spec.model_id, cfg.version, digest.hex(), data.label_set,
                              preprocess_metadata(cfg.preprocess))  # fmt: skip
    onnx_bytes = export_onnx(model, metadata, cfg.preprocess.size)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(cfg.out_dir / "weights.safetensors", weights_bytes(arrays))
    atomic_write(cfg.out_dir / "model.onnx", onnx_bytes)
    val = result.validation
    return {
        "model_id": spec.model_id, "model_version": cfg.version, "model_hash": digest.hex(),
        "train_samples": result.train_samples, "steps": result.steps, "device": result.device,
        "train_loss": result.train_loss, "validation_loss": val.loss,
        "validation_accuracy": val.accuracy,
        "validation_auc": None if math.isnan(val.auc) else val.auc,
        "images_per_second": result.images_per_second,
        "epsilon_round": result.dp_charge.epsilon_round if result.dp_charge else None,
        "epsilon_total": result.dp_charge.epsilon_total if result.dp_charge else None,
    }  # fmt: skip
