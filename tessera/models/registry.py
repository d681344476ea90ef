"""Architectures by stable id and version.

A `ModelSpec` names everything that fixes a model's parameter layout: architecture id and
version, input channels, number of classes and normalisation. Node and aggregators build the
same model from the same spec, so `spec.model_id` may appear in a study and in the model
card. Changing an architecture's layers means adding a new version, never editing one:
published weights must keep loading into the model their spec names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from tessera.models.nets import NORMS, TesseraNet, mobilenet_v2, resnet18, small_cnn, spot_cnn

Builder = Callable[[int, int, str], TesseraNet]


@dataclass(frozen=True)
class Architecture:
    """One registered architecture: its id, version, builder and a line for humans."""

    arch_id: str
    version: int
    build: Builder
    description: str


ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType(
    {
        arch.arch_id: arch
        for arch in (
            Architecture("small-cnn", 1, small_cnn, "3-stage CNN, ~25k params, for tests"),
            Architecture("spot-cnn", 1, spot_cnn, "small-cnn with global max pooling, ~25k"),
            Architecture("resnet18", 1, resnet18, "ResNet-18, basic blocks, ~11M params"),
            Architecture("mobilenet-v2", 1, mobilenet_v2, "MobileNetV2 1.0, ~2.2M params"),
        )
    }
)


@dataclass(frozen=True)
class ModelSpec:
    """What fixes a model's layout: architecture, version, channels, classes, norm."""

    arch_id: str
    channels: int
    num_classes: int
    norm: str = "group"
    version: int = 0  # 0: the architecture's current version

    def __post_init__(self) -> None:
        if self.arch_id not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {self.arch_id!r}; registered: {', '.join(ARCHITECTURES)}"
            )
        current = ARCHITECTURES[self.arch_id].version
        if self.version == 0:
            object.__setattr__(self, "version", current)
        elif self.version != current:
            raise ValueError(
                f"{self.arch_id} version {self.version} is not available (this build has "
                f"version {current}); run a Tessera release that ships it"
            )
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if not 2 <= self.num_classes <= 10_000:
            raise ValueError(f"num_classes must be 2..10000, got {self.num_classes}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")

    @property
    def model_id(self) -> str:
        """Stable text id, e.g. 'small-cnn@1/c1/k2/group'."""
        return f"{self.arch_id}@{self.version}/c{self.channels}/k{self.num_classes}/{self.norm}"

    @classmethod
    def from_model_id(cls, model_id: str) -> ModelSpec:
        """Parse `model_id` back into a spec; ValueError naming the expected form."""
        try:
            arch_version, channels, classes, norm = model_id.split("/")
            arch_id, version = arch_version.split("@")
            if not (channels.startswith("c") and classes.startswith("k")):
                raise ValueError
            return cls(arch_id, int(channels[1:]), int(classes[1:]), norm, int(version))
        except ValueError as error:
            if str(error):
                raise
            raise ValueError(
                f"model id {model_id!r} is not of the form 'arch@version/cC/kK/norm'"
            ) from None


def build_model(spec: ModelSpec, seed: int = 0) -> TesseraNet:
    """A freshly initialised model; the same spec and seed give identical parameters.

    The global torch RNG is forked, so building a model does not disturb the caller's
    random stream.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ARCHITECTURES[spec.arch_id].build(spec.channels, spec.num_classes, spec.norm)
