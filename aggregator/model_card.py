"""The model card every global model carries (docs/architecture.md, section 3, step 8).

A card says where a model came from and how it was made: its parent, version and round, how
many sites took part, the strategy (algorithm, server optimiser, every switch of the
adaptive policy with its reason), the epsilon each site has spent, the validation
metrics, and, where the study requires one, each site's privacy-audit figures. It never
lists which sites took part; and where fewer than k sites would be named (in the epsilon or
the audit table), it gives only their count and the largest values.

The card is signed jointly (its hash is in the release header), so every aggregator must
build the same bytes: no clocks, no host names, no aggregator-specific field, and canonical
JSON (tessera.governance.canonical) for the encoding.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aggregator.errors import RegistryError
from aggregator.strategies import OPTIMIZERS
from tessera.governance.canonical import canonical_json
from tessera.wire.messages import ALGORITHMS

CARD_FORMAT = "tessera-model-card/v1"


@dataclass(frozen=True)
class ModelCard:
    """The facts of one model version; `to_bytes` gives the signed encoding."""

    federation_id: str
    study_id: str
    version: int
    round: int
    parent_hash: bytes  # 32 zero bytes for the first model
    participant_count: int
    min_participants: int
    algorithm: str
    optimizer: str
    adaptive: bool
    switches: tuple[Mapping[str, Any], ...] = ()  # SwitchRecord.to_dict() of the lineage
    epsilon_per_site: Mapping[str, float] = field(default_factory=dict)
    validation: Mapping[str, float] = field(default_factory=dict)
    architecture: str = ""
    layout_digest: bytes = b""  # FlatManifest.digest() of the weights
    # Per site, a privacy audit's aggregate figures (aggregator.privacy_gate.card_figures);
    # empty when the study requires no audit, and then absent from the card's bytes.
    privacy_audit: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.participant_count < self.min_participants:
            raise RegistryError(
                f"a model from {self.participant_count} participant(s) cannot be carded or "
                f"released: the minimum is k={self.min_participants} (abort the round instead)"
            )
        if self.version < 0 or self.round < 0:
            raise RegistryError(f"version {self.version} / round {self.round} must be >= 0")
        if len(self.parent_hash) != 32:
            raise RegistryError("parent_hash must be 32 bytes (zeros for the first model)")
        if self.algorithm not in ALGORITHMS or self.optimizer not in OPTIMIZERS:
            raise RegistryError(
                f"strategy {self.algorithm}+{self.optimizer} is unknown; algorithm in "
                f"{ALGORITHMS}, optimiser in {OPTIMIZERS}"
            )
        for table, what in ((self.epsilon_per_site, "epsilon"), (self.validation, "metric")):
            for name, value in table.items():
                if not (isinstance(value, int | float) and math.isfinite(value)):
                    raise RegistryError(f"{what} {name!r} is {value!r}; it must be a finite number")
        for site, figures in self.privacy_audit.items():
            for name, value in figures.items():
                if not (isinstance(value, int | float) and math.isfinite(value)):
                    raise RegistryError(
                        f"privacy audit figure {name!r} of {site!r} is {value!r}; it must be a "
                        "finite number"
                    )

    def to_dict(self) -> dict[str, Any]:
        """The card as JSON-ready data (hashes in hex)."""
        card = {
            "format": CARD_FORMAT,
            "federation": self.federation_id,
            "study": self.study_id,
            "version": self.version,
            "round": self.round,
            "parent": self.parent_hash.hex(),
            "participants": {"count": self.participant_count, "minimum": self.min_participants},
            "strategy": {
                "algorithm": self.algorithm,
                "optimizer": self.optimizer,
                "adaptive": self.adaptive,
                "switches": [dict(record) for record in self.switches],
            },
            "privacy": _privacy_section(self.epsilon_per_site, self.min_participants),
            "validation": dict(sorted(self.validation.items())),
            "model": {"architecture": self.architecture, "layout": self.layout_digest.hex()},
        }
        if self.privacy_audit:
            card["privacy_audit"] = _audit_section(self.privacy_audit, self.min_participants)
        return card

    def to_bytes(self) -> bytes:
        """Canonical JSON: the same card gives the same bytes in every aggregator."""
        return canonical_json(self.to_dict())


def _privacy_section(epsilon: Mapping[str, float], k: int) -> dict[str, Any]:
    """Epsilon per site, or only the count and the maximum where fewer than k are named."""
    if not epsilon:
        return {"epsilon_per_site": {}}
    if len(epsilon) < k:
        return {"sites": len(epsilon), "epsilon_max": max(float(e) for e in epsilon.values())}
    return {"epsilon_per_site": {site: float(epsilon[site]) for site in sorted(epsilon)}}


def _audit_section(figures: Mapping[str, Mapping[str, float]], k: int) -> dict[str, Any]:
    """Audit figures per site, or, where fewer than k sites would be named, only the count
    and the worst value of each figure (the largest: every figure rises with leakage)."""
    if len(figures) < k:
        names = sorted({name for row in figures.values() for name in row})
        worst = {name: max(float(row[name]) for row in figures.values() if name in row)
                 for name in names}  # fmt: skip
        return {"sites": len(figures), "worst": worst}
    return {
        "per_site": {
            site: {name: float(value) for name, value in sorted(figures[site].items())}
            for site in sorted(figures)
        }
    }


def card_from_bytes(data: bytes) -> dict[str, Any]:
    """Parse card bytes for display; RegistryError unless it is a card of this format."""
    try:
        card = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RegistryError(f"model card is not JSON ({exc})") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise RegistryError(f"model card is not in format {CARD_FORMAT}")
    return card
