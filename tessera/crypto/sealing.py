"""HPKE sealing of shares and partial sums (RFC 9180, base mode).

Suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, the combination of RFC 9180
Appendix A.1, through the implementation built into `cryptography`. AES-128-GCM gives the
same ~128-bit level as X25519 and is the fastest of the three AEADs on hardware with AES
instructions. A sealed box is `enc (32 bytes) || ciphertext || tag (16 bytes)`.

Binding: every field of `SealBinding` (purpose, federation, study, round, the hash of the
exact RoundOpen, base model, sender, recipient, ring encoding) goes, length-prefixed in a
fixed order, into HPKE's `info`. `info`
enters the key schedule, so a box opened under any other binding derives a different key and
its tag fails. `cryptography`'s public HPKE API takes no associated data (it seals with an
empty AAD), so the binding lives entirely in `info`; for a single-shot box this binds exactly
as strongly as AAD would.

Guarantees: `open_sealed` returns the plaintext only if the box was sealed to this private
key under an identical binding and not changed since, and otherwise raises
`AuthenticationError`, which says nothing more. Sealing gives confidentiality and integrity
but not sender authentication (anyone can seal to a public key): the envelope signature
supplies that. A caller must never build the binding from the message it is about to open;
build it from its own expected context (its round, its id, its base model).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from tessera.errors import AuthenticationError, ConfigError
from tessera.files import load_private_pem, write_private_file
from tessera.wire.ids import check_id

SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_128_GCM)
ENC_LENGTH = 32
TAG_LENGTH = 16
SEAL_OVERHEAD = ENC_LENGTH + TAG_LENGTH
PUBLIC_KEY_LENGTH = 32
PURPOSES = ("share", "statement", "partial-sum")
_INFO_TAG = b"tessera/seal/v2\x00"  # v2: the announcement hash joined the binding


@dataclass(frozen=True)
class SealBinding:
    """The context a sealed box is bound to; opening under any other context fails."""

    purpose: str  # "share", "statement" (a node's sealed statement) or "partial-sum"
    federation_id: str
    study_id: str
    round: int
    # SHA-256 of the round's RoundOpen bytes (RoundOpen.digest()): a leader that signs two
    # announcements for one round gets shares that fit only the one each node answered.
    announcement_hash: bytes  # 32 bytes
    base_model_hash: bytes  # 32 bytes
    sender_id: str  # node id (share) or aggregator id (partial sum)
    recipient_id: str  # aggregator id
    encoding: bytes  # RingParams.to_bytes()

    def __post_init__(self) -> None:
        if self.purpose not in PURPOSES:
            raise ValueError(f"seal purpose {self.purpose!r} is not one of {PURPOSES}")
        for name in ("federation_id", "study_id", "sender_id", "recipient_id"):
            check_id(name, getattr(self, name))
        if not 0 <= self.round < 2**64:
            raise ValueError(f"round {self.round} is outside 0..2**64-1")
        for name in ("announcement_hash", "base_model_hash"):
            if len(getattr(self, name)) != 32:
                raise ValueError(
                    f"{name} is {len(getattr(self, name))} bytes; pass the raw 32-byte "
                    "SHA-256 digest, not hex"
                )
        if not self.encoding:
            raise ValueError("encoding is empty; pass RingParams.to_bytes()")

    def to_info(self) -> bytes:
        """The canonical HPKE `info`: a tag, then every field length-prefixed in order."""
        parts = [
            self.purpose.encode("ascii"),
            self.federation_id.encode("ascii"),
            self.study_id.encode("ascii"),
            struct.pack(">Q", self.round),
            self.announcement_hash,
            self.base_model_hash,
            self.sender_id.encode("ascii"),
            self.recipient_id.encode("ascii"),
            self.encoding,
        ]
        return _INFO_TAG + b"".join(struct.pack(">I", len(part)) + part for part in parts)


def seal(plaintext: bytes | memoryview, recipient: X25519PublicKey, binding: SealBinding) -> bytes:
    """Encrypt `plaintext` to `recipient` under `binding`, with a fresh ephemeral key.

    A memoryview is sealed without a copy (the node passes `Share.plaintext()`).
    """
    return SUITE.encrypt(plaintext, recipient, info=binding.to_info())


def open_sealed(sealed: bytes, private_key: X25519PrivateKey, binding: SealBinding) -> bytes:
    """Decrypt a box made by `seal`; raise AuthenticationError on any mismatch or change."""
    if len(sealed) < SEAL_OVERHEAD:
        raise AuthenticationError("sealed payload did not open")
    try:
        return SUITE.decrypt(sealed, private_key, info=binding.to_info())
    except (InvalidTag, ValueError):
        raise AuthenticationError("sealed payload did not open") from None


def generate_hpke_key() -> X25519PrivateKey:
    """A fresh X25519 key from the operating system's cryptographic generator."""
    return X25519PrivateKey.generate()


def save_hpke_key(key: X25519PrivateKey, path: str | os.PathLike[str]) -> None:
    """Write the key as unencrypted PKCS#8 PEM, atomically, with mode 0600."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private_file(path, pem)


def load_hpke_key(path: str | os.PathLike[str]) -> X25519PrivateKey:
    """Load a key written by `save_hpke_key`; ConfigError (with the fix) if it is unusable."""
    return load_private_pem(path, "HPKE key", X25519PrivateKey, "X25519")  # type: ignore[type-abstract]


def hpke_public_bytes(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    """The raw 32-byte public key, as the manifest stores it."""
    public = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_hpke_public(raw: bytes) -> X25519PublicKey:
    """Parse a raw 32-byte X25519 public key; ConfigError if it is not one."""
    if len(raw) != PUBLIC_KEY_LENGTH:
        raise ConfigError(
            f"an X25519 public key is {PUBLIC_KEY_LENGTH} raw bytes, got {len(raw)}; "
            "copy the key from the federation manifest unchanged"
        )
    return X25519PublicKey.from_public_bytes(raw)
