"""Build a valid, signed federation manifest and steward approvals for tests.

`build_federation(tmp_path, n_sites=3, n_aggregators=2)` writes, under `root`:

- `manifest.toml` (signed by the coordinator),
- `keys/<principal>.pem` for every Ed25519 key (coordinator, nodes, stewards, administrators,
  aggregators, operators, auditor) and `keys/<aggregator>.hpke.pem` for the HPKE keys,
- `approvals/<site>/<study>.json`: each site's steward's approval of each study.

Everything is generated fresh from the OS's cryptographic generator on every call.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tessera.crypto.sealing import generate_hpke_key, hpke_public_bytes, save_hpke_key
from tessera.crypto.signing import generate_signing_key, public_key_bytes, save_private_key
from tessera.governance.approvals import Approval, approve_study, save_approval
from tessera.governance.manifest import (
    Manifest,
    load_manifest,
    loads_manifest,
    save_manifest,
    sign_manifest,
)

STUDY_ID = "chest-xray"
NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)


@dataclass
class Federation:
    """What `build_federation` made: the signed manifest, every key, every approval."""

    root: Path
    manifest_path: Path
    manifest: Manifest
    keys: dict[str, Ed25519PrivateKey] = field(default_factory=dict)
    hpke_keys: dict[str, X25519PrivateKey] = field(default_factory=dict)
    approvals: dict[str, dict[str, Approval]] = field(default_factory=dict)

    @property
    def coordinator_key(self) -> Ed25519PrivateKey:
        return self.keys["coordinator"]

    @property
    def coordinator_public(self) -> bytes:
        return public_key_bytes(self.keys["coordinator"])

    @property
    def site_ids(self) -> list[str]:
        return [site.id for site in self.manifest.sites]

    @property
    def aggregator_ids(self) -> list[str]:
        return [agg.id for agg in self.manifest.aggregators]

    def key_path(self, principal: str) -> Path:
        """The PEM file of `principal` ("coordinator", "node-site-1", "steward-site-1"...)."""
        return self.root / "keys" / f"{principal}.pem"

    def approval_dir(self, site_id: str) -> Path:
        return self.root / "approvals" / site_id

    def resign(self, manifest: Manifest) -> Manifest:
        """Sign a changed manifest with the coordinator key, save it, and return it."""
        signed = sign_manifest(manifest, self.coordinator_key)
        save_manifest(signed, self.manifest_path)
        self.manifest = signed
        return signed


def _b64(key: Ed25519PrivateKey) -> str:
    return base64.b64encode(public_key_bytes(key)).decode("ascii")


def manifest_document(
    keys: Mapping[str, Ed25519PrivateKey],
    hpke: Mapping[str, X25519PrivateKey],
    site_ids: list[str],
    aggregator_ids: list[str],
    *,
    federation_id: str = "test-federation",
    version: int = 1,
    study: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest as a TOML-shaped dict (before validation), for tests that edit terms."""
    terms: dict[str, Any] = {
        "id": STUDY_ID,
        "purpose": "pneumonia triage on chest X-rays",
        "labels": ["normal", "pneumonia"],
        "architectures": ["small-cnn-v1", "resnet18-v1"],
        "preprocessing": {"size": 64, "channels": 1, "window": "lung"},
        "min_participants": 2,
        "max_rounds": 20,
        "clip_norm": 1.0,
        "dp": {"epsilon": 8.0, "delta": 1e-5},
        "expires": dt.date(2027, 6, 30),
    }
    terms.update(study or {})
    return {
        "federation": {"id": federation_id, "version": version},
        "coordinator": {"id": "coordinator", "key": _b64(keys["coordinator"])},
        "auditors": [{"id": "auditor", "key": _b64(keys["auditor"])}],
        "sites": [
            {
                "id": site,
                "node_key": _b64(keys[f"node-{site}"]),
                "administrators": [{"id": f"admin-{site}", "key": _b64(keys[f"admin-{site}"])}],
                "stewards": [{"id": f"steward-{site}", "key": _b64(keys[f"steward-{site}"])}],
            }
            for site in site_ids
        ],
        "aggregators": [
            {
                "id": agg,
                "signing_key": _b64(keys[agg]),
                "hpke_key": base64.b64encode(hpke_public_bytes(hpke[agg])).decode("ascii"),
                "operators": [{"id": f"operator-{agg}", "key": _b64(keys[f"operator-{agg}"])}],
            }
            for agg in aggregator_ids
        ],
        "studies": [terms],
    }


def build_federation(
    root: Path,
    n_sites: int = 3,
    n_aggregators: int = 2,
    *,
    study: Mapping[str, Any] | None = None,
    approve: bool = True,
    federation_id: str = "test-federation",
    site_ids: list[str] | None = None,
    aggregator_ids: list[str] | None = None,
) -> Federation:
    """A signed manifest for `n_sites` sites and `n_aggregators` aggregators (or the ids
    given), with keys on disk, and (unless `approve=False`) every site's steward approval of
    the study.

    The study's k is 2, so `n_sites` must be at least 2; manifests need 2 aggregators.
    """
    site_ids = site_ids or [f"site-{i}" for i in range(1, n_sites + 1)]
    aggregator_ids = aggregator_ids or [f"agg-{i}" for i in range(1, n_aggregators + 1)]
    if len(site_ids) < 2 or len(aggregator_ids) < 2:
        raise ValueError("build_federation needs n_sites >= 2 and n_aggregators >= 2")
    principals = ["coordinator", "auditor", *aggregator_ids]
    principals += [f"operator-{agg}" for agg in aggregator_ids]
    for site in site_ids:
        principals += [f"node-{site}", f"admin-{site}", f"steward-{site}"]
    (root / "keys").mkdir(parents=True, exist_ok=True)
    keys = {name: generate_signing_key() for name in principals}
    for name, key in keys.items():
        save_private_key(key, root / "keys" / f"{name}.pem")
    hpke = {agg: generate_hpke_key() for agg in aggregator_ids}
    for agg, hkey in hpke.items():
        save_hpke_key(hkey, root / "keys" / f"{agg}.hpke.pem")
    document = manifest_document(
        keys, hpke, site_ids, aggregator_ids, federation_id=federation_id, study=study
    )
    manifest = sign_manifest(loads_manifest(tomli_w.dumps(document)), keys["coordinator"])
    manifest_path = root / "manifest.toml"
    save_manifest(manifest, manifest_path)
    fed = Federation(root, manifest_path, load_manifest(manifest_path), keys, hpke)
    if approve:
        for site in site_ids:
            fed.approval_dir(site).mkdir(parents=True, exist_ok=True)
            fed.approvals[site] = {}
            for terms in fed.manifest.studies:
                approval = approve_study(fed.manifest, terms.id, site, keys[f"steward-{site}"], NOW)
                save_approval(approval, fed.approval_dir(site) / f"{terms.id}.json")
                fed.approvals[site][terms.id] = approval
    return fed
