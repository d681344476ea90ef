"""The signed privacy-audit report: what a site publishes about a membership-inference audit.

A site runs `tessera audit privacy` on its own node (`node.privacy.attacks`) and publishes
only this report: aggregate figures, never a per-patient score or identifier. Its JSON
document (`to_json`) has exactly these keys, and `from_json` refuses any other::

    format            "tessera-privacy-audit/1"
    federation_id, study_id, site_id
    model             {version, round, hash (hex SHA-256 of the weights)}
    population        {members, non_members}          counts of examples audited
    budget            {shadow_models, shadow_epochs, bootstrap, confidence}
    attacks           {loss: FIGURES, lira: FIGURES}
    dp                null, or {accountant_epsilon, delta}
    signature         base64 Ed25519 (absent before signing)

    FIGURES = {auc, balanced_accuracy, tpr_at_0_1pct_fpr, tpr_at_1pct_fpr: {value, low, high},
               empirical_epsilon: lower bound (null without DP)}

Signature: the site's node key (from the federation manifest) over `canonical_json(document
without signature)` under `SignatureDomain.PRIVACY_REPORT`. `verify_report` returns only if
the site's node key in the given (already verified) manifest signed these exact figures;
otherwise it raises `AuthenticationError`, deliberately vague. Never take the key from the
report itself.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tessera.crypto.signing import SignatureDomain, sign_message, verify_message
from tessera.errors import AuthenticationError, CodecError
from tessera.governance.canonical import canonical_json
from tessera.governance.manifest import Manifest
from tessera.wire.ids import check_id

REPORT_FORMAT = "tessera-privacy-audit/1"
ATTACKS = ("lira", "loss")
RATES = ("auc", "balanced_accuracy", "tpr_at_0_1pct_fpr", "tpr_at_1pct_fpr")
_TOP = ("format", "federation_id", "study_id", "site_id", "model", "population", "budget",
        "attacks", "dp")  # fmt: skip


@dataclass(frozen=True)
class Rate:
    """A rate in [0, 1] with its bootstrap confidence interval."""

    value: float
    low: float
    high: float

    def __post_init__(self) -> None:
        for number in (self.value, self.low, self.high):
            if not (_is_number(number) and 0.0 <= number <= 1.0):
                raise CodecError(f"a rate must be a number in [0, 1], got {number!r}")
        if self.low > self.high:
            raise CodecError(f"interval low {self.low} is above high {self.high}")


@dataclass(frozen=True)
class AttackFigures:
    """One attack's aggregate figures."""

    auc: Rate
    balanced_accuracy: Rate
    tpr_at_0_1pct_fpr: Rate
    tpr_at_1pct_fpr: Rate
    empirical_epsilon: float | None = None  # one-sided lower bound; with DP only

    def __post_init__(self) -> None:
        bound = self.empirical_epsilon
        if bound is not None and not (_is_number(bound) and bound >= 0):
            raise CodecError(f"empirical_epsilon must be a number >= 0 or null, got {bound!r}")


@dataclass(frozen=True)
class PrivacyAuditReport:
    """One site's audit of one model version, aggregate figures only (see module doc)."""

    federation_id: str
    study_id: str
    site_id: str
    model_version: int
    model_round: int
    model_hash: bytes
    members: int
    non_members: int
    shadow_models: int
    shadow_epochs: int
    bootstrap: int
    confidence: float
    attacks: Mapping[str, AttackFigures]
    accountant_epsilon: float | None = None
    delta: float | None = None
    signature: bytes | None = None

    def __post_init__(self) -> None:
        for name in ("federation_id", "study_id", "site_id"):
            check_id(name, getattr(self, name))
        if len(self.model_hash) != 32:
            raise CodecError("model_hash must be the 32-byte SHA-256 of the weights")
        counts = (self.model_version, self.model_round, self.members, self.non_members,
                  self.shadow_models, self.shadow_epochs, self.bootstrap)  # fmt: skip
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise CodecError(f"versions, rounds and counts must be integers >= 0, got {counts}")
        if not (_is_number(self.confidence) and 0.0 < self.confidence < 1.0):
            raise CodecError(f"confidence must be in (0, 1), got {self.confidence!r}")
        if tuple(sorted(self.attacks)) != ATTACKS:
            raise CodecError(f"a report has the attacks {ATTACKS}, got {sorted(self.attacks)}")
        if (self.accountant_epsilon is None) != (self.delta is None):
            raise CodecError("accountant_epsilon and delta come together (DP) or not at all")
        if self.accountant_epsilon is not None and not _is_number(self.accountant_epsilon):
            raise CodecError(f"accountant_epsilon must be a number, got {self.accountant_epsilon}")
        if self.delta is not None and not (_is_number(self.delta) and 0 < self.delta < 1):
            raise CodecError(f"delta must be in (0, 1), got {self.delta!r}")

    @property
    def worst_tpr_at_0_1pct_fpr(self) -> float:
        """The strongest attack's TPR at 0.1% FPR (what a study's release limit bounds)."""
        return max(a.tpr_at_0_1pct_fpr.value for a in self.attacks.values())

    @property
    def empirical_epsilon(self) -> float | None:
        """The largest empirical lower bound over the attacks; None without DP."""
        bounds = [a.empirical_epsilon for a in self.attacks.values()]
        known = [b for b in bounds if b is not None]
        return max(known) if known else None

    def headline(self) -> dict[str, float]:
        """The strongest attack's AUC and TPRs, and (with DP) the empirical and accountant
        epsilons: what a model card and an audit log record."""
        attacks = list(self.attacks.values())
        row = {
            "auc": max(a.auc.value for a in attacks),
            "tpr_at_0_1pct_fpr": self.worst_tpr_at_0_1pct_fpr,
            "tpr_at_1pct_fpr": max(a.tpr_at_1pct_fpr.value for a in attacks),
        }
        bound = self.empirical_epsilon
        if bound is not None and self.accountant_epsilon is not None:
            row["empirical_epsilon"] = bound
            row["accountant_epsilon"] = float(self.accountant_epsilon)
        return row

    def document(self) -> dict[str, Any]:
        """The JSON document without the signature (what is signed)."""
        dp = None
        if self.accountant_epsilon is not None:
            dp = {"accountant_epsilon": float(self.accountant_epsilon), "delta": self.delta}
        return {
            "format": REPORT_FORMAT,
            "federation_id": self.federation_id,
            "study_id": self.study_id,
            "site_id": self.site_id,
            "model": {
                "version": self.model_version,
                "round": self.model_round,
                "hash": self.model_hash.hex(),
            },
            "population": {"members": self.members, "non_members": self.non_members},
            "budget": {
                "shadow_models": self.shadow_models,
                "shadow_epochs": self.shadow_epochs,
                "bootstrap": self.bootstrap,
                "confidence": float(self.confidence),
            },
            "attacks": {name: _figures_dict(self.attacks[name]) for name in ATTACKS},
            "dp": dp,
        }

    def signed_bytes(self) -> bytes:
        """Canonical JSON of `document()`: what the node key signs (without the domain)."""
        return canonical_json(self.document())

    def to_json(self) -> bytes:
        """The published form: the document, plus the signature once signed."""
        data = self.document()
        if self.signature is not None:
            data["signature"] = base64.b64encode(self.signature).decode("ascii")
        return canonical_json(data)


def report_from_json(data: bytes) -> PrivacyAuditReport:
    """Parse a published report strictly (every key known and present); CodecError else."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise CodecError("privacy audit report is not JSON") from None
    try:
        _keys(doc, (*_TOP, "signature"), _TOP, "report")
        if doc["format"] != REPORT_FORMAT:
            raise CodecError(f"report format {doc['format']!r} is not {REPORT_FORMAT!r}")
        model = _keys(doc["model"], ("version", "round", "hash"), None, "model")
        population = _keys(doc["population"], ("members", "non_members"), None, "population")
        budget = _keys(doc["budget"], ("shadow_models", "shadow_epochs", "bootstrap",
                                       "confidence"), None, "budget")  # fmt: skip
        attacks = _keys(doc["attacks"], ATTACKS, None, "attacks")
        dp = doc["dp"]
        if dp is not None:
            dp = _keys(dp, ("accountant_epsilon", "delta"), None, "dp")
        signature = None
        if "signature" in doc:
            signature = base64.b64decode(doc["signature"], validate=True)
        return PrivacyAuditReport(
            federation_id=doc["federation_id"], study_id=doc["study_id"], site_id=doc["site_id"],
            model_version=model["version"], model_round=model["round"],
            model_hash=bytes.fromhex(model["hash"]),
            members=population["members"], non_members=population["non_members"],
            shadow_models=budget["shadow_models"], shadow_epochs=budget["shadow_epochs"],
            bootstrap=budget["bootstrap"], confidence=budget["confidence"],
            attacks={name: _figures_from(attacks[name], name) for name in ATTACKS},
            accountant_epsilon=None if dp is None else dp["accountant_epsilon"],
            delta=None if dp is None else dp["delta"],
            signature=signature,
        )  # fmt: skip
    except (TypeError, AttributeError, binascii.Error, ValueError) as error:
        if isinstance(error, CodecError):
            raise
        raise CodecError(f"privacy audit report is malformed ({error})") from None


def sign_report(report: PrivacyAuditReport, node_key: Ed25519PrivateKey) -> PrivacyAuditReport:
    """The report signed with the site's node key."""
    signature = sign_message(node_key, SignatureDomain.PRIVACY_REPORT, report.signed_bytes())
    return replace(report, signature=signature)


def verify_report(report: PrivacyAuditReport, manifest: Manifest) -> None:
    """Return only if the node key that `manifest` lists for `report.site_id` signed this
    report, for this federation; AuthenticationError otherwise (see module doc)."""
    site = manifest.site(report.site_id)
    if report.signature is None or site is None or report.federation_id != manifest.federation_id:
        raise AuthenticationError("privacy audit report signature did not verify")
    verify_message(
        site.node_key, SignatureDomain.PRIVACY_REPORT, report.signed_bytes(), report.signature
    )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _figures_dict(figures: AttackFigures) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in RATES:
        rate: Rate = getattr(figures, name)
        out[name] = {"value": float(rate.value), "low": float(rate.low), "high": float(rate.high)}
    bound = figures.empirical_epsilon
    out["empirical_epsilon"] = None if bound is None else float(bound)
    return out


def _figures_from(doc: object, attack: str) -> AttackFigures:
    table = _keys(doc, (*RATES, "empirical_epsilon"), None, f"attacks.{attack}")
    rates = {}
    for name in RATES:
        rate = _keys(table[name], ("value", "low", "high"), None, f"attacks.{attack}.{name}")
        rates[name] = Rate(rate["value"], rate["low"], rate["high"])
    return AttackFigures(**rates, empirical_epsilon=table["empirical_epsilon"])


def _keys(
    doc: object, allowed: tuple[str, ...], required: tuple[str, ...] | None, where: str
) -> dict[str, Any]:
    """`doc` as a dict whose keys are `allowed` (all of them required unless `required`)."""
    if not isinstance(doc, dict):
        raise CodecError(f"report {where} must be a JSON object")
    need = set(allowed if required is None else required)
    extra, missing = set(doc) - set(allowed), need - set(doc)
    if extra or missing:
        raise CodecError(
            f"report {where}: unknown keys {sorted(extra)}, missing keys {sorted(missing)}; "
            "a report carries aggregate figures only, in the documented layout"
        )
    return doc
