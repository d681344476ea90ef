"""Model definitions shared by nodes and aggregators: registry, transfer learning, export."""

from tessera.models.nets import TesseraNet
from tessera.models.registry import ARCHITECTURES, ModelSpec, build_model

__all__ = ["ARCHITECTURES", "ModelSpec", "TesseraNet", "build_model"]
