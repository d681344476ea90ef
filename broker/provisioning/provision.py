"""`tessera provision`: the federation's PKI, keys, roster, broker config and bundles.

Output layout under OUT::

    coordinator/        0700. Keep offline: whoever holds these can admit members.
      ca.pem, ca.key    the federation CA (key 0600)
      coordinator.key   Ed25519 key that signs the roster (0600)
    roster.json, roster.sig, coordinator.pub (hex)
    broker/             mount into the Mosquitto container at /mosquitto/config
      ca.pem, server.pem, server.key (0600), mosquitto.conf, acl
    bundles/<id>/       one per site and aggregator; see broker.provisioning.bundle for its layout

A second run refuses to touch an existing CA unless ``reuse_ca`` is set; then it keeps
every existing member's keys and certificate, issues only new members, and re-signs the
roster (version + 1), the ACL and every bundle's roster copy.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.errors import ProvisioningError
from broker.provisioning import pki
from broker.provisioning.bundle import bundle_document
from broker.provisioning.federation import Federation, Member
from broker.provisioning.mosquitto_conf import BrokerFiles, render_acl, render_conf
from broker.provisioning.roster import Roster, RosterEntry, sign_roster
from tessera.crypto.sealing import (
    generate_hpke_key,
    hpke_public_bytes,
    load_hpke_key,
    save_hpke_key,
)
from tessera.crypto.signing import (
    generate_signing_key,
    load_private_key,
    public_key_bytes,
    save_private_key,
)
from tessera.errors import ConfigError
from tessera.files import atomic_write

SERVER_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class ProvisionResult:
    """What a provisioning run did."""

    out: Path
    issued: tuple[str, ...]
    kept: tuple[str, ...]
    not_in_federation: tuple[str, ...]
    roster_version: int


def provision(
    federation: Federation,
    out: Path,
    *,
    reuse_ca: bool = False,
    broker_files: BrokerFiles | None = None,
    run_as_user: str = "mosquitto",
) -> ProvisionResult:
    """Create or extend a federation's provisioning output in ``out``.

    Raises ProvisioningError rather than replace an existing CA (without ``reuse_ca``), or
    when ``reuse_ca`` is set but there is no CA, or the CA belongs to another federation.
    """
    out = Path(out)
    coordinator_dir = out / "coordinator"
    has_ca = (coordinator_dir / "ca.pem").exists()
    if has_ca and not reuse_ca:
        raise ProvisioningError(
            f"{coordinator_dir} already holds a federation CA; refusing to replace it, since "
            "every issued certificate depends on it. Pass --reuse-ca to issue new members "
            "under it, or choose an empty --out folder for a new federation."
        )
    if reuse_ca and not has_ca:
        raise ProvisioningError(f"--reuse-ca given but {coordinator_dir} holds no CA")
    previous = _previous_roster(out, federation) if has_ca else None
    out.mkdir(parents=True, exist_ok=True)
    for folder in (coordinator_dir, out / "broker", out / "bundles"):
        folder.mkdir(mode=0o700 if folder == coordinator_dir else 0o755, exist_ok=True)
    os.chmod(coordinator_dir, 0o700)
    if has_ca:
        ca = pki.load(coordinator_dir / "ca.pem", coordinator_dir / "ca.key")
        coordinator = load_private_key(coordinator_dir / "coordinator.key")
    else:
        ca = pki.create_ca(federation.id)
        pki.save(ca, coordinator_dir / "ca.pem", coordinator_dir / "ca.key")
        coordinator = generate_signing_key()
        save_private_key(coordinator, coordinator_dir / "coordinator.key")
    ca_pem = pki.certificate_pem(ca.certificate)

    broker_dir = out / "broker"
    names = tuple(dict.fromkeys(SERVER_NAMES + federation.broker.hostnames))
    if pki.server_names(broker_dir / "server.pem") != set(names):
        # New, or the broker's host names changed: issue a server certificate that covers them.
        server = pki.issue_leaf(ca, "tessera-broker", None, server_names=names)
        pki.save(server, broker_dir / "server.pem", broker_dir / "server.key")
    atomic_write(broker_dir / "ca.pem", ca_pem)

    issued, kept, entries = [], [], []
    for member in federation.members:
        folder = out / "bundles" / member.id
        if (folder / "client.pem").exists():
            entries.append(_existing_entry(member, folder))
            kept.append(member.id)
        else:
            entries.append(_issue_member(ca, member, folder))
            issued.append(member.id)
    roster = Roster(
        federation.id, federation.leader, (previous.version + 1) if previous else 1, tuple(entries)
    )
    _write_roster(out, federation, roster, coordinator, ca_pem)

    files = broker_files or BrokerFiles()
    atomic_write(broker_dir / "acl", render_acl(federation).encode())
    conf = render_conf(federation, files, run_as_user=run_as_user)
    atomic_write(broker_dir / "mosquitto.conf", conf.encode())
    present = {p.name for p in (out / "bundles").iterdir() if p.is_dir()}
    stale = tuple(sorted(present - {m.id for m in federation.members}))
    return ProvisionResult(out, tuple(issued), tuple(kept), stale, roster.version)


def _issue_member(ca: pki.Issued, member: Member, folder: Path) -> RosterEntry:
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    client = pki.issue_leaf(ca, member.id, member.name)
    signing = generate_signing_key()
    save_private_key(signing, folder / "signing.key")
    hpke = None
    if member.role == "aggregator":
        hpke_key = generate_hpke_key()
        save_hpke_key(hpke_key, folder / "hpke.key")
        hpke = hpke_public_bytes(hpke_key)
    # The certificate is written last: its presence marks a complete member folder.
    pki.save(client, folder / "client.pem", folder / "client.key")
    return RosterEntry(
        member.id,
        member.role,
        member.name,
        public_key_bytes(signing),
        hpke,
        _cert_hash(client.certificate),
    )


def _existing_entry(member: Member, folder: Path) -> RosterEntry:
    certificate = x509.load_pem_x509_certificate((folder / "client.pem").read_bytes())
    signing = load_private_key(folder / "signing.key")
    hpke = None
    if member.role == "aggregator":
        if not (folder / "hpke.key").exists():
            raise ProvisioningError(
                f"{folder} has no hpke.key but {member.id} is an aggregator; a member cannot "
                "change role: give it a new id"
            )
        hpke = hpke_public_bytes(load_hpke_key(folder / "hpke.key"))
    return RosterEntry(
        member.id,
        member.role,
        member.name,
        public_key_bytes(signing),
        hpke,
        _cert_hash(certificate),
    )


def _cert_hash(certificate: x509.Certificate) -> bytes:
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).digest()


def _previous_roster(out: Path, federation: Federation) -> Roster | None:
    path = out / "roster.json"
    if not path.exists():
        return None
    try:
        roster = Roster.from_bytes(path.read_bytes())
    except ConfigError as error:
        raise ProvisioningError(f"{path}: {error}") from None
    if roster.federation_id != federation.id:
        raise ProvisioningError(
            f"{out} belongs to federation {roster.federation_id!r}, not {federation.id!r}; "
            "use a separate --out folder per federation"
        )
    return roster


def _write_roster(
    out: Path, federation: Federation, roster: Roster, coordinator: Ed25519PrivateKey, ca_pem: bytes
) -> None:
    raw, signature = roster.to_bytes(), sign_roster(roster, coordinator)
    coordinator_public = public_key_bytes(coordinator)
    atomic_write(out / "roster.json", raw)
    atomic_write(out / "roster.sig", signature)
    atomic_write(out / "coordinator.pub", coordinator_public.hex().encode() + b"\n")
    broker = {
        "hostnames": list(federation.broker.hostnames),
        "mqtt_port": federation.broker.mqtt_port,
        "websockets_port": federation.broker.websockets_port,
        "max_packet_bytes": federation.broker.max_packet_bytes,
    }
    for entry in roster.members:
        folder = out / "bundles" / entry.id
        document = bundle_document(entry.id, entry.role, federation.id, broker, coordinator_public)
        atomic_write(folder / "ca.pem", ca_pem)
        atomic_write(folder / "roster.json", raw)
        atomic_write(folder / "roster.sig", signature)
        atomic_write(folder / "bundle.toml", tomli_w.dumps(document).encode())
