"""X.509 for the federation: the CA, the broker's server certificate, client certificates.

TLS keys are ECDSA P-256 (what every Mosquitto/OpenSSL build and Python's ssl accept);
the end-to-end signing keys are Ed25519 and live in tessera.crypto.signing. A client certificate's
common name is the member id, which Mosquitto takes as the MQTT username
(use_identity_as_username) and client id (use_username_as_clientid), so the ACL can name it
and no member can use another's session.

Leaf certificates (members and broker) last LEAF_DAYS = 397 days: a yearly renewal with a
month to spare, the longest lifetime public TLS certificates may have (CA/Browser Forum,
398 days). Renewal is a manual step of the offline coordinator (`tessera provision
--reissue MEMBER`; the broker's certificate renews itself on any run within
RENEW_WITHIN_DAYS of its expiry), so a much shorter lifetime would mostly buy outages;
compromise is handled by revocation (`broker.provisioning.revocation`), and the lifetime
bounds only what revocation cannot reach.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.errors import ProvisioningError
from tessera.files import atomic_write, read_private_file, write_private_file

CA_DAYS = 3650
LEAF_DAYS = 397
RENEW_WITHIN_DAYS = 30  # members are told, the broker renewed, this close to expiry
MAX_NAME_LENGTH = 64


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str, organisation: str | None = None) -> x509.Name:
    for label, value in (("common name", common_name), ("organisation name", organisation)):
        if value is not None and len(value) > MAX_NAME_LENGTH:
            raise ProvisioningError(
                f"{label} {value!r} is {len(value)} characters; a certificate holds at most "
                f"{MAX_NAME_LENGTH} there (RFC 5280). Shorten it in FEDERATION.toml."
            )
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organisation:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation))
    return x509.Name(attributes)


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    # Backdated an hour so a member whose clock runs slightly behind still accepts it.
    now = datetime.datetime.now(datetime.UTC)
    return now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)


def create_ca(federation_id: str) -> Issued:
    """A self-signed CA for one federation, allowed to sign leaf certificates only."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"Tessera federation CA {federation_id}"[:MAX_NAME_LENGTH])
    start, end = _validity(CA_DAYS)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(certificate, key)


def issue_leaf(
    ca: Issued, common_name: str, organisation: str | None, *, server_names: tuple[str, ...] = ()
) -> Issued:
    """A leaf certificate: TLS server when ``server_names`` is given, else TLS client."""
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(LEAF_DAYS)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name, organisation))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if server_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in server_names]), critical=False
        )
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def _general_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def server_names(cert_path: Path) -> set[str] | None:
    """The DNS names and IP addresses a certificate on disk covers; None if there is none."""
    if not Path(cert_path).exists():
        return None
    certificate = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    dns = names.get_values_for_type(x509.DNSName)
    return set(dns) | {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}


def expires_within(certificate: x509.Certificate, days: int) -> bool:
    """Whether `certificate` expires less than `days` days from now."""
    remaining = certificate.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    return remaining < datetime.timedelta(days=days)


def certificate_pem(certificate: x509.Certificate) -> bytes:
    """PEM bytes of a certificate."""
    return certificate.public_bytes(serialization.Encoding.PEM)


def save(issued: Issued, cert_path: Path, key_path: Path) -> None:
    """Write the key (0600), then the certificate (0644), each atomically: a certificate on
    disk marks a complete pair."""
    key_pem = issued.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private_file(key_path, key_pem)
    atomic_write(cert_path, certificate_pem(issued.certificate))


def load(cert_path: Path, key_path: Path) -> Issued:
    """Load a certificate and key written by ``save``; ProvisioningError if unusable."""
    try:
        certificate = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        key = serialization.load_pem_private_key(read_private_file(key_path, "CA key"), None)
    except (OSError, ValueError) as error:
        raise ProvisioningError(f"cannot load {cert_path} / {key_path}: {error}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ProvisioningError(f"{key_path} is not an EC private key")
    return Issued(certificate, key)
