"""Transfer learning: start from a pretrained backbone, choose what trains.

Backbone files are safetensors (preferred: no code runs when it loads) or a torch
`state_dict` saved with `torch.save`, which is read with `weights_only=True` so that a
malicious pickle cannot run code. Only the backbone (`stem.*`, `blocks.*`) is taken from
the file; the head always starts fresh, because the new study's classes differ.

Modes:

- `head`: everything but `head` is frozen; the update carries only the classifier.
- `last-k`: the last k entries of `blocks` and the head train.
- `full`: every parameter trains.

Only parameters with `requires_grad` enter the update vector (`trainable_parameters`).
Frozen normalisation layers are kept in eval mode while training (`set_train_mode`), so a
BatchNorm variant's running statistics in the frozen part do not drift either.

Converting weights an operator already has (see README): load them in their own framework,
rename the keys to this package's names (`stem.0.weight`, `blocks.2.1.conv1.weight`, ...;
print `build_model(spec).state_dict().keys()` to see them), and save with
`safetensors.torch.save_file(tensors, "backbone.safetensors")`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from tessera.errors import ConfigError
from tessera.models.nets import TesseraNet

MODES = ("head", "last-k", "full")
BACKBONE_PREFIXES = ("stem.", "blocks.")
_STRIP_PREFIXES = ("module.", "model.")  # DataParallel and wrapper prefixes


def load_backbone_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a torch state_dict (weights_only) as CPU tensors.

    A checkpoint that nests its weights under "state_dict" or "model" is unwrapped, and a
    "module." / "model." key prefix is stripped. Raises ConfigError for anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"backbone file {path} does not exist")
    if path.suffix == ".safetensors":
        state: object = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - unpickling errors are varied
            raise ConfigError(
                f"backbone {path} is not a weights-only torch state_dict ({type(error).__name__}); "
                "convert it to safetensors (see tessera.models.transfer)"
            ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ConfigError(f"backbone {path} does not hold a mapping of names to tensors")
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        for prefix in _STRIP_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        tensors[name] = tensor
    return tensors


def init_from_backbone(model: TesseraNet, backbone: Mapping[str, torch.Tensor]) -> int:
    """Copy the backbone's stem and block tensors into `model`; returns how many were copied.

    Every backbone tensor of the model must be present with the same shape: a partial or
    mismatched backbone (another architecture, other channels) raises ConfigError naming
    the first offending key, rather than silently training from a half-initialised net.
    """
    own = model.state_dict()
    wanted = [name for name in own if name.startswith(BACKBONE_PREFIXES)]
    missing = [name for name in wanted if name not in backbone]
    if missing:
        raise ConfigError(
            f"backbone lacks {len(missing)} of the model's {len(wanted)} backbone tensors "
            f"(first: {missing[0]!r}); it is for another architecture or needs its keys renamed"
        )
    for name in wanted:
        if tuple(backbone[name].shape) != tuple(own[name].shape):
            raise ConfigError(
                f"backbone tensor {name!r} has shape {tuple(backbone[name].shape)}, the model "
                f"expects {tuple(own[name].shape)}; check channels and architecture"
            )
    with torch.no_grad():
        for name in wanted:
            own[name].copy_(backbone[name].to(own[name].dtype))
    return len(wanted)


def backbone_state(model: TesseraNet) -> dict[str, torch.Tensor]:
    """The backbone tensors (stem and blocks, buffers included) for saving as a backbone file."""
    return {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in model.state_dict().items()
        if name.startswith(BACKBONE_PREFIXES)
    }


def apply_transfer_mode(model: TesseraNet, mode: str, last_k: int = 1) -> None:
    """Set `requires_grad` for `mode` (see the module docstring)."""
    if mode not in MODES:
        raise ConfigError(f"transfer mode must be one of {MODES}, got {mode!r}")
    blocks = len(model.blocks)
    if mode == "last-k" and not 1 <= last_k <= blocks:
        raise ConfigError(f"last-k needs 1 <= k <= {blocks} for this architecture, got {last_k}")
    for param in model.parameters():
        param.requires_grad_(mode == "full")
    model.head.requires_grad_(True)
    if mode == "last-k":
        for block in list(model.blocks)[blocks - last_k :]:
            block.requires_grad_(True)


def set_train_mode(model: nn.Module) -> None:
    """model.train(), except modules with no trainable parameter stay in eval mode."""
    model.train()
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own and not any(p.requires_grad for p in own):
            module.eval()


def trainable_parameters(model: nn.Module) -> dict[str, np.ndarray]:
    """Name -> float32 copy of every parameter that trains: what the update vector carries."""
    return {
        name: param.detach().cpu().numpy().astype(np.float32, copy=True)
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def load_trainable_parameters(model: nn.Module, values: Mapping[str, np.ndarray]) -> None:
    """Write named arrays into the model's parameters (all must exist with equal shapes)."""
    params = dict(model.named_parameters())
    unknown = sorted(set(values) - set(params))
    if unknown:
        raise ConfigError(f"parameters {unknown[:3]} are not in this model; wrong architecture")
    with torch.no_grad():
        for name, value in values.items():
            target = params[name]
            if tuple(value.shape) != tuple(target.shape):
                raise ConfigError(
                    f"parameter {name!r} has shape {value.shape}, model expects "
                    f"{tuple(target.shape)}"
                )
            target.copy_(torch.from_numpy(np.ascontiguousarray(value)).to(target.device))
