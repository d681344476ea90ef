"""A complete, signed local federation on disk: what the demo and the end-to-end tests run.

`prepare_federation(out, spec)` does what a coordinator, stewards and operators do, in
order: provisioning (CA, certificates, keys, signed roster, broker config), a manifest
drafted from the roster with one study and signed by the coordinator's key, a steward key
and a signed approval per site, and one service configuration per member:

    out/provisioned/...                 `tessera provision` output (coordinator/ stays here)
    out/provisioned/bundles/<id>/       each member's bundle, plus manifest.toml and, for a
                                        site, approvals/<study>.json
    out/stewards/<site>.key             each steward's private key (0600)
    out/config/<id>.toml                `tessera node run` / `tessera aggregator run` config
    out/state/<id>/                     each member's state folder

Every key here is generated for this run only; nothing is a fixed test key.
"""

from __future__ import annotations

import datetime as dt
import getpass
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from broker.provisioning.bundle import load_bundle
from broker.provisioning.federation import Federation, parse_federation
from broker.provisioning.manifest_draft import draft_manifest
from broker.provisioning.provision import provision
from broker.provisioning.roster import Roster
from tessera.crypto.signing import (
    generate_signing_key,
    load_private_key,
    public_key_bytes,
    save_private_key,
)
from tessera.files import atomic_write
from tessera.governance.approvals import approve_study, save_approval
from tessera.governance.manifest import load_manifest, save_manifest, sign_manifest
from tessera.governance.manifest_model import Study
from tessera.models.study import StudyModel


@dataclass(frozen=True)
class FederationSpec:
    """The federation to build: members, the study's terms, and service settings."""

    sites: tuple[str, ...] = ("site-a", "site-b", "site-c")
    aggregators: tuple[str, ...] = ("agg-uni", "agg-ngo")
    federation_id: str = "demo-fed"
    study_id: str = "lesion"
    labels: tuple[str, ...] = ("absent", "present")
    architecture: str = "small-cnn-v1"
    image_size: int = 32
    min_participants: int = 2
    max_rounds: int = 10
    clip_norm: float = 1.0
    epsilon: float = 50.0
    delta: float = 1e-5
    round: Mapping[str, Any] = field(default_factory=dict)  # aggregator [round] overrides
    strategy: Mapping[str, Any] = field(default_factory=dict)  # aggregator [strategy]
    training: Mapping[str, Any] = field(default_factory=dict)  # node [training]
    # The study's privacy_audit term (max attack TPR at 0.1% FPR); None: no audit required.
    privacy_audit_limit: float | None = None

    @property
    def leader(self) -> str:
        """The aggregator that opens rounds."""
        return self.aggregators[0]

    def study_table(self) -> dict[str, Any]:
        """The study as a manifest table."""
        table: dict[str, Any] = {
            "id": self.study_id,
            "purpose": "Demonstration: lesion present or absent on synthetic images",
            "labels": list(self.labels),
            "architectures": [self.architecture],
            "preprocessing": {"size": self.image_size, "channels": 1},
            "min_participants": self.min_participants,
            "max_rounds": self.max_rounds,
            "dp": {"epsilon": self.epsilon, "delta": self.delta},
            "clip_norm": self.clip_norm,
            "expires": dt.date.today() + dt.timedelta(days=365),
        }
        if self.privacy_audit_limit is not None:
            table["privacy_audit"] = {"max_tpr_at_0_1pct_fpr": self.privacy_audit_limit}
        return table


@dataclass(frozen=True)
class PreparedFederation:
    """Where everything was written."""

    root: Path
    spec: FederationSpec
    federation: Federation
    roster: Roster

    @property
    def provisioned(self) -> Path:
        """The provisioning output folder."""
        return self.root / "provisioned"

    def bundle(self, member_id: str) -> Path:
        """A member's startup bundle."""
        return self.provisioned / "bundles" / member_id

    def config(self, member_id: str) -> Path:
        """A member's service configuration file."""
        return self.root / "config" / f"{member_id}.toml"

    def state(self, member_id: str) -> Path:
        """A member's state folder."""
        return self.root / "state" / member_id

    def study(self) -> Study:
        """The study as the signed manifest in the leader's bundle states it."""
        study = load_manifest(self.bundle(self.spec.leader) / "manifest.toml").study(
            self.spec.study_id
        )
        if study is None:
            raise ValueError(f"the manifest has no study {self.spec.study_id!r}")
        return study

    def study_model(self) -> StudyModel:
        """The model the study trains (its genesis, preprocessing and labels)."""
        return StudyModel.from_study(self.spec.federation_id, self.study(), self.spec.architecture)


def prepare_federation(
    root: Path,
    spec: FederationSpec,
    *,
    broker_host: str = "127.0.0.1",
    broker_port: int = 8883,
    tls: bool = True,
    dicom: Mapping[str, Path] | None = None,
    labels_csv: Mapping[str, Path] | None = None,
) -> PreparedFederation:
    """Provision, draft and sign the manifest, approve, write every configuration."""
    root = Path(root)
    federation = parse_federation({
        "federation": {"id": spec.federation_id, "leader": spec.leader,
                       "studies": [spec.study_id]},
        "broker": {"hostnames": [broker_host], "mqtt_port": broker_port,
                   "max_packet_bytes": 2 << 20},
        "sites": [{"id": s, "name": f"Hospital {s}"} for s in spec.sites],
        "aggregators": [{"id": a, "name": f"Aggregator {a}"} for a in spec.aggregators],
    })  # fmt: skip
    provision(federation, root / "provisioned", run_as_user=getpass.getuser())
    roster = load_bundle(root / "provisioned" / "bundles" / spec.leader).roster
    coordinator = load_private_key(root / "provisioned" / "coordinator" / "coordinator.key")
    steward_keys = {}
    (root / "stewards").mkdir(mode=0o700, parents=True, exist_ok=True)
    for site in spec.sites:
        key = generate_signing_key()
        save_private_key(key, root / "stewards" / f"{site}.key")
        steward_keys[site] = key
    manifest = sign_manifest(
        draft_manifest(
            roster,
            public_key_bytes(coordinator),
            {s: [(f"steward-{s}", public_key_bytes(k))] for s, k in steward_keys.items()},
            [spec.study_table()],
        ),
        coordinator,
    )
    prepared = PreparedFederation(root, spec, federation, roster)
    now = dt.datetime.now(dt.UTC)
    for member in (*spec.sites, *spec.aggregators):
        save_manifest(manifest, prepared.bundle(member) / "manifest.toml")
    for site in spec.sites:
        (prepared.bundle(site) / "approvals").mkdir(exist_ok=True)
        approval = approve_study(manifest, spec.study_id, site, steward_keys[site], now)
        save_approval(approval, prepared.bundle(site) / "approvals" / f"{spec.study_id}.json")
    broker = {"host": broker_host, "port": broker_port, "tls": tls}
    for aggregator in spec.aggregators:
        _write_config(prepared.config(aggregator), {
            "aggregator_id": aggregator, "bundle_dir": str(prepared.bundle(aggregator)),
            "study_id": spec.study_id, "state_dir": str(prepared.state(aggregator)),
            "http_port": 0, "broker": broker,
            "round": {"min_participants": spec.min_participants, "clip_norm": spec.clip_norm,
                      **spec.round},
            "strategy": dict(spec.strategy),
        })  # fmt: skip
    for site in spec.sites:
        document: dict[str, Any] = {
            "site_id": site, "bundle_dir": str(prepared.bundle(site)),
            "study_id": spec.study_id, "state_dir": str(prepared.state(site)),
            "http_host": "127.0.0.1", "http_port": 0, "broker": broker,
            "training": dict(spec.training),
        }  # fmt: skip
        if dicom and site in dicom:
            document["dicom_dir"] = str(dicom[site])
        if labels_csv and site in labels_csv:
            document["labels_csv"] = str(labels_csv[site])
        _write_config(prepared.config(site), document)
    return prepared


def _write_config(path: Path, document: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, tomli_w.dumps(dict(document)).encode("utf-8"))


def member_ids(spec: FederationSpec) -> Sequence[str]:
    """Every member, aggregators first."""
    return (*spec.aggregators, *spec.sites)
