"""The signed roster: every member's public keys, as provisioning issued them.

The roster is canonical JSON (sorted keys, no spaces) signed with the coordinator's
Ed25519 key under `SignatureDomain.ROSTER`. Members trust it only through ``load_roster``,
which verifies the signature against the coordinator key from their startup bundle
(never a key found in the roster itself) and raises AuthenticationError otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from tessera.crypto.sealing import load_hpke_public
from tessera.crypto.signing import SignatureDomain, load_public_key, sign_message, verify_message
from tessera.errors import AuthenticationError, ConfigError
from tessera.governance.manifest_model import Manifest

ROSTER_FORMAT = 1


@dataclass(frozen=True)
class RosterEntry:
    """One member's public identity."""

    id: str
    role: str
    name: str
    signing_key: bytes
    hpke_key: bytes | None
    certificate_sha256: bytes


@dataclass(frozen=True)
class Roster:
    """The federation's members and keys, at one provisioning version."""

    federation_id: str
    leader: str
    version: int
    members: tuple[RosterEntry, ...]

    def to_bytes(self) -> bytes:
        """Canonical JSON: the exact bytes that are signed."""
        document = {
            "format": ROSTER_FORMAT,
            "federation_id": self.federation_id,
            "leader": self.leader,
            "version": self.version,
            "members": [
                {
                    "id": m.id,
                    "role": m.role,
                    "name": m.name,
                    "signing_key": m.signing_key.hex(),
                    "hpke_key": m.hpke_key.hex() if m.hpke_key else None,
                    "certificate_sha256": m.certificate_sha256.hex(),
                }
                for m in sorted(self.members, key=lambda m: m.id)
            ],
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Roster:
        """Parse roster JSON (not a verification: use ``load_roster``)."""
        try:
            doc: dict[str, Any] = json.loads(raw)
            if doc.get("format") != ROSTER_FORMAT:
                raise ConfigError(f"roster format {doc.get('format')!r} is not {ROSTER_FORMAT}")
            members = tuple(
                RosterEntry(
                    m["id"],
                    m["role"],
                    m["name"],
                    bytes.fromhex(m["signing_key"]),
                    bytes.fromhex(m["hpke_key"]) if m["hpke_key"] else None,
                    bytes.fromhex(m["certificate_sha256"]),
                )
                for m in doc["members"]
            )
            return cls(doc["federation_id"], doc["leader"], int(doc["version"]), members)
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"roster is malformed ({error}); re-provision the bundle") from None

    def member(self, member_id: str) -> RosterEntry:
        """The entry for ``member_id``; ConfigError if it is not in the roster."""
        for entry in self.members:
            if entry.id == member_id:
                return entry
        raise ConfigError(f"{member_id!r} is not in roster version {self.version}")

    def signing_keys(self) -> dict[str, Ed25519PublicKey]:
        """Every member's Ed25519 public key by id (for tessera.wire.codec.open_envelope)."""
        return {m.id: load_public_key(m.signing_key) for m in self.members}

    def hpke_keys(self) -> dict[str, X25519PublicKey]:
        """Every aggregator's HPKE public key by id (for sealing shares)."""
        return {m.id: load_hpke_public(m.hpke_key) for m in self.members if m.hpke_key}

    @property
    def aggregator_ids(self) -> tuple[str, ...]:
        """Aggregator ids, sorted."""
        return tuple(sorted(m.id for m in self.members if m.role == "aggregator"))

    @property
    def site_ids(self) -> tuple[str, ...]:
        """Site ids, sorted."""
        return tuple(sorted(m.id for m in self.members if m.role == "site"))


def sign_roster(roster: Roster, coordinator_key: Ed25519PrivateKey) -> bytes:
    """The coordinator's 64-byte signature over the roster's canonical bytes."""
    return sign_message(coordinator_key, SignatureDomain.ROSTER, roster.to_bytes())


def load_roster(roster_path: Path, signature_path: Path, coordinator: Ed25519PublicKey) -> Roster:
    """Read and verify a roster; AuthenticationError if the signature does not verify."""
    raw = Path(roster_path).read_bytes()
    signature = Path(signature_path).read_bytes()
    try:
        verify_message(coordinator, SignatureDomain.ROSTER, raw, signature)
    except AuthenticationError:
        # Name what failed (the roster), never why.
        raise AuthenticationError("roster signature did not verify") from None
    roster = Roster.from_bytes(raw)
    if roster.to_bytes() != raw:
        # Signed bytes must be the canonical form, so two readers can never disagree on them.
        raise ConfigError(f"roster {roster_path} is not in canonical form; re-provision it")
    return roster


def check_manifest_agrees(roster: Roster, manifest: Manifest) -> None:
    """Raise ConfigError unless the manifest and the roster name the same members and keys.

    Both are signed by the coordinator: the roster for transport (who may connect, whose
    envelope signature counts, which HPKE key a share is sealed to), the manifest for
    governance (studies, stewards, terms). A service trusts a member only where both agree,
    so a stale bundle or a manifest from another provisioning run stops it at start, with
    the member named, instead of failing rounds later.
    """
    if manifest.federation_id != roster.federation_id:
        raise ConfigError(
            f"the manifest is for federation {manifest.federation_id!r}, the bundle's roster "
            f"for {roster.federation_id!r}"
        )
    wanted: dict[str, tuple[str, bytes, bytes | None]] = {
        **{s.id: ("site", s.node_key, None) for s in manifest.sites},
        **{a.id: ("aggregator", a.signing_key, a.hpke_key) for a in manifest.aggregators},
    }
    held = {m.id: (m.role, m.signing_key, m.hpke_key) for m in roster.members}
    for member_id in sorted(set(wanted) | set(held)):
        if member_id not in held or member_id not in wanted:
            where = "roster" if member_id not in held else "manifest"
            raise ConfigError(
                f"member {member_id!r} is missing from the {where}; provision and sign the "
                "manifest from the same federation roster (roster version "
                f"{roster.version}, manifest version {manifest.version})"
            )
        if wanted[member_id] != held[member_id]:
            raise ConfigError(
                f"member {member_id!r} has different keys or role in the manifest and in the "
                "roster; re-issue the manifest from the current roster"
            )
