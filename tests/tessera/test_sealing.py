"""HPKE sealing: the RFC 9180 suite, the binding, tampering and key files.

Known answers. `cryptography`'s public HPKE API seals single-shot with an empty AAD, while
every RFC 9180 Appendix A vector uses a non-empty AAD ("Count-0", ...). So the RFC vector
(A.1.1, sequence 0) is checked through the library's underscore-prefixed
`_decrypt_with_aad` hook, which runs the same suite object; that test proves our SUITE is the
RFC's DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM. Our own layer (the binding's
`info` encoding) is pinned by a recorded vector: a box sealed once by `seal` under a fixed
key and binding, which must keep opening. Changing the info layout breaks it, on purpose.
"""

from __future__ import annotations

import dataclasses
import hashlib
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.bindings._rust import openssl as rust_openssl
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.crypto.sealing import (
    SEAL_OVERHEAD,
    SUITE,
    SealBinding,
    generate_hpke_key,
    hpke_public_bytes,
    load_hpke_key,
    load_hpke_public,
    open_sealed,
    save_hpke_key,
    seal,
)
from tessera.errors import AuthenticationError, ConfigError

RFC_A1 = {
    "skRm": "4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8",
    "pkRm": "3948cfe0ad1ddb695d780e59077195da6c56506b027329794ab02bca80815c4d",
    "enc": "37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431",
    "info": "4f6465206f6e2061204772656369616e2055726e",
    "aad": "436f756e742d30",
    "pt": "4265617574792069732074727574682c20747275746820626561757479",
    "ct": "f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a9"
    "6d8770ac83d07bea87e13c512a",
}

RECORDED_KEY = hashlib.sha256(b"tessera recorded vector recipient").digest()
# Recorded with seal v2 (the announcement hash joined the binding, issue #18).
RECORDED_BOX = bytes.fromhex(
    "3cea43e22ae071a3d392fa884a18a839fa534fdb5c54dcebbd506d31f021af6d281a9a234d7ab73a709c8fa1"
    "bb7b08f0e614ba3dfbee94b27c32f5868719a0328595036a806a25"
)
RECORDED_INFO = bytes.fromhex(
    "746573736572612f7365616c2f763200000000057368617265000000056665642d310000000773747564792d"
    "3100000008000000000000000700000020b1ea3a82dee1b3725db68627d87824189d47eeefc8d85e89cfce5a"
    "f7e23e94a10000002050629b5db748be1071182bea955872390498f78a016a2d19252f3a72e897dc1c000000"
    "066e6f64652d61000000056167672d310000000e20104059000000000000000003e8"
)

BINDING = SealBinding(
    purpose="share",
    federation_id="fed-1",
    study_id="study-1",
    round=7,
    announcement_hash=hashlib.sha256(b"round open").digest(),
    base_model_hash=hashlib.sha256(b"base model").digest(),
    sender_id="node-a",
    recipient_id="agg-1",
    encoding=bytes.fromhex("20104059000000000000000003e8"),
)
KEY = generate_hpke_key()


def test_suite_matches_rfc9180_a1_known_answer() -> None:
    vector = {name: bytes.fromhex(value) for name, value in RFC_A1.items()}
    recipient = X25519PrivateKey.from_private_bytes(vector["skRm"])
    assert hpke_public_bytes(recipient) == vector["pkRm"]
    plaintext = rust_openssl.hpke._decrypt_with_aad(
        SUITE, vector["enc"] + vector["ct"], recipient, info=vector["info"], aad=vector["aad"]
    )
    assert plaintext == vector["pt"]


def test_recorded_vector_still_opens() -> None:
    recipient = X25519PrivateKey.from_private_bytes(RECORDED_KEY)
    assert BINDING.to_info() == RECORDED_INFO
    assert open_sealed(RECORDED_BOX, recipient, BINDING) == b"tessera share plaintext"


@settings(max_examples=40)
@given(plaintext=st.binary(max_size=2000))
def test_seal_then_open_round_trips(plaintext: bytes) -> None:
    sealed = seal(plaintext, KEY.public_key(), BINDING)
    assert len(sealed) == len(plaintext) + SEAL_OVERHEAD
    assert open_sealed(sealed, KEY, BINDING) == plaintext


def test_each_seal_uses_a_fresh_ephemeral_key() -> None:
    assert seal(b"same", KEY.public_key(), BINDING) != seal(b"same", KEY.public_key(), BINDING)


CHANGED_FIELDS = {
    "purpose": "partial-sum",
    "federation_id": "fed-2",
    "study_id": "study-2",
    "round": 8,
    "announcement_hash": hashlib.sha256(b"the other round open").digest(),
    "base_model_hash": hashlib.sha256(b"other model").digest(),
    "sender_id": "node-b",
    "recipient_id": "agg-2",
    "encoding": bytes.fromhex("40104059000000000000000003e8"),
}


def test_every_binding_field_is_covered() -> None:
    names = {field.name for field in dataclasses.fields(SealBinding)}
    assert names == set(CHANGED_FIELDS)


@pytest.mark.parametrize("field", sorted(CHANGED_FIELDS))
def test_changing_any_binding_field_makes_opening_fail(field: str) -> None:
    sealed = seal(b"share bytes", KEY.public_key(), BINDING)
    other = dataclasses.replace(BINDING, **{field: CHANGED_FIELDS[field]})
    with pytest.raises(AuthenticationError):
        open_sealed(sealed, KEY, other)


def test_field_boundaries_cannot_be_shifted() -> None:
    # "fed-1" + "study-1" must not equal "fed-1s" + "tudy-1": fields are length-prefixed.
    shifted = dataclasses.replace(BINDING, federation_id="fed-1s", study_id="tudy-1")
    assert shifted.to_info() != BINDING.to_info()


def test_wrong_private_key_fails() -> None:
    sealed = seal(b"share bytes", KEY.public_key(), BINDING)
    with pytest.raises(AuthenticationError):
        open_sealed(sealed, generate_hpke_key(), BINDING)


def test_every_single_bit_flip_is_rejected() -> None:
    sealed = seal(b"0123456789", KEY.public_key(), BINDING)
    for bit in range(len(sealed) * 8):
        tampered = bytearray(sealed)
        tampered[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(AuthenticationError):
            open_sealed(bytes(tampered), KEY, BINDING)


@pytest.mark.parametrize("cut", [0, 1, 31, 32, 47, 48, 57])
def test_truncated_or_extended_boxes_are_rejected(cut: int) -> None:
    sealed = seal(b"0123456789", KEY.public_key(), BINDING)
    with pytest.raises(AuthenticationError):
        open_sealed(sealed[:cut], KEY, BINDING)
    with pytest.raises(AuthenticationError):
        open_sealed(sealed + b"\x00", KEY, BINDING)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("purpose", "model", "purpose"),
        ("base_model_hash", b"\x00" * 31, "32-byte"),
        ("round", -1, "round"),
        ("sender_id", "node a", "not a valid id"),
        ("encoding", b"", "encoding"),
    ],
)
def test_invalid_bindings_are_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(BINDING, **{field: value})


def test_hpke_key_file_is_0600_and_loads(tmp_path: Path) -> None:
    path = tmp_path / "agg.hpke"
    save_hpke_key(KEY, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert hpke_public_bytes(load_hpke_key(path)) == hpke_public_bytes(KEY)
    path.chmod(0o604)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_hpke_key(path)


def test_public_key_raw_round_trip_and_length_check() -> None:
    raw = hpke_public_bytes(KEY)
    assert hpke_public_bytes(load_hpke_public(raw)) == raw
    with pytest.raises(ConfigError, match="32 raw bytes"):
        load_hpke_public(raw + b"\x00")
