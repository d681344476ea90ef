"""Transfer learning: backbone files, modes, what enters the update, and that transfer helps."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from node.training.trainer import TrainConfig, evaluate, run_local_round
from node.training.update import build_update
from tessera.errors import ConfigError
from tessera.models import ModelSpec, build_model
from tessera.models.transfer import (
    apply_transfer_mode,
    backbone_state,
    init_from_backbone,
    load_backbone_file,
    trainable_parameters,
)

torch.set_num_threads(1)
SIDE = 16


def _lines(rng: np.random.Generator, kinds: list[int]) -> np.ndarray:
    """Bars: 0 horizontal, 1 vertical, 2 diagonal, 3 anti-diagonal, at a random offset."""
    img = np.zeros((SIDE, SIDE), np.float32)
    for kind in kinds:
        p = int(rng.integers(3, SIDE - 3))
        if kind == 0:
            img[p, :] = 1
        elif kind == 1:
            img[:, p] = 1
        else:
            diagonal = np.eye(SIDE, k=p - SIDE // 2, dtype=np.float32)
            img += diagonal if kind == 2 else np.fliplr(diagonal)
    return img


def task_orientation(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pretraining task: which of four bar orientations (4 classes)."""
    y = rng.integers(0, 4, n)
    x = np.stack([_lines(rng, [int(k)]) for k in y])
    return (x + rng.normal(0, 0.6, x.shape)).astype(np.float32)[:, None], y


def task_shape(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Downstream task: a '+' (horizontal and vertical bar) or an 'x' (both diagonals)."""
    y = rng.integers(0, 2, n)
    x = np.stack([_lines(rng, [0, 1] if k == 0 else [2, 3]) for k in y])
    return (x + rng.normal(0, 0.6, x.shape)).astype(np.float32)[:, None], y


@pytest.fixture(scope="module")
def pretrained_backbone() -> dict[str, torch.Tensor]:
    x, y = task_orientation(600, np.random.default_rng(0))
    model = build_model(ModelSpec("small-cnn", 1, 4), seed=100)
    cfg = TrainConfig(local_epochs=6, batch_size=32, learning_rate=0.1, momentum=0.9)
    result = run_local_round(model, x, y, cfg)
    assert result.validation.accuracy > 0.7, "pretraining itself must have learned the task"
    return backbone_state(model)


def test_transfer_beats_scratch_with_few_samples(
    pretrained_backbone: dict[str, torch.Tensor],
) -> None:
    test_x, test_y = task_shape(400, np.random.default_rng(99))
    accuracy: dict[str, list[float]] = {"scratch": [], "head": [], "full": []}
    for seed in range(3):
        x, y = task_shape(20, np.random.default_rng(seed))  # the same 20 images for each
        for mode in accuracy:
            model = build_model(ModelSpec("small-cnn", 1, 2), seed=seed)
            if mode != "scratch":
                init_from_backbone(model, pretrained_backbone)
                apply_transfer_mode(model, mode)
            cfg = TrainConfig(local_steps=40, batch_size=16, learning_rate=0.05, momentum=0.9,
                              seed=seed, validation_fraction=0.1)  # fmt: skip
            run_local_round(model, x, y, cfg)
            accuracy[mode].append(evaluate(model, test_x, test_y).accuracy)
    mean = {mode: float(np.mean(values)) for mode, values in accuracy.items()}
    assert mean["full"] > mean["scratch"] + 0.15, mean
    assert mean["head"] > mean["scratch"] + 0.08, mean


def test_head_mode_trains_only_the_head_and_its_update_is_tiny(
    pretrained_backbone: dict[str, torch.Tensor],
) -> None:
    model = build_model(ModelSpec("small-cnn", 1, 2), seed=1)
    init_from_backbone(model, pretrained_backbone)
    apply_transfer_mode(model, "head")
    state = model.state_dict()
    frozen_before = {k: v.clone() for k, v in state.items() if not k.startswith("head")}
    base = trainable_parameters(model)
    assert sorted(base) == ["head.bias", "head.weight"]
    x, y = task_shape(30, np.random.default_rng(5))
    result = run_local_round(model, x, y, TrainConfig(local_steps=5, batch_size=8))
    for name, value in model.state_dict().items():
        if name in frozen_before:
            assert torch.equal(value, frozen_before[name]), f"{name} moved while frozen"
    update = build_update(base, trainable_parameters(model), result.train_samples,
                          result.validation.loss, clip_norm=1.0, weight_cap=100)  # fmt: skip
    total = sum(p.numel() for p in model.parameters())
    assert update.values.size == 64 * 2 + 2 + 3  # head weight, head bias, three statistics
    assert update.values.size < total / 100
    assert np.any(update.values[:-3] != 0)


def test_last_k_unfreezes_exactly_the_last_blocks() -> None:
    model = build_model(ModelSpec("resnet18", 1, 2))
    apply_transfer_mode(model, "last-k", last_k=2)
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n in trainable_parameters(model)}
    assert trainable == {"blocks.2", "blocks.3", "head.weight", "head.bias"}
    apply_transfer_mode(model, "full")
    assert len(trainable_parameters(model)) == len(list(model.parameters()))
    with pytest.raises(ConfigError, match="last-k"):
        apply_transfer_mode(model, "last-k", last_k=5)
    with pytest.raises(ConfigError):
        apply_transfer_mode(model, "partial")


def test_backbone_files_safetensors_and_state_dict(
    pretrained_backbone: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    st, pt = tmp_path / "b.safetensors", tmp_path / "b.pt"
    save_file(pretrained_backbone, str(st))
    # A wrapped checkpoint with a DataParallel prefix, as operators often have.
    torch.save({"state_dict": {f"module.{k}": v for k, v in pretrained_backbone.items()}}, pt)
    for path in (st, pt):
        model = build_model(ModelSpec("small-cnn", 1, 3), seed=9)
        copied = init_from_backbone(model, load_backbone_file(path))
        assert copied == len(pretrained_backbone)
        for name, tensor in pretrained_backbone.items():
            assert torch.equal(model.state_dict()[name], tensor)


class _Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def test_backbone_loading_refuses_code_and_wrong_architectures(
    pretrained_backbone: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"stem.0.weight": _Exploit()}, protocol=2))
    with pytest.raises(ConfigError, match="weights-only"):
        load_backbone_file(evil)
    with pytest.raises(ConfigError, match="lacks"):
        init_from_backbone(build_model(ModelSpec("mobilenet-v2", 1, 2)), pretrained_backbone)
    with pytest.raises(ConfigError, match="shape"):
        init_from_backbone(build_model(ModelSpec("small-cnn", 3, 2)), pretrained_backbone)
    with pytest.raises(ConfigError, match="does not exist"):
        load_backbone_file(tmp_path / "missing.safetensors")
