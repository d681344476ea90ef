"""Whether a member's private keys on disk are the ones its roster names: the `keys`
readiness check of both daemons (`/readyz`).

The files are read again on every call, so a key replaced, damaged or unmounted under a
running service shows at the next probe instead of at the next signature. Raises ConfigError
naming the key and the fix; never returns False.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.provisioning.roster import RosterEntry
from broker.session_config import TlsFiles
from tessera.crypto.sealing import hpke_public_bytes, load_hpke_key
from tessera.crypto.signing import load_private_key, public_key_bytes
from tessera.errors import ConfigError

_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def check_member_keys(
    entry: RosterEntry,
    signing_key: Path,
    *,
    hpke_key: Path | None = None,
    tls: TlsFiles | None = None,
) -> None:
    """Raise ConfigError unless the signing key (and, for an aggregator, the HPKE key) load
    and are the roster's public keys for `entry`, and the TLS client key is its
    certificate's."""
    fix = "mount the member's own bundle from `tessera provision`"
    signing = public_key_bytes(load_private_key(signing_key))
    if not hmac.compare_digest(signing, entry.signing_key):
        raise ConfigError(f"signing key {signing_key} is not {entry.id}'s in the roster; {fix}")
    if hpke_key is not None:
        sealing = hpke_public_bytes(load_hpke_key(hpke_key))
        if entry.hpke_key is None or not hmac.compare_digest(sealing, entry.hpke_key):
            raise ConfigError(f"HPKE key {hpke_key} is not {entry.id}'s in the roster; {fix}")
    if tls is not None:
        _check_tls_pair(tls.cert_file, tls.key_file, fix)


def _check_tls_pair(cert_file: Path, key_file: Path, fix: str) -> None:
    try:
        certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise ConfigError(
            f"TLS client certificate {cert_file} or key {key_file} does not load "
            f"({type(error).__name__}); {fix}"
        ) from None
    if key.public_key().public_bytes(*_SPKI) != certificate.public_key().public_bytes(*_SPKI):
        raise ConfigError(f"TLS client key {key_file} is not certificate {cert_file}'s; {fix}")
