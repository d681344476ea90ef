"""Ed25519 signing: envelope signatures, the domain registry, and key files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.crypto.sealing import save_hpke_key
from tessera.crypto.signing import (
    SignatureDomain,
    generate_signing_key,
    key_fingerprint,
    load_private_key,
    load_public_key,
    public_key_bytes,
    save_private_key,
    sign_envelope,
    sign_message,
    verify_envelope,
    verify_message,
)
from tessera.errors import AuthenticationError, ConfigError

KEY = generate_signing_key()
ROOT = Path(__file__).resolve().parents[2]

# The tag bytes as they were first shipped: every signature made so far covers them, so they
# must never change (a new purpose or version gets a new member instead).
SHIPPED_TAGS = {
    "ENVELOPE": b"tessera/envelope-signature/v1\x00",
    "RELEASE": b"tessera/model-release-signature/v1\x00",
    "MANIFEST": b"tessera/federation-manifest/v1\x00",
    "STUDY_APPROVAL": b"tessera/study-approval/v1\x00",
    "PRIVACY_REPORT": b"tessera/privacy-audit-report/v1\x00",
    "ROSTER": b"tessera/roster-signature/v1\x00",
}


def test_valid_signature_verifies_and_returns_nothing() -> None:
    signature = sign_envelope(KEY, b"header", b"payload")
    assert len(signature) == 64
    assert verify_envelope(KEY.public_key(), b"header", b"payload", signature) is None


@settings(max_examples=60)
@given(
    header=st.binary(max_size=40),
    payload=st.binary(max_size=40),
    part=st.sampled_from(["header", "payload", "signature"]),
    bit=st.integers(0, 2**16),
)
def test_any_flipped_bit_raises(header: bytes, payload: bytes, part: str, bit: int) -> None:
    signature = sign_envelope(KEY, header, payload)
    parts = {"header": header, "payload": payload, "signature": signature}
    if not parts[part]:
        parts[part] = b"\x00"  # an added byte is a change too
    else:
        data = bytearray(parts[part])
        index = bit % (len(data) * 8)
        data[index // 8] ^= 1 << (index % 8)
        parts[part] = bytes(data)
    with pytest.raises(AuthenticationError):
        verify_envelope(KEY.public_key(), parts["header"], parts["payload"], parts["signature"])


def test_header_and_payload_boundary_is_unambiguous() -> None:
    signature = sign_envelope(KEY, b"ab", b"c")
    with pytest.raises(AuthenticationError):
        verify_envelope(KEY.public_key(), b"a", b"bc", signature)


def test_wrong_key_raises() -> None:
    signature = sign_envelope(KEY, b"header", b"payload")
    other = generate_signing_key().public_key()
    with pytest.raises(AuthenticationError):
        verify_envelope(other, b"header", b"payload", signature)


def test_registered_tags_are_the_shipped_bytes() -> None:
    assert {domain.name: domain.value for domain in SignatureDomain} == SHIPPED_TAGS


@pytest.mark.parametrize("domain", list(SignatureDomain), ids=lambda d: d.name)
def test_signature_is_ed25519_over_tag_then_message(domain: SignatureDomain) -> None:
    # Ed25519 is deterministic, so equal signatures mean byte-identical signed messages.
    signature = sign_message(KEY, domain, b"message")
    assert signature == KEY.sign(SHIPPED_TAGS[domain.name] + b"message")
    verify_message(KEY.public_key(), domain, b"message", signature)
    verify_message(public_key_bytes(KEY), domain, b"message", signature)  # the manifest's form


def test_every_tag_is_registered_once_and_none_prefixes_another() -> None:
    tags = [domain.value for domain in SignatureDomain]
    assert len(set(tags)) == len(tags)
    for tag in tags:
        assert tag.startswith(b"tessera/") and tag.endswith(b"\x00")
        assert tag.count(b"\x00") == 1
        assert [other for other in tags if other.startswith(tag)] == [tag]


def test_no_module_but_signing_spells_a_signature_tag() -> None:
    # A tag copied into another module would be a second, unchecked registration.
    owners: dict[str, list[str]] = {}
    for package in ("tessera", "node", "aggregator", "broker"):
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            for domain in SignatureDomain:
                if repr(domain.value)[2:-1] in text:
                    owners.setdefault(domain.name, []).append(str(path.relative_to(ROOT)))
    expected = ["tessera/crypto/signing.py"]
    assert owners == {domain.name: expected for domain in SignatureDomain}


@pytest.mark.parametrize("domain", list(SignatureDomain), ids=lambda d: d.name)
def test_signature_for_one_domain_is_refused_in_every_other(domain: SignatureDomain) -> None:
    signature = sign_message(KEY, domain, b"message")
    for other in SignatureDomain:
        if other is not domain:
            with pytest.raises(AuthenticationError):
                verify_message(KEY.public_key(), other, b"message", signature)


def test_unknown_domain_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown signature domain"):
        sign_message(KEY, b"made-up", b"message")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown signature domain"):
        # Even a registered tag's bytes: only the registry's members are accepted.
        sign_message(KEY, SignatureDomain.ENVELOPE.value, b"message")  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", [b"", b"\x00" * 31, b"\x00" * 33])
def test_raw_public_key_of_the_wrong_length_fails_verification(raw: bytes) -> None:
    signature = sign_message(KEY, SignatureDomain.MANIFEST, b"message")
    with pytest.raises(AuthenticationError):
        verify_message(raw, SignatureDomain.MANIFEST, b"message", signature)


@pytest.mark.parametrize("signature", [b"", b"\x00" * 63, b"\x00" * 65, b"\x00" * 64])
def test_malformed_signature_raises(signature: bytes) -> None:
    with pytest.raises(AuthenticationError):
        verify_envelope(KEY.public_key(), b"h", b"p", signature)


def test_saved_key_has_mode_0600_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    old_umask = os.umask(0)  # even a permissive umask must not loosen the key file
    try:
        save_private_key(KEY, path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = load_private_key(path)
    assert public_key_bytes(loaded) == public_key_bytes(KEY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key"]  # no temp file left


def test_overwriting_a_loose_file_leaves_a_0600_file(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(b"old")
    path.chmod(0o644)
    save_private_key(KEY, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_key_bytes(load_private_key(path)) == public_key_bytes(KEY)


def test_group_readable_key_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    save_private_key(KEY, path)
    path.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_private_key(path)


def test_missing_garbage_and_wrong_type_keys_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_private_key(tmp_path / "absent.key")
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"not a key")
    garbage.chmod(0o600)
    with pytest.raises(ConfigError, match="not an unencrypted PEM"):
        load_private_key(garbage)
    hpke = tmp_path / "hpke.key"
    save_hpke_key(X25519PrivateKey.generate(), hpke)
    with pytest.raises(ConfigError, match="not Ed25519"):
        load_private_key(hpke)


def test_public_key_raw_round_trip_and_length_check() -> None:
    raw = public_key_bytes(KEY)
    assert len(raw) == 32
    assert public_key_bytes(load_public_key(raw)) == raw
    with pytest.raises(ConfigError, match="32 raw bytes"):
        load_public_key(raw[:31])


def test_fingerprint_is_stable_and_distinguishes_keys() -> None:
    assert key_fingerprint(KEY) == key_fingerprint(KEY.public_key())
    assert key_fingerprint(KEY) != key_fingerprint(generate_signing_key())
    assert key_fingerprint(KEY).startswith("ed25519:")
