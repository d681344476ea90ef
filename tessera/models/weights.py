"""Weights as bytes: the safetensors encoding a release carries and its hash names.

Same rule as the aggregator's registry: no safetensors metadata (a timestamp or host name
would make two aggregators disagree), every tensor contiguous, so equal arrays give equal
bytes in any process. `model_hash` is SHA-256 of these bytes (a release's `model_hash`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch
from safetensors.numpy import load, save
from torch import nn


def state_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """Every parameter and buffer of the model as a CPU numpy copy (float32 stays float32)."""
    return {name: t.detach().cpu().numpy().copy() for name, t in model.state_dict().items()}


def load_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """The inverse of `state_arrays`: load `arrays` into `model` in place (strict: the names
    and shapes must be the model's own, or torch raises RuntimeError)."""
    model.load_state_dict({name: torch.from_numpy(np.array(a)) for name, a in arrays.items()})


def weights_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Deterministic safetensors bytes of the arrays (no metadata)."""
    if not arrays:
        raise ValueError("a model needs at least one tensor")
    return bytes(save({name: np.ascontiguousarray(a) for name, a in arrays.items()}))


def load_weights(data: bytes) -> dict[str, np.ndarray]:
    """Arrays of safetensors bytes (ValueError if they are not safetensors)."""
    try:
        return dict(load(data))
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type
        raise ValueError(f"weights are not valid safetensors ({error})") from None


def model_hash(arrays: Mapping[str, np.ndarray]) -> bytes:
    """SHA-256 of `weights_bytes(arrays)`."""
    return hashlib.sha256(weights_bytes(arrays)).digest()
