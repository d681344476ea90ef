"""What `tessera demo` runs: one frozen set of options, from the command line to the report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoOptions:
    """What `tessera demo` runs."""

    out: Path = Path("tessera-demo")
    rounds: int = 8
    sites: int = 3
    images_per_site: int = 160
    image_size: int = 32
    skew: float = 0.8
    seed: int = 0
    broker: str = "embedded"  # or "mosquitto"
    modality: str = "cr"  # one scanner type: the skew is in the labels, not the pixels
    lesion_contrast: float = 40.0
    lesion_scale: float = 2.5
    architecture: str = "spot-cnn-v1"
    local_epochs: int = 2
    learning_rate: float = 0.1
    batch_size: int = 32
    noise_multiplier: float = 0.5
    clip_norm: float = 1.0  # L2 bound on each node's round delta (the secure sum's range)
    epsilon: float = 60.0
    algorithm: str = "fedavg"  # the first round's; the adaptive policy may switch later
    adaptive: bool = True
    adaptive_lower: float = 1.0
    adaptive_upper: float = 4.0
    timeout_s: float = 40.0  # per round
