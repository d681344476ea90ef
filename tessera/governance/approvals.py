"""Study approvals: a site's data steward signs one study's exact terms for one site.

An approval signs `canonical_json({federation_id, site_id, study_id, study_hash (hex),
steward_id, approved_at})` under `SignatureDomain.STUDY_APPROVAL` with the steward's Ed25519
key. It is stored as one small JSON file (`to_json` / `from_json`).

Guarantees of `verify_approval`: it returns only when the approval was signed by a key that
the (already verified) manifest lists as a steward of that very site, for this federation,
this site and this study, and for the study's *current* terms (its `study_hash`). Any change
to a study term (epsilon, architectures, expiry...) changes the hash, so an old approval stops
authorising until the steward approves again; an approval for another study, another site or
another federation never authorises this one. Callers must verify the manifest first: an
approval is only as trustworthy as the steward list it is checked against.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tessera.crypto.signing import SignatureDomain, public_key_bytes, sign_message, verify_message
from tessera.errors import AuthenticationError, ConfigError
from tessera.files import atomic_write
from tessera.governance.canonical import canonical_json
from tessera.governance.manifest import Manifest, study_hash

_FIELDS = ("federation_id", "site_id", "study_id", "study_hash", "steward_id", "approved_at")


@dataclass(frozen=True)
class Approval:
    """One steward's signed approval of one study's terms for one site."""

    federation_id: str
    site_id: str
    study_id: str
    study_hash: bytes
    steward_id: str
    approved_at: str
    signature: bytes

    def signed_bytes(self) -> bytes:
        """The canonical bytes the steward's signature covers (domain tag not included)."""
        return canonical_json(self._body())

    def _body(self) -> dict[str, Any]:
        return {
            "federation_id": self.federation_id,
            "site_id": self.site_id,
            "study_id": self.study_id,
            "study_hash": self.study_hash.hex(),
            "steward_id": self.steward_id,
            "approved_at": self.approved_at,
        }

    def to_json(self) -> str:
        """The approval file's text: the signed fields plus the hex signature."""
        return json.dumps({**self._body(), "signature": self.signature.hex()}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Approval:
        """Parse an approval file; ConfigError (with the fix) if it is not one."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(
                f"approval is not JSON ({error}); ask the steward for it again"
            ) from None
        expected = {*_FIELDS, "signature"}
        if not isinstance(data, dict) or set(data) != expected:
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ConfigError(
                f"approval must have exactly the keys {sorted(expected)}, got {keys}; "
                "use a file written by `tessera approve`"
            )
        if not all(isinstance(data[k], str) for k in expected):
            raise ConfigError("every approval value must be a string; use `tessera approve`")
        try:
            digest = bytes.fromhex(data["study_hash"])
            signature = bytes.fromhex(data["signature"])
        except ValueError:
            raise ConfigError("approval study_hash or signature is not hex") from None
        if len(digest) != 32 or len(signature) != 64:
            raise ConfigError("approval study_hash must be 32 bytes and signature 64 bytes")
        return cls(
            federation_id=data["federation_id"],
            site_id=data["site_id"],
            study_id=data["study_id"],
            study_hash=digest,
            steward_id=data["steward_id"],
            approved_at=data["approved_at"],
            signature=signature,
        )


def approve_study(
    manifest: Manifest,
    study_id: str,
    site_id: str,
    steward_key: Ed25519PrivateKey,
    now: dt.datetime,
) -> Approval:
    """Sign `study_id`'s current terms for `site_id` with a steward's key.

    ConfigError (with the fix) if the study or site is unknown, or if the key is not one of
    that site's stewards in this manifest (an approval that could never verify).
    """
    study = manifest.study(study_id)
    if study is None:
        known = ", ".join(s.id for s in manifest.studies)
        raise ConfigError(f"manifest has no study {study_id!r}; choose one of: {known}")
    site = manifest.site(site_id)
    if site is None:
        known = ", ".join(s.id for s in manifest.sites)
        raise ConfigError(f"manifest has no site {site_id!r}; choose one of: {known}")
    raw = public_key_bytes(steward_key)
    steward = next((m for m in site.stewards if m.key == raw), None)
    if steward is None:
        raise ConfigError(
            f"this key is not a data steward's key for site {site_id!r} in manifest version "
            f"{manifest.version}; use the steward's own key, or have the coordinator add it"
        )
    unsigned = Approval(
        federation_id=manifest.federation_id,
        site_id=site_id,
        study_id=study_id,
        study_hash=study_hash(study),
        steward_id=steward.id,
        approved_at=now.astimezone(dt.UTC).isoformat(timespec="seconds"),
        signature=b"",
    )
    signature = sign_message(steward_key, SignatureDomain.STUDY_APPROVAL, unsigned.signed_bytes())
    return replace(unsigned, signature=signature)


def verify_approval(approval: Approval, manifest: Manifest, study_id: str, site_id: str) -> None:
    """Return only if `approval` authorises `site_id` to take part in `study_id` as the
    (verified) `manifest` now defines it; AuthenticationError otherwise (see module doc)."""
    study = manifest.study(study_id)
    site = manifest.site(site_id)
    if study is None or site is None:
        raise AuthenticationError("approval does not cover this study at this site")
    if (
        approval.federation_id != manifest.federation_id
        or approval.site_id != site_id
        or approval.study_id != study_id
    ):
        raise AuthenticationError("approval does not cover this study at this site")
    if approval.study_hash != study_hash(study):
        raise AuthenticationError(
            "approval is for other terms than this study's current ones; the steward must "
            "approve the study again"
        )
    steward = next((m for m in site.stewards if m.id == approval.steward_id), None)
    if steward is None:
        raise AuthenticationError("approval is not signed by a steward of this site")
    verify_message(
        steward.key, SignatureDomain.STUDY_APPROVAL, approval.signed_bytes(), approval.signature
    )


def find_approval(
    approvals: Iterable[Approval], manifest: Manifest, study_id: str, site_id: str
) -> Approval:
    """The first approval that verifies for this study and site; AuthenticationError if none."""
    for approval in approvals:
        try:
            verify_approval(approval, manifest, study_id, site_id)
        except AuthenticationError:
            continue
        return approval
    raise AuthenticationError(
        f"no valid steward approval of study {study_id!r} for site {site_id!r}"
    )


def save_approval(approval: Approval, path: str | os.PathLike[str]) -> None:
    """Write an approval file atomically."""
    atomic_write(path, approval.to_json().encode("utf-8"))


def load_approval(path: str | os.PathLike[str]) -> Approval:
    """Read one approval file; ConfigError if missing or malformed."""
    try:
        return Approval.from_json(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"approval file {path} does not exist; check the path") from None


def load_approvals(folder: str | os.PathLike[str]) -> list[Approval]:
    """Every `*.json` approval in `folder`, in name order (an absent folder gives none)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    return [load_approval(p) for p in sorted(root.glob("*.json"))]
