"""The federation manifest's frozen dataclasses and their canonical form.

Import these through `tessera.governance.manifest`, which documents the format.
`canonical_dict()` is the structure that signatures and hashes cover: public keys as
standard base64 of the raw 32 bytes, dates as ISO `YYYY-MM-DD`, floats as floats (so
`epsilon = 8` in TOML and `epsilon = 8.0` are the same term), and every list of named
things sorted by id, so that reordering `[[sites]]` tables or rewriting a key from hex to
base64 changes no signature.
The order of `labels` is kept: a label's position is its class index.
"""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass
from typing import Any

FORMAT = "tessera-manifest/1"

PreprocessingValue = str | int | float | bool | tuple[str | int | float | bool, ...]


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class Member:
    """A person or service holding one role, named by id, with a raw Ed25519 public key."""

    id: str
    key: bytes

    def canonical_dict(self) -> dict[str, Any]:
        """The signed form: id and base64 key."""
        return {"id": self.id, "key": _b64(self.key)}


@dataclass(frozen=True)
class Site:
    """A hospital: its node's signing key, its administrators and its data stewards."""

    id: str
    node_key: bytes
    administrators: tuple[Member, ...]
    stewards: tuple[Member, ...]

    def canonical_dict(self) -> dict[str, Any]:
        """The signed form of this site."""
        return {
            "id": self.id,
            "node_key": _b64(self.node_key),
            "administrators": [m.canonical_dict() for m in sorted_by_id(self.administrators)],
            "stewards": [m.canonical_dict() for m in sorted_by_id(self.stewards)],
        }


@dataclass(frozen=True)
class Aggregator:
    """An aggregation service: its release-signing key, its HPKE (X25519) key, its operators."""

    id: str
    signing_key: bytes
    hpke_key: bytes
    operators: tuple[Member, ...]

    def canonical_dict(self) -> dict[str, Any]:
        """The signed form of this aggregator."""
        return {
            "id": self.id,
            "signing_key": _b64(self.signing_key),
            "hpke_key": _b64(self.hpke_key),
            "operators": [m.canonical_dict() for m in sorted_by_id(self.operators)],
        }


@dataclass(frozen=True)
class DPRequirement:
    """The study's differential-privacy budget for each site: (epsilon, delta) in total."""

    epsilon: float
    delta: float


@dataclass(frozen=True)
class PrivacyAuditRequirement:
    """The study requires a membership-inference audit at every site before a release, and
    holds any release whose strongest attack's TPR at 0.1% FPR exceeds this at some site."""

    max_tpr_at_0_1pct_fpr: float


@dataclass(frozen=True)
class Study:
    """One study's terms: what may be trained, on which labels, with which privacy, until when."""

    id: str
    purpose: str
    labels: tuple[str, ...]
    architectures: tuple[str, ...]
    preprocessing: tuple[tuple[str, PreprocessingValue], ...]
    min_participants: int
    max_rounds: int
    dp: DPRequirement
    clip_norm: float
    expires: dt.date
    privacy_audit: PrivacyAuditRequirement | None = None  # optional: absent = not required

    def preprocessing_dict(self) -> dict[str, PreprocessingValue]:
        """The preprocessing table as a plain dict."""
        return dict(self.preprocessing)

    def canonical_dict(self) -> dict[str, Any]:
        """The form that `study_hash` and the manifest signature cover.

        `privacy_audit` appears only when the study sets it, so manifests signed before the
        term existed keep their signatures and study hashes.
        """
        terms: dict[str, Any] = {
            "id": self.id,
            "purpose": self.purpose,
            "labels": list(self.labels),
            "architectures": sorted(self.architectures),
            "preprocessing": {
                name: list(value) if isinstance(value, tuple) else value
                for name, value in self.preprocessing
            },
            "min_participants": self.min_participants,
            "max_rounds": self.max_rounds,
            "dp": {"epsilon": float(self.dp.epsilon), "delta": float(self.dp.delta)},
            "clip_norm": float(self.clip_norm),
            "expires": self.expires.isoformat(),
        }
        if self.privacy_audit is not None:
            limit = float(self.privacy_audit.max_tpr_at_0_1pct_fpr)
            terms["privacy_audit"] = {"max_tpr_at_0_1pct_fpr": limit}
        return terms

    def is_expired(self, today: dt.date) -> bool:
        """True once `today` (UTC) is after the expiry date; the study runs through that day."""
        return today > self.expires


@dataclass(frozen=True)
class Manifest:
    """A federation manifest, signed or not. Build it with
    `tessera.governance.manifest.load_manifest` or `manifest_from_dict`; verify it with
    `tessera.governance.manifest.verify_manifest` before trusting it."""

    federation_id: str
    version: int
    coordinator: Member
    auditors: tuple[Member, ...]
    sites: tuple[Site, ...]
    aggregators: tuple[Aggregator, ...]
    studies: tuple[Study, ...]
    signature: bytes | None = None

    def canonical_dict(self) -> dict[str, Any]:
        """Everything the coordinator signs: the whole manifest except the signature."""
        return {
            "format": FORMAT,
            "federation": {"id": self.federation_id, "version": self.version},
            "coordinator": self.coordinator.canonical_dict(),
            "auditors": [m.canonical_dict() for m in sorted_by_id(self.auditors)],
            "sites": [s.canonical_dict() for s in sorted_by_id(self.sites)],
            "aggregators": [a.canonical_dict() for a in sorted_by_id(self.aggregators)],
            "studies": [s.canonical_dict() for s in sorted_by_id(self.studies)],
        }

    def study(self, study_id: str) -> Study | None:
        """The study with this id, or None."""
        return next((s for s in self.studies if s.id == study_id), None)

    def site(self, site_id: str) -> Site | None:
        """The site with this id, or None."""
        return next((s for s in self.sites if s.id == site_id), None)

    def aggregator(self, aggregator_id: str) -> Aggregator | None:
        """The aggregator with this id, or None."""
        return next((a for a in self.aggregators if a.id == aggregator_id), None)

    def node_keys(self) -> dict[str, bytes]:
        """Site id -> the node's raw Ed25519 key (for envelope verification)."""
        return {s.id: s.node_key for s in self.sites}

    def aggregator_keys(self) -> dict[str, bytes]:
        """Aggregator id -> its raw Ed25519 release-signing key."""
        return {a.id: a.signing_key for a in self.aggregators}

    def principal_keys(self) -> list[tuple[str, bytes]]:
        """Every (role-qualified name, key) pair in the manifest."""
        keys = [(f"coordinator {self.coordinator.id}", self.coordinator.key)]
        keys += [(f"auditor {m.id}", m.key) for m in self.auditors]
        for site in self.sites:
            keys.append((f"node of site {site.id}", site.node_key))
            keys += [(f"administrator {m.id} of {site.id}", m.key) for m in site.administrators]
            keys += [(f"steward {m.id} of {site.id}", m.key) for m in site.stewards]
        for agg in self.aggregators:
            keys.append((f"aggregator {agg.id}", agg.signing_key))
            keys += [(f"operator {m.id} of {agg.id}", m.key) for m in agg.operators]
        return keys


def sorted_by_id(items: tuple[Any, ...]) -> list[Any]:
    """Items sorted by their `id`, the canonical order of every named list."""
    return sorted(items, key=lambda item: item.id)
