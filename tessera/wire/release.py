"""Model releases: the bundle, its jointly signed header, and verification.

A `ModelRelease` carries a payload, the release bundle: `ReleaseBundle(weights, onnx, card)`
encoded with the codec's framing (type RELEASE_BUNDLE, three u64-length-prefixed parts, no
trailing bytes). The header names each part by hash:

- `model_hash` = SHA-256 of the weights bytes (safetensors). A later `RoundOpen` names its
  base model by this hash;
- `onnx_hash` = SHA-256 of the ONNX export;
- `card_hash` = SHA-256 of the model card bytes (JSON).

Each aggregator signs `release_header_bytes(release)`: every field except the payload bytes
and the signatures, plus the payload's length, under the release signature domain. Because
the bundle's parse is strict, the three hashes determine the payload completely.

Guarantee: `verify_release` returns the bundle only if every aggregator in the given key map
signed this exact header, no one else did, and the payload matches all three hashes.
Otherwise it raises `AuthenticationError`. A caller must never pass keys taken from the
release itself or from one aggregator's word: take them from the federation manifest.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import ClassVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tessera.crypto.signing import (
    SIGNATURE_LENGTH,
    SignatureDomain,
    sign_message,
    verify_message,
)
from tessera.errors import AuthenticationError, CodecError, ConfigError
from tessera.limits import MAX_RELEASE_PAYLOAD_BYTES
from tessera.wire.codec import (
    Bytes,
    MessageType,
    Reader,
    Writer,
    begin,
    check_context,
    check_hash,
    check_uint,
    read_context,
    write_context,
)
from tessera.wire.ids import check_id

MAX_SIGNATURES = 16

# A stored release is a folder of these four files, at the node (node.round.releases) and in
# the aggregator's registry (aggregator.registry): the bundle's three parts, then the signed
# release itself, from which the other three can be checked.
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
CARD_FILE = "card.json"
RELEASE_FILE = "release.bin"


@dataclass(frozen=True)
class ReleaseBundle:
    """What a release ships: the weights (safetensors), the ONNX export, the model card."""

    weights: bytes
    onnx: bytes
    card: bytes

    def to_bytes(self) -> bytes:
        """The payload layout a ModelRelease carries."""
        w = Writer(MessageType.RELEASE_BUNDLE)
        w.blob64(self.weights)
        w.blob64(self.onnx)
        w.blob64(self.card)
        return w.finish()

    @classmethod
    def from_bytes(cls, data: Bytes) -> ReleaseBundle:
        """Decode strictly; CodecError on anything malformed."""
        r = begin(data, cls.__name__, MessageType.RELEASE_BUNDLE)
        limit = r.remaining
        bundle = cls(r.blob64("weights", limit), r.blob64("onnx", limit), r.blob64("card", limit))
        r.done()
        return bundle


@dataclass(frozen=True)
class ModelRelease:
    """A new global model, its lineage, and the aggregators' signatures over its header."""

    federation_id: str
    study_id: str
    round: int
    version: int
    parent_hash: bytes  # model_hash of the base model; 32 zero bytes for the first model
    model_hash: bytes
    onnx_hash: bytes
    card_hash: bytes
    payload: bytes  # ReleaseBundle.to_bytes()
    signatures: tuple[tuple[str, bytes], ...] = ()  # (aggregator id, Ed25519 signature)
    TYPE: ClassVar[MessageType] = MessageType.MODEL_RELEASE

    def __post_init__(self) -> None:
        check_context(self.federation_id, self.study_id, self.round)
        check_uint("version", self.version, 64)
        for name in ("parent_hash", "model_hash", "onnx_hash", "card_hash"):
            check_hash(name, getattr(self, name))
        if not isinstance(self.payload, bytes):
            raise CodecError("payload must be bytes (ReleaseBundle.to_bytes())")
        if not isinstance(self.signatures, tuple) or len(self.signatures) > MAX_SIGNATURES:
            raise CodecError(f"signatures must be a tuple of at most {MAX_SIGNATURES} pairs")
        for pair in self.signatures:
            if (
                not isinstance(pair, tuple)
                or len(pair) != 2
                or not isinstance(pair[1], bytes)
                or len(pair[1]) != SIGNATURE_LENGTH
            ):
                raise CodecError("each signature must be (aggregator id, 64-byte signature)")
            check_id("signer", pair[0])
        signers = [signer for signer, _ in self.signatures]
        if len(set(signers)) != len(signers):
            raise CodecError(f"an aggregator signed twice: {signers}")

    @property
    def sender_id(self) -> str | None:
        return None  # any aggregator may publish it; the joint signatures carry authority

    def _write_header(self, w: Writer) -> None:
        write_context(w, self.federation_id, self.study_id, self.round)
        w.u64(self.version)
        for digest in (self.parent_hash, self.model_hash, self.onnx_hash, self.card_hash):
            w.hash(digest)

    def to_bytes(self) -> bytes:
        """Encode for the wire: header, payload, then the signatures."""
        w = Writer(self.TYPE)
        self._write_header(w)
        w.blob64(self.payload)
        w.u16(len(self.signatures))
        for signer, signature in self.signatures:
            w.id(signer)
            w.raw(signature)  # fixed 64 bytes
        return w.finish()

    @classmethod
    def from_bytes(cls, data: Bytes, max_payload: int = MAX_RELEASE_PAYLOAD_BYTES) -> ModelRelease:
        """Decode strictly; a payload over `max_payload` bytes is refused before it is read."""
        r = begin(data, cls.__name__, cls.TYPE)
        head = (
            *read_context(r), r.u64("version"), r.hash("parent_hash"), r.hash("model_hash"),
            r.hash("onnx_hash"), r.hash("card_hash"),
        )  # fmt: skip
        payload = r.blob64("payload", max_payload)
        signatures = _read_signatures(r)
        r.done()
        return cls(*head, payload, signatures)


def _read_signatures(r: Reader) -> tuple[tuple[str, bytes], ...]:
    count = r.u16("signature count")
    if count > MAX_SIGNATURES:
        raise CodecError(f"ModelRelease carries {count} signatures, over {MAX_SIGNATURES}")
    return tuple((r.id("signer"), r.fixed(SIGNATURE_LENGTH, "signature")) for _ in range(count))


def is_signature_note(release: ModelRelease) -> bool:
    """True for a follower aggregator's signature note on the release topic (empty payload,
    exactly one signature): input to the leader's release, never a release to install."""
    return release.payload == b"" and len(release.signatures) == 1


def release_header_bytes(release: ModelRelease) -> bytes:
    """The bytes each aggregator signs: every field but payload and signatures, plus the
    payload's length."""
    w = Writer(MessageType.RELEASE_HEADER)
    release._write_header(w)
    w.u64(len(release.payload))
    return w.finish()


def build_release(
    federation_id: str,
    study_id: str,
    round_: int,
    version: int,
    parent_hash: bytes,
    bundle: ReleaseBundle,
) -> ModelRelease:
    """An unsigned release whose hashes are computed from `bundle`."""
    return ModelRelease(
        federation_id,
        study_id,
        round_,
        version,
        parent_hash,
        hashlib.sha256(bundle.weights).digest(),
        hashlib.sha256(bundle.onnx).digest(),
        hashlib.sha256(bundle.card).digest(),
        bundle.to_bytes(),
    )


def sign_release(release: ModelRelease, aggregator_id: str, key: Ed25519PrivateKey) -> ModelRelease:
    """Return `release` with `aggregator_id`'s signature over its header added.

    Checks first that the payload matches the header's hashes (AuthenticationError if not).
    Signing vouches for the model: the caller must have checked `model_hash` (and the ONNX
    export) against weights it computed itself, never sign a hash it was only told.
    """
    check_id("aggregator_id", aggregator_id)
    if any(signer == aggregator_id for signer, _ in release.signatures):
        raise ValueError(f"aggregator {aggregator_id!r} has already signed this release")
    _check_payload(release)
    signature = sign_message(key, SignatureDomain.RELEASE, release_header_bytes(release))
    return replace(release, signatures=(*release.signatures, (aggregator_id, signature)))


def verify_release(
    release: ModelRelease, aggregator_keys: Mapping[str, Ed25519PublicKey]
) -> ReleaseBundle:
    """Return the bundle only if every listed aggregator (and no one else) signed the header
    and the payload matches its hashes; raise AuthenticationError otherwise.

    `aggregator_keys` must hold every aggregator of the federation, at least two (the
    trust model: no single aggregator can release a model); ConfigError otherwise.
    """
    if len(aggregator_keys) < 2:
        raise ConfigError(
            f"a release is trusted only when every aggregator signed it, and a federation has "
            f"at least 2; got keys for {len(aggregator_keys)}. Pass all aggregator keys from "
            "the federation manifest"
        )
    signatures = dict(release.signatures)
    if set(signatures) != set(aggregator_keys):
        raise AuthenticationError("release signatures did not verify")
    header = release_header_bytes(release)
    for aggregator_id, public_key in aggregator_keys.items():
        verify_message(public_key, SignatureDomain.RELEASE, header, signatures[aggregator_id])
    return _check_payload(release)


def verify_candidate(
    release: ModelRelease, leader_id: str, leader_key: Ed25519PublicKey
) -> ReleaseBundle:
    """Return the bundle of a candidate model only if the leader alone signed its header and
    the payload matches its hashes; AuthenticationError otherwise.

    A candidate (a study that requires a privacy audit) is what the sites audit before the
    aggregators sign a release. It is never a release: `verify_release` refuses it, and a
    node must not install or serve it.
    """
    if [signer for signer, _ in release.signatures] != [leader_id]:
        raise AuthenticationError("candidate signature did not verify")
    verify_message(
        leader_key, SignatureDomain.RELEASE, release_header_bytes(release), release.signatures[0][1]
    )
    return _check_payload(release)


def _check_payload(release: ModelRelease) -> ReleaseBundle:
    try:
        bundle = ReleaseBundle.from_bytes(release.payload)
    except CodecError:
        raise AuthenticationError("release payload does not match its hashes") from None
    for part, expected in (
        (bundle.weights, release.model_hash),
        (bundle.onnx, release.onnx_hash),
        (bundle.card, release.card_hash),
    ):
        if not hmac.compare_digest(hashlib.sha256(part).digest(), expected):
            raise AuthenticationError("release payload does not match its hashes")
    return bundle
