"""The federation manifest: the study charter every node and aggregator acts within.

Format (TOML; `tests/data/federation-manifest.toml` is a complete example)::

    format = "tessera-manifest/1"          # optional
    [federation]
    id = "demo"                            # ids: 1-64 of A-Z a-z 0-9 . _ -
    version = 3                            # bump on every change
    [coordinator]
    id = "coordinator"
    key = "<Ed25519 public key>"           # raw 32 bytes: standard base64 or 64 hex digits
    [[auditors]]                           # zero or more {id, key}
    [[sites]]                              # one or more
    id = "site-a"
    node_key = "<the node's Ed25519 key>"
    administrators = [{ id = "admin-a", key = "..." }]
    stewards = [{ id = "steward-a", key = "..." }]      # at least one
    [[aggregators]]                        # two or more
    id = "agg-1"
    signing_key = "<Ed25519 key that signs releases>"
    hpke_key = "<X25519 key that shares are sealed to>"
    operators = [{ id = "op-1", key = "..." }]
    [[studies]]                            # one or more
    id = "chest-xray"
    purpose = "pneumonia triage"
    labels = ["normal", "pneumonia"]       # order = class index
    architectures = ["small-cnn-v1"]       # the allowlist
    preprocessing = { size = 64, window = "lung" }   # scalars or lists of scalars
    min_participants = 3                   # k >= 2, and no more than the sites
    max_rounds = 50
    clip_norm = 1.0
    dp = { epsilon = 8.0, delta = 1e-5 }   # each site's total budget for this study
    expires = 2027-06-30                   # a TOML date; the study runs through that day (UTC)
    privacy_audit = { max_tpr_at_0_1pct_fpr = 0.05 }  # optional: audit every site before a
                                           # release; hold it if an attack beats this anywhere
    [signature]                            # written by `tessera manifest sign`
    value = "<base64 Ed25519 signature>"

Canonical bytes: `canonical_json(manifest.canonical_dict())` (see
`tessera.governance.canonical` and `tessera.governance.manifest_model`). The signature
covers the canonical bytes under `SignatureDomain.MANIFEST`, so TOML layout, comments, key
order, table order and hex-versus-base64 keys do not matter, while every term does.

Trust: a manifest is trusted only after `verify_manifest` with the coordinator key that the
node or aggregator was provisioned with (pinned, never taken from the manifest itself).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tessera.crypto.signing import SignatureDomain, public_key_bytes, sign_message, verify_message
from tessera.errors import AuthenticationError, ConfigError
from tessera.files import atomic_write
from tessera.governance.canonical import canonical_json
from tessera.governance.manifest_model import (
    FORMAT,
    Aggregator,
    DPRequirement,
    Manifest,
    Member,
    PrivacyAuditRequirement,
    Site,
    Study,
)
from tessera.governance.manifest_schema import decode_key, manifest_from_dict

__all__ = [
    "FORMAT",
    "Aggregator",
    "Change",
    "DPRequirement",
    "Manifest",
    "Member",
    "PrivacyAuditRequirement",
    "Site",
    "Study",
    "canonical_bytes",
    "check_successor",
    "decode_key",
    "diff",
    "dumps_manifest",
    "load_manifest",
    "loads_manifest",
    "manifest_from_dict",
    "save_manifest",
    "sign_manifest",
    "study_hash",
    "verify_manifest",
]

# A hash tag, not a signature domain (those are tessera.crypto.signing.SignatureDomain).
STUDY_HASH_DOMAIN = b"tessera/study/v1\x00"


def loads_manifest(text: str) -> Manifest:
    """Parse and validate manifest TOML text; ConfigError naming the key and the fix."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"manifest is not valid TOML: {error}; fix the syntax") from None
    return manifest_from_dict(data)


def load_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and validate a manifest file (signed or not); nothing is trusted until verified."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"manifest {path} does not exist; check the path") from None
    except UnicodeDecodeError:
        raise ConfigError(f"manifest {path} is not UTF-8 text; is it the right file?") from None
    return loads_manifest(text)


def dumps_manifest(manifest: Manifest) -> str:
    """The manifest as TOML in Tessera's own layout, with its signature if it has one."""
    data: dict[str, Any] = manifest.canonical_dict()
    for study in data["studies"]:
        study["expires"] = dt.date.fromisoformat(study["expires"])
    if manifest.signature is not None:
        data["signature"] = {"value": _b64(manifest.signature)}
    return tomli_w.dumps(data)


def save_manifest(manifest: Manifest, path: str | os.PathLike[str]) -> None:
    """Write the manifest TOML atomically (the old file or the new one, never a mix)."""
    atomic_write(path, dumps_manifest(manifest).encode("utf-8"))


def canonical_bytes(manifest: Manifest) -> bytes:
    """The bytes the coordinator signs: canonical JSON of everything but the signature."""
    return canonical_json(manifest.canonical_dict())


def study_hash(study: Study) -> bytes:
    """SHA-256 naming exactly one study's terms (32 bytes); any change to a term changes it."""
    return hashlib.sha256(STUDY_HASH_DOMAIN + canonical_json(study.canonical_dict())).digest()


def sign_manifest(manifest: Manifest, key: Ed25519PrivateKey) -> Manifest:
    """Return the manifest signed with the coordinator's key.

    Refuses (ConfigError) a key that is not the coordinator key the manifest names, since
    nodes would reject that signature anyway.
    """
    if public_key_bytes(key) != manifest.coordinator.key:
        raise ConfigError(
            "this signing key is not the manifest's coordinator key; sign with the "
            f"coordinator's key, or change [coordinator] key to {_b64(public_key_bytes(key))}"
        )
    return replace(
        manifest, signature=sign_message(key, SignatureDomain.MANIFEST, canonical_bytes(manifest))
    )


def verify_manifest(manifest: Manifest, coordinator_key: bytes | None) -> None:
    """Return only if the manifest carries a valid signature by the coordinator.

    `coordinator_key` is the raw key the caller was provisioned with; when given, the
    manifest must name exactly that key as its coordinator, so a manifest that someone else
    signed after naming themselves coordinator is rejected. With None, only self-consistency
    is checked (the signature is the declared coordinator's): never use None to decide trust.
    Raises AuthenticationError, deliberately vague, on any failure.
    """
    if manifest.signature is None:
        raise AuthenticationError("manifest is not signed; sign it with `tessera manifest sign`")
    if coordinator_key is not None and coordinator_key != manifest.coordinator.key:
        raise AuthenticationError("manifest signature did not verify")
    verify_message(
        manifest.coordinator.key,
        SignatureDomain.MANIFEST,
        canonical_bytes(manifest),
        manifest.signature,
    )


def check_successor(current: Manifest, candidate: Manifest) -> None:
    """Refuse a manifest update that is not a newer version of the same federation.

    Guards against rollback to an older, laxer manifest. Verify `candidate` with the pinned
    coordinator key as well; this check does not look at signatures.
    """
    if candidate.federation_id != current.federation_id:
        raise ConfigError(
            f"manifest is for federation {candidate.federation_id!r}, not "
            f"{current.federation_id!r}; use this federation's manifest"
        )
    if candidate.version <= current.version:
        raise ConfigError(
            f"manifest version {candidate.version} is not newer than the current "
            f"{current.version}; the coordinator must bump [federation] version"
        )


@dataclass(frozen=True)
class Change:
    """One difference between two manifests: a dotted path, and the old and new values
    (None where the item is absent on that side)."""

    path: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.path}: {_render(self.old)} -> {_render(self.new)}"


def diff(old: Manifest, new: Manifest) -> list[Change]:
    """What changed from `old` to `new`, term by term, in a stable order (signature ignored).

    Named lists (sites, studies, stewards...) are matched by id, so `sites[site-c]` shows as
    added or removed, and `studies[chest].dp.epsilon` as a changed value.
    """
    changes: list[Change] = []
    _compare("", old.canonical_dict(), new.canonical_dict(), changes)
    return changes


_ABSENT: Any = object()


def _compare(path: str, old: Any, new: Any, out: list[Change]) -> None:
    if old == new:
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            child = f"{path}.{key}" if path else key
            _compare(child, old.get(key, _ABSENT), new.get(key, _ABSENT), out)
    elif _named_list(old) and _named_list(new):
        before = {item["id"]: item for item in old}
        after = {item["id"]: item for item in new}
        for item_id in sorted(set(before) | set(after)):
            _compare(
                f"{path}[{item_id}]", before.get(item_id, _ABSENT), after.get(item_id, _ABSENT), out
            )
    else:
        out.append(Change(path, None if old is _ABSENT else old, None if new is _ABSENT else new))


def _named_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(i, dict) and "id" in i for i in value)


def _render(value: Any) -> str:
    return "(absent)" if value is None else json.dumps(value, sort_keys=True)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")
