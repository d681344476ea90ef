"""The model a study trains, as nodes and aggregators both derive it from the manifest.

A study's allowlist names architectures as `<arch>-v<version>` (`small-cnn-v1`); with the
study's label count and its `channels` preprocessing term that fixes a `ModelSpec`. Every
party builds the same first model (the genesis) from the same spec and a seed derived from
the federation and study ids, so the first RoundOpen's base-model hash matches at every
node without any weights being shipped. Group normalisation always: DP-SGD needs per-sample
gradients, which batch normalisation does not have.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from tessera.governance.manifest_model import Study
from tessera.models.nets import TesseraNet
from tessera.models.onnx_export import ExportMetadata, export_onnx
from tessera.models.registry import ModelSpec, build_model
from tessera.models.weights import load_arrays, model_hash, state_arrays
from tessera.pipeline import PREPROCESS_TERMS, resolved_preprocess

_ALLOWLIST_NAME = re.compile(r"^(?P<arch>[a-z0-9-]+?)-v(?P<version>[1-9][0-9]*)$")
DEFAULT_IMAGE_SIZE = 64


def spec_for(architecture: str, channels: int, num_classes: int) -> ModelSpec:
    """The ModelSpec for an allowlist name such as `small-cnn-v1`; ValueError naming the form."""
    match = _ALLOWLIST_NAME.match(architecture)
    if match is None:
        raise ValueError(
            f"architecture {architecture!r} is not of the form '<arch>-v<version>' "
            "(e.g. 'small-cnn-v1'); fix the study's allowlist or the node's setting"
        )
    return ModelSpec(match["arch"], channels, num_classes, "group", int(match["version"]))


def genesis_seed(federation_id: str, study_id: str) -> int:
    """The seed of the study's first model: public, and the same for every party."""
    digest = hashlib.sha256(f"tessera/genesis/{federation_id}/{study_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class StudyModel:
    """The model one study trains: spec, labels, preprocessing terms and the genesis seed."""

    federation_id: str
    study_id: str
    architecture: str
    spec: ModelSpec
    labels: tuple[str, ...]
    preprocess: Mapping[str, object]

    @classmethod
    def from_study(cls, federation_id: str, study: Study, architecture: str) -> StudyModel:
        """The study's model for `architecture`, which must be on the study's allowlist."""
        if architecture not in study.architectures:
            raise ValueError(
                f"architecture {architecture!r} is not in study {study.id}'s allowlist "
                f"({', '.join(study.architectures)})"
            )
        terms = study.preprocessing_dict()
        # Every term, defaults filled in: a release's ONNX must stand alone.
        preprocess = resolved_preprocess({k: terms[k] for k in PREPROCESS_TERMS if k in terms})
        channels = _int_term(preprocess, "channels", 1)
        spec = spec_for(architecture, channels, len(study.labels))
        return cls(federation_id, study.id, architecture, spec, study.labels, preprocess)

    @property
    def image_size(self) -> int:
        """The square input size of the model."""
        return _int_term(self.preprocess, "size", DEFAULT_IMAGE_SIZE)

    def build(self) -> TesseraNet:
        """A fresh model holding the genesis weights."""
        return build_model(self.spec, seed=genesis_seed(self.federation_id, self.study_id))

    def genesis(self) -> dict[str, np.ndarray]:
        """The genesis weights as arrays (what aggregators start from)."""
        return state_arrays(self.build())

    def export(self, params: Mapping[str, np.ndarray], version: int) -> bytes:
        """The self-describing ONNX file of `params` as release `version` (deterministic)."""
        model = self.build()
        load_arrays(model, params)
        metadata = ExportMetadata(self.spec.model_id, str(version), model_hash(params).hex(),
                                  self.labels, dict(self.preprocess))  # fmt: skip
        return export_onnx(model, metadata, self.image_size)


def _int_term(terms: Mapping[str, object], name: str, default: int) -> int:
    value = terms.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"preprocessing term {name} = {value!r} must be an integer")
    return value
