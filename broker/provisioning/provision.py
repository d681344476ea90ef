"""`tessera provision`: the federation's PKI, keys, roster, broker config and bundles.

Output layout under OUT::

    coordinator/        0700. Keep offline: whoever holds these can admit members.
      ca.pem, ca.key    the federation CA (key 0600)
      coordinator.key   Ed25519 key that signs the roster (0600)
      certificates.json every client certificate issued, and which are revoked
    roster.json, roster.sig, coordinator.pub (hex)
    broker/             mount into the Mosquitto container at /mosquitto/config
      ca.pem, server.pem, server.key (0600), crl.pem, mosquitto.conf, acl
    bundles/<id>/       one per site and aggregator; see broker.provisioning.bundle for its layout

A second run refuses to touch an existing CA unless ``reuse_ca`` is set; then it keeps
every existing member's keys and certificate, issues only new members, and re-signs the
roster (version + 1), the ACL and every bundle's roster copy. Every run rewrites the CRL
(`broker.provisioning.revocation`): ``reissue`` gives members a new TLS key and certificate
(renewal; their signing and HPKE keys stay, so the manifest stays valid) and revokes the
old ones, ``revoke`` revokes a member's certificates, and a member whose bundle folder was
deleted and issued again has its earlier certificates revoked too.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.errors import ProvisioningError
from broker.provisioning import pki, revocation
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
    reissued: tuple[str, ...] = ()
    revoked: tuple[str, ...] = ()  # members with a certificate revoked by this run
    suspended: tuple[str, ...] = ()  # members of the federation whose certificate is revoked
    expiring: tuple[str, ...] = ()  # members whose certificate expires within 30 days


def provision(
    federation: Federation,
    out: Path,
    *,
    reuse_ca: bool = False,
    broker_files: BrokerFiles | None = None,
    run_as_user: str = "mosquitto",
    revoke: Collection[str] = (),
    reissue: Collection[str] = (),
) -> ProvisionResult:
    """Create or extend a federation's provisioning output in ``out``.

    Raises ProvisioningError rather than replace an existing CA (without ``reuse_ca``), or
    when ``reuse_ca`` is set but there is no CA, or the CA belongs to another federation.
    ``revoke`` and ``reissue`` imply ``reuse_ca``: they act on an existing federation.
    """
    out = Path(out)
    coordinator_dir = out / "coordinator"
    _check_revocations(federation, revoke, reissue)
    reuse_ca = reuse_ca or bool(revoke or reissue)
    has_ca = (coordinator_dir / "ca.pem").exists()
    if has_ca and not reuse_ca:
        raise ProvisioningError(
            f"{coordinator_dir} already holds a federation CA; refusing to replace it, since "
            "every issued certificate depends on it. Pass --reuse-ca to issue new members "
            "under it, or choose an empty --out folder for a new federation."
        )
    if (revoke or reissue) and not has_ca:
        raise ProvisioningError(
            f"--revoke and --reissue act on an existing federation, but {coordinator_dir} "
            "holds no CA: point --out at the federation's provisioning folder"
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
    ledger_path = coordinator_dir / "certificates.json"
    before = revocation.load_ledger(ledger_path) or _ledger_from_bundles(out)
    _check_targets(out, before, revoke, reissue)  # before any certificate is issued

    broker_dir = out / "broker"
    _write_server_certificate(ca, federation, broker_dir)
    atomic_write(broker_dir / "ca.pem", ca_pem)

    issued, kept, renewed, entries = [], [], [], []
    for member in federation.members:
        folder = out / "bundles" / member.id
        if member.id in reissue:
            _renew_tls(ca, member, folder)
            entries.append(_existing_entry(member, folder))
            renewed.append(member.id)
        elif (folder / "client.pem").exists():
            entries.append(_existing_entry(member, folder))
            kept.append(member.id)
        else:
            entries.append(_issue_member(ca, member, folder))
            issued.append(member.id)
    roster = Roster(
        federation.id, federation.leader, (previous.version + 1) if previous else 1, tuple(entries)
    )
    bundles = out / "bundles"
    current = {m.id: _certificate(bundles / m.id / "client.pem") for m in federation.members}
    ledger = _revoke_and_write_crl(ca, before, current, revoke, ledger_path, broker_dir)
    _write_roster(out, federation, roster, coordinator, ca_pem)

    files = broker_files or BrokerFiles()
    atomic_write(broker_dir / "acl", render_acl(federation).encode())
    conf = render_conf(federation, files, run_as_user=run_as_user)
    atomic_write(broker_dir / "mosquitto.conf", conf.encode())
    present = {p.name for p in (out / "bundles").iterdir() if p.is_dir()}
    stale = tuple(sorted(present - {m.id for m in federation.members}))
    return ProvisionResult(
        out,
        tuple(issued),
        tuple(kept),
        stale,
        roster.version,
        reissued=tuple(renewed),
        revoked=tuple(sorted(_newly_revoked(before, ledger))),
        suspended=tuple(m for m, c in current.items() if ledger.is_revoked(c.serial_number)),
        expiring=tuple(
            m for m, c in current.items() if pki.expires_within(c, pki.RENEW_WITHIN_DAYS)
        ),
    )


def _revoke_and_write_crl(
    ca: pki.Issued,
    ledger: revocation.Ledger,
    current: dict[str, x509.Certificate],
    revoke: Collection[str],
    ledger_path: Path,
    broker_dir: Path,
) -> revocation.Ledger:
    """Record the members' current certificates, revoke the ones they no longer hold and
    every one of `revoke`'s, save the record, then write the CRL (in that order: a record
    ahead of the CRL is caught up by the next run)."""
    now = datetime.datetime.now(datetime.UTC)
    for member_id, certificate in current.items():
        ledger = revocation.record(ledger, member_id, certificate)
        ledger = revocation.supersede(ledger, member_id, certificate.serial_number, now)
    for member_id in revoke:
        ledger = revocation.revoke_member(ledger, member_id, now)
    ledger = revocation.Ledger(ledger.certificates, ledger.crl_number + 1)
    revocation.save_ledger(ledger_path, ledger)
    revocation.write_crl(broker_dir / "crl.pem", revocation.build_crl(ca, ledger, now))
    return ledger


def _check_revocations(
    federation: Federation, revoke: Collection[str], reissue: Collection[str]
) -> None:
    both = sorted(set(revoke) & set(reissue))
    if both:
        raise ProvisioningError(
            f"both --revoke and --reissue given for {', '.join(both)}: --reissue alone revokes "
            "the old certificate and issues a new one"
        )
    ids = {m.id for m in federation.members}
    unknown = sorted(set(reissue) - ids)
    if unknown:
        raise ProvisioningError(
            f"cannot --reissue {', '.join(unknown)}: not in the federation file; add it there "
            "first, or --revoke a member that left"
        )


def _check_targets(
    out: Path, ledger: revocation.Ledger, revoke: Collection[str], reissue: Collection[str]
) -> None:
    for member_id in revoke:  # raises for a member that never had a certificate
        revocation.revoke_member(ledger, member_id, datetime.datetime.now(datetime.UTC))
    for member_id in reissue:
        if not (out / "bundles" / member_id / "client.pem").exists():
            raise ProvisioningError(
                f"{member_id} has no certificate in {out / 'bundles' / member_id} to reissue; "
                "run without --reissue to issue it as a new member"
            )


def _write_server_certificate(ca: pki.Issued, federation: Federation, broker_dir: Path) -> None:
    """Issue the broker's certificate when there is none, when the broker's host names
    changed, or when it expires within RENEW_WITHIN_DAYS."""
    names = tuple(dict.fromkeys(SERVER_NAMES + federation.broker.hostnames))
    path = broker_dir / "server.pem"
    if pki.server_names(path) == set(names) and not pki.expires_within(
        _certificate(path), pki.RENEW_WITHIN_DAYS
    ):
        return
    server = pki.issue_leaf(ca, "tessera-broker", None, server_names=names)
    pki.save(server, path, broker_dir / "server.key")


def _renew_tls(ca: pki.Issued, member: Member, folder: Path) -> None:
    """A new TLS key and client certificate for an existing member; its other keys stay."""
    renewed = pki.issue_leaf(ca, member.id, member.name)
    pki.save(renewed, folder / "client.pem", folder / "client.key")


def _certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _ledger_from_bundles(out: Path) -> revocation.Ledger:
    """The record for a folder provisioned before there was one: its current certificates
    (earlier ones are unknown, so they cannot be revoked)."""
    ledger = revocation.Ledger()
    for folder in sorted((out / "bundles").glob("*/client.pem")):
        ledger = revocation.record(ledger, folder.parent.name, _certificate(folder))
    return ledger


def _newly_revoked(before: revocation.Ledger, after: revocation.Ledger) -> set[str]:
    was = {c.serial for c in before.certificates if c.revoked_at}
    return {c.member for c in after.certificates if c.revoked_at and c.serial not in was}


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
    certificate = _certificate(folder / "client.pem")
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
    broker: dict[str, Any] = {
        "hostnames": list(federation.broker.hostnames),
        "mqtt_port": federation.broker.mqtt_port,
        "max_packet_bytes": federation.broker.max_packet_bytes,
    }
    if federation.broker.websockets_port is not None:
        broker["websockets_port"] = federation.broker.websockets_port
    for entry in roster.members:
        folder = out / "bundles" / entry.id
        document = bundle_document(entry.id, entry.role, federation.id, broker, coordinator_public)
        atomic_write(folder / "ca.pem", ca_pem)
        atomic_write(folder / "roster.json", raw)
        atomic_write(folder / "roster.sig", signature)
        atomic_write(folder / "bundle.toml", tomli_w.dumps(document).encode())
