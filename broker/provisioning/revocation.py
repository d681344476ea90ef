"""Certificate revocation: the coordinator's record of issued client certificates, and the
CRL the broker checks them against.

    coordinator/certificates.json   every client certificate provisioning issued: member,
                                    serial, expiry, and when and why it was revoked
    broker/crl.pem                  the revocation list, signed by the federation CA
                                    (Mosquitto's ``crlfile``), rewritten on every run

A member's earlier certificates are revoked (reason superseded) as soon as provisioning sees
it holding another, however it got there: ``--reissue``, or its bundle folder deleted and
provisioned again. ``--revoke`` revokes every certificate a member holds. The record is
reconciled with the bundles on every run, so a run killed between writing a certificate
and writing the record catches up on the next one.

The CRL's nextUpdate is the CA's expiry: a CRL past its nextUpdate makes OpenSSL refuse
every client, and nobody re-signs this one on a schedule. Expired certificates leave it.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from broker.errors import ProvisioningError
from broker.provisioning.pki import Issued
from tessera.files import atomic_write

LEDGER_FORMAT = 1
SUPERSEDED = "superseded"  # replaced by a newer certificate for the same member
REVOKED = "revoked"  # revoked by the coordinator (`--revoke`)


@dataclass(frozen=True)
class IssuedCertificate:
    """One client certificate provisioning issued, and whether it is revoked."""

    member: str
    serial: int
    not_after: datetime.datetime
    revoked_at: datetime.datetime | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Ledger:
    """Every client certificate issued in a federation, and the last CRL's number."""

    certificates: tuple[IssuedCertificate, ...] = ()
    crl_number: int = 0

    def revoked(self, now: datetime.datetime) -> tuple[IssuedCertificate, ...]:
        """The revoked certificates that have not expired yet (what the CRL must list)."""
        return tuple(c for c in self.certificates if c.revoked_at and c.not_after > now)

    def is_revoked(self, serial: int) -> bool:
        """Whether the certificate with this serial number is revoked."""
        return any(c.serial == serial and c.revoked_at for c in self.certificates)

    def members(self) -> set[str]:
        """Every member a certificate was ever issued to."""
        return {c.member for c in self.certificates}


def record(ledger: Ledger, member: str, certificate: x509.Certificate) -> Ledger:
    """`ledger` with `certificate` (member's current one) added if it is not there yet."""
    if any(c.serial == certificate.serial_number for c in ledger.certificates):
        return ledger
    entry = IssuedCertificate(member, certificate.serial_number, certificate.not_valid_after_utc)
    return replace(ledger, certificates=(*ledger.certificates, entry))


def supersede(ledger: Ledger, member: str, current: int, now: datetime.datetime) -> Ledger:
    """Revoke every certificate of `member` but the one with serial `current`."""
    return _revoke(ledger, lambda c: c.member == member and c.serial != current, now, SUPERSEDED)


def revoke_member(ledger: Ledger, member: str, now: datetime.datetime) -> Ledger:
    """Revoke every certificate `member` holds; ProvisioningError if it never had one."""
    if member not in ledger.members():
        known = ", ".join(sorted(ledger.members()))
        raise ProvisioningError(
            f"no certificate was ever issued to {member!r} here; give one of: {known}"
        )
    return _revoke(ledger, lambda c: c.member == member, now, REVOKED)


def _revoke(
    ledger: Ledger, which: Callable[[IssuedCertificate], bool], now: datetime.datetime, reason: str
) -> Ledger:
    certificates = tuple(
        replace(c, revoked_at=now, reason=reason) if which(c) and not c.revoked_at else c
        for c in ledger.certificates
    )
    return replace(ledger, certificates=certificates)


def build_crl(ca: Issued, ledger: Ledger, now: datetime.datetime) -> x509.CertificateRevocationList:
    """The CRL of `ledger`'s unexpired revoked certificates, numbered ``ledger.crl_number``."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(now - datetime.timedelta(hours=1))  # a broker clock slightly behind
        .next_update(ca.certificate.not_valid_after_utc)
        .add_extension(x509.CRLNumber(ledger.crl_number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    for entry in ledger.revoked(now):
        revoked = (
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at or now)
        )
        if entry.reason == SUPERSEDED:
            revoked = revoked.add_extension(
                x509.CRLReason(x509.ReasonFlags.superseded), critical=False
            )
        builder = builder.add_revoked_certificate(revoked.build())
    return builder.sign(ca.key, hashes.SHA256())


def write_crl(path: Path, crl: x509.CertificateRevocationList) -> None:
    """Write the CRL as PEM, atomically, readable by the broker (0644: it holds no secret)."""
    atomic_write(path, crl.public_bytes(serialization.Encoding.PEM))


def load_ledger(path: Path) -> Ledger | None:
    """The ledger at `path`; None if there is none yet; ProvisioningError if unreadable."""
    if not Path(path).exists():
        return None
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
        if document.get("format") != LEDGER_FORMAT:
            raise ValueError(f"format {document.get('format')!r}, expected {LEDGER_FORMAT}")
        certificates = tuple(
            IssuedCertificate(
                str(c["member"]),
                int(c["serial"], 16),
                datetime.datetime.fromisoformat(c["not_after"]),
                datetime.datetime.fromisoformat(c["revoked_at"]) if c["revoked_at"] else None,
                c["reason"],
            )
            for c in document["certificates"]
        )
        return Ledger(certificates, int(document["crl_number"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ProvisioningError(
            f"{path} is not a readable certificate record ({error}); restore it from the "
            "coordinator's backup: without it, earlier certificates cannot be revoked"
        ) from None


def save_ledger(path: Path, ledger: Ledger) -> None:
    """Write the ledger atomically (0600, in the coordinator's private folder)."""
    document = {
        "format": LEDGER_FORMAT,
        "crl_number": ledger.crl_number,
        "certificates": [
            {
                "member": c.member,
                "serial": f"{c.serial:x}",
                "not_after": c.not_after.isoformat(),
                "revoked_at": c.revoked_at.isoformat() if c.revoked_at else None,
                "reason": c.reason,
            }
            for c in ledger.certificates
        ],
    }
    atomic_write(path, json.dumps(document, indent=1).encode() + b"\n", mode=0o600)
