"""Ed25519 signatures: the one place that signs and verifies, and the registry of domains.

Every Tessera signature (envelopes, model releases, the federation manifest, study approvals,
privacy-audit reports, the provisioning roster) is made by `sign_message` and checked by
`verify_message` over `domain tag + message`, where the tag is a member of `SignatureDomain`.
So a signature made for one purpose (an envelope) can never be presented as one for another
(a model release, a manifest): every tag is distinct and ends in NUL, so none is a prefix of
another. Envelope signatures cover the header and the SHA-256 of the payload, so a large
payload is hashed once and the signed message stays small.

Guarantees: `verify_*` returns only when the signature is valid for exactly these bytes and
this key, and otherwise raises `AuthenticationError`, which says nothing more on purpose.
There is no boolean form. A caller must never catch `AuthenticationError` and carry on with
the data, and must never choose the public key from the message being verified: keys come
from the federation manifest (or, for the roster, the startup bundle).

Hash and key-derivation tags (`tessera.crypto.sealing`, `sharing`, `flatten`, the study hash
in `tessera.governance.manifest`) are not signature domains and stay beside their one user.
"""

from __future__ import annotations

import hashlib
import os
import struct
from enum import Enum, unique

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tessera.errors import AuthenticationError, ConfigError
from tessera.files import load_private_pem, write_private_file

SIGNATURE_LENGTH = 64
PUBLIC_KEY_LENGTH = 32


@unique
class SignatureDomain(Enum):
    """Every signature domain tag, registered once. The bytes are part of the protocol:
    changing one invalidates every signature made under it, so a new purpose gets a new tag."""

    # Each ends in its only NUL, so no tag is a prefix of another (tests/tessera/test_signing.py).
    ENVELOPE = b"tessera/envelope-signature/v1\x00"  # signed envelopes (tessera.wire.envelopes)
    RELEASE = b"tessera/model-release-signature/v1\x00"  # model releases (tessera.wire.release)
    MANIFEST = b"tessera/federation-manifest/v1\x00"  # the coordinator's federation manifest
    STUDY_APPROVAL = b"tessera/study-approval/v1\x00"  # a data steward's study approval
    PRIVACY_REPORT = b"tessera/privacy-audit-report/v1\x00"  # a site's privacy-audit report
    ROSTER = b"tessera/roster-signature/v1\x00"  # the provisioning roster (broker.provisioning)


Payload = bytes | bytearray | memoryview


def generate_signing_key() -> Ed25519PrivateKey:
    """A fresh Ed25519 key from the operating system's cryptographic generator."""
    return Ed25519PrivateKey.generate()


def save_private_key(key: Ed25519PrivateKey, path: str | os.PathLike[str]) -> None:
    """Write the key as unencrypted PKCS#8 PEM, atomically, with mode 0600.

    The file is protected by its mode only; never put it on a shared or backed-up volume
    that ignores permissions.
    """
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private_file(path, pem)


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load a key written by `save_private_key`.

    Raises ConfigError (with the fix) when the file is missing, readable by group or others,
    not PEM, or not an Ed25519 key.
    """
    return load_private_pem(path, "signing key", Ed25519PrivateKey, "Ed25519")  # type: ignore[type-abstract]


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The raw 32-byte public key, as the manifest stores it."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public_key(raw: bytes) -> Ed25519PublicKey:
    """Parse a raw 32-byte Ed25519 public key; ConfigError if it is not one."""
    if len(raw) != PUBLIC_KEY_LENGTH:
        raise ConfigError(
            f"an Ed25519 public key is {PUBLIC_KEY_LENGTH} raw bytes, got {len(raw)}; "
            "copy the key from the federation manifest unchanged"
        )
    return Ed25519PublicKey.from_public_bytes(raw)


def key_fingerprint(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """A short, stable name for a public key (hex of the first 16 bytes of its SHA-256)."""
    return "ed25519:" + hashlib.sha256(public_key_bytes(key)).hexdigest()[:32]


def sign_message(key: Ed25519PrivateKey, domain: SignatureDomain, message: bytes) -> bytes:
    """Sign `message` under `domain`: Ed25519 over the domain's tag followed by `message`."""
    return key.sign(_tagged(domain, message))


def verify_message(
    public_key: Ed25519PublicKey | bytes,
    domain: SignatureDomain,
    message: bytes,
    signature: bytes,
) -> None:
    """Return only if `signature` is `public_key`'s over `message` under `domain`.

    `public_key` may be the raw 32 bytes the manifest stores; a raw key of any other length
    fails like a bad signature. Raises AuthenticationError otherwise, without saying why.
    """
    tagged = _tagged(domain, message)
    if len(signature) != SIGNATURE_LENGTH:
        raise AuthenticationError("signature did not verify")
    try:
        if not isinstance(public_key, Ed25519PublicKey):
            public_key = Ed25519PublicKey.from_public_bytes(public_key)
        public_key.verify(signature, tagged)
    except (InvalidSignature, ValueError):
        raise AuthenticationError("signature did not verify") from None


def sign_envelope(key: Ed25519PrivateKey, header: bytes, payload: Payload) -> bytes:
    """Sign an envelope: the domain tag, the header, and SHA-256 of the payload."""
    return sign_message(key, SignatureDomain.ENVELOPE, _envelope_digest_input(header, payload))


def verify_envelope(
    public_key: Ed25519PublicKey, header: bytes, payload: Payload, signature: bytes
) -> None:
    """Return only if the envelope signature is valid; raise AuthenticationError otherwise."""
    digest_input = _envelope_digest_input(header, payload)
    verify_message(public_key, SignatureDomain.ENVELOPE, digest_input, signature)


def _envelope_digest_input(header: bytes, payload: Payload) -> bytes:
    # The header is length-prefixed so that no header/payload split is ambiguous.
    return struct.pack(">Q", len(header)) + header + hashlib.sha256(payload).digest()


def _tagged(domain: SignatureDomain, message: bytes) -> bytes:
    # Only registered tags: a bare bytes tag would bypass the prefix-freedom the registry
    # guarantees (tests/tessera/test_signing.py checks it).
    if not isinstance(domain, SignatureDomain):
        raise ValueError(
            f"unknown signature domain {domain!r}; use a member of signing.SignatureDomain"
        )
    return domain.value + message
